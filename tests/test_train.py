"""Trainer: schedules, parameter groups, chunked loss, exact resume, crash safety, non-finite steps."""

import contextlib
import copy
import itertools
import json
import math

import pytest
import torch

from polyglu import PolychromaticLM
from polyglu.config import ConfigError, ModelConfig, RunConfig
from polyglu.data.special_tokens import IGNORE_INDEX
from polyglu.train import checkpointing as ckpt
from polyglu.train.loss import chunked_cross_entropy_sum
from polyglu.train.optim import parameter_groups
from polyglu.train.schedules import lr_at, tau_at
from polyglu.train.trainer import Trainer, TrainingError


class RandomTokens:
    """A deterministic batch source: a pure function of (step, micro_step)."""

    def __init__(self, vocab, batch_size, seq_len, seed=0):
        self.vocab, self.batch_size, self.seq_len, self.seed = vocab, batch_size, seq_len, seed

    def get_batch(self, step, micro_step=0):
        g = torch.Generator().manual_seed(self.seed * 100_000 + step * 100 + micro_step)
        # a learnable pattern: next token = (token + 1) % vocab, with random starts
        start = torch.randint(0, self.vocab, (self.batch_size, 1), generator=g)
        ids = (start + torch.arange(self.seq_len + 1)) % self.vocab
        doc_ids = torch.zeros(self.batch_size, self.seq_len, dtype=torch.long)
        doc_ids[:, self.seq_len // 2:] = 1
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "doc_ids": doc_ids}


def _config(run_dir, **train):
    train = {"max_steps": 6, "batch_size": 2, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 3,
             "eval_batches": 2, "checkpoint_every": 3, "progress": False, "routing_stats_every": 2, **train}
    return RunConfig.load(None, [f"run_dir={run_dir}"], model={
        "preset": "debug", "vocab_size": 64, "d_model": 32, "d_ff": 48, "n_heads": 4, "n_kv_heads": 2,
        "head_dim": 8, "max_seq_len": 32, "gate_hidden": 8}, train=train)


def _trainer(config, seed=0):
    torch.manual_seed(seed)
    model = PolychromaticLM(config.model_config())
    data = RandomTokens(64, config.train.batch_size, 16)
    return Trainer(config, model, data, RandomTokens(64, 2, 16, seed=1), log=lambda *a: None)


def test_building_a_model_never_changes_its_config():
    from polyglu.train.setup import build_model

    preset = RunConfig.load(None, ["train.seed=3"])  # {"preset": "debug"}: the vocabulary follows the tokenizer
    named = RunConfig.load(None, ["model.vocab_size=384", "model.n_layers=1"])
    for run, vocab in ((preset, 300), (named, 300), (preset, None)):
        before, model_before = copy.deepcopy(run), run.model_config()
        model, built_from = build_model(run, vocab)
        assert run == before and run.model == before.model and run.model_config() == model_before
        assert model.config == built_from.model_config()
    assert build_model(named, 300)[1] is named and build_model(preset, None)[1] is preset  # nothing to size
    model, built_from = build_model(preset, 300)  # sized to the tokenizer (rounded up to 64) in a new config
    assert "vocab_size" not in preset.model and built_from.model["vocab_size"] == model.config.vocab_size == 320
    assert {k: v for k, v in built_from.to_dict().items() if k != "model"} == \
        {k: v for k, v in preset.to_dict().items() if k != "model"}
    model_config = ModelConfig.from_preset("debug")
    kept = copy.deepcopy(model_config)
    assert PolychromaticLM(model_config).config == kept and model_config == kept


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_schedules():
    assert lr_at(0, 1e-4, 2000, 19531) == pytest.approx(1e-4 / 2000)
    assert lr_at(1999, 1e-4, 2000, 19531) == pytest.approx(1e-4)
    assert lr_at(19531, 1e-4, 2000, 19531, min_ratio=0.1) == pytest.approx(1e-5)
    mid = (2000 + 19531) // 2
    assert lr_at(mid, 1e-4, 2000, 19531, min_ratio=0.0) == pytest.approx(5e-5, rel=1e-3)
    assert tau_at(0, 1.0, 0.1, 101) == 1.0 and tau_at(100, 1.0, 0.1, 101) == pytest.approx(0.1)
    assert tau_at(50, 1.0, 0.1, 101) == pytest.approx(0.55)
    assert tau_at(70, 2.0, 0.1, 101, "constant") == 2.0


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("warmup,total", [(2, 6), (3, 10), (0, 5), (1, 2), (10, 1000)])
def test_lr_schedule_reaches_peak_once_and_ends_at_min(kind, warmup, total):
    peak, ratio = 3e-3, 0.1
    lrs = [lr_at(step, peak, warmup, total, ratio, kind) for step in range(total)]  # steps 0..total-1
    assert sum(lr == pytest.approx(peak, rel=1e-12) for lr in lrs) == 1  # the peak exactly once
    top = lrs.index(max(lrs))
    assert top == max(warmup - 1, 0)  # the last warm-up step (step 0 with no warm-up)
    assert all(a < b for a, b in zip(lrs[:top], lrs[1:top + 1]))  # strictly up, then strictly down
    assert all(a > b for a, b in zip(lrs[top:], lrs[top + 1:]))
    assert lrs[-1] == pytest.approx(ratio * peak, rel=1e-12)  # the last step trains at min_lr
    assert lr_at(total + 5, peak, warmup, total, ratio, kind) == pytest.approx(ratio * peak)


def test_lr_schedule_constant_and_warmup_longer_than_run():
    assert [lr_at(s, 1.0, 2, 5, 0.1, "constant") for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    # a warm-up longer than the run never finishes warming up (no decay to apply)
    assert [lr_at(s, 1.0, 8, 4, 0.1) for s in range(4)] == pytest.approx([1 / 8, 2 / 8, 3 / 8, 4 / 8])


def test_trainer_logs_the_schedule_peak_once_and_min_lr_last(tmp_path):
    config = _config(tmp_path / "run", max_steps=6, warmup_steps=2, checkpoint_every=100, eval_every=100)
    _trainer(config).fit()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert lrs.count(max(lrs)) == 1 and max(lrs) == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(3e-3 * config.train.min_lr_ratio)


def test_weight_decay_groups_list_every_parameter(tiny_config):
    model = PolychromaticLM(tiny_config)
    decay, no_decay = parameter_groups(model, 0.1)
    names = set(decay["names"]) | set(no_decay["names"])
    assert names == {n for n, _ in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for name in no_decay["names"]:
        assert name.endswith(("alpha", "beta", "bias", "norm.weight")), name
    for name in decay["names"]:
        assert name.endswith(("proj.weight", "embed_tokens.weight", "gate_net.0.weight", "gate_net.2.weight")), name
    assert "layers.0.ffn.alpha" in no_decay["names"] and "layers.1.ffn.beta" in no_decay["names"]


def test_the_cpu_optimizer_is_fused_where_torch_has_it_and_updates_as_the_loop_does(tiny_config, tmp_path):
    """build_optimizer fuses AdamW on the CPU (torch >= 2.4): the same update as torch's per-tensor
    loop over the same groups, and a CPU trainer still reads a step's finiteness on the host."""
    from polyglu.train.optim import build_optimizer, fused_on

    torch.manual_seed(0)
    model = PolychromaticLM(tiny_config)
    twin = PolychromaticLM(tiny_config)
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8)
    loop = torch.optim.AdamW(parameter_groups(twin, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    assert bool(fused.defaults.get("fused")) == fused_on("cpu")
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert fused.defaults["fused"]
    tokens = torch.randint(tiny_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m, opt in ((model, fused), (twin, loop)):
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(2)  # the same Gumbel draws in both
            logits = m(tokens[:, :-1]).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    trainer = _trainer(_config(tmp_path / "run"))
    assert bool(trainer.optimizer.defaults.get("fused")) == fused_on("cpu") and not trainer._skips_on_device


def test_chunked_cross_entropy_matches_full():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :3] = IGNORE_INDEX
    loss = chunked_cross_entropy_sum(hidden, weight, targets, chunk_size=4)
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t()).reshape(-1, 50), targets.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(loss.double(), ref)
    g1 = torch.autograd.grad(loss * 0.5, (hidden, weight))
    g2 = torch.autograd.grad(ref * 0.5, (hidden, weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_input_requires_grad"])
def test_chunked_cross_entropy_skips_gradient_work_without_grad(mode, monkeypatch):
    """Evaluation (no_grad) must not form the loss's gradients: the autograd Function, which computes
    them in its forward pass, is not called, and the value is the same."""
    from polyglu.train import loss as loss_module

    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=(mode != "no_input_requires_grad"))
    weight = torch.nn.Parameter(torch.randn(40, 16), requires_grad=(mode != "no_input_requires_grad"))
    targets = torch.randint(0, 40, (2, 9))
    targets[1, :4] = IGNORE_INDEX
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy((hidden @ weight.t()).reshape(-1, 40), targets.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum")
    calls = []
    real_apply = loss_module._ChunkedLinearCrossEntropy.apply
    monkeypatch.setattr(loss_module._ChunkedLinearCrossEntropy, "apply",
                        lambda *args: calls.append(1) or real_apply(*args))
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "no_input_requires_grad": contextlib.nullcontext}[mode]
    with context():
        loss = chunked_cross_entropy_sum(hidden, weight, targets, chunk_size=4)
    assert calls == [] and not loss.requires_grad
    torch.testing.assert_close(loss, ref)
    assert loss.dtype == torch.float32 and loss.shape == ()
    if mode == "no_grad":  # with grad enabled again the gradient path is used
        chunked_cross_entropy_sum(hidden, weight, targets, chunk_size=4).backward()
        assert calls == [1] and weight.grad is not None


def test_training_reduces_loss_and_logs(tmp_path):
    config = _config(tmp_path / "run", max_steps=30, checkpoint_every=100, eval_every=10)
    summary = _trainer(config).fit()
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    for key in ("tokens", "lr", "tau", "grad_norm", "tokens_per_s"):
        assert key in rows[0]
    assert "val_loss" in rows[9] and len(rows[1]["routing_entropy"]["dynamic"]) == 2
    assert rows[-1]["tau"] == pytest.approx(0.1) and rows[0]["tau"] == pytest.approx(1.0)
    assert summary["step"] == 30
    from polyglu import load_model

    model = load_model(tmp_path / "run/final")
    assert model.tau == pytest.approx(0.1)


def test_resume_is_exact(tmp_path):
    full = _config(tmp_path / "full", max_steps=6)
    _trainer(full).fit()
    half = _config(tmp_path / "half", max_steps=6)
    trainer = _trainer(half)
    trainer.fit(stop_at=3)  # stop as if killed after the step-3 checkpoint...
    trainer = _trainer(half, seed=123)  # ...then a new process (different init seed) resumes
    assert trainer.resume()
    assert trainer.step == 3
    trainer.fit()
    assert _losses(tmp_path / "full") == _losses(tmp_path / "half")


def test_checkpoints_are_complete_and_pruned(tmp_path):
    config = _config(tmp_path / "run", max_steps=12, checkpoint_every=2, keep_checkpoints=2)
    _trainer(config).fit()
    found = ckpt.list_checkpoints(tmp_path / "run")
    assert [s for s, _ in found] == [10, 12]
    # a half-written checkpoint (crash before the rename) is ignored
    (tmp_path / "run/checkpoints/.tmp-step-00000014-1").mkdir()
    (tmp_path / "run/checkpoints/step-00000016").mkdir()  # no train_state.json: incomplete
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000012"
    from polyglu import load_model

    load_model(found[-1][1])  # a checkpoint is a model directory


def test_checkpoints_by_time_as_well_as_by_steps(tmp_path, monkeypatch):
    """checkpoint_minutes: a save whenever that much time passed, whatever checkpoint_every says."""
    import polyglu.train.trainer as trainer_module

    clock = itertools.count(0, 40)  # each reading of the clock: 40 s later
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: float(next(clock)))
    config = _config(tmp_path / "run", max_steps=6, checkpoint_every=100, keep_checkpoints=10,
                     checkpoint_minutes=1.0)
    _trainer(config).fit()
    saved = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")]
    assert saved[-1] == 6 and len(saved) >= 3 and saved != [6]  # timed saves before the final one
    config = _config(tmp_path / "steps", max_steps=6, checkpoint_every=100, checkpoint_minutes=None)
    _trainer(config).fit()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "steps")] == [6]
    with pytest.raises(ConfigError, match="train.checkpoint_minutes must be positive"):
        _config(tmp_path / "bad", checkpoint_minutes=0)


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    config = _config(tmp_path / "run", max_steps=20, max_bad_steps=3, checkpoint_every=2)
    trainer = _trainer(config)
    real = trainer.loss_module.forward
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] > 4 else loss

    trainer.loss_module.forward = poisoned
    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        trainer.fit()
    assert trainer.skipped_steps == 3
    # skipped steps leave the weights untouched: every checkpoint holds finite, loadable weights
    from polyglu import load_model

    latest = ckpt.latest_checkpoint(tmp_path / "run")
    model = load_model(latest)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(v) for v in _losses(tmp_path / "run")[:4])


def test_run_config_errors():
    with pytest.raises(ConfigError, match="unknown config key 'train.max_step'"):
        RunConfig.load(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="train.max_steps must be positive"):
        RunConfig.load(None, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match="key=value"):
        RunConfig.load(None, ["train.max_steps"])


def test_overrides_parse_yaml_values():
    config = RunConfig.load(None, ["train.lr=3e-3", "train.betas=[0.9, 0.99]", "train.compile=true",
                                   "data.sources={math: a, code: b}", "init_from=null"])
    assert config.train.lr == 3e-3 and config.train.betas == (0.9, 0.99) and config.train.compile is True
    assert config.data.sources == {"math": "a", "code": "b"} and config.init_from is None

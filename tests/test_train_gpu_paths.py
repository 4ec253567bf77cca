"""The training step's GPU paths, checked on the CPU: liger-kernel's fused linear cross-entropy
(under TRITON_INTERPRET=1) against the chunked loss with vocabulary padding, a step that reads
nothing on the host (fused AdamW skipping non-finite steps itself), routing statistics on a sample."""

import contextlib

import pytest
import torch
from test_train import _config, _trainer

from polyglu.data.special_tokens import IGNORE_INDEX
from polyglu.model import fused
from polyglu.train import loss as loss_module
from polyglu.train.loss import chunked_cross_entropy_sum, cross_entropy_sum, padded_head
from polyglu.train.metrics import routing_entropy_summary
from polyglu.train.optim import parameter_groups
from polyglu.train.trainer import Trainer, TrainingError

liger = pytest.importorskip("liger_kernel")


def _loss_inputs(N=40, D=16, V=100, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::7] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("multiple", [None, 128])
def test_fused_loss_matches_the_chunked_loss_float32(multiple):
    hidden, weight, targets = _loss_inputs()
    want = chunked_cross_entropy_sum(hidden, weight, targets, chunk_size=16)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got = cross_entropy_sum(hidden, weight, targets, kernel="fused", vocab_multiple=multiple)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        assert g.shape == w.shape  # the padded rows' gradient never reaches the weight
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_fused_loss_bf16_logits_under_autocast():
    """Under bf16 autocast the fused loss takes bf16 logits (as the chunked loss's matmul does): equal
    within bf16 rounding, float32 loss."""
    hidden, weight, targets = _loss_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = chunked_cross_entropy_sum(hidden, weight, targets, chunk_size=16)
        got = cross_entropy_sum(hidden, weight, targets, kernel="fused", vocab_multiple=128)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got_grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, want.float(), rtol=1e-2, atol=1e-2)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.float32  # back to the parameters' dtype
        assert float((g - w.float()).abs().max()) <= 2e-2 * float(w.float().abs().max())


def test_padded_head_masks_only_the_pad_rows():
    weight = torch.randn(100, 4)
    padded, bias = padded_head(weight, 128)
    assert padded.shape == (128, 4) and padded[:100].equal(weight) and not padded[100:].any()
    assert bias[:100].eq(0).all() and bias[100:].eq(float("-inf")).all()
    assert padded_head(weight, 50) == (weight, None)  # already a multiple


def test_loss_kernel_choice(monkeypatch):
    hidden, weight, _ = _loss_inputs()
    assert loss_module.loss_kernel(hidden, weight) == "chunked"  # CPU
    with torch.no_grad():
        assert loss_module.loss_kernel(hidden, weight, "chunked") == "chunked"
    with pytest.raises(ValueError, match="loss kernel must be one of auto, chunked, fused, got 'liger'"):
        loss_module.loss_kernel(hidden, weight, "liger")
    cuda_like = torch.empty(0).requires_grad_()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert loss_module.loss_kernel(cuda_like, weight) == "fused"
    with torch.no_grad():  # evaluation keeps the chunked loss (no gradients to form)
        assert loss_module.loss_kernel(cuda_like, weight) == "chunked"


# ---- a training step without host reads


class _HostReads:
    """Counts reads of tensor values on the host (float/int/bool/item/tolist), by dtype."""

    NAMES = ("__float__", "__int__", "__bool__", "item", "tolist")

    def __init__(self):
        self.dtypes = []

    @contextlib.contextmanager
    def watching(self):
        originals = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def wrap(original):
            def read(tensor, *args, **kwargs):
                self.dtypes.append(tensor.dtype)
                return original(tensor, *args, **kwargs)
            return read

        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


def _device_skipping_trainer(tmp_path, monkeypatch, **train):
    trainer = _trainer(_config(tmp_path / "run", **train))
    # the CUDA optimizer (fused AdamW) on the CPU: it skips a non-finite step inside its kernel
    tc = trainer.tc
    trainer.optimizer = torch.optim.AdamW(parameter_groups(trainer.model, tc.weight_decay), lr=tc.lr,
                                          betas=tuple(tc.betas), eps=tc.eps, fused=True)
    assert not trainer._skips_on_device  # on the CPU the finiteness is read on the host
    monkeypatch.setattr(Trainer, "_skips_on_device", property(lambda self: True))  # the accelerators' step
    return trainer


def test_a_training_step_reads_no_floating_value_on_the_host(tmp_path, monkeypatch):
    """With the CUDA optimizer and the Triton mixed-activation kernel, a step reads only the target
    counts of its (host) batches; loss and grad norm stay on the device until log_every."""
    trainer = _device_skipping_trainer(tmp_path, monkeypatch)
    with fused.use_kernel("triton"), _HostReads().watching() as reads:
        out = trainer.train_step()
    assert isinstance(out["loss"], torch.Tensor) and isinstance(out["grad_norm"], torch.Tensor)
    assert all(not dtype.is_floating_point and dtype != torch.bool for dtype in reads.dtypes), reads.dtypes
    assert torch.isfinite(out["loss"]) and trainer.skipped_steps == 0


def test_non_finite_steps_are_skipped_on_the_device_then_stop(tmp_path, monkeypatch):
    trainer = _device_skipping_trainer(tmp_path, monkeypatch, max_bad_steps=2)
    real = trainer.loss_module.forward
    trainer.loss_module.forward = lambda *args: real(*args) * float("nan")
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train_step()
    trainer.train_step()
    for name, p in trainer.model.named_parameters():  # the optimizer skipped both updates
        assert p.equal(before[name]), name
    assert all(not state for state in trainer.optimizer.state.values()) or all(
        float(state["step"]) == 0 for state in trainer.optimizer.state.values())
    with pytest.raises(TrainingError, match="2 consecutive non-finite steps"):
        trainer.read_step_counters()
    assert trainer.skipped_steps == 2


def test_a_run_of_skipped_steps_goes_on_across_counter_reads(tmp_path, monkeypatch):
    trainer = _device_skipping_trainer(tmp_path, monkeypatch, max_bad_steps=3)
    real = trainer.loss_module.forward
    trainer.loss_module.forward = lambda *args: real(*args) * float("nan")
    trainer.train_step()
    trainer.train_step()
    trainer.read_step_counters()  # a log row between the skipped steps: 2 < 3, the run goes on
    assert (trainer.bad_steps, trainer.skipped_steps) == (2, 2)
    trainer.train_step()
    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        trainer.read_step_counters()


def test_routing_statistics_on_a_sample_without_autograd(tmp_path):
    trainer = _trainer(_config(tmp_path / "run"))
    batch = trainer.train_data.get_batch(0)
    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(torch.is_grad_enabled())
        yield

    stats = routing_entropy_summary(trainer.model, batch, trainer.device, autocast)
    assert entered == [False]  # the trainer's autocast, inside no_grad
    # the same numbers as the full routing weights of the sample, reduced afterwards
    from polyglu.model.routing import routing_entropy

    trainer.model.eval()
    with torch.no_grad():
        routing = trainer.model(batch["input_ids"][:2], batch["doc_ids"][:2], return_routing=True,
                                compute_logits=False).routing
    want = [round(float(routing_entropy(g, normalized=True).mean()), 6) for g in routing]
    assert stats["dynamic"] == pytest.approx(want, abs=2e-6)
    assert len(stats["static"]) == len(want) and all(0 <= x <= 1 for x in stats["static"])


def test_loss_settings_are_validated():
    from polyglu.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="train.vocab_pad_multiple must be positive or null, got 0"):
        RunConfig.load(None, ["train.vocab_pad_multiple=0"])
    with pytest.raises(ConfigError, match="loss_kernel"):
        RunConfig.load(None, ["train.loss_kernel=liger"])
    config = RunConfig.load(None, ["train.vocab_pad_multiple=128", "train.loss_kernel=fused"])
    assert (config.train.vocab_pad_multiple, config.train.loss_kernel) == (128, "fused")

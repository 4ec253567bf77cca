"""bf16 training on CPU: `train.dtype=bfloat16` runs the matmuls under CPU autocast and tracks fp32."""

import json

import torch

from polyglu import PolychromaticLM
from polyglu.config import RunConfig
from polyglu.train.trainer import Trainer

# measured: the largest per-step |loss_bf16 - loss_fp32| over these 20 steps is ~6e-4 (torch 2.13 CPU);
# bf16 keeps 8 bits of mantissa (relative rounding ~4e-3), so 0.02 on a loss of ~3.5 is ~1.5x that
BF16_LOSS_TOLERANCE = 0.02


class ShiftedTokens:
    """next token = (token + 1) % vocab from random starts; two documents per row."""

    def __init__(self, vocab, batch_size, seq_len):
        self.vocab, self.batch_size, self.seq_len = vocab, batch_size, seq_len

    def get_batch(self, step, micro_step=0):
        g = torch.Generator().manual_seed(step * 100 + micro_step)
        start = torch.randint(0, self.vocab, (self.batch_size, 1), generator=g)
        ids = (start + torch.arange(self.seq_len + 1)) % self.vocab
        doc_ids = torch.zeros(self.batch_size, self.seq_len, dtype=torch.long)
        doc_ids[:, self.seq_len // 2:] = 1
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "doc_ids": doc_ids}


def _run(run_dir, dtype: str):
    config = RunConfig.load(None, [f"run_dir={run_dir}"], model={
        "preset": "debug", "vocab_size": 64, "d_model": 32, "d_ff": 48, "n_heads": 4, "n_kv_heads": 2,
        "head_dim": 8, "max_seq_len": 32, "gate_hidden": 8}, train={
        "max_steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 100,
        "checkpoint_every": 100, "routing_stats_every": 100, "progress": False, "dtype": dtype})
    torch.manual_seed(0)
    model = PolychromaticLM(config.model_config())
    trainer = Trainer(config, model, ShiftedTokens(64, 4, 16), log=lambda *a: None)
    matmul_dtypes = set()
    # training forwards only (the logged routing statistics run in eval mode, in float32)
    hook = model.layers[0].ffn.gate_proj.register_forward_hook(
        lambda m, i, o: matmul_dtypes.add(o.dtype) if m.training else None)
    trainer.fit()
    hook.remove()
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer, losses, matmul_dtypes


def test_bfloat16_trains_on_cpu_and_tracks_float32(tmp_path):
    fp32, fp32_losses, fp32_matmuls = _run(tmp_path / "fp32", "float32")
    bf16, bf16_losses, bf16_matmuls = _run(tmp_path / "bf16", "bfloat16")
    assert fp32.device.type == bf16.device.type == "cpu"
    assert fp32_matmuls == {torch.float32} and bf16_matmuls == {torch.bfloat16}  # autocast really engaged
    # master weights and optimizer state stay float32 under autocast
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    assert len(bf16_losses) == len(fp32_losses) == 20
    assert bf16_losses != fp32_losses  # different arithmetic, so not bit-identical...
    for step, (a, b) in enumerate(zip(fp32_losses, bf16_losses), start=1):
        assert abs(a - b) <= BF16_LOSS_TOLERANCE, f"step {step}: fp32 {a:.4f} vs bf16 {b:.4f}"
    assert bf16_losses[-1] < bf16_losses[0] - 0.5  # ...and it learns

"""A CPU rehearsal of GPU training's compiled step: the trainer's per-block torch.compile with the real
inductor backend on a tiny model, tau and the packed documents (doc_ids) changing every step. After a
warm-up, no step may recompile a block, and no graph may break anywhere: on a GPU either would cost
a compile per step or a trip through Python per layer. Counted with dynamo's own counters."""

import torch

from polyglu import PolychromaticLM
from polyglu.config import RunConfig
from polyglu.train.trainer import Trainer

WARMUP_STEPS = 2  # step 1 compiles each block's forward and backward; step 2 may settle dynamic shapes
STEPS = 3


class ShiftingDocuments:
    """Random tokens whose document boundaries move every step (a pure function of the step)."""

    def __init__(self, vocab: int, batch_size: int, seq_len: int) -> None:
        self.vocab, self.batch_size, self.seq_len = vocab, batch_size, seq_len

    def get_batch(self, step: int, micro_step: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(step * 10 + micro_step)
        ids = torch.randint(0, self.vocab, (self.batch_size, self.seq_len + 1), generator=gen)
        cut = 2 + step % (self.seq_len - 4)  # a boundary at a new place each step
        doc_ids = (torch.arange(self.seq_len) >= cut).long().expand(self.batch_size, -1).clone()
        doc_ids[0, self.seq_len // 2:] += 2  # row 0: three documents
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "doc_ids": doc_ids}


def test_compiled_blocks_neither_recompile_nor_break(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    config = RunConfig.load(None, [f"run_dir={tmp_path / 'run'}"], model={
        "preset": "debug", "vocab_size": 64, "d_model": 32, "d_ff": 48, "n_layers": 2, "n_heads": 4,
        "n_kv_heads": 2, "head_dim": 8, "max_seq_len": 32, "gate_hidden": 8}, train={
        "max_steps": 100, "batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "compile": True, "progress": False,
        "tau_start": 1.0, "tau_end": 0.1})
    torch.manual_seed(0)
    model = PolychromaticLM(config.model_config())
    trainer = Trainer(config, model, ShiftingDocuments(64, 2, 16), log=lambda *a: None)
    taus = []
    for _ in range(WARMUP_STEPS):
        taus.append(trainer.train_step()["tau"])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the blocks were compiled (by inductor: no backend argument)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # a recompile raises
    for _ in range(STEPS):
        out = trainer.train_step()
        taus.append(out["tau"])
        assert torch.isfinite(torch.as_tensor(out["loss"]))
    assert len(set(taus)) == len(taus)  # tau changed every step
    assert counters["stats"]["unique_graphs"] == graphs  # no new graph after the warm-up
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])

"""FSDP2 on CPU (gloo): 2 sharded processes give the losses of 1 process with the same global batch;
the DCP checkpoint resumes to the same continuation (also in one process); the exported model
directories load."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from polyglu import PolychromaticLM, load_model
from polyglu.config import RunConfig
from polyglu.train import checkpointing as ckpt
from polyglu.train.distributed import DistributedContext
from polyglu.train.trainer import Trainer

GLOBAL_BATCH, SEQ, VOCAB, STEPS = 4, 16, 64, 4
STEP2 = "checkpoints/step-00000002"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


class ShardedTokens:
    """The same global batch for any world size; each rank takes its rows."""

    def __init__(self, rank=0, world_size=1, seed=0):
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def get_batch(self, step, micro_step=0):
        g = torch.Generator().manual_seed(self.seed * 100_000 + step * 100 + micro_step)
        start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
        ids = (start + torch.arange(SEQ + 1) * torch.randint(1, 3, (GLOBAL_BATCH, 1), generator=g)) % VOCAB
        rows = slice(self.rank * GLOBAL_BATCH // self.world_size, (self.rank + 1) * GLOBAL_BATCH // self.world_size)
        ids = ids[rows]
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "doc_ids": torch.zeros_like(ids[:, :-1])}


def _trainer(run_dir, world_size, rank, dist, init_seed=0):
    config = RunConfig.load(None, [f"run_dir={run_dir}"], model={
        "preset": "debug", "vocab_size": VOCAB, "d_model": 32, "d_ff": 48, "n_heads": 4, "n_kv_heads": 2,
        "head_dim": 8, "max_seq_len": 32, "gate_hidden": 8, "routing_noise": False},
        train={"max_steps": STEPS, "batch_size": GLOBAL_BATCH // world_size, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1,
               "log_every": 1, "eval_every": 2, "eval_batches": 1, "routing_stats_every": 2,
               "checkpoint_every": 2, "progress": False, "distributed": "fsdp",
               "dtype": "float32"})  # the comparison is to float32 rounding; auto is bf16 on some CPUs
    assert config.model_config().tie_embeddings  # the tied embedding/head must survive sharding
    torch.manual_seed(init_seed)
    model = PolychromaticLM(config.model_config())
    return Trainer(config, model, ShardedTokens(rank, world_size), ShardedTokens(rank, world_size, seed=1),
                   dist=dist, log=lambda *a: None)


def _run(rank, world_size, root, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = DistributedContext.from_env("cpu")
    trainer = _trainer(root / "full", world_size, rank, dist)
    assert trainer.sharded == (world_size > 1)
    model = trainer.model
    assert model.lm_head.weight is model.embed_tokens.weight
    trainer.fit()  # saves step 2 and step 4
    # a fresh process state (other init) resumes the step-2 checkpoint into another run directory
    resumed = _trainer(root / "resumed", world_size, rank, dist, init_seed=123)
    assert resumed.resume(root / "full" / STEP2) and resumed.step == 2
    resumed.fit()
    dist.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a, b, atol=1e-5, rtol=1e-4):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=atol, rtol=rtol, msg=name)


def test_fsdp_two_processes_match_one_and_resume(tmp_path):
    _run(0, 1, tmp_path / "single", _free_port())
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    mp.spawn(_run, args=(2, tmp_path / "fsdp", _free_port()), nprocs=2, join=True)

    single, fsdp = _rows(tmp_path / "single/full"), _rows(tmp_path / "fsdp/full")
    assert [r["step"] for r in single] == [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "tau"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in single], rel=1e-5, abs=1e-6), key
    for s, f in zip(single, fsdp):  # validation and routing statistics run on the gathered model
        assert ("val_loss" in f) == ("val_loss" in s) == (s["step"] % 2 == 0)
        if "val_loss" in s:
            assert f["val_loss"] == pytest.approx(s["val_loss"], rel=1e-5)
        assert ("routing_entropy" in f) == ("routing_entropy" in s)
        if "routing_entropy" in s:
            assert f["routing_entropy"]["dynamic"] == pytest.approx(s["routing_entropy"]["dynamic"], rel=1e-4)

    # the sharded checkpoint: DCP shards of both ranks + a full, loadable model directory
    step2 = tmp_path / "fsdp/full" / STEP2
    assert ckpt.is_sharded_checkpoint(step2)
    assert sorted(p.name for p in (step2 / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step2 / "optimizer.safetensors").exists()
    assert json.loads((step2 / "train_state.json").read_text())["sharded"] == {"format": "dcp", "world_size": 2}
    assert [p.name for p in (tmp_path / "fsdp/full/checkpoints").iterdir() if p.name.startswith(".")] == []
    _assert_same_weights(load_model(step2), load_model(tmp_path / "single/full" / STEP2))
    final = load_model(tmp_path / "fsdp/full/final")
    _assert_same_weights(final, load_model(tmp_path / "single/full/final"))

    # resumed from the step-2 DCP checkpoint: the same continuation and the same final weights
    resumed = _rows(tmp_path / "fsdp/resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    key = lambda r: (r["loss"], r["grad_norm"], r.get("val_loss"))  # noqa: E731
    assert [key(r) for r in resumed] == [key(r) for r in fsdp[2:]]  # exact, as in one process
    _assert_same_weights(load_model(tmp_path / "fsdp/resumed/final"), final, atol=0, rtol=0)

    # DCP reshards on load: the 2-rank checkpoint resumes in a single process too
    one = _trainer(tmp_path / "one", 1, 0, DistributedContext())
    assert one.resume(step2) and one.step == 2
    one.fit()
    assert [r["loss"] for r in _rows(tmp_path / "one")] == pytest.approx([r["loss"] for r in single[2:]],
                                                                         rel=1e-5, abs=1e-6)

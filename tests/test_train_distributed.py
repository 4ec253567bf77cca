"""Data-parallel training on CPU (gloo): 2 processes give the losses of 1 process, same global batch."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from polyglu import PolychromaticLM
from polyglu.config import RunConfig
from polyglu.train.distributed import DistributedContext
from polyglu.train.trainer import Trainer

GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 64


class ShardedTokens:
    """The same global batch for any world size; each rank takes its rows."""

    def __init__(self, rank=0, world_size=1):
        self.rank, self.world_size = rank, world_size

    def get_batch(self, step, micro_step=0):
        g = torch.Generator().manual_seed(step * 100 + micro_step)
        start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
        ids = (start + torch.arange(SEQ + 1) * torch.randint(1, 3, (GLOBAL_BATCH, 1), generator=g)) % VOCAB
        rows = slice(self.rank * GLOBAL_BATCH // self.world_size, (self.rank + 1) * GLOBAL_BATCH // self.world_size)
        ids = ids[rows]
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "doc_ids": torch.zeros_like(ids[:, :-1])}


def _config(run_dir, world_size):
    return RunConfig.load(None, [f"run_dir={run_dir}"], model={
        "preset": "debug", "vocab_size": VOCAB, "d_model": 32, "d_ff": 48, "n_heads": 4, "n_kv_heads": 2,
        "head_dim": 8, "max_seq_len": 32, "gate_hidden": 8, "routing_noise": False},
        train={"max_steps": 4, "batch_size": GLOBAL_BATCH // world_size, "lr": 3e-3, "warmup_steps": 1,
               "log_every": 1, "eval_every": 100, "checkpoint_every": 100, "progress": False,
               "dtype": "float32"})  # the comparison is to float32 rounding; auto is bf16 on some CPUs


def _run(rank, world_size, run_dir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = DistributedContext.from_env("cpu")
    config = _config(run_dir, world_size)
    torch.manual_seed(0)
    model = PolychromaticLM(config.model_config())
    Trainer(config, model, ShardedTokens(rank, world_size), dist=dist, log=lambda *a: None).fit()
    dist.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
    _run(0, 1, tmp_path / "single", _free_port())
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    mp.spawn(_run, args=(2, tmp_path / "ddp", _free_port()), nprocs=2, join=True)
    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 4
    assert single == pytest.approx(ddp, rel=1e-5, abs=1e-5)
    from polyglu import load_model

    a, b = load_model(tmp_path / "single/final"), load_model(tmp_path / "ddp/final")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_cuda_without_an_index_is_the_local_rank_device(monkeypatch):
    """`--device cuda` under torchrun: the process's own GPU, cuda:LOCAL_RANK (torch.cuda.set_device
    refuses a device without an index). torch.cuda mocked: no GPU needed."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for device in ("cuda", None):
        context = DistributedContext.from_env(device)
        assert context.device == torch.device("cuda", 3) and chosen[-1] == torch.device("cuda", 3)
        assert chosen[-1].index is not None
    assert DistributedContext.from_env("cuda:1").device == torch.device("cuda", 1)  # an explicit index stays
    assert DistributedContext.from_env("cpu").device == torch.device("cpu")

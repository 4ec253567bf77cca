"""PackedLoader / TokenShards / Mixture: packing, doc_ids, determinism, resume, ranks, mixing, splits."""

import json
import math

import numpy as np
import pytest
import torch

from polyglu.config import ConfigError
from polyglu.data.loader import Mixture, PackedLoader, TokenShards
from polyglu.data.prepare import prepare
from polyglu.data.sources import DataError
from polyglu.data.tokenizer import ByteTokenizer

EOS = 256


def _docs(letter, n, seed):
    rng = np.random.default_rng(seed)
    return [letter * int(k) for k in rng.integers(3, 30, n)]


def _prepared(root, name, docs, validation=None, shard_tokens=97):
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    val = None
    if validation is not None:
        val = root / f"{name}-val.jsonl"
        val.write_text("".join(json.dumps({"text": d}) + "\n" for d in validation))
    prepare([src], "byte", root / name, shard_tokens=shard_tokens, validation=val)
    return root / name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return {"a": _prepared(root, "a", _docs("a", 120, 0)),
            "b": _prepared(root, "b", _docs("b", 120, 1), validation=_docs("v", 30, 2))}


def _same(x, y):
    return all(torch.equal(x[k], y[k]) for k in ("input_ids", "targets", "doc_ids"))


def test_token_shards_memory_map_and_read_across_shards(data):
    shards = TokenShards(data["a"])
    stream = np.concatenate([np.fromfile(data["a"] / s["file"], dtype=np.uint16)
                             for s in shards.manifest["shards"]]).astype(np.int64)
    assert len(shards) == len(stream) and len(shards.manifest["shards"]) > 3
    boundary = shards.manifest["shards"][0]["tokens"]
    assert shards.read(boundary - 5, 200).tolist() == stream[boundary - 5:boundary + 195].tolist()
    with pytest.raises(IndexError):
        shards.read(len(stream) - 3, 10)


def test_batches_are_packed_next_token_windows_with_doc_ids(data):
    loader = PackedLoader(data["a"], seq_len=64, batch_size=4, seed=3)
    batch = loader.get_batch(0)
    x, y, doc = batch["input_ids"], batch["targets"], batch["doc_ids"]
    assert x.shape == y.shape == doc.shape == (4, 64) and x.dtype == y.dtype == doc.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert (y != -100).all()
    for row_x, row_doc in zip(x.tolist(), doc.tolist()):
        expected, current = [], 0
        for token in row_x:
            expected.append(current)
            current += token == EOS  # the EOS closes its own document
        assert row_doc == expected and row_doc[0] == 0
    assert set(x.unique().tolist()) <= {ord("a"), EOS}


def test_deterministic_resume_and_state(data):
    one = PackedLoader(data["a"], seq_len=32, batch_size=3, seed=7)
    batches = [one.get_batch(step) for step in range(6)]
    state = json.loads(json.dumps(one.state_dict()))
    assert state["next_step"] == 6 and len(json.dumps(state)) < 1_000
    fresh = PackedLoader(data["a"], seq_len=32, batch_size=3, seed=0)
    fresh.load_state_dict(state)
    assert fresh.next_step == 6 and _same(fresh.get_batch(6), one.get_batch(6))
    assert _same(PackedLoader(data["a"], seq_len=32, batch_size=3, seed=7).get_batch(4), batches[4])
    assert not _same(batches[0], batches[1])
    assert not _same(one.get_batch(2, micro_step=1), one.get_batch(2, micro_step=0))
    assert not _same(PackedLoader(data["a"], seq_len=32, batch_size=3, seed=8).get_batch(0), batches[0])
    with pytest.raises(DataError, match="seq_len 32 in the checkpoint, 16 now"):
        PackedLoader(data["a"], seq_len=16, batch_size=3).load_state_dict(state)


def test_ranks_hold_consecutive_rows_of_the_global_batch(data):
    single = PackedLoader(data, seq_len=24, batch_size=6, seed=1).get_batch(3, micro_step=1)
    parts = [PackedLoader(data, seq_len=24, batch_size=2, seed=1, rank=r, world_size=3).get_batch(3, micro_step=1)
             for r in range(3)]
    for key in single:
        assert torch.equal(torch.cat([p[key] for p in parts]), single[key])
    with pytest.raises(ConfigError, match="rank 3 outside"):
        PackedLoader(data, seq_len=24, batch_size=2, rank=3, world_size=3)


def test_mixture_anneal_switches_sources(data):
    mixture = Mixture({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, anneal_at=0.5)
    loader = PackedLoader(data, seq_len=16, batch_size=8, mixture=mixture, total_steps=10)
    for step in range(10):
        letters = set(loader.get_batch(step)["input_ids"].unique().tolist()) - {EOS}
        assert letters == ({ord("a")} if step < 5 else {ord("b")})
    mixed = PackedLoader(data, seq_len=16, batch_size=64, mixture={"weights": {"a": 3, "b": 1}})
    sources = [name for name, _ in mixed.windows(0)]
    assert 30 < sources.count("a") < 62


def test_mixture_presets_and_errors(data):
    paper = Mixture.paper()
    assert paper.weights_at(0, 100) == pytest.approx({"math": 0.70, "stem": 0.25, "code": 0.05})
    assert paper.weights_at(79, 100) == pytest.approx({"math": 0.70, "stem": 0.25, "code": 0.05})
    assert paper.weights_at(80, 100) == pytest.approx({"math": 0.85, "stem": 0.10, "code": 0.05})
    assert Mixture.from_dict(paper.to_dict()) == paper
    assert Mixture.constant({"a": 2, "b": 2}).weights_at(5) == {"a": 0.5, "b": 0.5}
    assert Mixture({"a": 1, "b": 1}, anneal_to={"a": 1}, anneal_at=0.5).weights_at(6, 10) == {"a": 1.0, "b": 0.0}
    with pytest.raises(ConfigError, match=r"anneal_to names \['z'\]"):
        Mixture({"a": 1}, anneal_to={"z": 1})
    with pytest.raises(ConfigError, match="total_steps is needed"):
        PackedLoader(data, seq_len=16, batch_size=2, mixture=Mixture({"a": 1, "b": 1}, {"a": 1, "b": 0}))
    with pytest.raises(ConfigError, match=r"mixture names \['c'\] but no such source"):
        PackedLoader(data, seq_len=16, batch_size=2, mixture={"weights": {"a": 1, "b": 1, "c": 1}})
    with pytest.raises(ConfigError, match="must be a number >= 0"):
        Mixture({"a": -1})
    with pytest.raises(ConfigError, match="unknown config key 'mixture.weight'"):
        Mixture.from_dict({"weight": {"a": 1}})


def test_validation_split(data):
    # b has a prepared validation/ directory: the validation split reads it
    val = PackedLoader(data["b"], seq_len=16, batch_size=4, split="validation")
    assert set(val.get_batch(0)["input_ids"].unique().tolist()) <= {ord("v"), EOS}
    # a has none: its last 1% (at least seq_len + 1 tokens) is held out, and training stops before it
    train = PackedLoader(data["a"], seq_len=16, batch_size=32, split="train")
    held = PackedLoader(data["a"], seq_len=16, batch_size=32, split="validation")
    shards = train.sources["a"].shards
    n = len(shards)
    boundary = held.sources["a"].lo
    # at least the nominal tail is held out, moved back to the start of the document it would cut
    assert boundary <= n - max(math.ceil(0.01 * n), 17) and boundary == train.sources["a"].hi
    assert shards.read(boundary - 1, 1)[0] == EOS
    assert all(start + 17 <= boundary for step in range(5) for _, start in train.windows(step))
    assert all(start >= boundary for _, start in held.windows(0))


def test_held_out_tail_starts_at_a_document_boundary(tmp_path):
    # documents of 40 tokens (39 letters + EOS); the nominal tail of 17 tokens cuts the last one
    docs = [chr(ord("a") + i % 26) * 39 for i in range(10)]
    directory = _prepared(tmp_path, "long", docs, shard_tokens=1000)
    train = PackedLoader(directory, seq_len=16, batch_size=64, split="train")
    held = PackedLoader(directory, seq_len=16, batch_size=64, split="validation")
    assert (train.sources["long"].hi, held.sources["long"].lo, held.sources["long"].hi) == (360, 360, 400)
    train_letters = {t for step in range(20) for t in train.get_batch(step)["input_ids"].unique().tolist()}
    held_letters = {t for t in held.get_batch(0)["input_ids"].unique().tolist()}
    assert held_letters == {ord(docs[-1][0])} and ord(docs[-1][0]) not in train_letters - {EOS}
    # one document longer than the tail: nothing before it to train on
    single = _prepared(tmp_path, "single", ["x" * 300], shard_tokens=1000)
    with pytest.raises(DataError, match="held-out tail .* one document"):
        PackedLoader(single, seq_len=16, batch_size=1, split="train")


def test_loader_errors(data, tmp_path):
    with pytest.raises(DataError, match="manifest.json: no such file"):
        PackedLoader(tmp_path, seq_len=8, batch_size=1)
    with pytest.raises(DataError, match="manifest/tokenizer mismatch: the data's EOS id is 256"):
        PackedLoader(data["a"], seq_len=8, batch_size=1, eos_id=0)
    with pytest.raises(DataError, match="fewer than seq_len \\+ 1"):
        PackedLoader(data["a"], seq_len=100_000, batch_size=1)

    class Other(ByteTokenizer):
        def identity(self):
            return {**super().identity(), "vocab_size": 999}

    with pytest.raises(DataError, match="manifest/tokenizer mismatch"):
        TokenShards(data["a"], tokenizer=Other())
    damaged = _prepared(tmp_path, "d", _docs("d", 20, 3), shard_tokens=50)
    shard = damaged / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match="shard-00000.bin: truncated shard: .* byte offset"):
        TokenShards(damaged)


def test_open_checks_checksums_fully_when_small_and_by_samples_when_large(tmp_path, monkeypatch):
    from polyglu.data import shards as shards_module
    from polyglu.data.shards import write_token_shards

    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 256, 40_000)  # 80,000 bytes: more than the 16 sampled 4 KiB blocks
    tokens[::100] = EOS
    directory = tmp_path / "d"
    write_token_shards(directory, [tokens], ByteTokenizer())
    shard = directory / "shard-00000.bin"
    damaged = np.fromfile(shard, dtype=np.uint16)
    offset = 2100  # byte 4200: between the first two sampled blocks, [0, 4096) and [5060, 9156)
    damaged[offset] = 4000  # an id no byte-level model can embed
    damaged.tofile(shard)
    with pytest.raises(DataError, match="shard-00000.bin: contents differ from the manifest's sha256"):
        TokenShards(directory)  # small: full sha256 at open
    monkeypatch.setattr(shards_module, "FULL_VERIFY_BYTES", 0)  # as if the data were > 1 GiB
    opened = TokenShards(directory)  # sampled blocks and the manifest's max id agree: opens
    assert opened.document_start(offset) <= offset
    loader = PackedLoader(directory, seq_len=512, batch_size=64, seed=0, validation_fraction=0.1)
    with pytest.raises(DataError, match=f"shard-00000.bin: token id 4000 at token offset {offset} is >= the "
                                        f"vocabulary size 260"):
        for step in range(50):  # the damaged id is refused in the batch that would embed it
            loader.get_batch(step)
    # a replaced shard (other content, same size) is caught by the sampled blocks
    rng.integers(0, 256, 40_000).astype(np.uint16).tofile(shard)
    with pytest.raises(DataError, match="differ from the manifest's sampled sha256"):
        TokenShards(directory)


def test_training_refuses_shards_of_another_tokenizer(data, tmp_path):
    from polyglu.data.tokenizer import train_bpe_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("aaa bbb ccc\n" * 20)
    bpe = train_bpe_tokenizer([corpus], 270, tmp_path / "bpe")
    with pytest.raises(DataError, match=r"manifest/tokenizer mismatch: shard-00000.bin and the other shards were "
                                        r"prepared with byte \(vocab 260\), but the run uses .*bpe"):
        PackedLoader(data["a"], seq_len=8, batch_size=1, tokenizer=bpe)

"""`polyglu prepare` and `verify-data`: shards, manifest, sources, resume, idempotency, bad input."""

import json

import numpy as np
import pytest

from polyglu.cli import main
from polyglu.data import prepare as prepare_module
from polyglu.data.prepare import STATE_NAME, prepare, prepare_builtin_math
from polyglu.data.shards import read_manifest, verify_prepared
from polyglu.data.sources import DataError, HFSource
from polyglu.data.tokenizer import ByteTokenizer

DOCS = ["first document", "", "second one, longer than the first", "third\nwith two lines", "x" * 40, "last"]


def _write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _expected_stream(docs):
    tok = ByteTokenizer()
    out = []
    for d in docs:
        if d:
            out += tok.encode(d) + [tok.eos_id]
    return out


def _stream(directory):
    manifest = read_manifest(directory)
    return np.concatenate([np.fromfile(directory / s["file"], dtype=manifest["dtype"]) for s in manifest["shards"]])


def _shard_files(directory):
    return sorted(p.name for p in directory.glob("shard-*"))


@pytest.fixture
def jsonl(tmp_path):
    return _write_jsonl(tmp_path / "docs.jsonl", DOCS)


def test_jsonl_txt_parquet_sources_shards_and_manifest(tmp_path, jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "notes.txt"
    txt.write_text("alpha beta\n<|endoftext|>\ngamma\n")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["from parquet", "again"], "n": [1, 2]}), parquet)
    out = tmp_path / "out"
    manifest = prepare([jsonl, txt, parquet], "byte", out, shard_tokens=48)
    expected = _expected_stream(DOCS + ["alpha beta", "gamma", "from parquet", "again"])
    assert _stream(out).tolist() == expected
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 260 and manifest["eos_id"] == 256
    assert manifest["documents"] == 9 and manifest["empty_documents"] == 1
    assert manifest["tokens"] == len(expected) and len(manifest["shards"]) > 2
    for shard in manifest["shards"]:  # documents never span shards: every shard ends with EOS
        assert np.fromfile(out / shard["file"], dtype=np.uint16)[-1] == 256
    assert (out / "tokenizer" / "byte_tokenizer.json").is_file()
    assert not (out / STATE_NAME).exists()
    assert verify_prepared(out)["tokens"] == len(expected)


def test_hf_datasets_source_through_local_json_builder(tmp_path, jsonl):
    local = prepare([jsonl], "byte", tmp_path / "local")
    hub = prepare([HFSource("json", data_files=str(jsonl), split="train")], "byte", tmp_path / "hf")
    assert _stream(tmp_path / "hf").tolist() == _stream(tmp_path / "local").tolist()
    assert hub["tokens"] == local["tokens"] and hub["inputs"]["sources"][0]["kind"] == "hf"
    streamed = prepare([HFSource("json", data_files=str(jsonl), streaming=True)], "byte", tmp_path / "stream")
    assert streamed["tokens"] == local["tokens"]


def test_worker_processes_give_identical_shards(tmp_path, jsonl, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_DOCUMENTS", 2)
    prepare([jsonl], "byte", tmp_path / "one", shard_tokens=40)
    prepare([jsonl], "byte", tmp_path / "two", shard_tokens=40, workers=2)
    assert _stream(tmp_path / "one").tolist() == _stream(tmp_path / "two").tolist()
    assert read_manifest(tmp_path / "one")["shards"] == read_manifest(tmp_path / "two")["shards"]


def test_idempotent_and_mismatches(tmp_path, jsonl):
    out = tmp_path / "out"
    first = prepare([jsonl], "byte", out, shard_tokens=40)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    notes = []
    assert prepare([jsonl], "byte", out, shard_tokens=40, log=notes.append) == first
    assert notes == [f"{out}: already prepared ({first['tokens']:,} tokens)"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == stamps
    with pytest.raises(DataError, match="already prepared from different inputs \\('shard_tokens' differs\\)"):
        prepare([jsonl], "byte", out, shard_tokens=64)
    other = _Remapped()
    with pytest.raises(DataError, match="manifest/tokenizer mismatch"):
        prepare([jsonl], other, out, shard_tokens=40)
    assert prepare([jsonl], "byte", out, shard_tokens=64, force=True)["tokens"] == first["tokens"]
    assert len(read_manifest(out)["shards"]) < len(first["shards"])


class _Remapped(ByteTokenizer):
    """A byte tokenizer with a different vocabulary size (a different tokenizer)."""

    @property
    def vocab_size(self):
        return 300

    def identity(self):
        return {**super().identity(), "vocab_size": 300}


class _Broken(ByteTokenizer):
    """Emits an id beyond its vocabulary for the letter 'z'."""

    def encode_batch(self, texts):
        return [[999 if i == ord("z") else i for i in self.encode(t)] for t in texts]


def test_resume_after_interruption_continues_without_rewriting(tmp_path, jsonl, monkeypatch):
    reference = tmp_path / "reference"
    prepare([jsonl], "byte", reference, shard_tokens=40)
    out = tmp_path / "out"
    original_flush, calls = prepare_module._ShardWriter.flush, []

    def interrupted_flush(self):
        original_flush(self)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module._ShardWriter, "flush", interrupted_flush)
    with pytest.raises(KeyboardInterrupt):
        prepare([jsonl], "byte", out, shard_tokens=40)
    assert not (out / "manifest.json").exists() and (out / STATE_NAME).exists()
    assert _shard_files(out) == ["shard-00000.bin", "shard-00001.bin"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    monkeypatch.setattr(prepare_module._ShardWriter, "flush", original_flush)
    manifest = prepare([jsonl], "byte", out, shard_tokens=40)
    assert manifest["shards"] == read_manifest(reference)["shards"]
    assert _stream(out).tolist() == _stream(reference).tolist()
    assert {n: out.joinpath(n).stat().st_mtime_ns for n in stamps} == stamps  # finished shards untouched
    assert not (out / STATE_NAME).exists()


def test_max_tokens_caps_exactly(tmp_path, jsonl):
    manifest = prepare([jsonl], "byte", tmp_path / "out", max_tokens=30, shard_tokens=20)
    assert manifest["tokens"] == 30 and manifest["truncated_last_document"]
    assert _stream(tmp_path / "out").tolist() == _expected_stream(DOCS)[:30]
    verify_prepared(tmp_path / "out")


@pytest.mark.parametrize("case", ["missing_field", "empty", "unreadable", "bad_json", "token_id"])
def test_bad_input_names_file_and_offset_and_writes_nothing(tmp_path, case):
    out = tmp_path / "out"
    tokenizer = "byte"
    if case == "missing_field":
        path = tmp_path / "rows.jsonl"
        path.write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
        message = r"rows.jsonl line 3: missing field 'text' \(fields: body\)"
    elif case == "empty":
        path = _write_jsonl(tmp_path / "empty.jsonl", ["", ""])
        message = "empty.jsonl: empty source"
    elif case == "unreadable":
        path = tmp_path / "binary.txt"
        path.write_bytes(b"fine\n\xff\xfe broken\n")
        message = "binary.txt line 2: not UTF-8 \\(invalid start byte\\) at byte offset 5"
    elif case == "bad_json":
        path = tmp_path / "broken.jsonl"
        path.write_text('{"text": "a"}\n{"text": \n')
        message = "broken.jsonl line 2: invalid JSON"
    else:
        path = _write_jsonl(tmp_path / "z.jsonl", ["abc", "xyz"])
        tokenizer = _Broken()
        message = r"z.jsonl line 2: token id 999 at token offset 2 of the document is >= the vocabulary size 260"
    with pytest.raises(DataError, match=message):
        prepare([path], tokenizer, out, shard_tokens=1_000)
    assert not list(out.glob("shard-*")) and not list(out.glob(".shard-*")) and not (out / "manifest.json").exists()


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        prepare([tmp_path / "nope.jsonl"], "byte", tmp_path / "out")


def test_verify_data_finds_damage(tmp_path, jsonl, capsys):
    out = tmp_path / "out"
    prepare([jsonl], "byte", out, shard_tokens=40)
    assert main(["verify-data", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    shard = out / "shard-00001.bin"
    original = shard.read_bytes()

    tokens = np.frombuffer(original, dtype=np.uint16).copy()
    tokens[5] = 4000  # beyond the vocabulary
    shard.write_bytes(tokens.tobytes())
    assert main(["verify-data", str(out)]) == 2
    err = capsys.readouterr().err
    assert "shard-00001.bin: token id 4000 at token offset 5 is >= the vocabulary size 260" in err

    shard.write_bytes(original[:-1])
    assert main(["verify-data", str(out)]) == 2
    assert "shard-00001.bin: truncated shard" in capsys.readouterr().err

    tokens = np.frombuffer(original, dtype=np.uint16).copy()
    tokens[3] = ord("Q")  # a valid id: only the checksum can tell
    shard.write_bytes(tokens.tobytes())
    with pytest.raises(DataError, match="shard-00001.bin: contents differ from the manifest's sha256"):
        verify_prepared(out)
    verify_prepared(out, checksums=False)

    shard.write_bytes(original)
    verify_prepared(out)
    assert main(["verify-data", str(out), "--tokenizer", "byte"]) == 0
    (out / "manifest.json").write_text("{not json")
    assert main(["verify-data", str(out)]) == 2
    assert "manifest.json line 1: invalid JSON" in capsys.readouterr().err


def test_cli_prepare_input_and_builtin(tmp_path, jsonl, capsys):
    rows = _write_jsonl(tmp_path / "body.jsonl", ["one", "two"], field="body")
    out = tmp_path / "cli"
    assert main(["prepare", "--input", f"{jsonl},{rows}", "--text-field", "body", "--tokenizer", "byte",
                 "--out", str(out), "--no-progress"]) == 2
    assert "docs.jsonl line 1: missing field 'body'" in capsys.readouterr().err
    assert main(["prepare", "--input", str(rows), "--text-field", "body", "--tokenizer", "byte", "--out", str(out),
                 "--no-progress", "--workers", "1"]) == 0
    assert "8 tokens, 2 documents" in capsys.readouterr().out

    builtin = tmp_path / "math"
    manifest = prepare_builtin_math("byte", builtin, n_train=40, n_val=8, n_test=8)
    assert set(manifest["builtin"]["files"]) == {"pretrain_train", "pretrain_validation", "sft_train",
                                                  "sft_validation", "test"}
    assert (builtin / manifest["builtin"]["files"]["test"]).is_file()
    assert read_manifest(builtin / "validation")["documents"] == 8
    assert manifest["documents"] == 40
    assert main(["prepare", "--builtin", "math", "--tokenizer", "byte", "--out", str(builtin), "--n-train", "40",
                 "--n-val", "8", "--n-test", "8", "--no-progress"]) == 0  # already prepared: nothing to do
    assert "40 documents" in capsys.readouterr().out


# ---- data identity


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_inputs_are_fingerprinted_by_their_whole_content(tmp_path):
    from polyglu.data.sources import describe_source, same_source

    big = tmp_path / "big.txt"
    data = bytearray(b"abcdefgh" * (3 << 17))  # 3 MiB: the middle is outside the first and last MiB
    big.write_bytes(data)
    before = describe_source(big)
    data[len(data) // 2] = ord("Z")  # same size, one byte changed in the middle
    big.write_bytes(data)
    after = describe_source(big)
    assert before["bytes"] == after["bytes"] and before["sample_sha256"] == after["sample_sha256"]
    assert not same_source(before, after)
    # a manifest written by an older polyglu (no full hash) still compares on what it recorded
    legacy = {k: v for k, v in before.items() if k != "sha256"}
    assert same_source(legacy, after)


def test_a_different_builtin_spec_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "math"
    prepare_builtin_math("byte", out, n_train=30, n_val=6, n_test=6, seed=0)
    before = _snapshot(out)
    for change in ({"seed": 1}, {"n_train": 31}):
        with pytest.raises(DataError, match="already prepared from the built-in corpus with "
                                            f"{next(iter(change))}="):
            prepare_builtin_math("byte", out, **{"n_train": 30, "n_val": 6, "n_test": 6, "seed": 0, **change})
        assert _snapshot(out) == before  # text, manifest and shards untouched
    verify_prepared(out)
    # an interrupted prepare (state file, no manifest) of another spec is refused too, text untouched
    (out / "manifest.json").rename(tmp_path / "manifest.json")
    (out / STATE_NAME).write_text(json.dumps({"inputs": {}, "shards": []}))
    text_before = _snapshot(out / "text")
    with pytest.raises(DataError, match="seed=0"):
        prepare_builtin_math("byte", out, n_train=30, n_val=6, n_test=6, seed=2)
    assert _snapshot(out / "text") == text_before


def test_validation_inputs_are_checked_before_the_training_split_is_written(tmp_path, jsonl):
    other = _write_jsonl(tmp_path / "other.jsonl", ["held out"])
    out = tmp_path / "out"
    prepare(jsonl, "byte", out / "validation")  # out/validation prepared from other inputs
    with pytest.raises(DataError, match="validation/manifest.json: already prepared from different inputs"):
        prepare(jsonl, "byte", out, validation=other)
    assert not (out / "manifest.json").exists() and not list(out.glob("shard-*"))


def test_a_copied_prepared_directory_still_matches_its_inputs(tmp_path):
    import shutil

    first = tmp_path / "first"
    prepare_builtin_math("byte", first, n_train=30, n_val=6, n_test=6)
    shutil.copytree(first, tmp_path / "copy")
    shutil.rmtree(first)  # the original (and its absolute paths) is gone
    manifest = prepare_builtin_math("byte", tmp_path / "copy", n_train=30, n_val=6, n_test=6)
    assert manifest["inputs"]["sources"][0]["path"] == "text/pretrain_train.jsonl"
    validation = read_manifest(tmp_path / "copy" / "validation")
    assert validation["inputs"]["sources"][0]["path"] == "../text/pretrain_validation.jsonl"
    assert verify_prepared(tmp_path / "copy")["validation"]["documents"] == 6


def test_output_path_that_is_a_file_is_refused(tmp_path, jsonl):
    target = tmp_path / "file"
    target.write_text("keep me")
    for out in (target, target / "sub"):
        with pytest.raises(DataError, match=f"--out {out}: is a file"):
            prepare(jsonl, "byte", out)
        with pytest.raises(DataError, match="is a file"):
            prepare_builtin_math("byte", out, n_train=10, n_val=2, n_test=2)
    assert target.read_text() == "keep me"

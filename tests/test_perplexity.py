import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polyglu.cli import main
from polyglu.data.shards import TokenShards, write_token_shards
from polyglu.data.sources import DataError
from polyglu.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from polyglu.eval.perplexity import evaluate_perplexity, perplexity, sliding_windows
from polyglu.eval.scoring import score_continuations

EOS = 256  # the byte tokenizer's end of text


def direct_nll(model, tokens: list[int]) -> tuple[float, int]:
    """Summed NLL of tokens[1:] from one plain forward of tokens[:-1]."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0]
    return float(F.cross_entropy(logits, ids[0, 1:], reduction="sum")), len(tokens) - 1


@pytest.mark.parametrize("n, window, stride", [(10, 4, 2), (100, 32, 16), (33, 32, 32), (5, 48, 24), (1, 4, 2)])
def test_sliding_windows_score_every_target_once(n, window, stride):
    windows = sliding_windows(n, window, stride)
    scored = []
    for start, end, count in windows:
        assert end - start <= window and 1 <= count <= end - start
        scored += range(end - count + 1, end + 1)  # token indices predicted
        if start > 0:
            assert end - count - start + 1 >= window - stride  # at least window - stride tokens of context
    assert scored == list(range(1, n))


def test_short_stream_equals_one_forward(model):
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    result = perplexity(model, np.array(tokens, dtype=np.uint16))
    nll, count = direct_nll(model, tokens)
    assert result["tokens"] == count == 39 and result["windows"] == 1
    assert result["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_sliding_windows_equal_direct_window_forwards(model):
    tokens = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    result = perplexity(model, torch.tensor(tokens), window=32, stride=12, batch_size=3)
    total = 0.0
    for start, end, count in sliding_windows(150, 32, 12):
        with torch.no_grad():
            logits = model(torch.tensor([tokens[start:end]])).logits[0, -count:]
        total += float(F.cross_entropy(logits, torch.tensor(tokens[end - count + 1:end + 1]), reduction="sum"))
    assert result["tokens"] == 149
    assert result["nll"] == pytest.approx(total / 149, rel=1e-5)


def test_documents_restart_at_eos(model):
    doc1 = [10, 20, 30, 40, 50, EOS]
    doc2 = [60, 70, 80, EOS]
    result = perplexity(model, np.array(doc1 + doc2), document_end=EOS)
    nll1, c1 = direct_nll(model, doc1)
    nll2, c2 = direct_nll(model, doc2)
    assert result["tokens"] == c1 + c2  # the first token of doc2 has no context: not scored
    assert result["nll"] == pytest.approx((nll1 + nll2) / (c1 + c2), rel=1e-5)
    plain = perplexity(model, np.array(doc1 + doc2))
    assert plain["tokens"] == 9 and plain["nll"] != pytest.approx(result["nll"], rel=1e-5)


def test_scoring_is_batch_invariant_and_truncates_long_contexts(model):
    gen = torch.Generator().manual_seed(3)
    requests = [(torch.randint(0, 256, (n,), generator=gen).tolist(), torch.randint(0, 256, (m,), generator=gen).tolist())
                for n, m in [(3, 2), (20, 5), (60, 4), (1, 1), (7, 0)]]
    batched = score_continuations(model, requests, batch_size=4)
    for (context, continuation), score in zip(requests, batched):
        full = (context + continuation)[-49:]  # the context keeps its last tokens
        if not continuation:
            assert score.count == 0 and score.logprob == 0.0
            continue
        with torch.no_grad():
            logits = model(torch.tensor([full[:-1]])).logits[0, -len(continuation):]
        expected = -float(F.cross_entropy(logits, torch.tensor(continuation), reduction="sum"))
        assert score.logprob == pytest.approx(expected, rel=1e-5, abs=1e-5) and score.count == len(continuation)
    with pytest.raises(ValueError, match="empty context"):
        score_continuations(model, [([], [1])])


def write_shards(directory, arrays, tokenizer="byte"):
    write_token_shards(directory, arrays, load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer)
    return directory


def test_token_shards_and_errors(model, tmp_path):
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 256, 70), rng.integers(0, 256, 30)]
    directory = write_shards(tmp_path / "math", shards)
    opened = TokenShards(directory)
    assert [a.tolist() for a in opened.arrays] == [s.tolist() for s in shards] and opened.eos_id == EOS
    result = evaluate_perplexity(model, {"math": directory, "array": shards[0]}, window=32)
    assert result["math"]["tokens"] == 69 + 29
    assert result["array"]["nll"] == pytest.approx(perplexity(model, shards[0], window=32)["nll"])
    assert perplexity(model, shards, max_tokens=80)["tokens"] == 69 + 9

    shard = directory / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"shard-00001.bin: truncated shard: 59 bytes is not a multiple of 2"):
        TokenShards(directory)
    with pytest.raises(DataError, match="manifest.json: no such file"):
        TokenShards(tmp_path)
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        perplexity(model, np.array([1, 2, 300]))


def test_shards_are_checked_against_the_model_before_scoring(model, tmp_path):
    rng = np.random.default_rng(2)
    # data of a tokenizer with a larger vocabulary than the model's: refused at open, naming the shard
    big = {"kind": "hf", "name": "big", "vocab_size": 5000, "eos_id": 4999}
    ids = np.append(rng.integers(0, 256, 40), [4000, 4999])
    write_shards(tmp_path / "big", [rng.integers(0, 256, 20), ids], tokenizer=big)
    with pytest.raises(DataError, match=r"shard-00001.bin: token id 4000 at token offset 40 is >= the size 260 of "
                                        r"the model's vocabulary; the data was prepared with big"):
        evaluate_perplexity(model, {"big": tmp_path / "big"})
    # a shard whose bytes changed (valid ids, same size): refused at open by its checksum
    directory = write_shards(tmp_path / "ok", [rng.integers(0, 256, 64)])
    shard = directory / "shard-00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[30] = (tokens[30] + 1) % 256
    tokens.tofile(shard)
    with pytest.raises(DataError, match="shard-00000.bin: contents differ from the manifest's sha256"):
        evaluate_perplexity(model, {"ok": directory})


def test_cli_perplexity_refuses_byte_shards_with_a_bpe_model(model, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 50)
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    bpe = train_bpe_tokenizer([corpus], 260, directory / "tokenizer")
    assert bpe.vocab_size <= model.config.vocab_size
    data = write_shards(tmp_path / "bytes", [np.append(np.frombuffer(b"the cat", np.uint8), EOS)])
    assert main(["perplexity", str(directory), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest/tokenizer mismatch" in err and "shard-00000.bin" in err
    assert "prepared with byte (vocab 260)" in err and "but the model uses" in err and "--tokenizer" in err


def test_cli_perplexity(model, tmp_path, capsys):
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    load_tokenizer("byte").save(directory / "tokenizer")
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    write_shards(data / "math", [np.append(rng.integers(0, 256, 50), EOS)])
    write_shards(data / "code", [rng.integers(0, 256, 90)])
    out = tmp_path / "ppl.json"
    assert main(["perplexity", str(directory), "--data", str(data), "--window", "32", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["sources"]) == {"code", "math"}
    assert report["sources"]["math"]["tokens"] == 50 and report["sources"]["math"]["document_end"] == EOS
    assert report["sources"]["code"]["tokens"] == 89
    assert "perplexity" in capsys.readouterr().out
    assert main(["perplexity", str(directory), "--data", f"m={data / 'math'},c={data / 'code'}",
                 "--no-documents", "--max-tokens", "40"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    assert set(report["sources"]) == {"m", "c"} and report["sources"]["m"]["tokens"] == 39
    assert main(["perplexity", str(directory), "--data", str(tmp_path / "missing")]) == 2

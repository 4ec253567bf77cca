import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polyglu.cli import main
from polyglu.data.tokenizer import load_tokenizer
from polyglu.eval.perplexity import evaluate_perplexity, perplexity, read_token_shards, sliding_windows
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


def write_shards(directory, arrays, dtype="uint16"):
    directory.mkdir(parents=True)
    for i, array in enumerate(arrays):
        np.asarray(array, dtype=dtype).tofile(directory / f"shard-{i:05d}.bin")
    manifest = {"dtype": dtype, "tokenizer": {"kind": "byte", "name": "byte", "vocab_size": 260, "eos_id": EOS}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_token_shards_and_errors(model, tmp_path):
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 256, 70), rng.integers(0, 256, 30)]
    directory = write_shards(tmp_path / "math", shards, dtype="uint32")
    arrays, manifest = read_token_shards(directory)
    assert [a.tolist() for a in arrays] == [s.tolist() for s in shards] and manifest["dtype"] == "uint32"
    result = evaluate_perplexity(model, {"math": directory, "array": shards[0]}, window=32)
    assert result["math"]["tokens"] == 69 + 29
    assert result["array"]["nll"] == pytest.approx(perplexity(model, shards[0], window=32)["nll"])
    assert perplexity(model, shards, max_tokens=80)["tokens"] == 69 + 9

    (directory / "shard-00002.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match=r"shard-00002.bin: 3 bytes is not a multiple"):
        read_token_shards(directory)
    with pytest.raises(FileNotFoundError, match="manifest.json: missing"):
        read_token_shards(tmp_path)
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        perplexity(model, np.array([1, 2, 300]))


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

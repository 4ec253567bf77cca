"""Bad inputs and faults, each run through the CLI as a user would (`polyglu.cli.main`): a non-zero
exit, one line on stderr naming the cause, and no pre-existing file changed.

Every case here is a row of the table in docs/reliability.md, and the row must show the message
fragment the test expects: the doc stays true to what the code does."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from polyglu.cli import main
from polyglu.data.prepare import prepare, prepare_builtin_math
from polyglu.data.shards import write_token_shards
from polyglu.data.tokenizer import load_tokenizer, train_bpe_tokenizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


@pytest.fixture(scope="module")
def template(tmp_path_factory, model):
    """Inputs shared by every case, copied into each test's own directory."""
    root = tmp_path_factory.mktemp("template")
    model.save_pretrained(root / "model")  # byte vocabulary (260), context 48
    load_tokenizer("byte").save(root / "model" / "tokenizer")
    corpus = root / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 50)
    model.save_pretrained(root / "bpe_model")
    train_bpe_tokenizer([corpus], 260, root / "bpe_model" / "tokenizer")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(40)))
    prepare([docs], "byte", root / "bytes")
    prepare_builtin_math("byte", root / "math", n_train=20, n_val=4, n_test=4)
    (root / "a_file").write_text("not a directory\n")
    return root


@pytest.fixture
def ws(template, tmp_path):
    shutil.copytree(template, tmp_path / "ws", symlinks=True)
    return tmp_path / "ws"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


# ---- the cases: id -> (setup(ws) returning argv, expected fragment of the one error line)


def _yaml(ws, name, data: bytes):
    (ws / name).write_bytes(data)
    return ["train", "--config", str(ws / name), f"run_dir={ws / 'run'}", "train.max_steps=1"]


def _symlink_loop(ws):
    loop = ws / "loop"
    loop.mkdir()
    (loop / "config.json").symlink_to("config.json")
    shutil.copy(ws / "model" / "model.safetensors", loop)
    return ["generate", str(loop), "--prompt", "hi"]


def _wrong_rank(ws):
    torch.save({"model": {"embeddings.weight": torch.zeros(8)}}, ws / "upstream.pt")
    return ["convert", "--from", "upstream", str(ws / "upstream.pt"), str(ws / "converted")]


def _random_pt(ws):
    (ws / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    return ["convert", "--from", "upstream", str(ws / "random.pt"), str(ws / "converted")]


def _math_rows(ws):
    (ws / "math.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2 #### 2"}) + "\n"
                                   + json.dumps({"question": "why?", "answer": "because"}) + "\n")
    return ["eval-math", str(ws / "model"), "--data", str(ws / "math.jsonl")]


def _damaged_shard(ws):
    shard = ws / "bytes" / "shard-00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[7] = ord("Z")  # a valid id, same size: only the checksum can tell
    tokens.tofile(shard)
    return ["perplexity", str(ws / "model"), "--data", str(ws / "bytes")]


def _big_vocab_shards(ws):
    identity = {"kind": "hf", "name": "big", "vocab_size": 5000, "eos_id": 4999}
    write_token_shards(ws / "big", [np.array([1, 2, 3, 4000, 4999])], identity)
    shutil.copytree(ws / "model", ws / "bare_model", ignore=shutil.ignore_patterns("tokenizer"))  # no tokenizer
    return ["perplexity", str(ws / "bare_model"), "--data", str(ws / "big")]


def _train_other_tokenizer(ws):
    return ["train", f"run_dir={ws / 'run'}", f"data.sources={{bytes: {ws / 'bytes'}}}",
            f"data.tokenizer={ws / 'bpe_model' / 'tokenizer'}", "train.max_steps=1", "data.seq_len=16"]


def _prepare_base(ws, *extra):  # a valid prepare command, plus `extra`
    return ["prepare", "--input", str(ws / "docs.jsonl"), "--tokenizer", "byte", "--out", str(ws / "new"),
            "--no-progress", *extra]


def _builtin(ws, n_train=20, seed=0):
    return ["prepare", "--builtin", "math", "--tokenizer", "byte", "--out", str(ws / "math"), "--n-train",
            str(n_train), "--n-val", "4", "--n-test", "4", "--seed", str(seed), "--no-progress"]


def _train_base(ws, *extra):  # a valid one-step training command on the prepared byte shards
    return ["train", f"run_dir={ws / 'run'}", f"data.sources={{bytes: {ws / 'bytes'}}}", "train.max_steps=1",
            "data.seq_len=16", *extra]


def _alias_bomb(ws):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return _yaml(ws, "bomb.yaml", ("\n".join(lines) + "\ntrain:\n  lr: 1e-3\n").encode())


def _init_from_own_final(ws):
    final = ws / "run" / "final"
    shutil.copytree(ws / "model", final)
    (ws / "run" / "run_config.json").write_text("{}\n")
    return _train_base(ws, f"init_from={final}", "--overwrite")


def _nan_weight(ws):
    from polyglu import load_model

    model = load_model(ws / "model")
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(ws / "nan_model")
    return ["generate", str(ws / "nan_model"), "--prompt", "hi", "--tokenizer", "byte"]


def _huge_config(ws):
    shutil.copytree(ws / "model", ws / "huge")
    meta = json.loads((ws / "huge" / "config.json").read_text())
    meta["model"].update(d_model=16384, d_ff=65536, n_layers=96, n_heads=128, n_kv_heads=8, head_dim=128)
    (ws / "huge" / "config.json").write_text(json.dumps(meta))
    return ["generate", str(ws / "huge"), "--prompt", "hi"]


def _truncated_weights(ws):
    shutil.copytree(ws / "model", ws / "cut")
    data = (ws / "cut" / "model.safetensors").read_bytes()
    (ws / "cut" / "model.safetensors").write_bytes(data[: len(data) // 3])
    return ["perplexity", str(ws / "cut"), "--data", str(ws / "bytes")]


def _foreign_output(ws):
    (ws / "notes.json").write_text('{"mine": true}\n')
    return ["perplexity", str(ws / "model"), "--data", str(ws / "bytes"), "--output", str(ws / "notes.json")]


def _utf16_input(ws):
    (ws / "utf16.txt").write_bytes("a document\n".encode("utf-16"))
    return ["prepare", "--input", str(ws / "utf16.txt"), "--tokenizer", "byte", "--out", str(ws / "new"),
            "--no-progress"]


CASES = {
    "prepare-validation-is-input": (lambda ws: _prepare_base(ws, "--validation", str(ws / "docs.jsonl")),
                                    "docs.jsonl is also a training input"),
    "input-utf16": (_utf16_input, "utf16.txt: UTF-16 text (a UTF-16 byte-order mark at the start); convert it to "
                                  "UTF-8"),
    "yaml-alias-bomb": (_alias_bomb, "bomb.yaml line 2: YAML alias '*a' at column 8: aliases are not accepted"),
    "train-lr-nan": (lambda ws: _train_base(ws, "train.lr=nan"), "train.lr must be a finite number, got nan"),
    "train-lr-inf": (lambda ws: _train_base(ws, "train.lr=inf"), "train.lr must be a finite number, got inf"),
    "train-threads-over-cpus": (lambda ws: _train_base(ws, "train.threads=4096"),
                                "train.threads=4096 exceeds the"),
    "train-fused-loss-off-cuda": (lambda ws: _train_base(ws, "train.loss_kernel=fused"),
                                  "train.loss_kernel=fused runs Triton kernels on CUDA, not on cpu"),
    "train-fused-loss-without-liger": (lambda ws: _train_base(ws, "train.loss_kernel=fused"),
                                       "train.loss_kernel=fused needs liger-kernel, which is not installed"),
    "train-vocab-pad-not-positive": (lambda ws: _train_base(ws, "train.vocab_pad_multiple=0"),
                                     "train.vocab_pad_multiple must be positive or null, got 0"),
    "init-from-inside-overwritten-run": (_init_from_own_final, "which --overwrite deletes before training"),
    "validation-is-training": (lambda ws: _train_base(ws, f"data.validation={{held: {ws / 'bytes'}}}"),
                               "data.validation.held is data.sources.bytes"),
    "duplicate-source": (lambda ws: _train_base(ws, f"data.sources={{a: {ws / 'bytes'}, b: {ws / 'bytes'}}}"),
                         "data.sources.b and data.sources.a are the same directory"),
    "perplexity-duplicate-names": (
        lambda ws: ["perplexity", str(ws / "model"), "--data", f"x={ws / 'bytes'},x={ws / 'math'}"],
        "--data: two sources are named 'x'"),
    "fewshot-from-evaluated-file": (
        lambda ws: [*_math_rows(ws)[:4], "--num-fewshot", "1", "--fewshot-data", str(ws / "math.jsonl")],
        "--fewshot-data is the evaluated file"),
    "output-is-model-config": (
        lambda ws: ["perplexity", str(ws / "model"), "--data", str(ws / "bytes"), "--output",
                    str(ws / "model" / "config.json")],
        "would replace a file inside the input"),
    "output-jsonl-is-data": (lambda ws: [*_math_rows(ws)[:4], "--output-jsonl", str(ws / "math.jsonl")],
                             "is an input of this command"),
    "output-not-written-by-polyglu": (_foreign_output, "exists and is not an earlier output of this command"),
    "prompt-not-utf8": (lambda ws: ["generate", str(ws / "model"), "--prompt", "caf\udce9"],
                        "--prompt: not valid UTF-8 (byte 0xe9 at character 3)"),
    "non-finite-weight": (_nan_weight, "tensor 'layers.0.attn.q_proj.weight' holds 1 non-finite value(s) (NaN)"),
    "config-names-a-huge-model": (_huge_config, "model.safetensors does not match its config; "),
    "truncated-weights": (_truncated_weights, "model.safetensors: not a readable safetensors file"),
    "top-p-zero": (lambda ws: ["generate", str(ws / "model"), "--prompt", "hi", "--top-p", "0"],
                   "--top-p must be in (0, 1]"),
    "top-p-above-one": (lambda ws: ["generate", str(ws / "model"), "--prompt", "hi", "--top-p", "1.5"],
                        "--top-p must be in (0, 1]"),
    "negative-temperature": (lambda ws: ["generate", str(ws / "model"), "--prompt", "hi", "--temperature", "-1"],
                             "--temperature must be >= 0"),
    "negative-top-k": (lambda ws: ["generate", str(ws / "model"), "--prompt", "hi", "--top-k", "-1"],
                       "--top-k must be >= 0"),
    "max-new-tokens-over-context": (
        lambda ws: ["generate", str(ws / "model"), "--prompt", "hi", "--max-new-tokens", "100"],
        "--max-new-tokens 100 does not fit the model context of 48 tokens"),
    "chat-max-new-tokens-over-context": (lambda ws: ["chat", str(ws / "model"), "--max-new-tokens", "48"],
                                         "--max-new-tokens 48 does not fit the model context of 48 tokens"),
    "compile-unknown-mode": (lambda ws: ["eval-math", str(ws / "model"), "--data", str(ws / "math.jsonl"),
                                         "--compile", "fast"],
                             "--compile: compile='fast' is neither a torch.compile mode (default, reduce-overhead"),
    "prepare-out-is-a-file": (lambda ws: ["prepare", "--input", str(ws / "docs.jsonl"), "--tokenizer", "byte",
                                          "--out", str(ws / "a_file")],
                              "a_file: is a file; expected a directory"),
    "export-hf-out-is-a-file": (lambda ws: ["export-hf", str(ws / "model"), str(ws / "a_file")],
                                "a_file: is a file; expected a new directory"),
    "convert-out-under-a-file": (
        lambda ws: ["convert", "--from", "upstream", str(ws / "random.pt"), str(ws / "a_file" / "out")],
        "its parent"),
    "config-json-symlink-loop": (_symlink_loop, "loop/config.json: Too many levels of symbolic links"),
    "yaml-not-utf8": (lambda ws: _yaml(ws, "latin1.yaml", b"train:\n  # caf\xe9\n  max_steps: 1\n"),
                      "latin1.yaml line 2: not UTF-8"),
    "yaml-syntax-error": (lambda ws: _yaml(ws, "syntax.yaml", b"train:\n  betas: [0.9, 0.95\nmodel: {}\n"),
                          "syntax.yaml line 3: YAML syntax error"),
    "yaml-duplicate-key": (lambda ws: _yaml(ws, "dup.yaml", b"train:\n  lr: 1e-3\n  lr: 2e-3\n"),
                           "dup.yaml line 3: duplicate key 'lr' (first at line 2)"),
    "yaml-empty": (lambda ws: _yaml(ws, "empty.yaml", b"\n"), "empty.yaml is empty"),
    "shard-tokens-zero": (lambda ws: _prepare_base(ws, "--shard-tokens", "0"), "--shard-tokens must be positive"),
    "perplexity-stride-zero": (
        lambda ws: ["perplexity", str(ws / "model"), "--data", str(ws / "bytes"), "--stride", "0"],
        "--stride must be positive"),
    "analyze-max-tokens-zero": (
        lambda ws: ["analyze", str(ws / "model"), "--out", str(ws / "an"), "--max-tokens", "0"],
        "--max-tokens must be positive"),
    "eval-math-answer-not-numeric": (_math_rows, "math.jsonl line 2: answer 'because' has no numeric final answer"),
    "upstream-tensor-wrong-rank": (_wrong_rank, "tensor 'embeddings.weight' has shape (8,), expected 2 dimensions"),
    "random-bytes-pt": (_random_pt, "random.pt: not a PyTorch checkpoint"),
    "missing-tokenizer-path": (lambda ws: ["prepare", "--input", str(ws / "docs.jsonl"), "--tokenizer",
                                           str(ws / "no_tok"), "--out", str(ws / "new")],
                               "no_tok: no such directory"),
    "perplexity-byte-shards-bpe-model": (
        lambda ws: ["perplexity", str(ws / "bpe_model"), "--data", str(ws / "bytes")],
        "manifest/tokenizer mismatch: shard-00000.bin and the other shards were prepared with byte (vocab 260), "
        "but the model uses"),
    "train-shards-of-another-tokenizer": (_train_other_tokenizer, "but the run uses"),
    "max-new-tokens-with-long-prompt": (
        lambda ws: ["generate", str(ws / "model"), "--prompt", "x" * 40, "--max-new-tokens", "10"],
        "--max-new-tokens 10 does not fit the model context of 48 tokens with the prompt's 40 tokens; use at most 8"),
    "override-unknown-key": (lambda ws: _yaml(ws, "ok.yaml", b"train:\n  lr: 1.0e-3\n") + ["train.max_step=3"],
                             "command-line override train.max_step=3: unknown config key 'train.max_step'"),
    "sft-seq-len-over-context": (
        lambda ws: ["sft", f"run_dir={ws / 'sft'}", f"init_from={ws / 'model'}", "train.max_steps=1"],
        "data.seq_len=256 is longer than the context of init_from"),
    "sft-tokenizer-of-another-model": (
        lambda ws: ["sft", f"run_dir={ws / 'sft'}", f"init_from={ws / 'model'}", "data.seq_len=16",
                    f"data.tokenizer={ws / 'bpe_model' / 'tokenizer'}", "train.max_steps=1"],
        "is not the tokenizer of init_from"),
    "shard-checksum-mismatch": (_damaged_shard, "shard-00000.bin: contents differ from the manifest's sha256"),
    "shard-ids-outside-model-vocab": (_big_vocab_shards,
                                      "shard-00000.bin: token id 4000 at token offset 3 is >= the size 260 of the "
                                      "model's vocabulary"),
    "builtin-other-seed": (lambda ws: _builtin(ws, seed=1),
                           "already prepared from the built-in corpus with seed=0, not 1"),
    "builtin-other-size": (lambda ws: _builtin(ws, n_train=21),
                           "with n_train=20, not 21"),
    "perplexity-missing-data": (lambda ws: ["perplexity", str(ws / "model"), "--data", str(ws / "nothing")],
                                "nothing: no such directory"),
}

# what a case changes around main(): environment variables, or "patch": ("module.attribute", value)
CASE_ENV = {
    "train-fused-loss-off-cuda": {"TRITON_INTERPRET": "0"},  # the tests run Triton's interpreter (conftest)
    "train-fused-loss-without-liger": {"patch": ("polyglu.train.setup.fused_available", lambda: False)},
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_line_and_changes_nothing(case, ws, capsys, monkeypatch):
    setup, expected = CASES[case]
    for name, value in CASE_ENV.get(case, {}).items():
        monkeypatch.setattr(*value) if name == "patch" else monkeypatch.setenv(name, value)
    argv = setup(ws)
    before = _snapshot(ws)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, f"{case}: exit 0"
    assert len(lines) == 1, f"{case}: expected one line, got:\n{err}"
    assert expected in lines[0], lines[0]
    after = _snapshot(ws)
    if case.startswith("sft-"):
        assert not (ws / "sft").exists(), f"{case}: the refused run left its directory"
    assert {k: v for k, v in after.items() if k in before} == before, f"{case}: changed a pre-existing file"
    # the documented table lists this case with the message the user gets
    row = next((r for r in DOC.read_text().splitlines() if r.startswith(f"| `{case}` |")), None)
    assert row is not None, f"docs/reliability.md has no row for `{case}`"
    assert expected in row.replace("\\|", "|"), f"docs/reliability.md row `{case}` does not show: {expected}"


def test_every_documented_row_is_tested():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), flags=re.M)
    documented_here = set(rows) - TESTED_ELSEWHERE
    assert documented_here == set(CASES)


# rows of the table kept true by other test files (accepted inputs, or run-directory cases)
TESTED_ELSEWHERE = {"yaml-exponent-float", "copied-prepared-directory", "held-out-split-document-boundary",
                    "input-edited-in-the-middle", "shard-replaced-large-data", *(
                        re.findall(r"^\| `([a-z0-9-]+)` \|.*\| test_(?:train_rundir|native|compiler|fused|train|cli|faults)\.py::\w+ \|$",
                                   DOC.read_text(), flags=re.M))}


@pytest.mark.parametrize("file, at_least", [("test_train_rundir.py", 10), ("test_native.py", 5),
                                            ("test_compiler.py", 1), ("test_fused.py", 2), ("test_train.py", 1),
                                            ("test_cli.py", 1), ("test_faults.py", 5)])
def test_rows_kept_by_other_files_name_existing_tests(file, at_least):
    """Each run-directory or native-kernel row names a test of its file that exists."""
    names = re.findall(rf"\| {re.escape(file)}::(\w+) \|$", DOC.read_text(), flags=re.M)
    source = (Path(__file__).parent / file).read_text()
    assert len(names) >= at_least
    missing = [n for n in names if f"def {n}(" not in source]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"

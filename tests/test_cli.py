"""The command line: help, info, python -m."""

import json
import subprocess
import sys

from polyglu.cli import VERBS, main


def test_help_lists_verbs(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out


def test_help_does_not_import_torch():
    code = "import sys; from polyglu.cli import main; main(['--help']) if False else None; import polyglu; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_info_paper_counts(capsys):
    assert main(["info", "paper-600m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["total"] == 597_153_888
    assert info["parameters"]["routing"] == 1_380_960
    assert main(["info", "paper-600m"]) == 0
    text = capsys.readouterr().out
    assert "597,153,888" in text and "1,380,960" in text and "0.231%" in text


def test_info_model_dir_and_errors(tmp_path, tiny_config, capsys):
    from polyglu import PolychromaticLM

    PolychromaticLM(tiny_config).save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["d_ff"] == 48
    assert main(["info", "no-such-thing"]) == 2
    assert "neither a model directory nor a preset" in capsys.readouterr().err


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "polyglu", "info", "debug", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["parameters"]["total"] > 0


def test_every_verb_has_help(capsys):
    import pytest

    for verb in VERBS:
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        assert exit_info.value.code == 0, verb
        assert f"polyglu {verb}" in capsys.readouterr().out


# ---- defaults that fit the model, devices, progress (issue 26)

import pytest  # noqa: E402


@pytest.fixture
def byte_model_dir(tmp_path, model):
    """conftest's byte-vocabulary model (context 48) with its tokenizer."""
    from polyglu.data.tokenizer import load_tokenizer

    directory = tmp_path / "model"
    model.save_pretrained(directory)
    load_tokenizer("byte").save(directory / "tokenizer")
    return directory


def test_generate_default_new_tokens_fit_the_prompt_and_the_advice_works(byte_model_dir, capsys):
    prompt = "x" * 40  # 40 byte tokens of a 48-token context
    assert main(["generate", str(byte_model_dir), "--prompt", prompt, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["generated_tokens"] <= 8
    assert main(["generate", str(byte_model_dir), "--prompt", prompt, "--max-new-tokens", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("with the prompt's 40 tokens; use at most 8") and "\n" not in err
    assert main(["generate", str(byte_model_dir), "--prompt", prompt, "--max-new-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == 40
    assert main(["generate", str(byte_model_dir), "--prompt", "x" * 48]) == 2
    assert "shorten it to at most 47 tokens" in capsys.readouterr().err


def test_chat_and_eval_math_defaults_fit_a_small_context(byte_model_dir, tmp_path, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(byte_model_dir)]) == 0  # default 256 new tokens would not fit 48
    assert capsys.readouterr().out.count("assistant> ") == 1
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2", "difficulty": 1}) + "\n")
    assert main(["eval-math", str(byte_model_dir), "--data", str(data), "--quiet"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_half_the_context_is_the_default_without_a_prompt():
    from polyglu.commands.common import default_max_new_tokens

    assert default_max_new_tokens(4096) == 256 and default_max_new_tokens(256) == 128
    assert default_max_new_tokens(48, prompt_tokens=40, cap=128) == 8 and default_max_new_tokens(2) == 1


DEVICE_VERBS = {
    "generate": ["M", "--prompt", "hi"], "chat": ["M"], "eval": ["M", "--tasks", "x"],
    "eval-math": ["M", "--data", "x.jsonl"], "perplexity": ["M", "--data", "d"], "analyze": ["M", "--out", "o"],
    "train": [], "sft": [], "ablate": ["--config", "x.yaml"],
}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine with CUDA")
@pytest.mark.parametrize("verb", list(DEVICE_VERBS))
def test_device_cuda_without_cuda_is_one_line_in_every_verb(verb, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([verb, *DEVICE_VERBS[verb], "--device", "cuda"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"polyglu {verb}: error: --device cuda: CUDA is not available "
                   f"({err[0].split('(', 1)[1]}"] and "use --device cpu" in err[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_every_verb_with_device_is_checked():
    """DEVICE_VERBS above covers every verb that has --device."""
    from polyglu.cli import _build_parser

    with_device = set()
    for verb in VERBS:
        parser = _build_parser(verb)
        sub = next(a for a in parser._actions if a.dest == "verb").choices[verb]
        if any("--device" in a.option_strings for a in sub._actions):
            with_device.add(verb)
    assert with_device == set(DEVICE_VERBS)


def test_an_unknown_device_name_is_one_line(capsys):
    assert main(["generate", "M", "--prompt", "hi", "--device", "gpu0"]) == 2
    assert "--device 'gpu0': not a device (expected cpu, cuda, cuda:N or auto)" in capsys.readouterr().err


def test_train_without_config_trains_past_its_warm_up(capsys, tmp_path, monkeypatch):
    """The defaults leave warm-up early, and `polyglu train` with no --config says what it trains."""
    from polyglu.config import RunConfig
    from polyglu.train.setup import build_run

    defaults = RunConfig()
    assert defaults.train.warmup_steps <= defaults.train.max_steps // 10
    monkeypatch.chdir(tmp_path)
    logs = []
    config = RunConfig.load(None, ["train.max_steps=4", "train.warmup_steps=8", "data.builtin_train=20",
                                   "data.builtin_validation=4", "data.builtin_test=4", "data.seq_len=32"])
    build_run(config, log=logs.append).run_lock.release()
    assert any("never leaves warm-up" in line for line in logs)


def test_progress_shows_on_a_terminal_unless_quiet(monkeypatch):
    import argparse
    import io

    from polyglu.commands.common import progress_disabled, progress_visible

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    assert progress_visible(argparse.Namespace(quiet=False)) and progress_disabled(argparse.Namespace()) is None
    assert not progress_visible(argparse.Namespace(quiet=True)) and progress_disabled(argparse.Namespace(quiet=True))
    assert not progress_visible(argparse.Namespace(no_progress=True))
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a pipe or a file
    assert not progress_visible(argparse.Namespace(quiet=False))


def test_verbs_doing_long_work_take_quiet(capsys):
    for verb in ("train", "sft", "prepare", "eval-math", "perplexity", "analyze", "generate"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "--quiet" in capsys.readouterr().out, verb

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

"""Run directories: one run per directory, one trainer at a time, nothing lost or mixed by a rerun,
a kill, a Ctrl-C or a resume with another config."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import RandomTokens, _config, _losses, _trainer

import polyglu
from polyglu import PolychromaticLM
from polyglu.analysis import training_curves
from polyglu.atomic import temporary_name
from polyglu.cli import main
from polyglu.train import checkpointing as ckpt
from polyglu.train import trainer as trainer_module
from polyglu.train.metrics import read_metrics, truncate_metrics
from polyglu.train.rundir import LOCK_NAME, RunDirError, RunLock, check_resume_config, clean_leftovers
from polyglu.train.trainer import Trainer, TrainingInterrupted

SRC = str(Path(polyglu.__file__).resolve().parents[1])
TESTS = str(Path(__file__).resolve().parent)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "run_config_history.jsonl").read_text().splitlines()]


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **kwargs)


def _one_line(error) -> str:
    text = str(error.value) if hasattr(error, "value") else str(error)
    assert "\n" not in text.strip()
    return text


# ---- a second start on a run directory


def test_fresh_start_on_a_finished_run_is_refused_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    _trainer(_config(run, max_steps=6)).fit()
    before = _hashes(run)
    shorter = _trainer(_config(run, max_steps=3))
    with pytest.raises(RunDirError) as error:
        shorter.fit()
    message = _one_line(error)
    assert str(run) in message and "--resume" in message and "--overwrite" in message
    for name in ("run_config.json", "metrics.jsonl", "checkpoints/", "final/"):
        assert name in message
    assert _hashes(run) == before  # nothing rewritten, appended or pruned
    assert not (run / LOCK_NAME).exists()  # the refused trainer let go of the lock


def test_a_start_that_trained_no_step_does_not_block_the_retry(tmp_path, monkeypatch):
    """A first step that fails (here: a forward raising) leaves run_config.json; the retry starts afresh."""
    run = tmp_path / "run"
    trainer = _trainer(_config(run, max_steps=3))
    monkeypatch.setattr(trainer, "_train", lambda stop_at: (_ for _ in ()).throw(RuntimeError("set-up failed")))
    with pytest.raises(RuntimeError, match="set-up failed"):
        trainer.fit()
    assert (run / "run_config.json").is_file() and not (run / "metrics.jsonl").exists()
    monkeypatch.undo()
    _trainer(_config(run, max_steps=3)).fit()  # no --resume, no --overwrite needed
    assert _steps(run) == [1, 2, 3] and [h["event"] for h in _history(run)] == ["start"]


def test_overwrite_deletes_the_old_run_then_trains(tmp_path):
    run = tmp_path / "run"
    _trainer(_config(run, max_steps=6, checkpoint_every=2)).fit()
    logs = []
    config = _config(run, max_steps=3, checkpoint_every=100)
    torch.manual_seed(0)
    trainer = Trainer(config, PolychromaticLM(config.model_config()), RandomTokens(64, 2, 16),
                      RandomTokens(64, 2, 16, seed=1), log=logs.append, overwrite=True)
    trainer.fit()
    assert any("--overwrite: deleted the previous run's" in line for line in logs)
    assert _steps(run) == [1, 2, 3]
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [3]  # the old run's step 2..6 are gone
    assert json.loads((run / "final/config.json").read_text())["step"] == 3
    assert [h["event"] for h in _history(run)] == ["overwrite"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no trash left


def _cli_args(run_dir, *extra):
    return ["train", f"run_dir={run_dir}", f"data.builtin_dir={run_dir.parent / 'data'}", "data.builtin_train=60",
            "data.builtin_validation=10", "data.builtin_test=5", "data.seq_len=32", "model.vocab_size=320",
            "train.max_steps=3", "train.batch_size=2", "train.warmup_steps=1", "train.log_every=1",
            "train.eval_every=3", "train.eval_batches=1", "train.checkpoint_every=2", "train.progress=false",
            "train.routing_stats_every=3", "model.preset=debug", "model.d_model=32", "model.d_ff=48",
            "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=8", "model.max_seq_len=64",
            "model.gate_hidden=8", *extra]


def test_cli_rerun_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_cli_args(run)) == 0
    before = _hashes(tmp_path)
    capsys.readouterr()
    assert main(_cli_args(run)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a run" in err and "--overwrite" in err
    assert _hashes(tmp_path) == before  # nothing written: refused before the data and the model
    assert main(_cli_args(run, "train.max_steps=4", "--resume")) == 0
    assert _steps(run) == [1, 2, 3, 4]
    assert main(_cli_args(run, "--overwrite")) == 0
    assert _steps(run) == [1, 2, 3]
    assert [h["event"] for h in _history(run)] == ["overwrite"]


# ---- the lock


def test_second_trainer_on_a_live_run_dir_exits_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = _python("import sys; from polyglu.train.rundir import RunLock\n"
                     "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); sys.stdin.read()",
                     str(run), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        trainer = _trainer(_config(run))
        start = time.perf_counter()
        with pytest.raises(RunDirError) as error:
            trainer.fit()
        assert time.perf_counter() - start < 5  # at once, not after waiting
        message = _one_line(error)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "in use" in message
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            trainer.resume()
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    _trainer(_config(run, max_steps=2)).fit()  # released by its exit: the run directory is free again


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = _python("pass")
    dead.wait(timeout=30)
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    logs = []
    config = _config(run, max_steps=2)
    Trainer(config, PolychromaticLM(config.model_config()), RandomTokens(64, 2, 16), log=logs.append).fit()
    assert any("taking over a stale lock" in line and f"pid {dead.pid}" in line for line in logs)
    assert _steps(run) == [1, 2] and not (run / LOCK_NAME).exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "other-node-7"}))
    with pytest.raises(RunDirError) as error:
        RunLock(run).acquire()
    message = _one_line(error)
    assert "pid 1 on host other-node-7" in message and f"delete {run / LOCK_NAME}" in message


# ---- killed runs


KILLED_RUN = """
import sys, time
from pathlib import Path
from test_train import _config, _trainer
from polyglu.train import checkpointing as ckpt

real_publish = ckpt._publish

def slow_publish(run_dir, tmp, final, keep):
    print("publishing", final.name, flush=True)  # the temporary directory is complete, not yet renamed
    time.sleep(60)
    real_publish(run_dir, tmp, final, keep)

ckpt._publish = slow_publish if len(sys.argv) > 2 else real_publish
if len(sys.argv) > 2:
    real_first = ckpt.save_checkpoint
    def first_fast(*args, **kwargs):  # the step-3 checkpoint completes; the step-6 one is killed mid-write
        ckpt._publish = real_publish if args[1] < 6 else slow_publish
        return real_first(*args, **kwargs)
    ckpt.save_checkpoint = first_fast
_trainer(_config(Path(sys.argv[1]), max_steps=9)).fit()
"""


def test_sigkill_mid_checkpoint_then_resume_is_exact_and_logs_each_step_once(tmp_path):
    full = tmp_path / "full"
    _trainer(_config(full, max_steps=9)).fit()
    run = tmp_path / "run"
    child = _python(KILLED_RUN, str(run), "kill", stdout=subprocess.PIPE)
    try:
        line = child.stdout.readline().strip()
        assert line == "publishing step-00000006", line
    finally:
        child.kill()  # SIGKILL mid-checkpoint: no handler, no clean-up, the lock file left behind
        child.wait(timeout=30)
    assert (run / LOCK_NAME).is_file() and list((run / "checkpoints").glob(".tmp-step-00000006-*"))
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert ckpt.latest_checkpoint(run).name == "step-00000003"

    logs = []
    config = _config(run, max_steps=9)
    torch.manual_seed(123)  # a new process: another init, overwritten by the checkpoint
    resumed = Trainer(config, PolychromaticLM(config.model_config()), RandomTokens(64, 2, 16),
                      RandomTokens(64, 2, 16, seed=1), log=logs.append)
    assert resumed.resume() and resumed.step == 3
    resumed.fit()
    assert any("taking over a stale lock" in line for line in logs)
    assert any("dropped 3 rows logged after step 3" in line for line in logs)
    assert any("left-over temporary" in line for line in logs)
    assert _steps(run) == list(range(1, 10))  # each step once
    assert _losses(run) == _losses(full)  # and bit for bit the uninterrupted run
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / LOCK_NAME).exists()
    assert [h["event"] for h in _history(run)] == ["start", "resume"]


def test_a_kill_while_final_is_written_leaves_the_old_final_whole(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _trainer(_config(run, max_steps=4)).fit()
    old_final = _hashes(run / "final")
    real_save_model = trainer_module.save_model

    def dies_after_writing(model, directory, extra=None):
        real_save_model(model, directory, extra)  # weights and config.json written...
        raise KeyboardInterrupt  # ...then killed before the directory is in place

    monkeypatch.setattr(trainer_module, "save_model", dies_after_writing)
    longer = _trainer(_config(run, max_steps=6))
    longer.resume()
    with pytest.raises(KeyboardInterrupt):
        longer.fit()
    assert _hashes(run / "final") == old_final  # the old model, whole: not new weights with an old config
    monkeypatch.setattr(trainer_module, "save_model", real_save_model)
    again = _trainer(_config(run, max_steps=6))
    again.resume()
    again.fit()
    assert json.loads((run / "final/config.json").read_text())["step"] == 6
    assert not list(run.glob(".tmp-*")) and _steps(run) == [1, 2, 3, 4, 5, 6]


def test_leftovers_of_killed_writers_are_cleaned_and_an_interrupted_swap_put_back(tmp_path):
    """Where the filesystem cannot swap directories, the old one is renamed aside first; a kill
    between the two renames leaves no final/, which the next start restores."""
    run = tmp_path / "run"
    old_final = temporary_name(run / "final", "old")
    old_final.mkdir(parents=True)
    (old_final / "config.json").write_text("{}")
    leftovers = [temporary_name(run / "metrics.jsonl"), temporary_name(run / "checkpoints/step-00000008"),
                 run / "checkpoints/.tmp-step-00000004-77", run / ".trash-99"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x") if path.name.startswith(".metrics") else path.mkdir()
    (run / ".keep-me").write_text("a user's hidden file")
    logs = []
    cleaned = clean_leftovers(run, logs.append)
    assert sorted(cleaned) == sorted(str(p.relative_to(run)) for p in leftovers)
    assert not any(p.exists() for p in leftovers) and (run / ".keep-me").is_file()
    assert (run / "final/config.json").read_text() == "{}" and not old_final.exists()
    assert any("restored" in line for line in logs)


# ---- resuming with another config


@pytest.mark.parametrize("override,expected", [
    ({"batch_size": 4}, "train.batch_size 2 -> 4"),
    ({"seed": 5}, "train.seed 0 -> 5"),
    ({"lr": 1e-3}, "train.lr 0.003 -> 0.001"),
    ({"data.seq_len": 64}, "data.seq_len 256 -> 64"),
    ({"model.d_model": 64}, "model.d_model 32 -> 64"),
])
def test_resume_refuses_changes_that_alter_the_run(tmp_path, override, expected):
    run = tmp_path / "run"
    _trainer(_config(run, max_steps=6)).fit(stop_at=3)
    before = _hashes(run)
    train = {k: v for k, v in override.items() if "." not in k}
    config = _config(run, max_steps=6, **train)
    for key, value in override.items():
        if key.startswith("data."):
            setattr(config.data, key[5:], value)
        elif key.startswith("model."):
            config.model[key[6:]] = value
    trainer = _trainer(config)
    with pytest.raises(RunDirError) as error:  # not a load_state_dict traceback for d_model
        trainer.resume()
    message = _one_line(error)
    assert expected in message and "step-00000003" in message and "init_from=" in message
    assert _hashes(run) == before


def test_resume_lists_every_changed_key_in_one_line(tmp_path):
    run = tmp_path / "run"
    _trainer(_config(run, max_steps=6)).fit(stop_at=3)
    config = _config(run, max_steps=6, batch_size=4, warmup_steps=3)
    config.data.seq_len = 64
    with pytest.raises(RunDirError) as error:
        _trainer(config).resume()
    message = _one_line(error)
    assert "data.seq_len 256 -> 64, train.batch_size 2 -> 4, train.warmup_steps 2 -> 3" in message


def test_a_new_world_size_may_keep_the_global_batch_but_not_change_it(tmp_path):
    old = _config(tmp_path, batch_size=2).to_dict()
    two_ranks = {"world_size": 2, "batch_size": 2, "grad_accum": 2}
    changes = check_resume_config(old, _config(tmp_path, batch_size=4).to_dict(), tmp_path, "ckpt",
                                  old_layout=two_ranks, new_layout={"world_size": 1, "batch_size": 4, "grad_accum": 2})
    assert changes == {"train.batch_size": (2, 4), "world_size": (2, 1)}  # the same rows: safe, recorded
    with pytest.raises(RunDirError) as error:  # same config, half the ranks: half the global batch
        check_resume_config(old, old, tmp_path, "ckpt", old_layout=two_ranks,
                            new_layout={"world_size": 1, "batch_size": 2, "grad_accum": 2})
    assert "world_size 2 -> 1" in _one_line(error) and "global batch 4 rows x 2 micro-steps -> 2 x 2" in str(error.value)
    # half the ranks, twice the micro-steps (tokens_per_step): the same rows per step, split otherwise
    changes = check_resume_config(old, old, tmp_path, "ckpt", old_layout=two_ranks,
                                  new_layout={"world_size": 1, "batch_size": 2, "grad_accum": 4})
    assert changes == {"world_size": (2, 1), "global_batch": ("4x2", "2x4")}
    with pytest.raises(RunDirError, match="train.grad_accum 1 -> 2"):  # the same ranks: a choice that changes the run
        check_resume_config(old, _config(tmp_path, batch_size=2, grad_accum=2).to_dict(), tmp_path, "ckpt",
                            old_layout={"world_size": 1, "batch_size": 2, "grad_accum": 1},
                            new_layout={"world_size": 1, "batch_size": 2, "grad_accum": 2})


def test_resume_accepts_and_records_safe_changes(tmp_path):
    run = tmp_path / "run"
    _trainer(_config(run, max_steps=6)).fit(stop_at=3)
    logs = []
    config = _config(run, max_steps=8, eval_every=4, keep_checkpoints=1)
    torch.manual_seed(0)
    trainer = Trainer(config, PolychromaticLM(config.model_config()), RandomTokens(64, 2, 16),
                      RandomTokens(64, 2, 16, seed=1), log=logs.append)
    assert trainer.resume() and trainer.step == 3
    trainer.fit()
    assert any("resuming with changed settings: train.eval_every 3 -> 4" in line for line in logs)
    history = _history(run)
    assert [h["event"] for h in history] == ["start", "resume"] and history[1]["step"] == 3
    assert history[1]["changes"] == {"train.eval_every": {"old": 3, "new": 4},
                                     "train.keep_checkpoints": {"old": 3, "new": 1},
                                     "train.max_steps": {"old": 6, "new": 8}}
    assert json.loads((run / "run_config.json").read_text())["train"]["max_steps"] == 8
    assert _steps(run) == list(range(1, 9))


def test_resume_without_checkpoint_checks_run_config_and_restarts_the_log(tmp_path):
    run = tmp_path / "run"
    trainer = _trainer(_config(run, max_steps=6, checkpoint_every=100))
    real = trainer.train_step

    def dies_at_step_3():
        if trainer.step == 2:
            raise KeyboardInterrupt  # a kill before the first checkpoint
        return real()

    trainer.train_step = dies_at_step_3
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert _steps(run) == [1, 2] and ckpt.latest_checkpoint(run) is None
    with pytest.raises(RunDirError, match="train.batch_size 2 -> 4"):
        _trainer(_config(run, max_steps=6, checkpoint_every=100, batch_size=4)).resume()
    again = _trainer(_config(run, max_steps=6, checkpoint_every=100))
    assert not again.resume()
    again.fit()
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


# ---- Ctrl-C


def test_sigint_saves_a_checkpoint_and_the_resumed_run_is_exact(tmp_path):
    full = tmp_path / "full"
    _trainer(_config(full, max_steps=8, checkpoint_every=100)).fit()
    run = tmp_path / "run"
    trainer = _trainer(_config(run, max_steps=8, checkpoint_every=100))
    real = trainer.train_step

    def ctrl_c_during_step_5():
        out = real()
        if trainer.step == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer.train_step = ctrl_c_during_step_5
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as error:
        trainer.fit()
    assert signal.getsignal(signal.SIGINT) is previous  # handler restored
    assert error.value.step == 5 and error.value.checkpoint.name == "step-00000005"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [5] and not (run / "final").exists()
    assert not (run / LOCK_NAME).exists()
    resumed = _trainer(_config(run, max_steps=8, checkpoint_every=100), seed=7)
    assert resumed.resume() and resumed.step == 5
    resumed.fit()
    assert _steps(run) == list(range(1, 9)) and _losses(run) == _losses(full)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_on_the_cli_saves_and_says_how_to_resume(tmp_path, signum):
    """Ctrl-C, or the SIGTERM a scheduler (SLURM, Kubernetes) sends before killing: the same save."""
    run = tmp_path / "run"
    args = _cli_args(run, "train.max_steps=100000", "train.checkpoint_every=100000")
    child = _python("import sys; from polyglu.cli import main; sys.exit(main(sys.argv[1:]))", *args,
                    stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
                (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
            time.sleep(0.05)
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signum, err
    last = err.strip().splitlines()[-1]
    assert "interrupted at step" in last and f"by {signum.name}" in last and "checkpoint saved in" in last and "--resume" in last
    step = ckpt.list_checkpoints(run)[-1][0]
    assert f"step-{step:08d}" in last and step >= 2
    assert _steps(run) == list(range(1, step + 1))
    assert main(_cli_args(run, f"train.max_steps={step + 2}", "train.checkpoint_every=100000", "--resume")) == 0
    assert _steps(run) == list(range(1, step + 3))


# ---- the one metrics.jsonl reader


def test_metrics_reader_keeps_the_last_row_of_each_step_and_truncates(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)] + [{"step": s, "loss": 1.0 * s} for s in (3, 4, 5)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo'  # a line torn by a kill
    (run / "metrics.jsonl").write_text(text)
    log = read_metrics(run)
    assert log.steps == [1, 2, 3, 4, 5] and [r["loss"] for r in log.rows] == [9.0, 8.0, 3.0, 4.0, 5.0]
    assert log.duplicate_rows == 2 and log.skipped_lines == 1
    curves = training_curves(run)  # the analysis reads the same rows
    assert curves["series"]["loss"]["step"] == [1, 2, 3, 4, 5] and curves["series"]["loss"]["value"][2] == 3.0
    assert truncate_metrics(run, 3) == 5  # steps 4, 5, two duplicates, the torn line
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}, {"step": 3, "loss": 3.0}]
    assert truncate_metrics(run, 3) == 0

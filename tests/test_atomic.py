"""Atomic writes: old content or complete new content, no temporaries left, ordinary permissions."""

import json
import os
import stat

import pytest

from polyglu import atomic
from polyglu.atomic import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new data")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary left behind


def test_written_files_are_readable_like_any_new_file(tmp_path, umask_022):
    # a temporary from tempfile.mkstemp is 0o600, and the rename kept that mode for the result
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_text(tmp_path / "b.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert _mode(tmp_path / "a.bin") == _mode(tmp_path / "b.txt") == _mode(tmp_path / "plain.txt") == 0o644


def test_json_and_text_round_trip_and_replace(tmp_path):
    path = tmp_path / "sub" / "state.json"  # parent created
    atomic_write_json(path, {"step": 1})
    atomic_write_json(path, {"step": 2, "tau": [0.5]})
    assert path.read_text() == json.dumps({"step": 2, "tau": [0.5]}, indent=2) + "\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_directory_is_created_complete_with_ordinary_modes(tmp_path, umask_022):
    target = tmp_path / "final"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and not target.exists()
        (tmp / "config.json").write_text("{}")
        (tmp / "tokenizer").mkdir()
        (tmp / "tokenizer" / "vocab.json").write_text("[]")
    assert (target / "tokenizer" / "vocab.json").read_text() == "[]"
    assert _mode(target) == 0o755 and _mode(target / "config.json") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "move-aside"])
def test_directory_replaces_an_existing_one_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "final"
    target.mkdir()
    (target / "model.safetensors").write_text("old weights")
    (target / "stale.txt").write_text("from the old run")
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_text("new weights")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert (target / "model.safetensors").read_text() == "new weights"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_directory_is_untouched_when_the_writer_fails(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="killed"), atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("new")
        raise RuntimeError("killed half-way")
    assert (target / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_directory_without_replace_refuses_before_writing(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    with pytest.raises(FileExistsError, match="final"), atomic_directory(target, replace=False):
        raise AssertionError("the body must not run")
    assert [p.name for p in tmp_path.iterdir()] == ["final"]

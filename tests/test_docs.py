"""Every documented command and example runs as written: the ```bash and ```python blocks of
README.md and docs/*.md, page by page, in order, in a temporary directory (with the repository's
configs/ beside them, as in a clone).

- A command line (or a whole block, in its first line) whose comment says `[needs: ...]` is not run:
  an original checkpoint, a GPU, a download or a long run. Every other line runs after the ones above it.
- Blocks without a language (synopses, outputs, layouts) are not code.
- `polyglu ...` lines run in this process (`polyglu.cli.main`, standard input empty); anything else
  (pipes, printf, python -c) through bash with this checkout's `polyglu` first on PATH. Python blocks run
  each in a fresh namespace, so every example stands alone.
- A page's leading commands that run in an empty directory (say, the training run its examples read)
  are run once per test process and copied to the next page that starts with the same lines.
- A shell line continued with a trailing backslash must paste: nothing may follow the backslash.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDS = re.compile(r"\[needs: ([^\]]+)\]")
FENCE = re.compile(r"^```(\w*)\s*$")
# pages whose examples take longer than the fast suite affords; each is covered by a fast test too
SLOW_PAGES = {
    "docs/huggingface.md": "tests/test_clients_hf.py runs each client example on a tiny export",
}


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the block's first code line
    language: str
    text: str


@dataclass
class Command:
    page: str
    line: int
    text: str  # the logical line, continuations joined, comment kept
    needs: str | None


def code_blocks(page: str) -> list[Block]:
    lines = (ROOT / page).read_text(encoding="utf-8").split("\n")
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if match.group(1) in ("bash", "sh", "python"):
                blocks.append(Block(page, i + 2, match.group(1), "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def shell_commands(block: Block) -> list[Command]:
    """The block's logical lines; raises AssertionError for a continuation that does not paste."""
    commands, pending, start = [], "", None
    for offset, raw in enumerate(block.text.split("\n")):
        if start is None:
            start = block.line + offset
        bad = re.search(r"\\[ \t]+\S", raw)
        if bad and not raw.lstrip().startswith("#"):
            assert "#" in raw[:bad.start()] or raw.count("'") % 2 or raw.count('"') % 2, (
                f"{block.page}:{block.line + offset}: text after a line-continuation backslash breaks the "
                f"command when pasted: {raw.strip()!r}")
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text = (pending + raw).strip()
        pending = ""
        if text and not text.startswith("#"):
            commands.append(Command(block.page, start, text, _needs(text)))
        start = None
    return commands


def _needs(text: str) -> str | None:
    found = NEEDS.search(text)
    return found.group(1) if found else None


def pages() -> list[str]:
    return ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def test_every_page_with_code_is_collected_and_every_skip_says_why():
    """The runner sees every page's code; a skipped line names what it needs."""
    assert "README.md" in pages() and "docs/generation.md" in pages()
    for page in pages():
        for block in code_blocks(page):
            if block.language == "python":
                continue
            for command in shell_commands(block):
                if command.needs is not None:
                    assert len(command.needs.strip()) > 3, f"{page}:{command.line}: [needs: ...] says nothing"


def test_a_continuation_followed_by_a_comment_is_refused():
    block = Block("x.md", 1, "bash", "polyglu analyze m \\   # a comment\n    --out r")
    with pytest.raises(AssertionError, match="breaks the command when pasted"):
        shell_commands(block)
    block = Block("x.md", 1, "bash", "polyglu analyze m \\\n    --out r   # fine\npolyglu info x  # [needs: a GPU]")
    commands = shell_commands(block)
    assert [c.text for c in commands] == ["polyglu analyze m      --out r   # fine", "polyglu info x  # [needs: a GPU]"]
    assert commands[1].needs == "a GPU" and commands[0].needs is None


# ---- running a page

_SHARED: dict[tuple[str, ...], Path] = {}  # leading commands run in an empty directory -> their result


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_polyglu(argv: list[str], where: str) -> None:
    from polyglu.cli import main

    err = io.StringIO()
    stdin = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code
    finally:
        sys.stdin = stdin
    assert status == 0, f"{where}: exit {status}\n{err.getvalue()[-3000:]}"


def _run_command(command: Command, cwd: Path) -> None:
    where = f"{command.page}:{command.line}: {command.text}"
    tokens = shlex.split(command.text, comments=True)
    plain = not any(op in tokens for op in ("|", ">", ">>", "&&", "||", ";", "<"))
    if plain and tokens[:1] == ["polyglu"]:
        _run_polyglu(tokens[1:], where)
    elif plain and tokens[:3] == ["python", "-m", "polyglu"]:
        _run_polyglu(tokens[3:], where)
    else:
        done = subprocess.run(["bash", "-c", command.text], cwd=cwd, env=_environment(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{where}: exit {done.returncode}\n{done.stderr[-3000:]}"


def _run_python(block: Block) -> None:
    code = compile(block.text, f"{block.page}:{block.line}", "exec")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, {"__name__": "__docs__"})


def run_page(page: str, directory: Path, shared_root: Path) -> list[str]:
    """Run the page's code in `directory` (results of leading commands kept under `shared_root`);
    returns the lines skipped, with what they need."""
    (directory / "configs").symlink_to(ROOT / "configs")
    skipped, prefix, fresh = [], (), True
    cwd = Path.cwd()
    os.chdir(directory)
    try:
        for block in code_blocks(page):
            if block.language == "python":
                fresh = False
                first = block.text.split("\n", 1)[0]
                if _needs(first):
                    skipped.append(f"{page}:{block.line}: {_needs(first)}")
                    continue
                _run_python(block)
                continue
            commands = shell_commands(block)
            block_needs = _needs(block.text.split("\n", 1)[0]) if block.text.lstrip().startswith("#") else None
            for command in commands:
                needs = block_needs or command.needs
                if needs:
                    skipped.append(f"{page}:{command.line}: {needs}")
                elif fresh:  # the page's first block, started in an empty directory: share its results
                    prefix = (*prefix, shlex.join(shlex.split(command.text, comments=True)))  # comments aside
                    if prefix in _SHARED:
                        _restore(_SHARED[prefix], directory)
                    else:
                        _run_command(command, directory)
                        _SHARED[prefix] = _snapshot(directory, shared_root / f"prefix-{len(_SHARED)}")
                else:
                    _run_command(command, directory)
            fresh = False
    finally:
        os.chdir(cwd)
    return skipped


def _snapshot(directory: Path, copy: Path) -> Path:
    shutil.copytree(directory, copy, symlinks=True)
    return copy


def _restore(snapshot: Path, directory: Path) -> None:
    for entry in snapshot.iterdir():
        target = directory / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True)
        else:
            shutil.copy2(entry, target, follow_symlinks=False)


def _page_params():
    out = []
    for page in pages():
        if not code_blocks(page):
            continue
        marks = [pytest.mark.slow] if page in SLOW_PAGES else []
        out.append(pytest.param(page, marks=marks, id=page))
    return out


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory):
    return tmp_path_factory.mktemp("docs-shared")


@pytest.mark.parametrize("page", _page_params())
def test_page_runs_as_written(page, tmp_path, shared_root, monkeypatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        skipped = run_page(page, tmp_path, shared_root)
    finally:
        torch.set_num_threads(threads)  # a run config's train.threads must not leak into later tests
    # what was not run is what the page says needs more than this machine: an original checkpoint, a
    # GPU, a download or a long run
    assert all(re.search(r"checkpoint|GPU|download|minutes|hours|PyPI|suite|model|conversion", line.split(": ", 1)[1])
               for line in skipped), skipped

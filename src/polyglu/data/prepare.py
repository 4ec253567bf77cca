"""`polyglu prepare`: text sources -> a directory of token shards (format in `polyglu.data.shards`).

    prepare(["a.jsonl", "b.txt"], "byte", "data/mine", text_field="text")
    prepare([HFSource("json", data_files="x.jsonl")], "tok/", "data/hf")
    prepare_builtin_math("tok/", "data/math")    # the built-in corpus, train + validation/

Safe to interrupt and re-run:
- a shard is written to a temporary name, fsynced and renamed, then recorded in
  `.prepare-state.json`; a re-run with the same inputs verifies the recorded shards and continues
  after the last one (the document order is deterministic, so the result is the same);
- `manifest.json` is written last: a directory with a manifest is complete, and preparing it
  again with the same inputs does nothing; different inputs are an error unless `force=True`;
- bad input (unreadable file, missing field, empty source, token id >= vocabulary size) raises a
  `DataError` naming the file and line/row before the shard in progress is written.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from polyglu.atomic import (
    atomic_write_bytes,
    atomic_write_text,
    fsync_tree,
    output_lock,
    replace_directory,
    temporary_name,
)
from polyglu.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_PATTERN,
    TOKENIZER_DIR,
    VALIDATION_DIR,
    check_tokenizer,
    file_sha256,
    read_manifest,
    shard_dtype,
    shard_record,
    shard_size_check,
)
from polyglu.data.sources import (
    DataError,
    Document,
    describe_source,
    iter_documents,
    parse_sources,
    same_source,
)
from polyglu.data.tokenizer import describe_identity, load_tokenizer, same_tokenizer

STATE_NAME = ".prepare-state.json"
DEFAULT_SHARD_TOKENS = 1 << 24  # 16M tokens: 32 MiB as uint16
CHUNK_DOCUMENTS = 512  # documents per tokenisation task


def prepare(sources, tokenizer, out: str | Path, *, text_field: str = "text", validation=None,
            max_tokens: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 1,
            progress: bool = False, force: bool = False, metadata: dict | None = None, log=None) -> dict:
    """Tokenise `sources` (paths, 'a.txt,b.jsonl', `HFSource`s) into shards under directory `out`.

    tokenizer: 'byte', a directory, a hub name, or a loaded tokenizer. `validation`: sources for a
    held-out split, prepared the same way into `out/validation`. `max_tokens` caps the tokens
    written (EOS included; the last document is cut to fit). `log`: a print-like callable for
    one-line progress notes. Every check that can refuse (arguments, the output path, a directory
    prepared or half-prepared from other inputs) runs for both splits before anything is written.
    Returns the manifest.
    """
    log = log or (lambda *args, **kwargs: None)
    check_output_directory(out)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    out = Path(out)
    if validation is not None:  # held-out text that is also training text measures memorisation
        training = {Path(s).resolve(): s for s in parse_sources(sources) if isinstance(s, Path)}
        for source in parse_sources(validation):
            if isinstance(source, Path) and source.resolve() in training:
                raise DataError(f"--validation {source} is also a training input ({training[source.resolve()]}); "
                                f"validation on training data measures memorisation: give a held-out file")
    with output_lock(out, log):  # a second prepare into `out` waits, then finds it prepared (or refuses)
        if force and _has_content(out):
            return _rebuild_beside(out, lambda staging: prepare(
                sources, tok, staging, text_field=text_field, validation=validation, max_tokens=max_tokens,
                shard_tokens=shard_tokens, workers=workers, progress=progress, metadata=metadata, log=log))
        return _prepare(sources, tok, out, text_field=text_field, validation=validation, max_tokens=max_tokens,
                        shard_tokens=shard_tokens, workers=workers, progress=progress, force=force,
                        metadata=metadata, log=log)


def _has_content(out: Path) -> bool:
    return out.is_dir() and any(out.iterdir())


def _rebuild_beside(out: Path, build) -> dict:
    """--force on a directory holding an earlier result: build the new one in a hidden directory
    beside it, then swap it in whole, so an interrupted run leaves the old dataset intact (before,
    it was deleted first). Files prepare did not write are never deleted: they are refused."""
    foreign = sorted(p.name for p in out.iterdir() if not _written_by_prepare(p))
    if foreign:
        raise DataError(f"--out {out}: holds files prepare did not write ({', '.join(foreign[:5])}); --force "
                        f"replaces the whole directory: move them elsewhere first, or choose another --out")
    staging = temporary_name(out)
    try:
        manifest = build(staging)
        fsync_tree(staging)
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _written_by_prepare(path: Path) -> bool:
    return (path.name in (MANIFEST_NAME, STATE_NAME, TOKENIZER_DIR, VALIDATION_DIR, "text")
            or path.match("shard-*.bin") or path.match(".shard-*.tmp"))


def _prepare(sources, tok, out: Path, *, text_field, validation, max_tokens, shard_tokens, workers, progress, force,
             metadata, log) -> dict:
    common = dict(text_field=text_field, shard_tokens=shard_tokens, force=force)
    plans = [_plan_split(parse_sources(sources), tok, out, out, max_tokens=max_tokens, **common)]
    if validation is not None:
        plans.append(_plan_split(parse_sources(validation), tok, out / VALIDATION_DIR, out, max_tokens=None,
                                 **common))
    manifests = [_run_split(plan, tok, workers=workers, progress=progress, metadata=metadata, log=log)
                 for plan in plans]
    return manifests[0]


def prepare_builtin_math(tokenizer, out: str | Path, *, n_train: int = 50_000, n_val: int = 1_000,
                         n_test: int = 1_000, seed: int = 0, max_tokens: int | None = None, workers: int = 1,
                         progress: bool = False, force: bool = False, log=None) -> dict:
    """The built-in math corpus, written as text under `out/text/` (pre-training JSONL, SFT chat
    JSONL, test JSONL) and tokenised: train into `out`, validation into `out/validation`.
    The manifest's "builtin" entry lists the text files (relative to `out`). A directory prepared
    from another seed or size is refused before its text is touched."""

    log = log or (lambda *args, **kwargs: None)
    out_dir = Path(out)
    check_output_directory(out_dir)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    with output_lock(out_dir, log):
        if force and _has_content(out_dir):
            return _rebuild_beside(out_dir, lambda staging: prepare_builtin_math(
                tok, staging, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, max_tokens=max_tokens,
                workers=workers, progress=progress, log=log))
        return _prepare_builtin_math(tok, out_dir, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed,
                                     max_tokens=max_tokens, workers=workers, progress=progress, force=force, log=log)


def _prepare_builtin_math(tok, out_dir: Path, *, n_train, n_val, n_test, seed, max_tokens, workers, progress, force,
                          log) -> dict:
    from polyglu.data.synthetic import write_builtin_math

    text_dir = out_dir / "text"
    spec = {"name": "math", "seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test}
    stamp = text_dir / "builtin.json"
    if not force:
        _check_builtin_target(out_dir, spec, tok.identity(), stamp)
    names = ("pretrain_train", "pretrain_validation", "sft_train", "sft_validation", "test")
    paths = {name: text_dir / f"{name}.jsonl" for name in names}
    if force or not _stamp_matches(stamp, spec) or not all(p.is_file() for p in paths.values()):
        if log:
            log(f"writing the built-in math corpus to {text_dir}")
        paths = write_builtin_math(text_dir, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
        atomic_write_text(stamp, json.dumps(spec, indent=2) + "\n")
    metadata = {"builtin": {**spec, "files": {name: str(p.relative_to(out_dir)) for name, p in paths.items()}}}
    return _prepare([paths["pretrain_train"]], tok, out_dir, validation=[paths["pretrain_validation"]],
                    text_field="text", max_tokens=max_tokens, shard_tokens=DEFAULT_SHARD_TOKENS, workers=workers,
                    progress=progress, force=force, metadata=metadata, log=log)


def check_output_directory(out: str | Path) -> None:
    """Refuse an output path that is (or lies under) a file, before anything is written."""
    path = Path(out)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "" if part == path else f" (its parent {part} is a file)"
                raise DataError(f"--out {path}: is a file{where}; expected a directory (new or prepared before)")
            return


def _check_builtin_target(out_dir: Path, spec: dict, identity: dict, stamp: Path) -> None:
    """Refuse, before the text is rewritten, a directory holding a built-in corpus of another spec
    (prepared, or half-prepared with its text still there)."""
    old = None
    if (out_dir / MANIFEST_NAME).is_file():
        manifest = read_manifest(out_dir)
        check_tokenizer(out_dir, manifest, identity, "this prepare")
        old = {k: v for k, v in manifest.get("builtin", {}).items() if k != "files"} or None
        if old is None:
            raise DataError(f"{out_dir / MANIFEST_NAME}: already prepared from other inputs (not the built-in "
                            f"corpus); use --force to overwrite or another --out")
    elif (out_dir / STATE_NAME).is_file() and stamp.is_file():
        try:
            old = json.loads(stamp.read_text())
        except (OSError, ValueError):
            old = None
    if old is not None and old != spec:
        key = next(k for k in spec if old.get(k) != spec[k])
        raise DataError(f"{out_dir}: already prepared from the built-in corpus with {key}={old.get(key)!r}, not "
                        f"{spec[key]!r}; use another --out (or --force to overwrite; for `polyglu train`, "
                        f"another run_dir or data.builtin_dir)")


def _stamp_matches(stamp: Path, spec: dict) -> bool:
    try:
        return json.loads(stamp.read_text()) == spec
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# one split


class _Plan:
    """What preparing one split will do, decided (and every refusal raised) before writing."""

    def __init__(self, sources, out_dir: Path, inputs: dict, force: bool, manifest: dict | None = None,
                 done_shards: list[dict] | None = None) -> None:
        self.sources, self.out_dir, self.inputs, self.force = sources, out_dir, inputs, force
        self.manifest, self.done_shards = manifest, done_shards or []


def _plan_split(sources, tok, out_dir: Path, root: Path, *, text_field, max_tokens, shard_tokens, force) -> _Plan:
    if max_tokens is not None and max_tokens <= 0:
        raise DataError(f"--max-tokens must be a positive number of tokens, got {max_tokens}")
    if not isinstance(shard_tokens, int) or shard_tokens <= 0:
        raise DataError(f"--shard-tokens must be a positive number of tokens per shard, got {shard_tokens}")
    check_output_directory(out_dir)
    identity = tok.identity()
    dtype = shard_dtype(tok.vocab_size)
    inputs = {"sources": [describe_source(s, out_dir, root) for s in sources], "text_field": text_field,
              "tokenizer": identity, "max_tokens": max_tokens, "shard_tokens": shard_tokens, "dtype": dtype}
    if force:
        return _Plan(sources, out_dir, inputs, force)
    if (out_dir / MANIFEST_NAME).is_file():
        return _Plan(sources, out_dir, inputs, force, manifest=_already_prepared(out_dir, inputs, identity))
    return _Plan(sources, out_dir, inputs, force, done_shards=_resume_state(out_dir, inputs))


def _run_split(plan: _Plan, tok, *, workers, progress, metadata, log) -> dict:
    out_dir, inputs, sources = plan.out_dir, plan.inputs, plan.sources
    if plan.manifest is not None:
        log(f"{out_dir}: already prepared ({plan.manifest['tokens']:,} tokens)")
        return plan.manifest
    identity = inputs["tokenizer"]
    out_dir.mkdir(parents=True, exist_ok=True)
    if plan.force:
        _clear(out_dir)
    done_shards = plan.done_shards
    if done_shards:
        log(f"{out_dir}: resuming after {len(done_shards)} finished shard(s)")
    else:
        log(f"{out_dir}: tokenising {', '.join(map(str, sources))} with {describe_identity(identity)}")
    tok.save(out_dir / TOKENIZER_DIR)
    for leftover in out_dir.glob(".shard-*.tmp"):
        leftover.unlink()

    writer = _ShardWriter(out_dir, inputs, inputs["shard_tokens"], inputs["max_tokens"], done_shards)
    documents = iter_documents(sources, inputs["text_field"])
    _skip(documents, writer.source_documents)
    bar = _progress_bar(progress, out_dir, writer.tokens)
    try:
        for doc, ids in _tokenise(documents, tok, out_dir / TOKENIZER_DIR, workers):
            if ids.size and int(ids.max()) >= tok.vocab_size:
                bad = int(np.flatnonzero(ids >= tok.vocab_size)[0])
                raise DataError(f"{doc.location}: token id {int(ids[bad])} at token offset {bad} of the document "
                                f"is >= the vocabulary size {tok.vocab_size} of {describe_identity(identity)}")
            before = writer.tokens
            done = writer.add(ids, empty=not doc.text)
            bar.update(writer.tokens - before)
            if done:
                break
        writer.flush()
    finally:
        bar.close()
        documents.close()

    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer": identity,
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "dtype": inputs["dtype"],
                "tokens": writer.tokens, "documents": sum(s["documents"] for s in writer.shards),
                "empty_documents": writer.empty_documents, "truncated_last_document": writer.truncated,
                "shards": writer.shards, "inputs": inputs, **(metadata or {})}
    if manifest["tokens"] == 0:
        raise DataError(f"{', '.join(map(str, sources))}: empty source (no tokens)")
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    (out_dir / STATE_NAME).unlink(missing_ok=True)
    log(f"{out_dir}: {manifest['tokens']:,} tokens, {manifest['documents']:,} documents, "
        f"{len(manifest['shards'])} shard(s)")
    return manifest


def _clear(out_dir: Path) -> None:
    """Remove what `prepare` writes (and nothing else)."""
    for name in (MANIFEST_NAME, STATE_NAME):
        (out_dir / name).unlink(missing_ok=True)
    for path in list(out_dir.glob("shard-*.bin")) + list(out_dir.glob(".shard-*.tmp")):
        path.unlink()
    shutil.rmtree(out_dir / TOKENIZER_DIR, ignore_errors=True)


def _first_difference(old: dict, new: dict) -> str | None:
    for key in new:
        if key == "tokenizer":
            continue
        if key == "sources":
            olds = old.get("sources") or []
            if len(olds) != len(new["sources"]) or not all(map(same_source, olds, new["sources"])):
                return key
        elif old.get(key) != new[key]:
            return key
    return None


def _already_prepared(out_dir: Path, inputs: dict, identity: dict) -> dict:
    manifest = read_manifest(out_dir)
    check_tokenizer(out_dir, manifest, identity, "this prepare")
    key = _first_difference(manifest.get("inputs", {}), inputs)
    if key is not None:
        raise DataError(f"{out_dir / MANIFEST_NAME}: already prepared from different inputs ('{key}' differs); "
                        f"use --force to overwrite or another --out")
    for entry in manifest["shards"]:
        shard_size_check(out_dir, entry, manifest["dtype"])
    return manifest


def _resume_state(out_dir: Path, inputs: dict) -> list[dict]:
    """The shards an interrupted run with the same inputs finished (each re-checked; the list stops
    at the first damaged one), or [] for a fresh start."""
    path = out_dir / STATE_NAME
    if not path.is_file():
        return []
    try:
        state = json.loads(path.read_text())
        old, records = state["inputs"], list(state["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    key = _first_difference(old, inputs)
    if key is None and same_tokenizer(old.get("tokenizer", {}), inputs["tokenizer"]) is not None:
        key = "tokenizer"
    if key is not None:
        raise DataError(f"{out_dir}: holds an interrupted prepare of different inputs ('{key}' differs); "
                        f"use --force to start over or another --out")
    kept = []
    for record in records:
        try:
            shard = shard_size_check(out_dir, record, inputs["dtype"])
        except DataError:
            break
        if file_sha256(shard) != record["sha256"]:
            break
        kept.append(record)
    return kept


class _ShardWriter:
    """Accumulates documents (ids + EOS) and writes each full shard atomically, then records it,
    with the counters a resumed run starts from, in the state file."""

    def __init__(self, out_dir: Path, inputs: dict, shard_tokens: int, max_tokens: int | None,
                 done_shards: list[dict]) -> None:
        self.out_dir, self.inputs = out_dir, inputs
        self.shard_tokens, self.max_tokens = shard_tokens, max_tokens
        self.dtype = np.dtype(inputs["dtype"])
        self.eos = np.array([inputs["tokenizer"]["eos_id"]], dtype=self.dtype)
        self.records = list(done_shards)
        resume = self.records[-1]["resume"] if self.records else {}
        self.tokens = resume.get("tokens", 0)
        self.source_documents = resume.get("source_documents", 0)
        self.empty_documents = resume.get("empty_documents", 0)
        self.truncated = resume.get("truncated", False)
        self.buffer: list[np.ndarray] = []
        self.buffered_tokens = self.buffered_documents = 0

    @property
    def shards(self) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "resume"} for r in self.records]

    def add(self, ids: np.ndarray, empty: bool = False) -> bool:
        """Add one source document; True once `max_tokens` is reached."""
        if empty:
            self.source_documents += 1
            self.empty_documents += 1
            return False
        doc = np.concatenate([ids.astype(self.dtype, copy=False), self.eos])
        cut = self.max_tokens is not None and self.tokens + doc.size > self.max_tokens
        if cut:
            doc = doc[:self.max_tokens - self.tokens]
        if self.buffered_tokens and self.buffered_tokens + doc.size > self.shard_tokens:
            self.flush()  # before counting this document: a resumed run starts with it
        self.truncated = self.truncated or cut
        self.source_documents += 1
        self.buffer.append(doc)
        self.buffered_tokens += doc.size
        self.buffered_documents += 1
        self.tokens += doc.size
        return self.max_tokens is not None and self.tokens >= self.max_tokens

    def flush(self) -> None:
        if not self.buffered_tokens:
            return
        name = SHARD_PATTERN.format(len(self.records))
        tokens = np.concatenate(self.buffer)
        atomic_write_bytes(self.out_dir / name, tokens.tobytes())
        resume = {"tokens": self.tokens, "source_documents": self.source_documents,
                  "empty_documents": self.empty_documents, "truncated": self.truncated}
        # documents counted as added: a last document cut by max_tokens has no EOS
        record = {**shard_record(name, tokens, int(self.eos[0])), "documents": self.buffered_documents}
        self.records.append({**record, "resume": resume})
        self.buffer, self.buffered_tokens, self.buffered_documents = [], 0, 0
        atomic_write_text(self.out_dir / STATE_NAME, json.dumps({"inputs": self.inputs, "shards": self.records}))


def _skip(documents: Iterator[Document], n: int) -> None:
    for _ in range(n):
        next(documents, None)


def _progress_bar(enabled: bool, out_dir: Path, initial: int):
    from tqdm import tqdm

    return tqdm(desc=f"prepare {out_dir.name}", unit="tok", unit_scale=True, initial=initial, disable=not enabled,
                dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# tokenisation, in order, optionally in worker processes

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    return _encode_with(_WORKER_TOKENIZER, texts)


def _encode_with(tok, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(texts)]


def _chunks(documents: Iterable[Document]) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == CHUNK_DOCUMENTS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _forked_with_default_sigterm(make_pool):
    """make_pool() with SIGTERM at its default action while the workers fork, so that each worker
    has it from its first instruction. Pool.terminate() (on an error, Ctrl-C or SIGTERM) sends
    SIGTERM to the workers; a worker still inheriting the verbs' Python handler could lose a SIGTERM
    that arrived between fork and Python's after-fork reset of its signal state, and the pool then
    waited on it forever (seen in CI: a worker blocked on its task queue, the parent in join())."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return make_pool()
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return make_pool()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tokenise(documents: Iterable[Document], tok, tokenizer_dir: Path, workers: int
              ) -> Iterator[tuple[Document, np.ndarray]]:
    """(document, ids) in document order. With workers > 1, chunks go to a process pool with a
    bounded number in flight, so memory stays flat whatever the input size."""
    if workers <= 1:
        for chunk in _chunks(documents):
            yield from zip(chunk, _encode_with(tok, [d.text for d in chunk]))
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with _forked_with_default_sigterm(lambda: context.Pool(workers, initializer=_init_worker,
                                                           initargs=(str(tokenizer_dir),))) as pool:
        pending: deque = deque()
        for chunk in _chunks(documents):
            pending.append((chunk, pool.apply_async(_encode_chunk, ([d.text for d in chunk],))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield from zip(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from zip(done, result.get())

"""Text and row sources: local `.txt`, `.jsonl`, `.json`, `.parquet` files and Hugging Face datasets.

Every document and row carries its location ("data.jsonl line 57", "hf:json[train] example 3"), so
an error names where it happened.

- `.txt`: documents are separated by `<|endoftext|>`; a file without one is a single document.
- `.jsonl`: one JSON object per line; the text is `text_field`. `.json`: an array of such objects.
- `.parquet`: the text is column `text_field`.
- `HFSource`: `datasets.load_dataset(name, config, split=..., data_files=..., streaming=...)`.

Wherever a text contains the literal `<|endoftext|>`, it is split into documents there: the EOS token
always marks a document boundary, which the loader relies on for per-document attention.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from polyglu.data.special_tokens import EOS_TOKEN

TEXT_SUFFIXES = (".txt", ".md")
ROW_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """Bad input or a damaged prepared directory; the message names the file and offset."""


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face dataset: `load_dataset(name, config, split=split, data_files=..., streaming=...)`.

    Local files go through the builders `json`, `parquet`, `text` with `data_files`.
    """

    name: str
    config: str | None = None
    split: str = "train"
    data_files: str | tuple[str, ...] | None = None
    streaming: bool = False
    revision: str | None = None

    def __str__(self) -> str:
        config = f"/{self.config}" if self.config else ""
        return f"hf:{self.name}{config}[{self.split}]"

    def load(self):
        try:
            import datasets
        except ImportError as e:  # pragma: no cover
            raise DataError(f"{self}: reading Hugging Face datasets needs `pip install datasets` ({e})") from None
        data_files = list(self.data_files) if isinstance(self.data_files, tuple) else self.data_files
        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, data_files=data_files,
                                         streaming=self.streaming, revision=self.revision)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"cannot load Hugging Face dataset {self}: {first}") from None

    def describe(self, relative_to: Path | None = None, within: Path | None = None) -> dict:
        """What identifies the data (for resuming and idempotency); local data files by content too."""
        files = None
        if self.data_files is not None:
            paths = [self.data_files] if isinstance(self.data_files, str) else list(self.data_files)
            files = [_file_fingerprint(Path(p), relative_to, within) if Path(p).is_file() else {"path": p}
                     for p in paths]
        return {"kind": "hf", "name": self.name, "config": self.config, "split": self.split,
                "data_files": files, "revision": self.revision}


Source = Path | HFSource


@dataclass
class Document:
    text: str
    location: str


@dataclass
class Row:
    data: dict
    location: str


def parse_sources(spec) -> list[Source]:
    """'a.txt,b.jsonl', a path, an `HFSource`, or a list of these -> checked sources."""
    if isinstance(spec, (str, os.PathLike, HFSource)):
        spec = [spec]
    sources: list[Source] = []
    for item in spec:
        if isinstance(item, HFSource):
            sources.append(item)
            continue
        parts = str(item).split(",") if isinstance(item, str) else [item]
        for part in parts:
            if isinstance(part, str) and not part.strip():
                continue
            path = Path(part)
            if not path.exists():
                raise DataError(f"cannot read {path}: no such file")
            if path.is_dir():
                raise DataError(f"cannot read {path}: is a directory, expected a file "
                                f"({', '.join(TEXT_SUFFIXES + ROW_SUFFIXES)})")
            if path.suffix.lower() not in TEXT_SUFFIXES + ROW_SUFFIXES:
                raise DataError(f"{path}: unknown file type {path.suffix!r} "
                                f"(known: {', '.join(TEXT_SUFFIXES + ROW_SUFFIXES)})")
            sources.append(path)
    if not sources:
        raise DataError("no input sources given")
    return sources


def describe_source(source: Source, relative_to: Path | None = None, within: Path | None = None) -> dict:
    """What identifies a source: a local file by its size and full sha256. Its path is kept for people:
    relative to `relative_to` when the file lies inside `within` (default: `relative_to`), so a
    copied directory holds no stale absolute path; it is never compared."""
    if isinstance(source, HFSource):
        return source.describe(relative_to, within)
    return {"kind": "file", **_file_fingerprint(source, relative_to, within)}


def same_source(old: dict, new: dict) -> bool:
    """Whether two `describe_source` entries name the same data: by content, not by path. Entries
    written before content hashing (size + first and last MiB) are compared on what they hold."""
    if old.get("kind") != new.get("kind"):
        return False
    if new.get("kind") == "hf":
        keys = ("name", "config", "split", "revision")
        old_files, new_files = old.get("data_files") or [], new.get("data_files") or []
        return all(old.get(k) == new.get(k) for k in keys) and len(old_files) == len(new_files) and all(
            _same_file(a, b) for a, b in zip(old_files, new_files))
    return _same_file(old, new)


def _same_file(old: dict, new: dict) -> bool:
    if "sha256" in old and "sha256" in new:
        return old["bytes"] == new["bytes"] and old["sha256"] == new["sha256"]
    if "sample_sha256" in old:  # a manifest from an older polyglu
        return old.get("bytes") == new.get("bytes") and old["sample_sha256"] == new.get("sample_sha256")
    return old == new


HASH_BLOCK = 1 << 22


def _file_fingerprint(path: Path, relative_to: Path | None = None, within: Path | None = None) -> dict:
    """Path, size, the sha256 of the whole file (~0.9 GB/s: an edit anywhere changes it) and the
    sample hash older manifests recorded (first and last MiB), so those still compare."""
    try:
        size = path.stat().st_size
        full, sample = hashlib.sha256(), hashlib.sha256()
        with open(path, "rb") as f:
            sample.update(f.read(1 << 20))
            f.seek(0)
            for block in iter(lambda: f.read(HASH_BLOCK), b""):
                full.update(block)
            f.seek(size - (1 << 20) if size > 2 << 20 else min(size, 1 << 20))
            sample.update(f.read(1 << 20))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    resolved = path.resolve()
    shown = str(resolved)
    if relative_to is not None and resolved.is_relative_to(Path(within or relative_to).resolve()):
        shown = os.path.relpath(resolved, Path(relative_to).resolve())
    return {"path": shown, "bytes": size, "sha256": full.hexdigest(), "sample_sha256": sample.hexdigest()}


# ---------------------------------------------------------------------------------------------
# rows (JSONL / JSON / parquet / HF)


def iter_rows(source: Source, columns: list[str] | None = None) -> Iterator[Row]:
    """Rows of a row source as dicts, each with its location."""
    if isinstance(source, HFSource):
        yield from _hf_rows(source)
        return
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(source)
    elif suffix == ".json":
        yield from _json_rows(source)
    elif suffix == ".parquet":
        yield from _parquet_rows(source, columns)
    else:
        raise DataError(f"{source}: rows need .jsonl, .json or .parquet, not {suffix!r}")


def check_text_start(path, raw: bytes) -> bytes:
    """The first bytes of a text file, checked: UTF-16 (a byte-order mark, or NUL bytes as UTF-16
    puts in ASCII text) is refused naming the file, a UTF-8 byte-order mark is dropped (it is not
    text: it would become a token of the first document). Returns `raw` without the mark."""
    utf16_mark = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
    if utf16_mark or b"\x00" in raw[:4096]:
        sign = "a UTF-16 byte-order mark" if utf16_mark else "NUL bytes"
        raise DataError(f"{path}: UTF-16 text ({sign} at the start); convert it to UTF-8, e.g. iconv -f UTF-16 "
                        f"-t UTF-8")
    return raw[3:] if raw[:3] == b"\xef\xbb\xbf" else raw


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, read in binary so that a bad byte is located exactly."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        line_no = offset = 0
        while True:
            try:
                raw = f.readline()
            except OSError as e:
                raise DataError(f"cannot read {path} at byte offset {offset}: {e.strerror or e}") from None
            if not raw:
                return
            line_no += 1
            if line_no == 1:
                skipped = len(raw)
                raw = check_text_start(path, raw)
                offset += skipped - len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {line_no}: not UTF-8 ({e.reason}) at byte offset "
                                f"{offset + e.start}") from None
            offset += len(raw)
            yield line_no, text


def _jsonl_rows(path: Path) -> Iterator[Row]:
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {line_no}: invalid JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(data, dict):
            raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(data).__name__}")
        yield Row(data, f"{path} line {line_no}")


def _json_rows(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(check_text_start(path, path.read_bytes()).decode("utf-8"))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(item).__name__}")
        yield Row(item, f"{path} item {i}")


def _parquet_rows(path: Path, columns: list[str] | None) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover
        raise DataError(f"{path}: reading parquet needs `pip install pyarrow` ({e})") from None
    try:
        parquet = pq.ParquetFile(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = parquet.schema_arrow.names
    if columns:
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path} row 0: missing field '{missing[0]}' (columns: {', '.join(names)})")
    row = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=4096):
        for item in batch.to_pylist():
            yield Row(item, f"{path} row {row}")
            row += 1


def _hf_rows(source: HFSource) -> Iterator[Row]:
    dataset = source.load()
    for i, item in enumerate(dataset):
        yield Row(dict(item), f"{source} example {i}")


def row_field(row: Row, name: str, kind: type = str):
    """`row.data[name]`, checked: missing fields and wrong types name the location."""
    if name not in row.data or row.data[name] is None:
        known = ", ".join(sorted(map(str, row.data))) or "none"
        raise DataError(f"{row.location}: missing field '{name}' (fields: {known})")
    value = row.data[name]
    if not isinstance(value, kind):
        raise DataError(f"{row.location}: field '{name}' is {type(value).__name__}, expected {kind.__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# documents


def iter_documents(sources: Iterable[Source], text_field: str = "text") -> Iterator[Document]:
    """Documents of all sources in order. Empty texts are yielded too (the caller counts them);
    a source without any non-empty text is an error."""
    for source in sources:
        non_empty = 0
        for doc in _source_documents(source, text_field):
            if doc.text:
                non_empty += 1
            yield doc
        if non_empty == 0:
            raise DataError(f"{source}: empty source (no text found)")


def _source_documents(source: Source, text_field: str) -> Iterator[Document]:
    if isinstance(source, Path) and source.suffix.lower() in TEXT_SUFFIXES:
        yield from _text_documents(source)
        return
    for row in iter_rows(source, columns=[text_field]):
        text = row_field(row, text_field)
        if EOS_TOKEN in text:
            for j, part in enumerate(text.split(EOS_TOKEN)):
                yield Document(part, f"{row.location} part {j}")
        else:
            yield Document(text, row.location)


def _text_documents(path: Path) -> Iterator[Document]:
    """Stream a text file, splitting at `<|endoftext|>`; locations are the starting line."""
    parts: list[str] = []
    start_line = 1
    for line_no, line in _lines(path):
        while EOS_TOKEN in line:
            head, line = line.split(EOS_TOKEN, 1)
            parts.append(head)
            yield Document(_strip_separator("".join(parts)), f"{path} line {start_line}")
            parts, start_line = [], line_no
        parts.append(line)
    tail = "".join(parts)
    if tail.strip():
        yield Document(_strip_separator(tail), f"{path} line {start_line}")


def _strip_separator(text: str) -> str:
    """Drop the newline that usually follows a separator, and a trailing newline before one."""
    if text.startswith("\n"):
        text = text[1:]
    if text.endswith("\n"):
        text = text[:-1]
    return text

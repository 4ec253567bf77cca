"""The prepared-data format: a directory of token shards and its `manifest.json`.

    DIR/manifest.json          what was tokenised, with which tokenizer, and per shard its token and
                               document counts and sha256
    DIR/shard-00000.bin ...    raw little-endian token ids (uint16 when the vocabulary fits, else
                               uint32); each document's tokens are followed by EOS
    DIR/tokenizer/             the tokenizer used (loadable with `load_tokenizer`)
    DIR/validation/            optional: the same layout for a held-out split

Documents never span shards. `verify_prepared` checks everything and stops at the first problem,
naming the shard and token offset.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from polyglu.data.sources import DataError
from polyglu.data.tokenizer import describe_identity, same_tokenizer

FORMAT = "polyglu-token-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_GLOB = "shard-*.bin"
TOKENIZER_DIR = "tokenizer"
VALIDATION_DIR = "validation"
SHARD_PATTERN = "shard-{:05d}.bin"
DTYPES = ("uint16", "uint32")
REQUIRED_KEYS = ("format", "version", "tokenizer", "vocab_size", "eos_id", "dtype", "tokens", "documents", "shards")
VERIFY_BLOCK = 1 << 22  # tokens checked at a time


def shard_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a prepared directory, with its keys and shard entries checked."""
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (not a prepared data directory; run `polyglu prepare`)") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object")
    for key in REQUIRED_KEYS:
        if key not in manifest:
            raise DataError(f"{path}: missing key '{key}'")
    if manifest["format"] != FORMAT or manifest["version"] != FORMAT_VERSION:
        raise DataError(f"{path}: format {manifest['format']!r} version {manifest['version']!r}, expected "
                        f"{FORMAT!r} version {FORMAT_VERSION}")
    if manifest["dtype"] not in DTYPES:
        raise DataError(f"{path}: dtype {manifest['dtype']!r}, expected one of {', '.join(DTYPES)}")
    if np.iinfo(manifest["dtype"]).max < manifest["vocab_size"] - 1:
        raise DataError(f"{path}: dtype {manifest['dtype']} cannot hold vocab_size {manifest['vocab_size']}")
    for i, entry in enumerate(manifest["shards"]):
        for key in ("file", "tokens", "documents", "sha256"):
            if key not in entry:
                raise DataError(f"{path}: shards[{i}] is missing key '{key}'")
        if Path(entry["file"]).name != entry["file"]:
            raise DataError(f"{path}: shards[{i}].file {entry['file']!r} must be a plain file name")
    total = sum(e["tokens"] for e in manifest["shards"])
    if total != manifest["tokens"]:
        raise DataError(f"{path}: shards hold {total} tokens in all, but 'tokens' says {manifest['tokens']}")
    return manifest


def check_tokenizer(directory: str | Path, manifest: dict, identity: dict) -> None:
    """Raise unless `identity` (a tokenizer's `identity()`) is the one the data was prepared with."""
    key = same_tokenizer(manifest["tokenizer"], identity)
    if key is not None:
        raise DataError(f"{Path(directory) / MANIFEST_NAME}: manifest/tokenizer mismatch: prepared with "
                        f"{describe_identity(manifest['tokenizer'])}, not {describe_identity(identity)} "
                        f"(they differ in {key})")


def shard_size_check(directory: str | Path, entry: dict, dtype: str) -> Path:
    """The shard's path after checking it exists and holds exactly the manifest's token count."""
    path = Path(directory) / entry["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: shard listed in the manifest is missing") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    itemsize = np.dtype(dtype).itemsize
    if size % itemsize:
        raise DataError(f"{path}: truncated shard: {size} bytes is not a multiple of {itemsize} ({dtype}); "
                        f"damage at byte offset {size - size % itemsize}")
    if size // itemsize != entry["tokens"]:
        raise DataError(f"{path}: holds {size // itemsize} tokens but the manifest says {entry['tokens']}; "
                        f"damage at token offset {min(size // itemsize, entry['tokens'])}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_prepared(directory: str | Path, identity: dict | None = None, checksums: bool = True) -> dict:
    """Check a prepared directory (and its validation/ split when present): manifest, shard sizes,
    token ids below the vocabulary size, EOS count per shard, checksums, and optionally that
    `identity` is the tokenizer used. Raises `DataError` at the first problem; returns a summary."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if identity is not None:
        check_tokenizer(directory, manifest, identity)
    dtype, vocab, eos = manifest["dtype"], manifest["vocab_size"], manifest["eos_id"]
    trimmed = bool(manifest.get("truncated_last_document"))
    for i, entry in enumerate(manifest["shards"]):
        path = shard_size_check(directory, entry, dtype)
        n = entry["tokens"]
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        eos_count = 0
        for start in range(0, n, VERIFY_BLOCK):
            block = np.asarray(tokens[start:start + VERIFY_BLOCK])
            bad = np.flatnonzero(block >= vocab)
            if bad.size:
                offset = start + int(bad[0])
                raise DataError(f"{path}: token id {int(block[bad[0]])} at token offset {offset} is >= the "
                                f"vocabulary size {vocab}")
            eos_count += int(np.count_nonzero(block == eos))
        expected = entry["documents"] - (1 if trimmed and i == len(manifest["shards"]) - 1 else 0)
        if eos_count != expected:
            raise DataError(f"{path}: {eos_count} EOS tokens (id {eos}) but the manifest lists {entry['documents']} "
                            f"documents")
        del tokens
        if checksums and file_sha256(path) != entry["sha256"]:
            raise DataError(f"{path}: contents differ from the manifest's sha256 (corrupted shard; "
                            f"offset unknown, size matches)")
    summary = {"directory": str(directory), "shards": len(manifest["shards"]), "tokens": manifest["tokens"],
               "documents": manifest["documents"], "dtype": dtype, "vocab_size": vocab,
               "tokenizer": manifest["tokenizer"].get("name")}
    validation = directory / VALIDATION_DIR
    if (validation / MANIFEST_NAME).is_file():
        summary["validation"] = verify_prepared(validation, identity or manifest["tokenizer"], checksums)
    return summary


def read_token_shards(directory: str | Path) -> tuple[list[np.ndarray], dict]:
    """Memory-map the shards of a prepared directory: (arrays in shard order, manifest)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory of token shards")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{manifest_path}: missing (a shard directory holds {SHARD_GLOB} + "
                                f"{MANIFEST_NAME}; write one with `polyglu prepare`)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    dtype_name = manifest.get("dtype")
    if dtype_name not in ("uint16", "uint32", "int32", "int64"):
        raise ValueError(f"{manifest_path}: 'dtype' must be uint16 or uint32, got {dtype_name!r}")
    dtype = np.dtype(dtype_name)
    paths = sorted(directory.glob(SHARD_GLOB))
    if not paths:
        raise FileNotFoundError(f"{directory}: no {SHARD_GLOB} files")
    arrays = []
    for path in paths:
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise ValueError(f"{path}: {size} bytes is not a multiple of {dtype_name}'s {dtype.itemsize} "
                             f"(truncated shard?)")
        arrays.append(np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype))
    return arrays, manifest

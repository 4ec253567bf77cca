"""The prepared-data format: a directory of token shards and its `manifest.json`.

    DIR/manifest.json          what was tokenised, with which tokenizer, and per shard its token and
                               document counts, largest token id, sha256 and sampled sha256
    DIR/shard-00000.bin ...    raw little-endian token ids (uint16 when the vocabulary fits, else
                               uint32); each document's tokens are followed by EOS
    DIR/tokenizer/             the tokenizer used (loadable with `load_tokenizer`)
    DIR/validation/            optional: the same layout for a held-out split

Documents never span shards. `TokenShards(DIR, tokenizer, model_vocab_size=...)` is the one way to
open prepared data (training, perplexity, analysis): it refuses another tokenizer's data, token ids
the model cannot embed and shards whose contents differ from the manifest before any of it is used.
`verify_prepared` checks everything and stops at the first problem, naming the shard and token offset.

Checksums at open: the full sha256 of every shard when the directory holds at most
`FULL_VERIFY_BYTES` (1 GiB, about a second at sha256's ~0.9 GB/s); above that, size + the manifest's
largest id + a sha256 of `SAMPLE_BLOCKS` blocks spread over each shard (a replaced or regenerated
shard is caught at open in constant time per shard; a flipped byte between the samples is left to
`polyglu verify-data`, and an out-of-vocabulary id it leaves is still refused by the loader's
per-batch id check).
"""

from __future__ import annotations

import hashlib
import json
import os
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
FULL_VERIFY_BYTES = 1 << 30  # directories up to this size get a full sha256 per shard at open
SAMPLE_BLOCKS = 16  # blocks of SAMPLE_BLOCK bytes hashed per shard above that
SAMPLE_BLOCK = 1 << 12
VERIFY_MODES = ("auto", "full", "sample")


def shard_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a prepared directory, with its keys and shard entries checked."""
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        what = "is a file, not" if Path(directory).exists() else "no such directory; expected"
        raise DataError(f"{directory}: {what} a prepared data directory (manifest.json + shard-*.bin; "
                        f"write one with `polyglu prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (not a prepared data directory; run `polyglu prepare`)") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte offset {e.start}") from None
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
        max_id = entry.get("max_id")
        if max_id is not None and (not isinstance(max_id, int) or max_id >= manifest["vocab_size"]):
            raise DataError(f"{path}: shards[{i}] ({entry['file']}) max_id {max_id!r} is not a token id below the "
                            f"vocabulary size {manifest['vocab_size']} (damaged manifest)")
    total = sum(e["tokens"] for e in manifest["shards"])
    if total != manifest["tokens"]:
        raise DataError(f"{path}: shards hold {total} tokens in all, but 'tokens' says {manifest['tokens']}")
    return manifest


def check_tokenizer(directory: str | Path, manifest: dict, identity: dict, user: str = "the tokenizer given"
                    ) -> None:
    """Raise unless `identity` (a tokenizer's `identity()`) is the one the data was prepared with;
    `user` says whose tokenizer it is ("the model", "the run")."""
    key = same_tokenizer(manifest["tokenizer"], identity)
    if key is not None:
        first = manifest["shards"][0]["file"] if manifest.get("shards") else MANIFEST_NAME
        raise DataError(f"{Path(directory) / MANIFEST_NAME}: manifest/tokenizer mismatch: {first} and the other "
                        f"shards were prepared with {describe_identity(manifest['tokenizer'])}, but {user} uses "
                        f"{describe_identity(identity)} (they differ in {key}); re-prepare the data with that "
                        f"tokenizer (`polyglu prepare ... --tokenizer {identity.get('name')}`) or use a model of "
                        f"the data's tokenizer")


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


def sample_sha256(data: bytes | Path) -> str:
    """sha256 of the size and `SAMPLE_BLOCKS` blocks spread evenly over `data` (bytes or a file; the
    whole of a small one): constant cost per shard, changes when a shard is replaced."""
    if isinstance(data, (str, Path)):
        with open(data, "rb") as f:
            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            return _sample_digest(os.path.getsize(data), read)
    view = memoryview(data)
    return _sample_digest(len(view), lambda offset, n: view[offset:offset + n])


def _sample_digest(size: int, read) -> str:
    digest = hashlib.sha256(str(size).encode())
    if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
        digest.update(read(0, size))
    else:
        for i in range(SAMPLE_BLOCKS):
            digest.update(read(round(i * (size - SAMPLE_BLOCK) / (SAMPLE_BLOCKS - 1)), SAMPLE_BLOCK))
    return digest.hexdigest()


def shard_record(name: str, tokens: np.ndarray, eos_id: int) -> dict:
    """The manifest entry of a shard holding `tokens` (in its on-disk dtype)."""
    data = tokens.tobytes()
    return {"file": name, "tokens": int(tokens.size), "documents": int(np.count_nonzero(tokens == eos_id)),
            "max_id": int(tokens.max()) if tokens.size else None, "sha256": hashlib.sha256(data).hexdigest(),
            "sample_sha256": sample_sha256(data)}


def write_token_shards(directory: str | Path, arrays, tokenizer, metadata: dict | None = None) -> dict:
    """Write token arrays that were tokenised elsewhere as a prepared directory (one shard per array,
    documents ended by the tokenizer's EOS), so that `TokenShards` and `verify-data` can check them.
    `tokenizer`: a tokenizer or its `identity()`. Returns the manifest."""
    from polyglu.atomic import atomic_write_bytes, atomic_write_text

    identity = tokenizer if isinstance(tokenizer, dict) else tokenizer.identity()
    vocab, eos = identity["vocab_size"], identity["eos_id"]
    dtype = np.dtype(shard_dtype(vocab))
    directory = Path(directory)
    if (directory / MANIFEST_NAME).exists():
        raise DataError(f"{directory / MANIFEST_NAME}: already exists; write into a new directory")
    records = []
    for i, array in enumerate(arrays):
        array = np.asarray(array).reshape(-1)
        if array.size and (array.min() < 0 or array.max() >= vocab):
            bad = int(np.flatnonzero((array < 0) | (array >= vocab))[0])
            raise DataError(f"array {i}: token id {int(array[bad])} at token offset {bad} is outside the "
                            f"vocabulary [0, {vocab}) of {describe_identity(identity)}")
        tokens = array.astype(dtype)
        name = SHARD_PATTERN.format(i)
        atomic_write_bytes(directory / name, tokens.tobytes())
        records.append(shard_record(name, tokens, eos))
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer": identity, "vocab_size": vocab,
                "eos_id": eos, "pad_id": identity.get("pad_id", eos), "dtype": dtype.name,
                "tokens": sum(r["tokens"] for r in records), "documents": sum(r["documents"] for r in records),
                "shards": records, **(metadata or {})}
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


class TokenShards:
    """The shards of a prepared directory, memory-mapped, as one token stream (`read`) or per shard
    (`arrays`): the one opener of prepared data.

    Checked on opening, before any token is used: the manifest; `tokenizer` (a tokenizer or its
    `identity()`) against the one the data was prepared with; every shard present with its exact
    size; each shard's largest token id below the data's vocabulary and below `model_vocab_size`;
    the contents against the manifest's checksums (`verify`: "full" sha256, "sample" sha256 of blocks,
    "auto" = full up to `FULL_VERIFY_BYTES` in all). Errors are `DataError`s naming the shard.
    """

    def __init__(self, directory: str | Path, tokenizer=None, *, model_vocab_size: int | None = None,
                 verify: str = "auto", user: str = "the tokenizer given") -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if tokenizer is not None:
            identity = tokenizer if isinstance(tokenizer, dict) else tokenizer.identity()
            check_tokenizer(self.directory, self.manifest, identity, user)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_id: int = self.manifest["eos_id"]
        self.identity: dict = self.manifest["tokenizer"]
        entries = self.manifest["shards"]
        paths = [shard_size_check(self.directory, entry, self.dtype.name) for entry in entries]
        if verify == "auto":
            verify = "full" if sum(e["tokens"] for e in entries) * self.dtype.itemsize <= FULL_VERIFY_BYTES \
                else "sample"
        self.arrays: list[np.ndarray] = []
        for entry, path in zip(entries, paths):
            n = entry["tokens"]
            tokens = np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
            self._check_contents(path, entry, tokens, verify, model_vocab_size)
            self.arrays.append(tokens)
        self._shards = [a for a in self.arrays if len(a)]
        # starts[i] = offset of non-empty shard i in the stream
        self._starts = np.cumsum([0] + [len(a) for a in self._shards])

    def _check_contents(self, path: Path, entry: dict, tokens: np.ndarray, verify: str,
                        model_vocab_size: int | None) -> None:
        if verify == "full":
            if file_sha256(path) != entry["sha256"]:
                raise DataError(f"{path}: contents differ from the manifest's sha256 (corrupted or replaced "
                                f"shard); run `polyglu verify-data {self.directory}` to locate it, then re-prepare")
        elif "sample_sha256" in entry and sample_sha256(path) != entry["sample_sha256"]:
            raise DataError(f"{path}: contents differ from the manifest's sampled sha256 (corrupted or replaced "
                            f"shard); run `polyglu verify-data {self.directory}`, then re-prepare")
        max_id = entry.get("max_id")
        if (max_id is None or verify == "full") and len(tokens):  # older manifests, or re-checked with the hash
            max_id = max(int(tokens[i:i + VERIFY_BLOCK].max()) for i in range(0, len(tokens), VERIFY_BLOCK))
        if max_id is None:
            return
        for limit, whose in ((self.vocab_size, f"the data's vocabulary ({describe_identity(self.identity)})"),
                             (model_vocab_size, "the model's vocabulary")):
            if limit is not None and max_id >= limit:
                offset = int(np.flatnonzero(np.asarray(tokens) >= limit)[0]) if len(tokens) else 0
                raise DataError(f"{path}: token id {int(tokens[offset])} at token offset {offset} is >= the size "
                                f"{limit} of {whose}; the data was prepared with "
                                f"{describe_identity(self.identity)}: use a model of that tokenizer or re-prepare")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def fingerprint(self) -> str:
        """Identifies the data: the shards' checksums."""
        return hashlib.sha256("".join(e["sha256"] for e in self.manifest["shards"]).encode()).hexdigest()[:16]

    def document_start(self, position: int, block: int = 1 << 16) -> int:
        """The start of the document holding token `position`: the offset after the last EOS
        before it, or 0."""
        end = position
        while end > 0:
            start = max(0, end - block)
            hits = np.flatnonzero(self.read(start, end - start) == self.eos_id)
            if hits.size:
                return start + int(hits[-1]) + 1
            end = start
        return 0

    def read(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64 (into `out` when given), across
        shard boundaries."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"{self.directory}: tokens [{start}, {start + length}) outside [0, {len(self)})")
        if out is None:
            out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            offset = start + filled - int(self._starts[shard])
            take = min(length - filled, len(self._shards[shard]) - offset)
            out[filled:filled + take] = self._shards[shard][offset:offset + take]
            filled += take
            shard += 1
        return out

    def locate(self, position: int) -> tuple[Path, int]:
        """(shard path, token offset in it) of stream position `position`."""
        shard = int(np.searchsorted(self._starts, position, side="right")) - 1
        entries = [e for e in self.manifest["shards"] if e["tokens"]]
        return self.directory / entries[shard]["file"], position - int(self._starts[shard])


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
        eos_count = max_id = 0
        for start in range(0, n, VERIFY_BLOCK):
            block = np.asarray(tokens[start:start + VERIFY_BLOCK])
            bad = np.flatnonzero(block >= vocab)
            if bad.size:
                offset = start + int(bad[0])
                raise DataError(f"{path}: token id {int(block[bad[0]])} at token offset {offset} is >= the "
                                f"vocabulary size {vocab}")
            eos_count += int(np.count_nonzero(block == eos))
            max_id = max(max_id, int(block.max()))
        if n and entry.get("max_id") is not None and entry["max_id"] != max_id:
            raise DataError(f"{path}: largest token id {max_id}, but the manifest says {entry['max_id']} "
                            f"(corrupted shard or manifest)")
        expected = entry["documents"] - (1 if trimmed and i == len(manifest["shards"]) - 1 else 0)
        if eos_count != expected:
            raise DataError(f"{path}: {eos_count} EOS tokens (id {eos}) but the manifest lists {entry['documents']} "
                            f"documents")
        del tokens
        if checksums and file_sha256(path) != entry["sha256"]:
            raise DataError(f"{path}: contents differ from the manifest's sha256 (corrupted shard; "
                            f"offset unknown, size matches)")
        if checksums and "sample_sha256" in entry and sample_sha256(path) != entry["sample_sha256"]:
            raise DataError(f"{path}: the manifest's sampled sha256 does not match the shard, whose full sha256 "
                            f"does (damaged manifest)")
    summary = {"directory": str(directory), "shards": len(manifest["shards"]), "tokens": manifest["tokens"],
               "documents": manifest["documents"], "dtype": dtype, "vocab_size": vocab,
               "tokenizer": manifest["tokenizer"].get("name")}
    validation = directory / VALIDATION_DIR
    if (validation / MANIFEST_NAME).is_file():
        summary["validation"] = verify_prepared(validation, identity or manifest["tokenizer"], checksums)
    return summary

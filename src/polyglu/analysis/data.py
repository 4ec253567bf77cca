"""Token batches for analysis, from prepared token shards or raw text (JSONL / .txt).

A batch is (input_ids, doc_ids), both (B, T) int64: documents are packed with EOS between them and
`doc_ids` restarts attention and causal routing at each document, as in training. Batches are
small (token ids only) and returned as a list so that several checkpoints can reuse them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from polyglu.documents import doc_ids_from_eos


def windows_to_batches(windows: list[np.ndarray], eos_id: int | None, batch_size: int
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Group token windows into (input_ids, doc_ids) batches; windows of equal length share a batch."""
    batches, group = [], []

    def flush() -> None:
        if group:
            ids = torch.from_numpy(np.stack(group).astype(np.int64))
            batches.append((ids, doc_ids_from_eos(ids, eos_id)))
            group.clear()

    for window in windows:
        if group and (len(window) != len(group[0]) or len(group) == batch_size):
            flush()
        group.append(np.asarray(window))
    flush()
    return batches


def shard_arrays(directory: str | Path, tokenizer=None, vocab_size: int | None = None) -> tuple[list[np.ndarray], int]:
    """(the non-empty memory-mapped shards of a prepared directory in order, its EOS id), opened by the
    one shard opener: another tokenizer's data or ids >= `vocab_size` are refused there."""
    from polyglu.data.shards import TokenShards

    shards = TokenShards(directory, tokenizer, model_vocab_size=vocab_size, user="the model")
    return [a for a in shards.arrays if a.size], shards.eos_id


def shard_windows(arrays: list[np.ndarray], seq_len: int, max_tokens: int) -> list[np.ndarray]:
    """Up to max_tokens // seq_len windows of seq_len tokens, spread evenly over all shards."""
    counts = np.array([len(a) // seq_len for a in arrays])  # whole windows per shard
    total = int(counts.sum())
    if total == 0:  # shards shorter than one window: take what there is
        return [np.asarray(a, dtype=np.int64) for a in arrays][: max(1, max_tokens // seq_len)]
    n = max(1, min(total, max_tokens // seq_len))
    ends = np.cumsum(counts)
    windows = []
    for index in np.linspace(0, total - 1, n).round().astype(np.int64):
        shard = int(np.searchsorted(ends, index, side="right"))
        start = (int(index) - int(ends[shard] - counts[shard])) * seq_len
        windows.append(np.asarray(arrays[shard][start: start + seq_len], dtype=np.int64))
    return windows


def read_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a .jsonl file (field `text_field` of each object) or a .txt file (blank-line
    separated paragraphs)."""
    path = Path(path)
    if path.suffix == ".txt":
        for paragraph in path.read_text(errors="replace").split("\n\n"):
            if paragraph.strip():
                yield paragraph.strip()
        return
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{lineno}: no string field {text_field!r} "
                                 f"(fields: {', '.join(record) if isinstance(record, dict) else 'none'})")
            yield record[text_field]


def text_windows(path: str | Path, tokenizer, seq_len: int, max_tokens: int, text_field: str = "text"
                 ) -> list[np.ndarray]:
    """Tokenize documents in file order, EOS after each, and cut the stream into seq_len windows
    until max_tokens (the last window may be shorter)."""
    stream: list[int] = []
    for text in read_texts(path, text_field):
        stream.extend(tokenizer.encode(text))
        stream.append(tokenizer.eos_id)
        if len(stream) >= max_tokens:
            break
    if not stream:
        raise ValueError(f"{path}: no documents")
    tokens = np.asarray(stream[:max_tokens], dtype=np.int64)
    return [tokens[i: i + seq_len] for i in range(0, len(tokens), seq_len)]


def load_token_batches(source: str | Path, seq_len: int, batch_size: int, max_tokens: int, tokenizer=None,
                       eos_id: int | None = None, vocab_size: int | None = None, text_field: str = "text"
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, doc_ids) batches from a shard directory written by `polyglu prepare` or a
    .jsonl / .txt file (needs `tokenizer`). Token ids must be below `vocab_size` when given; shards
    must have been prepared with `tokenizer` when given."""
    source = Path(source)
    if source.is_dir():
        arrays, eos_id = shard_arrays(source, tokenizer, vocab_size)
        windows = shard_windows(arrays, seq_len, max_tokens)
    elif source.is_file():
        if tokenizer is None:
            raise ValueError(f"{source}: text data needs a tokenizer (none in the model directory; pass --tokenizer)")
        windows = text_windows(source, tokenizer, seq_len, max_tokens, text_field)
        eos_id = tokenizer.eos_id
    else:
        raise FileNotFoundError(f"{source}: no such shard directory or text file")
    if vocab_size is not None:
        for i, w in enumerate(windows):
            if len(w) and int(w.max()) >= vocab_size:
                raise ValueError(f"{source}: token id {int(w.max())} in window {i} is outside the model's "
                                 f"vocabulary ({vocab_size}); data and model tokenizers differ?")
    return windows_to_batches(windows, eos_id, batch_size)

"""Packed, mixed, resumable batches from prepared token shards.

    loader = PackedLoader({"math": "data/math", "code": "data/code"}, seq_len=512, batch_size=8,
                          mixture=Mixture.paper(), total_steps=10_000, rank=rank, world_size=world)
    batch = loader.get_batch(step, micro_step)   # input_ids, targets, doc_ids: (B, T) int64

Each row is a window of seq_len + 1 consecutive tokens of one source, starting anywhere:
`input_ids = w[:-1]`, `targets = w[1:]` (standard LM loss on every position), and `doc_ids` numbers
the documents inside the row (0, 1, ...), an EOS belonging to the document it ends, so attention
and causal routing can stay inside a document.

Determinism: the source and start of row r of the global batch at (step, micro_step) are drawn
from a counter-based generator keyed by (seed, split, step, micro_step), r draws in. A batch is
thus a pure function of (seed, step, micro_step, rank, world_size, batch_size): a resumed run sees
exactly the batches an uninterrupted one would, and rank k of W holds rows k*B .. k*B+B-1 of the
global batch (W ranks with batch B see the same data as one rank with batch W*B).

Held-out split: `split="validation"` reads `DIR/validation/` when that directory was prepared
(`prepare(..., validation=...)`, `prepare --builtin math`); otherwise the last
`validation_fraction` of each source's tokens (at least seq_len + 1), widened back to the start of
the document it would cut, is held out and the training split stops before it: no document is
split between the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polyglu.config_loader import ConfigError, dataclass_from_dict, to_jsonable
from polyglu.data.shards import (  # noqa: F401  (TokenShards re-exported: the loader's view of the data)
    MANIFEST_NAME,
    VALIDATION_DIR,
    TokenShards,
    check_tokenizer,
)
from polyglu.data.sources import DataError
from polyglu.documents import doc_ids_from_eos

SPLITS = ("train", "validation")
_SPLIT_KEYS = {"train": 0, "validation": 1}


# ---------------------------------------------------------------------------------------------
# mixture


@dataclass
class Mixture:
    """Sampling weights per named source: `weights` until `anneal_at` x total steps, then
    `anneal_to` (a step change, as in the paper's last 20%; sources it leaves out get 0).
    Weights need not sum to 1."""

    weights: dict[str, float]
    anneal_to: dict[str, float] | None = None
    anneal_at: float = 0.8

    def __post_init__(self) -> None:
        for name, table in (("weights", self.weights), ("anneal_to", self.anneal_to)):
            if table is None:
                continue
            if not table:
                raise ConfigError(f"Mixture.{name} is empty")
            for source, weight in table.items():
                if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                    raise ConfigError(f"Mixture.{name}[{source!r}] must be a number >= 0, got {weight!r}")
            if sum(table.values()) <= 0:
                raise ConfigError(f"Mixture.{name} gives every source weight 0")
        if self.anneal_to is not None and set(self.anneal_to) - set(self.weights):
            raise ConfigError(f"Mixture.anneal_to names {sorted(set(self.anneal_to) - set(self.weights))}, which "
                              f"`weights` does not ({', '.join(self.weights)}); a source left out of "
                              f"anneal_to gets weight 0")
        if not 0.0 <= self.anneal_at <= 1.0:
            raise ConfigError(f"Mixture.anneal_at must be a fraction in [0, 1], got {self.anneal_at}")

    @classmethod
    def constant(cls, weights: dict[str, float]) -> Mixture:
        return cls(dict(weights))

    @classmethod
    def paper(cls) -> Mixture:
        """The paper's mix: math/STEM/code 70/25/5, annealed to 85/10/5 for the last 20% of training."""
        return cls({"math": 0.70, "stem": 0.25, "code": 0.05}, {"math": 0.85, "stem": 0.10, "code": 0.05}, 0.8)

    @classmethod
    def from_dict(cls, data: dict) -> Mixture:
        return dataclass_from_dict(cls, data, "mixture")

    def to_dict(self) -> dict:
        return to_jsonable(self)

    @property
    def anneals(self) -> bool:
        return self.anneal_to is not None

    def weights_at(self, step: int, total_steps: int | None = None) -> dict[str, float]:
        """Normalised weights in force at `step`."""
        table = self.weights
        if self.anneals:
            if total_steps is None:
                raise ConfigError("this mixture anneals: weights_at needs total_steps")
            if step >= self.anneal_at * total_steps:
                table = self.anneal_to
        total = sum(table.values())
        return {name: table.get(name, 0.0) / total for name in self.weights}


# ---------------------------------------------------------------------------------------------
# packed loader


class _Split:
    """One source's token range [lo, hi) for a split."""

    def __init__(self, name: str, shards: TokenShards, lo: int, hi: int) -> None:
        self.name, self.shards, self.lo, self.hi = name, shards, lo, hi


class PackedLoader:
    """Packed windows of `seq_len` tokens from one or several prepared directories (see module doc).

    sources: {name: directory} or one directory. mixture: a `Mixture` (or its dict) over the source
    names; by default sources are weighted by their token counts. total_steps is needed when the
    mixture anneals. eos_id, when given, must match the data's.
    """

    def __init__(self, sources: dict[str, str | Path] | str | Path, seq_len: int, batch_size: int, seed: int = 0,
                 mixture: Mixture | dict | None = None, rank: int = 0, world_size: int = 1, split: str = "train",
                 eos_id: int | None = None, total_steps: int | None = None, validation_fraction: float = 0.01,
                 tokenizer=None) -> None:
        if not isinstance(sources, dict):
            sources = {Path(sources).name or "data": sources}
        if not sources:
            raise DataError("PackedLoader: no sources given")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"PackedLoader: {name} must be a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"PackedLoader: rank {rank} outside [0, world_size={world_size})")
        if split not in SPLITS:
            raise ConfigError(f"PackedLoader: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not 0.0 < validation_fraction < 1.0:
            raise ConfigError(f"PackedLoader: validation_fraction must be in (0, 1), got {validation_fraction}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, int(seed)
        self.rank, self.world_size, self.split = rank, world_size, split
        self.total_steps, self.validation_fraction = total_steps, validation_fraction
        self.next_step = 0

        self.sources = {name: self._open(name, Path(path), tokenizer) for name, path in sources.items()}
        first = next(iter(self.sources.values()))
        for part in self.sources.values():
            if part.shards.eos_id != first.shards.eos_id or part.shards.vocab_size != first.shards.vocab_size:
                raise DataError(f"{part.shards.directory}: tokenizer differs from {first.shards.directory} "
                                f"(vocab {part.shards.vocab_size} vs {first.shards.vocab_size}, "
                                f"eos {part.shards.eos_id} vs {first.shards.eos_id})")
            check_tokenizer(first.shards.directory, first.shards.manifest, part.shards.identity)
        self.eos_id = first.shards.eos_id
        self.vocab_size = first.shards.vocab_size
        if eos_id is not None and eos_id != self.eos_id:
            raise DataError(f"{first.shards.directory / MANIFEST_NAME}: manifest/tokenizer mismatch: the data's EOS "
                            f"id is {self.eos_id}, the tokenizer's {eos_id}")

        if mixture is None:
            mixture = Mixture({name: float(s.hi - s.lo) for name, s in self.sources.items()})
        elif isinstance(mixture, dict):
            mixture = Mixture.from_dict(mixture)
        unknown = sorted(set(mixture.weights) - set(self.sources))
        missing = sorted(set(self.sources) - set(mixture.weights))
        if unknown or missing:
            raise ConfigError(f"PackedLoader: mixture names {unknown or missing} "
                              f"{'but no such source is given' if unknown else 'are sources without a weight'} "
                              f"(sources: {', '.join(self.sources)})")
        if mixture.anneals and split == "train" and total_steps is None:
            raise ConfigError(f"PackedLoader: the mixture anneals at {mixture.anneal_at:.0%} of training, "
                              f"so total_steps is needed")
        self.mixture = mixture
        self._names = list(self.sources)

    def _open(self, name: str, directory: Path, tokenizer) -> _Split:
        held_out = directory / VALIDATION_DIR
        if (held_out / MANIFEST_NAME).is_file():
            shards = TokenShards(held_out if self.split == "validation" else directory, tokenizer, user="the run")
            lo, hi = 0, len(shards)
        else:
            shards = TokenShards(directory, tokenizer, user="the run")
            n = len(shards)
            n_val = max(math.ceil(n * self.validation_fraction), self.seq_len + 1)
            # the tail starts at a document start, so no document is split between training and validation
            boundary = shards.document_start(max(n - n_val, 0))
            if boundary == 0 < n - n_val:
                raise DataError(f"source '{name}' ({shards.directory}): the held-out tail (last {n_val} tokens) "
                                f"lies inside one document that starts at token 0, so no whole document is left "
                                f"to train on; prepare a validation split (`polyglu prepare --validation FILE`)")
            lo, hi = (boundary, n) if self.split == "validation" else (0, boundary)
        if hi - lo < self.seq_len + 1:
            raise DataError(f"source '{name}' ({shards.directory}): {max(hi - lo, 0)} {self.split} tokens, fewer "
                            f"than seq_len + 1 = {self.seq_len + 1}")
        return _Split(name, shards, lo, hi)

    # ---- batches

    def weights_at(self, step: int) -> dict[str, float]:
        if self.split == "validation" or not self.mixture.anneals:
            return self.mixture.weights_at(0, 1)
        return self.mixture.weights_at(step, self.total_steps)

    def _draws(self, step: int, micro_step: int) -> np.ndarray:
        """(B, 2) raw 64-bit draws for this rank's rows, rows rank*B .. of the global batch: row g
        uses Philox block g (4 outputs, the first two used), so a rank jumps straight to its rows."""
        key = np.random.SeedSequence([self.seed, _SPLIT_KEYS[self.split], step, micro_step])
        bits = np.random.Philox(key=key.generate_state(2, dtype=np.uint64))
        bits.advance(self.rank * self.batch_size)  # counts 4-output blocks
        return bits.random_raw(self.batch_size * 4).reshape(self.batch_size, 4)[:, :2]

    def windows(self, step: int, micro_step: int = 0) -> list[tuple[str, int]]:
        """(source name, start offset in its token stream) of each row."""
        weights = self.weights_at(step)
        cumulative = np.cumsum([weights[name] for name in self._names])
        draws = self._draws(step, micro_step)
        u = (draws[:, 0] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform in [0, 1)
        which = np.minimum(np.searchsorted(cumulative, u, side="right"), len(self._names) - 1)
        parts = [self.sources[name] for name in self._names]
        lo = np.array([p.lo for p in parts], dtype=np.uint64)
        span = np.array([p.hi - p.lo - self.seq_len for p in parts], dtype=np.uint64)  # possible starts
        starts = lo[which] + draws[:, 1] % span[which]
        return [(self._names[i], int(start)) for i, start in zip(which.tolist(), starts.tolist())]

    def get_batch(self, step: int, micro_step: int = 0) -> dict[str, torch.Tensor]:
        """input_ids, targets, doc_ids: (B, T) int64, a pure function of (seed, step, micro_step, rank)."""
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)  # (B, T+1)
        windows = self.windows(step, micro_step)
        for row, (name, start) in zip(rows, windows):
            self.sources[name].shards.read(start, self.seq_len + 1, out=row)
        if rows.max() >= self.vocab_size:  # damage between the blocks checked at open: stop, never embed it
            row, column = np.argwhere(rows >= self.vocab_size)[0]
            name, start = windows[row]
            path, offset = self.sources[name].shards.locate(start + int(column))
            raise DataError(f"{path}: token id {int(rows[row, column])} at token offset {offset} is >= the "
                            f"vocabulary size {self.vocab_size} (corrupted shard; run `polyglu verify-data`)")
        input_ids = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
        self.next_step = step + 1
        return {"input_ids": input_ids,
                "targets": torch.from_numpy(np.ascontiguousarray(rows[:, 1:])),
                "doc_ids": doc_ids_from_eos(input_ids, self.eos_id)}

    # ---- state

    def state_dict(self) -> dict:
        """Small and JSON-serialisable: what resuming needs and what must not have changed."""
        return {"kind": "packed", "seed": self.seed, "next_step": self.next_step, "seq_len": self.seq_len,
                "split": self.split, "mixture": self.mixture.to_dict(),
                "sources": {name: s.shards.fingerprint() for name, s in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "packed":
            raise DataError(f"loader state is of kind {state.get('kind')!r}, expected 'packed'")
        if state["seq_len"] != self.seq_len:
            raise DataError(f"loader state: seq_len {state['seq_len']} in the checkpoint, {self.seq_len} now")
        now = {name: s.shards.fingerprint() for name, s in self.sources.items()}
        if state["sources"] != now:
            changed = sorted(set(state["sources"]) ^ set(now) | {n for n in now if state["sources"].get(n) != now[n]})
            raise DataError(f"loader state: the data of source(s) {', '.join(changed)} changed since the checkpoint")
        self.seed = int(state["seed"])
        self.next_step = int(state["next_step"])
        self.mixture = Mixture.from_dict(state["mixture"])

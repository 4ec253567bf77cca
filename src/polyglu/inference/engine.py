"""The engine: prefill once, then a loop of decode steps, as a generator of per-step results.

    engine = Engine(model, compile=False)
    for step in engine.steps(prompts, max_new_tokens=64, sampling=Sampling(temperature=0.7, seed=0)):
        step.tokens, step.emitted, step.stopped     # (B,) each, on the host

`polyglu.inference.generate` collects these steps into a `GenerationOutput`; streaming, the chat
verb and the lm-eval adapter consume them through it. The engine works in token ids: text (stop
strings, streaming) plugs in as a per-row `stop` callable (nanochat's `engine.py` is the model).

Prompts of different lengths are left-padded, and the padding is a document of its own (`doc_ids`):
it never enters the real tokens' attention, rotary positions or causal routing, so a batched prompt
gives exactly (to float tolerance) what it gives alone.

Two paths, same results:
- cached (default): the prompt is run once (prefill), then one token per step against the KV cache
  (`polyglu.inference.cache.KVCache`) and, for `causal` routing, the per-layer running pool sums;
  each step through `DecodeStep` (`polyglu.inference.compiled`), eager or compiled.
- full recompute: every step re-runs the whole sequence. `use_cache=False` asks for it (the original
  project's only path; kept for tests and benchmarks); a model whose routing is not causal (the
  original `sequence` pooling, whose pool includes future tokens) always takes it: correct, but
  O(T^2) per token.

Sampled ids stay on the model's device; the host reads them every `sync_every` steps (1 on CPU,
where reading is free; `DEVICE_SYNC_EVERY` on an accelerator), checks stop strings and yields the
steps of that stretch. A row that a stop string ends mid-stretch decodes on until the read, and what
it produces after its stop is discarded: the results do not depend on `sync_every`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from polyglu.documents import doc_ids_with_padding
from polyglu.inference.cache import KVCache
from polyglu.inference.compiled import DecodeStep, compiled_cache_length
from polyglu.inference.sampling import sample_next

# steps between host reads of the sampled ids on an accelerator (each read waits for the device)
DEVICE_SYNC_EVERY = 8
# caches kept per model for reuse by later compiled generations (one per batch size and length; an
# evaluation's full batches and its last one). They hold memory between generations: `release_caches`
CACHES_PER_MODEL = 2
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: argmax at temperature 0, else a draw after top-k / top-p
    filtering, from `generator` (or a fresh one seeded with `seed`, or torch's global RNG). Ids at
    or above `vocab_limit` (the padding of a padded vocabulary) are never chosen."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    generator: torch.Generator | None = None
    vocab_limit: int | None = None

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        if self.temperature > 0 and self.generator is None and self.seed is not None:
            return torch.Generator(device=device).manual_seed(self.seed)
        return self.generator


@dataclass
class Step:
    """One decoding step's results, for every original row (B of them), on the host."""

    index: int  # the step: position of the token in the continuation
    tokens: torch.Tensor  # (B,) long: the token each row produced (pad_token_id where none)
    emitted: torch.Tensor  # (B,) bool: rows that produced a token this step (rows already stopped did not)
    stopped: torch.Tensor  # (B,) bool: rows that this token ended (EOS, or `stop` said so)
    logits: torch.Tensor | None = None  # (B, vocab) float32 raw next-token logits (0 where not emitted)


@dataclass
class _Pending:
    """A step sampled on the device, not yet read by the host."""

    index: int
    rows: torch.Tensor  # (b,) original row of each working row, on the host
    tokens: torch.Tensor  # (b,) on the device
    emitted: torch.Tensor  # (b,) bool on the device: not finished before this step
    eos: torch.Tensor  # (b,) bool on the device
    logits: torch.Tensor | None = None


class Engine:
    """Runs `model` token by token; `steps` yields one `Step` per decoding step.

    compile: as `DecodeStep` (False, True, a torch.compile mode or backend name). Compiled
    generations take their cache from a small pool per model, one per (batch size, length), reset in
    place and reused by the next generation of that shape: the compiled step (and on CUDA its
    graph) sees the same tensors every time.
    """

    def __init__(self, model, compile: bool | str = False) -> None:
        self.model = model
        self.decode = DecodeStep(model, compile)

    @property
    def compiled(self) -> bool:
        return self.decode.compiled

    def steps(self, prompts: list[list[int]], max_new_tokens: int, *, sampling: Sampling = Sampling(),
              eos_ids: Sequence[int] = (), pad_token_id: int = 0, stop: Callable[[int, int], bool] | None = None,
              use_cache: bool = True, compact: bool = True, sync_every: int | None = None,
              return_logits: bool = False) -> Iterator[Step]:
        """Prefill `prompts` (lists of ids; left-padded here), then decode up to `max_new_tokens`.

        stop(row, token) -> bool is asked, on the host, for every token a row produces (after EOS
        is checked) and ends the row when true. compact: drop stopped rows from the working batch
        once they are at least half of it (never when compiled: a new batch size compiles again).
        The model must be in the mode it should decode in (`generate` puts it in eval mode)."""
        if max_new_tokens <= 0:
            return
        device = self.model.device
        sync_every = sync_every or (1 if device.type == "cpu" else DEVICE_SYNC_EVERY)
        recompute = not use_cache or not self.model.config.causal_routing
        ids, doc_ids = left_pad(prompts, pad_token_id, device)
        stepper = _RecomputeStepper(self.model, ids, doc_ids) if recompute else \
            _CachedStepper(self.model, ids, doc_ids, max_new_tokens, self.decode)
        loop = _Loop(len(prompts), device, sampling, eos_ids, pad_token_id, stop, return_logits)
        try:
            yield from loop.run(stepper, max_new_tokens, sync_every, compact and not (self.compiled and not recompute))
        finally:
            stepper.release()


class _Loop:
    """The decoding loop of one `Engine.steps` call: sample on the device, read every few steps."""

    def __init__(self, batch: int, device: torch.device, sampling: Sampling, eos_ids: Sequence[int],
                 pad_token_id: int, stop: Callable[[int, int], bool] | None, return_logits: bool) -> None:
        self.batch, self.device, self.sampling = batch, device, sampling
        self.generator = sampling.generator_on(device)
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        self.pad, self.stop, self.return_logits = pad_token_id, stop, return_logits
        self.finished = torch.zeros(batch, dtype=torch.bool)  # what the host knows of every original row
        self.rows = torch.arange(batch)  # original row of each row of the working batch
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)  # working rows known finished
        self.stopped_since_compact = False

    def run(self, stepper, max_new_tokens: int, sync_every: int, compact: bool) -> Iterator[Step]:
        logits = stepper.first()
        pending: list[_Pending] = []
        for t in range(max_new_tokens):
            pending.append(self.sample(t, logits))
            last = t == max_new_tokens - 1
            if last or len(pending) >= sync_every:
                yield from self.read(pending)
                pending = []
                if last or bool(self.finished.all()):
                    return
                if compact and self.stopped_since_compact:
                    self.compact(stepper)
            logits = stepper.next(self.feed)

    def sample(self, t: int, logits: torch.Tensor) -> _Pending:
        """Choose the next tokens on the device; no host read."""
        s = self.sampling
        tokens = sample_next(logits.float(), s.temperature, s.top_k, s.top_p, self.generator, s.vocab_limit)
        emitted = ~self.done
        eos = torch.isin(tokens, self.eos) if self.eos.numel() else torch.zeros_like(emitted)
        self.done = self.done | (eos & emitted)
        # stopped rows keep decoding padding until enough of them can be dropped at once
        self.feed = tokens.masked_fill(self.done, self.pad)
        return _Pending(t, self.rows, tokens, emitted, eos, logits.float() if self.return_logits else None)

    def read(self, pending: list[_Pending]) -> list[Step]:
        """The host's read of a stretch of steps: stop checks in order, then one `Step` each."""
        steps = [self.host_step(p) for p in pending]
        if self.stop is not None:  # rows a stop check ended mid-stretch are fed padding from now on
            self.done = self.finished[self.rows].to(self.device)
            self.feed = self.feed.masked_fill(self.done, self.pad)
        if len(steps) == 1:  # a step read at once always has a row that produced a token
            return steps
        # steps decoded after every row had stopped produced nothing: not steps of the generation
        return [step for step in steps if step.emitted.any()]

    def host_step(self, p: _Pending) -> Step:
        tokens, emitted, eos = p.tokens.cpu(), p.emitted.cpu(), p.eos.cpu()
        live = emitted & ~self.finished[p.rows]  # a stop check may have ended a row since
        stops = eos & live
        if self.stop is not None:
            for i, row, token in zip(live.nonzero().flatten().tolist(), p.rows[live].tolist(), tokens[live].tolist()):
                stops[i] |= bool(self.stop(row, token))
        self.finished[p.rows] |= stops
        working = p.rows.shape[0]
        if working > 1:  # one row left: nothing to compact
            self.stopped_since_compact |= bool(stops.any())
        logits = None if p.logits is None else p.logits.cpu().masked_fill(~live[:, None], 0.0)
        if working == self.batch:  # no row dropped yet: the working rows are the original ones
            return Step(p.index, tokens.masked_fill(~live, self.pad), live, stops, logits)
        out = Step(p.index, torch.full((self.batch,), self.pad, dtype=torch.long),
                   torch.zeros(self.batch, dtype=torch.bool), torch.zeros(self.batch, dtype=torch.bool),
                   None if logits is None else torch.zeros(self.batch, logits.shape[-1]))
        out.tokens[p.rows], out.emitted[p.rows], out.stopped[p.rows] = tokens.masked_fill(~live, self.pad), live, stops
        if logits is not None:
            out.logits[p.rows] = logits
        return out

    def compact(self, stepper) -> None:
        self.stopped_since_compact = False
        keep = ~self.finished[self.rows]
        if int(keep.sum()) * 2 > len(self.rows):
            return
        index = keep.nonzero().flatten()
        self.rows = self.rows[index]
        stepper.select(index.to(self.device))
        index = index.to(self.device)
        self.done, self.feed = self.done[index], self.feed[index]


# --------------------------------------------------------------------------------------------
# prefill and steps: against the cache, or recomputing everything


class _CachedStepper:
    """Prefill once, then one token per step against the KV cache (`DecodeStep`)."""

    def __init__(self, model, ids: torch.Tensor, doc_ids: torch.Tensor | None, max_new_tokens: int,
                 decode: DecodeStep) -> None:
        self.model, self.ids, self.doc_ids, self.decode = model, ids, doc_ids, decode
        # the last generated token is never fed back: P + max_new_tokens - 1 slots suffice
        length = ids.shape[1] + max_new_tokens - 1
        self.pooled = decode.compiled
        if self.pooled:
            length = compiled_cache_length(length, model.config.max_seq_len)
        self.cache = take_cache(model, ids.shape[0], length) if self.pooled else new_cache(model, ids.shape[0], length)

    def first(self) -> torch.Tensor:
        return self.model(self.ids, self.doc_ids, cache=self.cache, logits_to_keep=1).logits[:, -1]

    def next(self, next_ids: torch.Tensor) -> torch.Tensor:
        return self.decode(next_ids[:, None], self.cache)

    def select(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)

    def release(self) -> None:
        if self.pooled:
            give_back_cache(self.model, self.cache)


class _RecomputeStepper:
    """Every step runs the whole sequence again (uncached reference path; non-causal routing)."""

    def __init__(self, model, ids: torch.Tensor, doc_ids: torch.Tensor | None) -> None:
        self.model, self.ids, self.doc_ids = model, ids, doc_ids

    def first(self) -> torch.Tensor:
        return self._run()

    def next(self, next_ids: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, next_ids[:, None]], dim=1)
        if self.doc_ids is not None:
            self.doc_ids = torch.cat([self.doc_ids, self.doc_ids[:, -1:]], dim=1)
        return self._run()

    def select(self, index: torch.Tensor) -> None:
        self.ids = self.ids[index]
        self.doc_ids = self.doc_ids[index] if self.doc_ids is not None else None

    def release(self) -> None:
        pass

    def _run(self) -> torch.Tensor:
        return self.model(self.ids, self.doc_ids, logits_to_keep=1).logits[:, -1]


def new_cache(model, batch_size: int, length: int) -> KVCache:
    """A new cache of `batch_size` rows and `length` slots for `model` (the engine's one allocation)."""
    return KVCache.for_model(model, batch_size, length)


def take_cache(model, batch_size: int, length: int) -> KVCache:
    """An empty cache of `batch_size` rows and `length` slots for `model`: one kept from an earlier
    generation of that shape (reset in place, its tensors at their addresses) or a new one. Taken
    out of the pool while in use, so generations in several threads never share one."""
    p = next(model.parameters())
    key = (batch_size, length, p.dtype, p.device)
    cache = _CACHES.get(model, {}).pop(key, None)
    if cache is None:
        return new_cache(model, batch_size, length)
    cache.reset()
    return cache


def give_back_cache(model, cache: KVCache) -> None:
    """Keep `cache` for the next generation of its shape (not if rows were dropped from it)."""
    pool = _CACHES.setdefault(model, {})
    key = (cache.batch_size, cache.max_len, cache.dtype, cache.device)
    pool.pop(key, None)
    pool[key] = cache  # the newest last: the oldest goes first when the pool is full
    while len(pool) > CACHES_PER_MODEL:
        pool.pop(next(iter(pool)))


def release_caches(model) -> None:
    """Drop the caches kept for `model`'s compiled generations (their memory goes back)."""
    _CACHES.pop(model, None)


# --------------------------------------------------------------------------------------------
# inputs


def prompt_list(input_ids, attention_mask) -> list[list[int]]:
    """Normalise the accepted prompt forms to a list of token-id lists (one per row)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T) or (T,), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            return input_ids.tolist()
        mask = torch.as_tensor(attention_mask).bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        return [row[m].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
    if attention_mask is not None:
        raise ValueError("attention_mask is only meaningful with a padded input_ids tensor; "
                         "pass lists of ids of different lengths instead")
    input_ids = list(input_ids)
    if input_ids and all(isinstance(t, int) for t in input_ids):
        return [input_ids]
    return [list(map(int, row)) for row in input_ids]


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids (B, P), doc_ids (B, P) or None): left padding is a document of its own (PADDING_DOCUMENT),
    the prompt document 0. doc_ids is None when no row needs padding (plain causal attention)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    is_token = torch.zeros(len(prompts), P, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        is_token[b, P - len(p):] = True
    padded = not bool(is_token.all())
    return ids.to(device), (doc_ids_with_padding(is_token).to(device) if padded else None)

"""`generate`: the engine's steps collected into tokens, lengths and texts; the library's one entry
point for generation (the generate and chat verbs, eval-math and the lm-eval adapter call it).

    out = generate(model, [[ids of prompt 1], [ids of prompt 2]], max_new_tokens=64,
                   temperature=0.7, top_p=0.9, seed=0, tokenizer=tok, stop_strings=["\\n\\n"])
    out.tokens   # (B, max_new_tokens), pad_token_id after a row stops
    out.texts    # continuations cut before the stop string / EOS (when a tokenizer is given)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from polyglu.inference.engine import Engine, Sampling, Step, prompt_list
from polyglu.inference.sampling import check_sampling
from polyglu.inference.text import StopStringMatcher, continuation_text

# called once per decoding step with (tokens (B,), emitted (B,) bool): the token chosen for each
# original row, and which rows actually produced one this step (rows already stopped did not)
StreamCallback = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # (B, max_new_tokens) long; pad_token_id after a row has stopped
    lengths: torch.Tensor  # (B,) long: tokens generated per row, the stopping token included
    finished: torch.Tensor  # (B,) bool: stopped on EOS or a stop string (False: ran to max_new_tokens)
    logits: torch.Tensor | None = None  # (B, max_new_tokens, vocab) float32 raw next-token logits; 0 after a stop
    texts: list[str] | None = None  # with a tokenizer: continuations cut before the stop string or EOS
    used_cache: bool = True  # False when every step recomputed the whole sequence

    def token_lists(self) -> list[list[int]]:
        """Generated ids per row, without the padding after a stop."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, *, use_cache: bool = True,
             attention_mask: torch.Tensor | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, stop_strings: Sequence[str] | None = None, tokenizer=None,
             stream: StreamCallback | None = None, return_logits: bool = False,
             compact: bool = True, compile: bool | str = False, sync_every: int | None = None,
             vocab_limit: int | None = None) -> GenerationOutput:
    """Generate up to `max_new_tokens` tokens after each prompt.

    input_ids: a (B, T) tensor (all rows real tokens, or with `attention_mask` (B, T), 1 on real
        tokens, any padding side), a (T,) tensor, a list of ints, or a list of lists of ints of
        different lengths (batched, left-padded internally).
    temperature: 0 is greedy (argmax); otherwise (> 0) sampling with optional `top_k` (>= 0, exactly
        k tokens kept) / `top_p` (in (0, 1]), from `generator`, or a fresh one seeded with `seed`
        (reproducible), or torch's global RNG. Out-of-range values are a ValueError.
    vocab_limit: ids at or above it are never chosen: the padding rows of a vocabulary padded past
        the tokenizer's. None: the tokenizer's vocab_size when a tokenizer is given, else every id.
    eos_token_id: id or ids that stop a row (kept as its last token). None: the model config's
        eos_token_id, else the tokenizer's eos_id; [] disables.
    stop_strings: stop a row once its decoded continuation contains one (needs `tokenizer`); the
        token completing it is kept in `tokens`, `texts` are cut before it. Decoded incrementally
        (`StopStringMatcher`): a stop string of any number of tokens is found, at a per-step cost
        independent of the continuation's length.
    stream: called after each step with (tokens (B,), emitted (B,) bool); see `TextStreamer`.
    compact: drop stopped rows from the batch once they are at least half of it (less compute;
        results agree to float tolerance). Off when compiled.
    compile: run each cached decoding step compiled (`DecodeStep`: True, a torch.compile mode or
        backend name; True means "reduce-overhead" on CUDA: CUDA graphs). Pays for long or repeated
        generations (compiling takes seconds to minutes, once per process and batch shape); a failure
        falls back to eager with a warning. Ignored on the recompute path.
    sync_every: steps between host reads of the sampled ids (default 1 on CPU, 8 on an accelerator);
        the same results, `stream` called in bursts.

    The prompt plus `max_new_tokens` must fit in the model context (`max_seq_len`); truncate prompts
    yourself (keep their last tokens). Runs in eval mode; the model's mode is restored afterwards.
    """
    prompts = prompt_list(input_ids, attention_mask)
    check_request(model, prompts, max_new_tokens, stop_strings, tokenizer)
    check_sampling(temperature, top_k, top_p)
    if sync_every is not None and sync_every < 1:
        raise ValueError(f"sync_every must be >= 1 (steps between host reads), got {sync_every}")
    eos_ids = _token_set(eos_token_id, model, tokenizer)
    pad_token_id = _pad_id(pad_token_id, model, tokenizer, eos_ids)
    sampling = Sampling(temperature, top_k, top_p, seed, generator, _vocab_limit(vocab_limit, model, tokenizer))
    stop_strings = [s for s in (stop_strings or []) if s]
    steps = Engine(model, compile).steps(
        prompts, max_new_tokens, sampling=sampling, eos_ids=eos_ids, pad_token_id=pad_token_id,
        stop=_stop_check(tokenizer, stop_strings, len(prompts)), use_cache=use_cache, compact=compact,
        sync_every=sync_every, return_logits=return_logits)
    out = _Collector(len(prompts), max_new_tokens, pad_token_id, model.config.vocab_size, return_logits, tokenizer)
    with _eval_mode(model):
        for step in steps:
            out.add(step)
            if stream is not None:
                stream(step.tokens.clone(), step.emitted)
    texts = None if tokenizer is None else \
        [continuation_text(tokenizer, ids, eos_ids, stop_strings) for ids in out.generated]
    return GenerationOutput(tokens=out.tokens, lengths=out.lengths, finished=out.finished, logits=out.logits,
                            texts=texts, used_cache=use_cache and model.config.causal_routing)


@contextlib.contextmanager
def _eval_mode(model):
    """Evaluation mode (deterministic routing, no Gumbel noise) within the block; the mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _stop_check(tokenizer, stop_strings: list[str], batch: int) -> Callable[[int, int], bool] | None:
    """The engine's per-row stop question for stop strings: one incremental matcher per row."""
    if not stop_strings:
        return None
    matchers = [StopStringMatcher(tokenizer, stop_strings) for _ in range(batch)]
    return lambda row, token: matchers[row].push(token)


class _Collector:
    """The engine's steps gathered into the tensors of a GenerationOutput (and, for texts, id lists)."""

    def __init__(self, batch: int, max_new_tokens: int, pad_token_id: int, vocab: int, return_logits: bool,
                 tokenizer) -> None:
        self.tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long)
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.finished = torch.zeros(batch, dtype=torch.bool)
        self.logits = torch.zeros(batch, max_new_tokens, vocab) if return_logits else None
        # the ids of each row, for its text (with a tokenizer only)
        self.generated: list[list[int]] | None = [[] for _ in range(batch)] if tokenizer is not None else None

    def add(self, step: Step) -> None:
        self.tokens[:, step.index] = step.tokens  # padding where a row produced nothing, as initialised
        self.lengths += step.emitted
        self.finished |= step.stopped
        if self.logits is not None:
            self.logits[:, step.index] = step.logits
        if self.generated is not None:
            for row, token in zip(step.emitted.nonzero().flatten().tolist(), step.tokens[step.emitted].tolist()):
                self.generated[row].append(token)


def check_request(model, prompts: list[list[int]], max_new_tokens: int, stop_strings, tokenizer) -> None:
    """A ValueError naming the first prompt or argument that generation cannot take."""
    if not prompts:
        raise ValueError("no prompts given")
    for b, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {b} is empty: generation needs at least one token to condition on")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    context = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model "
                         f"context max_seq_len={context}; shorten the prompt (keep its last "
                         f"{max(context - max_new_tokens, 0)} tokens) or lower max_new_tokens")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated tokens")
    vocab = model.config.vocab_size
    for b, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {b} has token id {bad[0]} outside the vocabulary [0, {vocab})")


def _vocab_limit(vocab_limit: int | None, model, tokenizer) -> int | None:
    """The ids sampling may choose: below `vocab_limit`, else the tokenizer's size; None for all."""
    if vocab_limit is None and tokenizer is not None:
        vocab_limit = tokenizer.vocab_size
    if vocab_limit is None or vocab_limit >= model.config.vocab_size:
        return None
    if vocab_limit < 1:
        raise ValueError(f"vocab_limit must be >= 1 (the tokenizer's vocabulary size), got {vocab_limit}")
    return int(vocab_limit)


def _token_set(eos_token_id, model, tokenizer) -> list[int]:
    if eos_token_id is None:
        config_eos = getattr(model.config, "eos_token_id", None)
        if config_eos is not None:
            return [config_eos]
        return [tokenizer.eos_id] if tokenizer is not None else []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in eos_token_id]


def _pad_id(pad_token_id: int | None, model, tokenizer, eos_ids: list[int]) -> int:
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_id if tokenizer is not None else (eos_ids[0] if eos_ids else 0)
    return pad_token_id

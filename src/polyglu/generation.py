"""Text generation: prefill + decode with the KV cache, sampling, stop conditions, batching.

    out = generate(model, [[ids of prompt 1], [ids of prompt 2]], max_new_tokens=64,
                   temperature=0.7, top_p=0.9, seed=0, tokenizer=tok, stop_strings=["\\n\\n"])
    out.tokens   # (B, max_new_tokens), pad_token_id after a row stops
    out.texts    # continuations cut before the stop string / EOS (when a tokenizer is given)

Prompts of different lengths are left-padded, and the padding is a document of its own (`doc_ids`):
it never enters the real tokens' attention, rotary positions or causal routing, so a batched
prompt gives exactly (to float tolerance) what it gives alone.

Two paths, same results:
- cached (default): the prompt is run once (prefill), then one token per step against the KV cache
  and, for `causal` routing, the per-layer running pool sums.
- full recompute: every step re-runs the whole sequence. `use_cache=False` asks for it (the original
  project's only path; kept for tests and benchmarks); a `sequence`-pooled model (the original,
  non-causal routing, whose pool includes future tokens) always takes it, because appending a token
  changes the routing of every earlier position: correct, but O(T^2) per token — slow.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from polyglu.documents import doc_ids_with_padding

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


# --------------------------------------------------------------------------------------------
# sampling: pure functions of the logits


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p. logits: (B, V).

    top_k keeps exactly k tokens (ties with the k-th are broken by index); 0 or None: no limit.
    top_p keeps the smallest set of most likely tokens whose mass reaches top_p, and always the
    most likely one (top_p near 0 is greedy).
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        top = torch.topk(logits, top_k, dim=-1).indices  # (B, k)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ValueError naming the first sampling argument outside its range."""
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 or None: no nucleus filter), got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, V): argmax when temperature is 0, else a draw from
    softmax(filtered logits / temperature). Returns (B,) long."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------
# inputs


def _prompt_list(input_ids, attention_mask) -> list[list[int]]:
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


def _token_set(eos_token_id, model, tokenizer) -> list[int]:
    if eos_token_id is None:
        config_eos = getattr(model.config, "eos_token_id", None)
        if config_eos is not None:
            return [config_eos]
        return [tokenizer.eos_id] if tokenizer is not None else []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in eos_token_id]


# --------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, *, use_cache: bool = True,
             attention_mask: torch.Tensor | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, stop_strings: Sequence[str] | None = None, tokenizer=None,
             stream: StreamCallback | None = None, return_logits: bool = False,
             compact: bool = True, compile: bool | str = False) -> GenerationOutput:
    """Generate up to `max_new_tokens` tokens after each prompt.

    input_ids: a (B, T) tensor (all rows real tokens, or with `attention_mask` (B, T), 1 on real
        tokens, any padding side), a (T,) tensor, a list of ints, or a list of lists of ints of
        different lengths (batched, left-padded internally).
    temperature: 0 is greedy (argmax); otherwise (> 0) sampling with optional `top_k` (>= 0, exactly
        k tokens kept) / `top_p` (in (0, 1]), from `generator`, or a fresh one seeded with `seed`
        (reproducible), or torch's global RNG. Out-of-range values are a ValueError.
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
        backend name; True means "reduce-overhead" on CUDA: CUDA graphs). Pays for long or repeated generations
        (compiling takes seconds to minutes, once per process and batch shape); a failure falls back
        to eager with a warning. Ignored on the recompute path.

    The prompt plus `max_new_tokens` must fit in the model context (`max_seq_len`): a longer one is
    an error; truncate prompts yourself (keep their last tokens). Runs in eval mode (deterministic
    routing, no Gumbel noise); the model's mode is restored afterwards.
    """
    prompts = _prompt_list(input_ids, attention_mask)
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
    check_sampling(temperature, top_k, top_p)
    vocab = model.config.vocab_size
    for b, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {b} has token id {bad[0]} outside the vocabulary [0, {vocab})")

    device = model.embed_tokens.weight.device
    B = len(prompts)
    eos_ids = _token_set(eos_token_id, model, tokenizer)
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_id if tokenizer is not None else (eos_ids[0] if eos_ids else 0)
    if temperature > 0 and generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop_strings = [s for s in (stop_strings or []) if s]
    stop_matchers = [StopStringMatcher(tokenizer, stop_strings) for _ in range(B)] if stop_strings else None
    eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device)

    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long)
    lengths = torch.zeros(B, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool)
    logits_out = torch.zeros(B, max_new_tokens, vocab) if return_logits else None
    generated: list[list[int]] = [[] for _ in range(B)]
    recompute = not use_cache or _needs_recompute(model)
    compiled = bool(compile) and not recompute  # a new batch size would compile again: never compact

    was_training = model.training
    model.eval()
    try:
        if max_new_tokens > 0:
            ids, doc_ids = left_pad(prompts, pad_token_id, device)
            step = _RecomputeStepper(model, ids, doc_ids) if recompute else \
                _CachedStepper(model, ids, doc_ids, max_new_tokens, DecodeStep(model, compile))
            rows = torch.arange(B)  # original row of each row of the working batch
            logits = step.first()
            for t in range(max_new_tokens):
                next_ids = sample_next(logits.float(), temperature, top_k, top_p, generator)  # (b,)
                stops = torch.isin(next_ids, eos_tensor) if eos_ids else torch.zeros_like(next_ids, dtype=torch.bool)
                next_cpu, stops = next_ids.cpu(), stops.cpu()
                live = ~finished[rows]
                live_rows = rows[live]
                tokens[live_rows, t] = next_cpu[live]
                lengths[live_rows] += 1
                if logits_out is not None:
                    logits_out[live_rows, t] = logits.float().cpu()[live]
                for r, token in zip(live_rows.tolist(), next_cpu[live].tolist()):
                    generated[r].append(token)
                if stop_matchers is not None:
                    for i in live.nonzero().flatten().tolist():
                        r = int(rows[i])
                        stops[i] |= stop_matchers[r].push(generated[r][-1])
                finished[live_rows] |= stops[live]
                if stream is not None:
                    emitted = torch.zeros(B, dtype=torch.bool)
                    emitted[live_rows] = True
                    stream(tokens[:, t].clone(), emitted)
                if t == max_new_tokens - 1 or bool(finished.all()):
                    break
                # stopped rows keep decoding padding until enough of them can be dropped at once
                next_ids = next_ids.masked_fill(finished[rows].to(device), pad_token_id)
                keep = ~finished[rows]
                if compact and not compiled and int(keep.sum()) * 2 <= len(rows):
                    index = keep.nonzero().flatten()
                    step.select(index.to(device))
                    rows, next_ids = rows[index], next_ids[index.to(device)]
                logits = step.next(next_ids)
    finally:
        model.train(was_training)

    texts = None
    if tokenizer is not None:
        texts = [_continuation_text(tokenizer, ids, eos_ids, stop_strings) for ids in generated]
    return GenerationOutput(tokens=tokens, lengths=lengths, finished=finished, logits=logits_out, texts=texts,
                            used_cache=not recompute)


def _needs_recompute(model) -> bool:
    """A model whose routing is not causal (e.g. `sequence` pooling: its pool sees the future) cannot be
    decoded incrementally."""
    return not model.config.causal_routing


def _continuation_text(tokenizer, ids: list[int], eos_ids: list[int], stop_strings: list[str]) -> str:
    if ids and ids[-1] in eos_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]


def _last_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Head applied to the last position only: (B, T, d) -> (B, vocab). Never materialise (B, T, vocab)."""
    return model.lm_head(hidden[:, -1])


# A compiled decode step has the cache's length in its shapes: compiled generations round it up (within
# the context) to a power of two up to this, to a multiple of it beyond, so batches of different prompt
# lengths share a compiled step (an evaluation compiles a few times per batch size, not once per
# batch) while the extra slots, masked, stay under half the cache.
COMPILED_CACHE_BUCKET = 256


def compiled_cache_length(length: int, context: int) -> int:
    """The cache length a compiled generation allocates for `length` slots (see COMPILED_CACHE_BUCKET)."""
    bucket = COMPILED_CACHE_BUCKET
    rounded = 1 << max(length - 1, 0).bit_length() if length <= bucket else -(-length // bucket) * bucket
    return max(length, min(rounded, context))


class _CachedStepper:
    """Prefill once, then one token per step against the KV cache (`DecodeStep`)."""

    def __init__(self, model, ids: torch.Tensor, doc_ids: torch.Tensor | None, max_new_tokens: int,
                 decode: DecodeStep) -> None:
        self.model, self.ids, self.doc_ids, self.decode = model, ids, doc_ids, decode
        # the last generated token is never fed back: P + max_new_tokens - 1 slots suffice
        length = ids.shape[1] + max_new_tokens - 1
        if decode.compiled:
            length = compiled_cache_length(length, model.config.max_seq_len)
        self.cache = model.new_cache(ids.shape[0], length)

    def first(self) -> torch.Tensor:
        out = self.model(self.ids, self.doc_ids, cache=self.cache, compute_logits=False)
        return _last_logits(self.model, out.hidden_states)

    def next(self, next_ids: torch.Tensor) -> torch.Tensor:
        return self.decode(next_ids[:, None], self.cache)

    def select(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)


class _RecomputeStepper:
    """Every step runs the whole sequence again (uncached reference path; sequence pooling)."""

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

    def _run(self) -> torch.Tensor:
        out = self.model(self.ids, self.doc_ids, compute_logits=False)
        return _last_logits(self.model, out.hidden_states)


# --------------------------------------------------------------------------------------------
# the decode step, eager or compiled

# compiled decode steps per model and mode: compiling costs seconds to minutes, once per process
_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILE_FAILED: set[str] = set()  # modes whose compilation failed once (warned; eager from then on)
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(compile) -> None:
    """A ValueError naming the choices unless `compile` is a bool, None, a torch.compile mode or a
    registered torch.compile backend (what `generate(compile=...)` and `--compile` accept)."""
    if compile is None or isinstance(compile, bool):
        return
    if not isinstance(compile, str):
        raise ValueError(f"compile must be True, False, a torch.compile mode ({', '.join(_COMPILE_MODES)}) "
                         f"or a torch.compile backend name, got {compile!r}")
    if compile not in _COMPILE_MODES:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if compile not in backends:
            raise ValueError(f"compile={compile!r} is neither a torch.compile mode ({', '.join(_COMPILE_MODES)}) "
                             f"nor a backend ({', '.join(b for b in backends if 'TESTING' not in b)})")


def compile_setting(value) -> bool | str:
    """A `compile` setting given as text (a command-line or lm-eval model argument): "true"/"1"/"yes"
    -> True, "false"/"0"/"no"/"" -> False, anything else a torch.compile mode or backend name."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip()
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no", ""):
        return False
    return text


def _compile_options(mode: str | None) -> dict:
    """torch.compile keyword arguments for a decode step in `mode` (None: a backend's own defaults).

    Every call of a compiled function first checks its guards: for a decode step, several hundred
    (each parameter and buffer, each module attribute and cache attribute the trace read), ~0.3 ms
    of a ~7 ms batch-1 step of the `small` preset on CPU, and more for PolyGLU (its routing
    parameters) than for SwiGLU. Where torch offers both (torch >= 2.13), only the tensors' guards
    are kept (`torch.compiler.keep_tensor_guards_unsafe`): every tensor's shape, dtype, device and
    layout, parameters included, is still checked (a new batch size, cache length, dtype or weight
    layout compiles again), and each compiled step is isolated (`isolate_recompiles`): torch.compile
    caches graphs per function, `decode_logits` is one function for every model, and tensor guards
    alone would let a SwiGLU model's graph serve a PolyGLU model of the same sizes. What is not seen:
    a change to a module's Python attributes (say `eval_routing`) after its first compiled step.
    DecodeStep keys its compiled steps by model, mode, training flag and grad mode.
    """
    keep = getattr(torch.compiler, "keep_tensor_guards_unsafe", None)
    isolate = "isolate_recompiles" in inspect.signature(torch.compile).parameters
    options = {"guard_filter_fn": functools.partial(keep, keep_parameters=True)} if keep and isolate else {}
    kwargs = {"isolate_recompiles": True} if options else {}
    if mode is None:
        return {**kwargs, "options": options} if options else {}
    if not options:
        return {} if mode == "default" else {"mode": mode}
    from torch._inductor import list_mode_options

    # a mode is a set of inductor options, and torch.compile takes mode= or options=, not both
    return {**kwargs, "options": {**list_mode_options(mode), **options}}


class DecodeStep:
    """model.decode_step as a callable, eager or compiled: (token_ids (B, 1), cache) -> logits (B, vocab).

    Every step has the same shapes (attention reads all the cache's slots under a mask), so
    torch.compile captures the whole step in one graph (fullgraph) and, on CUDA with
    mode="reduce-overhead", replays it as a CUDA graph.

        step = DecodeStep(model, compile=True)
        cache = model.new_cache(batch_size, prompt_len + new_tokens)
        logits = model(prompt_ids, cache=cache).logits[:, -1]      # prefill
        for _ in range(new_tokens - 1):
            next_ids = logits.argmax(-1, keepdim=True)            # (B, 1)
            logits = step(next_ids, cache)

    compile: False (eager), True (torch.compile with mode "reduce-overhead" on CUDA, the default
    mode elsewhere), a torch.compile mode name, or a backend name ("eager" or "aot_eager" check the
    capture in seconds, without generating code). The first compiled call compiles (seconds to
    minutes); the compiled step is kept per model and mode for the process. A batch size or cache
    length not seen before compiles again. If compiling fails, one warning is issued and the step
    runs eagerly from then on. On CUDA the logits are copied out of the graph's memory.
    """

    def __init__(self, model, compile: bool | str = False) -> None:
        self.model = model
        self.device = model.embed_tokens.weight.device
        on_cuda = self.device.type == "cuda"
        if compile is True:
            compile = "reduce-overhead" if on_cuda else "default"
        elif compile is False or compile is None:
            compile = None
        else:
            check_compile(compile)
        self.mode = compile  # a mode, or a backend name ("eager", "aot_eager": checks without a compiler)
        if compile is None:
            self.options = {}
        elif compile in _COMPILE_MODES:
            self.options = _compile_options(compile)
        else:
            self.options = {"backend": compile, **_compile_options(None)}
        self._cuda_graphs = on_cuda and compile in ("reduce-overhead", "max-autotune", "cudagraphs")
        self._marked_cache: weakref.ref | None = None

    @property
    def compiled(self) -> bool:
        """Whether steps run compiled (False after a compile failure)."""
        return self.mode is not None and self.mode not in _COMPILE_FAILED

    def __call__(self, token_ids: torch.Tensor, cache) -> torch.Tensor:
        if not self.compiled:
            return self.model.decode_step(token_ids, cache)
        cache.check_room(1)
        self.model.rope_tables(token_ids.device)  # built outside the trace
        logits = self._compiled_call(token_ids, cache)
        cache.advance(1)
        return logits

    def _compiled_call(self, token_ids: torch.Tensor, cache) -> torch.Tensor:
        per_model = _COMPILED_STEPS.setdefault(self.model, {})
        # the guards kept are the tensors' (see _compile_options): what else the trace read is keyed here
        key = (self.mode, self.model.training, torch.is_grad_enabled())
        if key not in per_model:
            kwargs = dict(self.options)
            if "options" in kwargs:  # torch.compile takes guard_filter_fn out of the dict it is given
                kwargs["options"] = dict(kwargs["options"])
            from polyglu.model.compiler import compile_fn

            per_model[key] = compile_fn(self.model.decode_logits, fullgraph=True, dynamic=False, **kwargs)
        if self._cuda_graphs:
            self._mark_static(cache)
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with warnings.catch_warnings():
                # polyglu's own cached helpers are pure: tracing through the cache wrapper is safe
                warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
                logits = per_model[key](token_ids, cache)
        except Exception as error:  # any compiler failure: fall back, once
            _COMPILE_FAILED.add(self.mode)
            warnings.warn(f"torch.compile of the decode step failed ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); decoding eagerly",
                          RuntimeWarning, stacklevel=3)
            return self.model.decode_logits(token_ids, cache)
        return logits.clone() if self._cuda_graphs else logits

    def _mark_static(self, cache) -> None:
        """CUDA graphs replay fixed addresses: the cache's tensors, written in place, are marked static."""
        if self._marked_cache is not None and self._marked_cache() is cache:
            return
        tensors = [*cache.keys, *cache.values, cache.segments, cache.positions, cache.filled,
                   *(state.total for state in cache.pool)]
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)
        self._marked_cache = weakref.ref(cache)


# --------------------------------------------------------------------------------------------
# text: incremental decoding, stop strings, streaming

# tokens held back while they end in an incomplete UTF-8 character, before giving up and taking
# the replacement character as text (a model can emit invalid bytes forever)
_MAX_HELD_TOKENS = 16


class IncrementalDecoder:
    """One row's text, decoded as its tokens arrive at a cost independent of the row's length.

    Each push decodes only a short window: the text of ids[prefix:] minus that of ids[prefix:read],
    where ids[prefix:read] are the tokens of the previous step, kept as context so that tokenizers
    whose pieces depend on a neighbour (a leading space) decode as in the whole sequence. While the
    window ends in an incomplete UTF-8 character (U+FFFD), its text is held back.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read]: context; ids[read:]: not yet committed
        self.held = ""  # decoded text of the held-back tokens (ending in U+FFFD)

    def push(self, token: int) -> str:
        """Add one token; return the newly committed text (empty while a character is incomplete)."""
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        new = after[len(before):]
        if new.endswith("\ufffd") and len(self.ids) - self.read < _MAX_HELD_TOKENS:
            self.held = new
            return ""
        self.prefix, self.read, self.held = self.read, len(self.ids), ""
        return new


class StopStringMatcher:
    """Whether one row's continuation contains a stop string yet, fed one token at a time.

    Only the newly decoded text and the last (longest stop string - 1) characters before it are
    searched: a stop string made of any number of tokens (CJK or emoji as byte tokens) is found
    on the token that completes it, exactly when decoding the whole continuation would find it.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_strings = [s for s in stop_strings if s]
        self.keep = max((len(s) for s in self.stop_strings), default=1) - 1
        self.tail = ""  # the last `keep` characters of the committed text

    def push(self, token: int) -> bool:
        text = self.tail + self.decoder.push(token)
        self.tail = text[-self.keep:] if self.keep else ""
        # as in decoding the whole continuation now: the held-back text counts, U+FFFD included
        text += self.decoder.held
        return any(s in text for s in self.stop_strings)



class TextStreamer:
    """A `stream` callback that writes one row's continuation as text while it is generated.

    Decodes the row's tokens so far and writes what is new, holding back an incomplete UTF-8
    character (decoded as U+FFFD) and any tail that could still become a stop string, so the
    terminal never shows the stop string or a half character. Tokens in `skip_token_ids` (EOS,
    <|im_end|>) are not written. Call `finish()` after generation to flush what was held back.
    """

    def __init__(self, tokenizer, write: Callable[[str], object] | None = None, row: int = 0,
                 stop_strings: Sequence[str] = (), skip_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer, self.row = tokenizer, row
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.stop_strings = [s for s in stop_strings if s]
        self.skip = set(skip_token_ids)
        self.ids: list[int] = []
        self.written = 0  # characters of the decoded text already written
        self.stopped = False

    def __call__(self, tokens: torch.Tensor, emitted: torch.Tensor) -> None:
        if not bool(emitted[self.row]) or self.stopped:
            return
        token = int(tokens[self.row])
        if token in self.skip:
            self.stopped = True
            return
        self.ids.append(token)
        self._flush(final=False)

    def finish(self) -> str:
        """Write the rest (cut at a stop string); returns the full text written."""
        return self._flush(final=True)

    def _flush(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids)
        cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        end = len(text)
        if not final and cut < 0:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            for s in self.stop_strings:  # hold back a tail that is a prefix of a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        if end > self.written:
            self.write(text[self.written:end])
            self.written = end
        return text[:self.written]

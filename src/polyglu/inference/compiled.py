"""The compiled static-cache decode step: one `torch.compile` around one step function, as gpt-fast's
`generate.py` compiles `decode_one_token`.

    step = DecodeStep(model, compile=True)
    cache = KVCache.for_model(model, batch_size, compiled_cache_length(prompt_len + new_tokens, context))
    logits = model(prompt_ids, cache=cache, logits_to_keep=1).logits[:, -1]     # prefill
    for _ in range(new_tokens - 1):
        logits = step(logits.argmax(-1, keepdim=True), cache)                    # (B, vocab)

The step function is the model's `decode_logits` (every tensor keeps its shape step to step, the
cache changes only in place); the model's `decode_step` does the host-side bookkeeping around it
and takes the compiled function as its `body`. What is machine-specific (the mode, CUDA graphs, the
guards kept) is decided here and nowhere else.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref

import torch

from polyglu.model.compiler import compile_fn

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
    mode="reduce-overhead", replays it as a CUDA graph (the cache's `static_tensors()` marked static).

    compile: False (eager), True (torch.compile with mode "reduce-overhead" on CUDA, the default
    mode elsewhere), a torch.compile mode name, or a backend name ("eager" or "aot_eager" check the
    capture in seconds, without generating code). The first compiled call compiles (seconds to
    minutes); the compiled step is kept per model and mode for the process. A batch size or cache
    length not seen before compiles again. If compiling fails, one warning is issued and the step
    runs eagerly from then on. On CUDA the logits are copied out of the graph's memory.
    """

    def __init__(self, model, compile: bool | str = False) -> None:
        self.model = model
        self.device = model.device
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
        return self.model.decode_step(token_ids, cache, body=self._compiled_call)

    def _compiled_call(self, token_ids: torch.Tensor, cache) -> torch.Tensor:
        per_model = _COMPILED_STEPS.setdefault(self.model, {})
        # the guards kept are the tensors' (see _compile_options): what else the trace read is keyed here
        key = (self.mode, self.model.training, torch.is_grad_enabled())
        if key not in per_model:
            kwargs = dict(self.options)
            if "options" in kwargs:  # torch.compile takes guard_filter_fn out of the dict it is given
                kwargs["options"] = dict(kwargs["options"])
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
        for tensor in cache.static_tensors():
            torch._dynamo.mark_static_address(tensor)
        self._marked_cache = weakref.ref(cache)

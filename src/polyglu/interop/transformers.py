"""Hugging Face `transformers` classes around PolychromaticLM (the `[hf]` extra).

    import polyglu.interop.transformers  # registers model_type "polychromatic" with the Auto classes
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported-dir")
    out = model.generate(input_ids, max_new_tokens=32, do_sample=False)

`PolychromaticForCausalLM` holds a `PolychromaticLM` as `self.model`: no second implementation, and
tensor names are those of a polyglu model directory with a `model.` prefix.

Cache: the transformers Cache protocol stores keys/values per layer, but causal routing also needs
the running pool sum of every PolyGLU layer, and our attention writes into a preallocated `KVCache`
that also tracks documents. So `PolychromaticCache` is a thin `Cache` subclass that owns one
`KVCache` (allocated at the first forward, when the batch size is known) and answers the questions
`generate` asks (length, beam reordering, batch expansion). `generate` builds it through
`_prepare_cache_for_generation`; a `DynamicCache` or static cache is refused with an error.
transformers 5.24 renamed the cache keyword from `past_key_values` to `cache` (in `generate`'s
model kwargs, `forward` and the output classes): `CACHE_KWARG` is the name the installed version
uses, and `forward` accepts both, so neither version sees a deprecated name.
A non-causal model (`ModelConfig.causal_routing` False: the original `sequence` pooling) cannot be
decoded with a cache:
`generate` then recomputes the whole sequence every step (correct, slower).

Padding: zeros in `attention_mask` become a document of their own (`doc_ids`), so padding never
enters the tokens' attention, rotary positions or causal routing; left- or right-padded rows give
what they give alone. (A zero in the middle of a row starts a new document after it.) `position_ids`
are ignored: positions follow from the documents.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from polyglu.documents import doc_ids_with_padding
from polyglu.inference.cache import KVCache
from polyglu.interop.hf_config import PolychromaticConfig
from polyglu.model.polyglu import PolyGLU
from polyglu.model.transformer import PolychromaticLM

__all__ = ["CACHE_KWARG", "PolychromaticBackbone", "PolychromaticCache", "PolychromaticCausalLMOutput",
           "PolychromaticConfig", "PolychromaticForCausalLM"]

# the keyword generate passes the cache under, and the output field holding it: "cache" from
# transformers 5.24 on, "past_key_values" before (5.24 warns about the old name on every use)
CACHE_KWARG = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


class PolychromaticCache(Cache):
    """A transformers `Cache` holding polyglu's `KVCache` (keys/values, documents, routing pool sums).

    max_len: capacity in tokens (default: the model's max_seq_len); `generate` passes its max length.
    """

    def __init__(self, max_len: int | None = None) -> None:
        super().__init__(layers=[])
        self.max_len = max_len
        self.kv: KVCache | None = None

    def bind(self, model: PolychromaticLM, batch_size: int) -> KVCache:
        """The KVCache for `model`, allocated on first use."""
        if self.kv is None:
            max_len = min(self.max_len or model.config.max_seq_len, model.config.max_seq_len)
            self.kv = KVCache.for_model(model, batch_size, max_len)
        elif self.kv.batch_size != batch_size:
            raise ValueError(f"PolychromaticCache holds {self.kv.batch_size} rows, the input has {batch_size}")
        return self.kv

    # ---- the questions transformers asks a Cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.length if self.kv is not None else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.kv.max_len if self.kv is not None else (self.max_len or -1)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def batch_size(self) -> int:
        return self.kv.batch_size if self.kv is not None else -1

    @property
    def is_initialized(self) -> bool:
        return self.kv is not None

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        self.kv = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.kv is not None:
            self.kv.reorder(beam_idx.to(self.kv.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            rows = torch.arange(self.kv.batch_size, device=self.kv.device)
            self.kv.reorder(rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("PolychromaticCache cannot be cropped (causal routing keeps running sums)")

    def update(self, *args, **kwargs):
        raise NotImplementedError("PolychromaticForCausalLM writes its KVCache directly; Cache.update is unused")


@dataclass
class PolychromaticCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast + the routing weights per PolyGLU layer when asked (`return_routing=True`)."""

    routing: list[torch.Tensor | None] | None = None


def padding_documents(attention_mask: torch.Tensor | None, length: int, cached: bool) -> torch.Tensor | None:
    """doc_ids (B, length) from a 2D attention mask: padding (0) is PADDING_DOCUMENT, tokens document 0.

    Tokens get id 0 because a cache fed without a mask continues document 0. Without a cache, a mask
    of ones gives None (plain causal attention, the fast path).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"PolychromaticForCausalLM takes a 2D attention_mask (B, T), got shape "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask[:, -length:]
    if not cached and bool(mask.all()):
        return None
    return doc_ids_with_padding(mask)


def _checkpoint_while_training(checkpoint_func, block: nn.Module, *args, **kwargs):
    """Run `block` under `checkpoint_func` (torch.utils.checkpoint with transformers' options) only when
    a backward will follow: evaluation and cached decoding run it plainly."""
    if block.training and torch.is_grad_enabled():
        return checkpoint_func(block.__call__, *args, **kwargs)
    return block(*args, **kwargs)


class PolychromaticBackbone:
    """`model.base_model`: the transformer without the LM head, called like a transformers base model
    (input_ids, attention_mask, cache) and returning `last_hidden_state` (B, T, d_model) after the
    final norm. A view of the wrapper holding no tensors of its own (the weights keep their names);
    TRL's fused-loss path calls it and applies `get_output_embeddings()` itself."""

    _tp_plan = None
    _pp_plan = None

    def __init__(self, wrapper: PolychromaticForCausalLM) -> None:
        self.wrapper = wrapper
        self.config = wrapper.config

    def __call__(self, *args, **kwargs) -> BaseModelOutputWithPast:
        return self.forward(*args, **kwargs)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        hidden, cache, _ = self.wrapper.forward_backbone(input_ids, attention_mask, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_KWARG: cache})


class PolychromaticForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PolychromaticConfig
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}
    supports_gradient_checkpointing = True

    def __init__(self, config: PolychromaticConfig) -> None:
        super().__init__(config)
        self.model = PolychromaticLM(config.model_config())
        self.gradient_checkpointing = False
        self.post_init()

    @classmethod
    def from_polyglu(cls, model: PolychromaticLM | str) -> PolychromaticForCausalLM:
        """Wrap a PolychromaticLM (or load a polyglu model directory) without copying its tensors."""
        if not isinstance(model, PolychromaticLM):
            from polyglu.loading import load_model

            model = load_model(model)
        config = PolychromaticConfig(**model.config.to_dict())
        with torch.device("meta"):
            wrapper = cls(config)
        wrapper.model = model
        wrapper.train(model.training)
        return wrapper

    @property
    def base_model(self) -> PolychromaticBackbone:
        return PolychromaticBackbone(self)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1, **kwargs) -> None:
        """What `gradient_checkpointing_enable()` / `_disable()` call: wrap every `every_n_layers`-th
        Block in torch's checkpoint wrapper (as `train.activation_checkpointing` does; the state dict
        keeps its names), or unwrap them."""
        from functools import partial

        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointWrapper,
            checkpoint_wrapper,
        )

        if gradient_checkpointing_func is None:
            from torch.utils.checkpoint import checkpoint

            gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        layers = self.model.layers
        for i, block in enumerate(layers):
            inner = block._checkpoint_wrapped_module if isinstance(block, CheckpointWrapper) else block
            if enable and i % every_n_layers == 0:
                layers[i] = checkpoint_wrapper(inner, checkpoint_fn=partial(_checkpoint_while_training,
                                                                            gradient_checkpointing_func))
            else:
                layers[i] = inner
        self.gradient_checkpointing = enable

    # ---- embeddings (the inner model is not a PreTrainedModel: answer for it)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    def _init_weights(self, module: nn.Module) -> None:
        """PolychromaticLM.reset_parameters's rules, module by module: transformers calls this for
        modules whose tensors a checkpoint did not provide (its init functions skip loaded tensors)."""
        self.model.init_module(module)
        if isinstance(module, PolyGLU):
            nn.init.constant_(module.tau, self.config.tau)

    # ---- forward

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: PolychromaticCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                return_routing: bool = False, past_key_values: PolychromaticCache | None = None,
                **kwargs) -> PolychromaticCausalLMOutput:
        """input_ids (B, T); attention_mask (B, S) with S = cached + T, zeros for padding.

        A cache is used when `cache` (transformers >= 5.24) or `past_key_values` (earlier versions)
        is a PolychromaticCache, as `generate` passes, or `use_cache=True` (a new one is returned).
        `logits_to_keep` = n computes logits for the last n positions only (0: all). `labels` (B, T)
        give the shifted next-token loss, -100 ignored.
        """
        hidden, cache, routing = self.forward_backbone(input_ids, attention_mask, cache=cache, use_cache=use_cache,
                                                    return_routing=return_routing, past_key_values=past_key_values,
                                                    **kwargs)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.model.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return PolychromaticCausalLMOutput(loss=loss, logits=logits, routing=routing, **{CACHE_KWARG: cache})

    def forward_backbone(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                      cache: PolychromaticCache | None = None, use_cache: bool | None = None,
                      return_routing: bool = False, past_key_values: PolychromaticCache | None = None,
                      **kwargs) -> tuple[torch.Tensor, PolychromaticCache | None, list | None]:
        """(hidden states (B, T, d_model) after the final norm, the cache used or None, routing):
        the part of `forward` before the head, shared with `base_model`."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("PolychromaticForCausalLM takes input_ids, not inputs_embeds")
        if cache is not None and past_key_values is not None:
            raise ValueError("PolychromaticForCausalLM got both cache= and past_key_values=; pass one")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, PolychromaticCache):
            raise TypeError(f"PolychromaticForCausalLM needs a PolychromaticCache (it also keeps the routing "
                            f"pool sums), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = PolychromaticCache()
        kv = cache.bind(self.model, input_ids.shape[0]) if cache is not None else None
        doc_ids = padding_documents(attention_mask, input_ids.shape[1], cached=kv is not None)
        out = self.model(input_ids, doc_ids, cache=kv, return_routing=return_routing, compute_logits=False)
        return out.hidden_states, cache, out.routing

    # ---- generation

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """Give `generate` a PolychromaticCache sized to its max length (signature of transformers 5.x:
        generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)."""
        cache = model_kwargs.get(CACHE_KWARG)
        if cache is not None:
            if not isinstance(cache, PolychromaticCache):
                raise TypeError(f"PolychromaticForCausalLM.generate needs a PolychromaticCache, got "
                                f"{type(cache).__name__}")
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not supported "
                             f"by PolychromaticForCausalLM (it keeps its own cache)")
        if not self.model.config.causal_routing:
            # non-causal routing: a new token changes every position's pool, so recompute each step
            generation_config.use_cache = False
            return
        max_cache_length = kwargs.get("max_cache_length", args[2] if len(args) > 2 else None)
        model_kwargs[CACHE_KWARG] = PolychromaticCache(max_len=max_cache_length)


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know model_type "polychromatic" (done on import)."""
    AutoConfig.register(PolychromaticConfig.model_type, PolychromaticConfig, exist_ok=True)
    AutoModelForCausalLM.register(PolychromaticConfig, PolychromaticForCausalLM, exist_ok=True)


register()

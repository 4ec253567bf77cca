"""PolychromaticLM: a pre-norm decoder-only transformer whose feed-forward blocks are PolyGLU."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polyglu.documents import document_causal_mask, document_positions
from polyglu.model.attention import Attention
from polyglu.model.flex import document_block_mask, uses_flex
from polyglu.model.layers import RMSNorm, rotary_tables
from polyglu.model.polyglu import GLU, PolyGLU, identity_routing_map, layer_to_neuron_state
from polyglu.model_config import ModelConfig

if TYPE_CHECKING:  # the cache lives in the inference wing, above the model: used here only by its methods
    from polyglu.inference.cache import KVCache


def build_ffn(config: ModelConfig) -> nn.Module:
    return (PolyGLU if config.ffn == "polyglu" else GLU).from_config(config)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = build_ffn(config)

    def forward(self, x, cos, sin, mask, doc_ids, positions, cache: KVCache | None = None,
                return_routing: bool | str = False):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, self.layer)
        pool_state = cache.pool_state(self.layer) if cache is not None else None
        out = self.ffn(self.ffn_norm(x), doc_ids, positions=positions, pool_state=pool_state,
                       return_routing=return_routing)
        if return_routing:
            out, routing = out
            return x + out, routing
        return x + out, None


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, vocab)
    hidden_states: torch.Tensor | None = None  # (B, T, d_model), after the final norm
    routing: list[torch.Tensor | None] | None = None  # per layer (B, T', d_ff, K): weights, or logits


class PolychromaticLM(nn.Module):
    """Decoder-only LM: embed -> N x [RMSNorm -> GQA(QK-norm, RoPE) -> +, RMSNorm -> FFN -> +] -> RMSNorm -> head.

    Inference uses it through two methods and a cache (`polyglu.inference.cache.KVCache`), never
    through its members:

        out = model(ids, doc_ids, cache=cache, logits_to_keep=1)    # a chunk (prefill): (B, 1, vocab)
        logits = model.decode_step(token_ids, cache)                # one token per row: (B, vocab)

    `decode_step(..., body=f)` runs the step's body through `f`, a compiled `decode_logits`
    (`polyglu.inference.compiled.DecodeStep`); `use_decode_layout()` stores the weights in the
    layout batch-1 CPU decoding reads fastest; `device` is where the weights are.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # rotary tables stay float32 whatever dtype the model is cast to: built lazily per device
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != device:
            c = self.config
            self._rope = rotary_tables(c.head_dim, c.max_seq_len, c.rope_theta, device=device)
        return self._rope

    # ---- initialisation

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for linear and embedding weights; residual outputs (o_proj, down_proj)
        scaled by 1/sqrt(2 n_layers); routing: alpha 0, beta 1, gate_net biases 0, a neuron-scope
        routing_map the identity (each neuron starts with the layer's dynamic logits)."""
        for module in self.modules():
            self.init_module(module)

    def init_module(self, module: nn.Module) -> None:
        """The initialisation rule for one module (also used by the transformers wrapper)."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            is_residual = any(module is block.attn.o_proj or module is block.ffn.down_proj for block in self.layers)
            nn.init.normal_(module.weight, mean=0.0,
                            std=std / math.sqrt(2 * self.config.n_layers) if is_residual else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, PolyGLU):
            nn.init.zeros_(module.alpha)
            if module.beta is not None:
                nn.init.ones_(module.beta)
            if module.routing_map is not None:
                with torch.no_grad():
                    module.routing_map.copy_(identity_routing_map(*module.routing_map.shape))

    # ---- routing temperature

    def set_tau(self, tau: float) -> None:
        for module in self.polyglu_layers():
            module.tau.fill_(float(tau))

    @property
    def tau(self) -> float | None:
        layers = self.polyglu_layers()
        return float(layers[0].tau) if layers else None

    def polyglu_layers(self) -> list[PolyGLU]:
        return [block.ffn for block in self.layers if isinstance(block.ffn, PolyGLU)]

    # ---- forward

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, *,
                cache: KVCache | None = None, return_routing: bool | str = False, compute_logits: bool = True,
                return_hidden: bool = False, reduce_routing=None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids: (B, T). doc_ids (B, T): packed documents, each a run of equal ids (see
        polyglu.documents): block-diagonal causal attention, rotary positions and routing pools
        restart per document. With `cache`, the tokens continue the cached ones.
        `compute_logits=False` skips the head (for a chunked loss on hidden states);
        `logits_to_keep=n` applies it to the last n positions only (a prefill needs one).
        `return_routing`: True for each PolyGLU's routing weights, "logits" for its logits before tau.
        `reduce_routing`: with `return_routing`, a function applied to each layer's routing weights
        as soon as the layer has run, its result kept instead (statistics without holding every
        layer's (B, T', d_ff, K) weights at once)."""
        B, T = input_ids.shape
        flex = uses_flex(self.config.attention_backend, input_ids.device, cached=cache is not None)
        if cache is not None:
            doc_ids, positions = cache.prepare(T, doc_ids)
            mask = cache.attention_mask(T)
            if flex and T > 1 and mask is not None:  # a chunk over documents; one token stays on SDPA
                mask = document_block_mask(cache.filled_segments(T), T)
        elif doc_ids is not None:
            positions = document_positions(doc_ids)
            # flex: one block mask for every layer instead of a dense (B, 1, T, T) one
            mask = document_block_mask(doc_ids, T) if flex else document_causal_mask(doc_ids)
        else:
            positions, mask = None, None
        rope_cos, rope_sin = self.rope_tables(input_ids.device)
        if positions is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
            cos, sin = rope_cos[:T][None, None], rope_sin[:T][None, None]
        else:
            # positions inside a chunk are < T: only a long chunk or a cache needs the (host-syncing) check
            if (cache is not None or T > self.config.max_seq_len) and int(positions.max()) >= self.config.max_seq_len:
                raise ValueError(f"a document position reaches {int(positions.max())}, beyond "
                                 f"max_seq_len={self.config.max_seq_len}")
            cos, sin = rope_cos[positions][:, None], rope_sin[positions][:, None]  # (B, 1, T, hd/2)

        x = self.embed_tokens(input_ids)
        routing = [] if return_routing else None
        for block in self.layers:
            x, layer_routing = block(x, cos, sin, mask, doc_ids, positions, cache, return_routing)
            if return_routing:
                reduced = reduce_routing is not None and layer_routing is not None
                routing.append(reduce_routing(layer_routing) if reduced else layer_routing)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        logits = None
        if compute_logits:
            logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        return ModelOutput(logits=logits, hidden_states=x if (return_hidden or not compute_logits) else None,
                           routing=routing)

    # ---- decoding one token at a time

    def decode_step(self, token_ids: torch.Tensor, cache: KVCache, body=None) -> torch.Tensor:
        """One new token per row, (B, 1), continuing each row's last cached document: returns the
        next-token logits (B, vocab). Equals `self(token_ids, cache=cache).logits[:, -1]`, at fixed
        shapes. `body` (default `decode_logits`) computes the step between the host-side checks:
        `polyglu.inference.compiled.DecodeStep` passes the compiled `decode_logits`."""
        cache.check_room(1)
        self.rope_tables(token_ids.device)  # built outside any trace
        logits = (body or self.decode_logits)(token_ids, cache)
        cache.advance(1)
        return logits

    def decode_logits(self, token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The body of `decode_step`, the function torch.compile captures whole: every tensor keeps
        its shape from step to step (attention reads all cache slots under a mask), nothing is read
        on the host and the cache changes only in place. It neither checks the cache's room nor
        advances it: call `decode_step` rather than this."""
        segments, positions, mask = cache.step_inputs()  # (B, 1), (B, 1), (B, 1, 1, max_len)
        rope_cos, rope_sin = self._rope
        cos, sin = rope_cos[positions][:, None], rope_sin[positions][:, None]  # (B, 1, 1, hd/2)
        view = cache.step_view(positions)
        x = self.embed_tokens(token_ids)
        # causal pooling updates the cache's running sums in place (their addresses never change,
        # which CUDA graphs need)
        for block in self.layers:
            x, _ = block(x, cos, sin, mask, segments, positions, view)
        return self.lm_head(self.norm(x))[:, -1]

    def use_decode_layout(self, columns: bool = True) -> bool:
        """Store every linear weight, and each PolyGLU's alpha, column-major, in place: the same
        values, shapes, parameter objects and state dict, only the strides change (a weight (out, in)
        becomes the transpose of a contiguous (in, out) tensor; alpha (d_ff, K) is read one activation
        at a time by the native decode kernel, `polyglu.model.native`). On CPU in float32 a one-row product x @ W^T reads that
        layout ~1.8x faster (MKL's gemv; the `small` preset's head: 4.1 -> 2.3 ms), so batch-1
        decoding, which streams every weight once per token, runs ~1.3x faster. Larger batches
        run alike; a training step is ~2% slower. `polyglu.loading.load_model_and_tokenizer` (the
        inference verbs) applies it; `generate` never changes the layout; `columns=False` restores
        row-major (contiguous) weights, e.g. to train after generating. Idempotent; returns
        whether it changed anything; does nothing on other devices or dtypes.
        """
        changed = False
        with torch.no_grad():
            for module in self.modules():
                # a PolyGLU's alpha (d_ff, K) too: the native decode kernel reads it one activation at a time
                weight = getattr(module, "weight" if isinstance(module, nn.Linear) else "alpha", None)
                if not (isinstance(module, (nn.Linear, PolyGLU)) and isinstance(weight, torch.Tensor)
                        and weight.device.type == "cpu" and weight.dtype == torch.float32 and min(weight.shape) > 1):
                    continue
                if columns and weight.is_contiguous():
                    weight.data = weight.data.t().contiguous().t()
                elif not columns and not weight.is_contiguous():
                    weight.data = weight.data.contiguous()
                else:
                    continue
                changed = True
        return changed

    # ---- convenience

    def num_parameters(self) -> dict[str, int]:
        from polyglu.model.parameters import parameter_counts

        return parameter_counts(self)

    # The model-directory format lives in polyglu.model_io, which does not import this module. It is
    # imported inside these two methods so that export-hf can bundle this file without it.

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> Path:
        from polyglu.model_io import save_model

        return save_model(self, directory, extra=extra)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, **overrides: Any) -> PolychromaticLM:
        """Load from a model directory. `overrides` change config fields that do not affect tensor
        shapes (e.g. eval_routing, mixed_impl, routing_pool), or routing_scope="neuron" (with
        routing_rank) over a layer-scope model: the same logits, each neuron's routing then trainable."""
        from polyglu.model_io import (
            WEIGHTS_NAME,
            check_finite,
            check_header_shapes,
            check_state_dict,
            load_state_file,
            model_state_dict,
            read_model_config,
            read_safetensors_header,
        )

        stored, _ = read_model_config(directory)
        config = stored.replace(**overrides) if overrides else stored
        weights = Path(directory) / WEIGHTS_NAME
        # names and shapes compared from the file's header with a model (of the stored config) on the meta
        # device: a config.json naming a huge model beside small weights is refused before any tensor is allocated
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in model_state_dict(cls(stored)).items()}
        check_header_shapes(read_safetensors_header(weights), expected, str(weights))
        state = load_state_file(weights)
        check_finite(state, str(weights))
        if stored.ffn == "polyglu" and stored.routing_scope == "layer" and config.routing_scope == "neuron":
            for i in range(config.n_layers):
                if f"layers.{i}.ffn.gate_net.2.weight" in state:  # a missing tensor is named by the check below
                    layer_to_neuron_state(state, f"layers.{i}.ffn.", config.d_ff, config.routing_rank)
        with torch.device("cpu"):
            model = cls(config)
        check_state_dict(model, state, str(weights))
        model.load_state_dict(state, strict=False)
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        model.eval()
        return model


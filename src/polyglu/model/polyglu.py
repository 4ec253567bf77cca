"""PolyGLU: a gated feed-forward layer whose neurons each mix K activations, and GLU baselines.

    out = down_proj( [sum_k g_k * act_k(gate_proj(x))] * up_proj(x) )
    g   = softmax((alpha + beta * gate_net(pool(x)) + Gumbel noise) / tau)     over k

alpha (d_ff, K) is a static per-neuron preference, beta (K,) scales the dynamic, input-dependent
part, gate_net is a small d_model -> gate_hidden -> K MLP of the pooled context. With
routing_scope="neuron" gate_net ends in routing_rank values instead, and a per-layer map
(d_ff, K, routing_rank) turns them into per-neuron dynamic logits (d_ff, K). Routing semantics
(pooling, noise, determinism) are described in docs/architecture.md and pinned by tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polyglu.config_loader import ConfigError
from polyglu.documents import document_positions, segment_ids
from polyglu.model.activations import ACTIVATIONS
from polyglu.model.layers import global_module_hooks, plain_linear
from polyglu.model_config import (
    DEFAULT_ACTIVATIONS,
    MIXED_IMPLS,
    ROUTING_MODES,
    ROUTING_POOLS,
    ROUTING_SCOPES,
    ModelConfig,
    routing_is_causal,
)

try:  # the Hugging Face standalone export (interop/hf_export.py) bundles this module without the kernels
    from polyglu.model import fused as _fused
    from polyglu.model import fused_native as _fused_native
    from polyglu.model import small_inference
    from polyglu.model.fused import mixed_activation_fused
except ImportError:
    mixed_activation_fused, small_inference, _fused, _fused_native = None, None, None, None


@dataclass
class PoolState:
    """Running state of causal pooling for one layer during cached decoding.

    `total` holds, per row, the sum of the routing network's first projection over the tokens of
    the row's current (last) document; the count comes from the token positions.
    """

    total: torch.Tensor  # (B, gate_hidden) float32
    # for one decode step (one token per row), computed once from the positions and shared by every
    # layer (`KVCache.step_view`): 0 where the token starts a document, else 1; and the document's
    # token count so far, this token included. Both (B, 1) float32; None: derived from positions.
    keep: torch.Tensor | None = None
    count: torch.Tensor | None = None


def routing_logits(alpha: torch.Tensor, dynamic: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """alpha + dynamic + noise in float32: (B, T', F, K), before the division by tau.

    alpha: (F, K); dynamic: (B, T', K) (layer scope: one vector for all neurons) or (B, T', F, K)
    (neuron scope), T' = 1 (sequence pooling) or T; noise: (B, F, K) or None.
    """
    dynamic = dynamic.float()
    logits = alpha.float()[None, None] + (dynamic if dynamic.dim() == 4 else dynamic[:, :, None, :])
    if noise is not None:
        logits = logits + noise.float()[:, None]
    return logits


def routing_weights(alpha: torch.Tensor, dynamic: torch.Tensor, noise: torch.Tensor | None,
                    tau: torch.Tensor, hard: bool = False) -> torch.Tensor:
    """g = softmax((alpha + dynamic + noise) / tau) over the activations, in float32.

    Shapes as `routing_logits`. Returns (B, T', F, K). `hard` returns the one-hot argmax instead
    (deterministic evaluation).
    """
    return weights_from_logits(routing_logits(alpha, dynamic, noise), tau, hard)  # (B, T', F, K)


def weights_from_logits(logits: torch.Tensor, tau: torch.Tensor | float, hard: bool = False) -> torch.Tensor:
    """softmax(logits / tau) over the last dimension in float32, or its one-hot argmax when `hard`."""
    logits = logits.float()
    if hard:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return torch.softmax(logits / (tau.float() if isinstance(tau, torch.Tensor) else float(tau)), dim=-1)


def mixed_activation_reference(gate: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor,
                               dynamic: torch.Tensor, noise: torch.Tensor | None, tau: torch.Tensor,
                               activations: Sequence[str], hard: bool = False) -> torch.Tensor:
    """The plain formulation: stacks the K activation outputs (K x d_ff per token kept for backward).

    gate, up: (B, T, F). Returns (B, T, F) in gate's dtype. The fused implementation is tested
    against this function.
    """
    g = routing_weights(alpha, dynamic, noise, tau, hard)  # (B, T', F, K)
    acts = torch.stack([ACTIVATIONS[name](gate) for name in activations], dim=-1)  # (B, T, F, K)
    mixed = (g * acts.float()).sum(-1)  # (B, T, F)
    return (mixed * up.float()).to(gate.dtype)


def mixed_activation(gate: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor, dynamic: torch.Tensor,
                     noise: torch.Tensor | None, tau: torch.Tensor, activations: Sequence[str],
                     hard: bool = False, impl: str = "auto", routing_map: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k g_k * act_k(gate) * up, by the chosen implementation ("auto", "fused", "reference"): the
    fused kernels, or for a small call without autograd the small-inference override
    (`polyglu.model.small_inference.choose` decides, here and nowhere else). With `routing_map`
    (F, K, r), per-neuron logits in rank form: dynamic is (B, T', r) and each neuron's logits are
    `neuron_logits(dynamic, routing_map)`; the fused kernels compute them in their loops, the other
    paths from that product."""
    if impl != "reference" and mixed_activation_fused is not None:
        activations = tuple(activations)
        path = small_inference.choose((gate, up, alpha, dynamic, noise, routing_map), activations, hard=hard,
                                      noisy=noise is not None, per_neuron=routing_map is not None)
        if path is not None:
            if routing_map is not None:
                dynamic = neuron_logits(dynamic, routing_map)
            return small_inference.mixed_activation(gate, up, alpha, dynamic, noise, tau, activations, hard, path)
        return mixed_activation_fused(gate, up, alpha, dynamic, noise, tau, activations, hard, routing_map=routing_map)
    if impl == "fused":
        raise RuntimeError("mixed_impl='fused' requested but polyglu.model.fused is not available")
    if routing_map is not None:
        dynamic = neuron_logits(dynamic, routing_map)
    return mixed_activation_reference(gate, up, alpha, dynamic, noise, tau, activations, hard)


def neuron_logits(out: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """Each neuron's own dynamic logits from gate_net's output `out` (B, T', r) and a map (d_ff, K, r):
    sum_r out[..., r] * routing_map[n, k, r], (B, T', d_ff, K), a view of a (B, T', K, d_ff) tensor
    (each activation's logits a contiguous (B, T', d_ff) slice, what the fused kernel's per-unit forms
    read without a copy). out @ map rather than F.linear: the map's gradient is then out^T @ grad,
    (r, BT) x (BT, K d_ff), which BLAS computes ~10x faster than the transposed product F.linear's
    backward asks for."""
    F_, K, r = routing_map.shape
    flat = routing_map.permute(2, 1, 0).reshape(r, K * F_)  # (r, K * F)
    return torch.matmul(out, flat).unflatten(-1, (K, F_)).transpose(-1, -2)  # (B, T', F, K) view


def sample_gumbel(shape: Sequence[int], device: torch.device, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples: -log(-log(U)), U ~ Uniform(0, 1) (several times faster to draw on
    CPU than Exponential(1)); U = 0 is moved to the smallest normal float, so samples are finite."""
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    return u.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()


class PolyGLU(nn.Module):
    """Drop-in replacement for a SwiGLU feed-forward block.

    Args:
        d_model, d_ff: model and hidden widths.
        activations: names from `ACTIVATIONS` mixed per neuron (any non-empty ordered subset).
        gate_hidden: width of the routing MLP.
        routing_pool: "causal" (mean over positions <= t of the same document; default),
            "sequence" (the original: mean over the whole row or document, future included),
            "token" (no pooling).
        eval_routing: "soft" or "hard" routing outside training mode (never noisy).
        routing_noise: add Gumbel noise to the routing logits in training mode.
        tau: initial temperature (a persistent buffer; schedules overwrite it).
        mixed_impl: "auto" | "fused" | "reference" implementation of the mixed activation.
        routing_mode: "full" (alpha + beta * gate_net), or the ablations "static" (alpha only, no
            gate_net) and "dynamic" (alpha fixed at 0, not trained).
        routing_scope: "layer" (the paper: one dynamic K-vector per token, shared by all neurons) or
            "neuron" (gate_net outputs `routing_rank` values; `routing_map` (d_ff, K, routing_rank)
            maps them to each neuron's own K logits; it starts as the identity on the first K values,
            so a fresh or converted neuron-scope layer computes what the layer scope computes).

    forward(x, doc_ids=None) -> y, with x, y of shape (B, T, d_model). With `return_routing=True`
    it returns (y, g) where g (B, T', d_ff, K) are the routing weights used (T' = 1 for "sequence").
    """

    def __init__(self, d_model: int, d_ff: int, activations: Sequence[str] = DEFAULT_ACTIVATIONS,
                 gate_hidden: int = 32, routing_pool: str = "causal", eval_routing: str = "soft",
                 routing_noise: bool = True, tau: float = 1.0, mixed_impl: str = "auto",
                 routing_mode: str = "full", routing_scope: str = "layer", routing_rank: int = 4) -> None:
        super().__init__()
        activations = tuple(activations)
        if not activations:
            raise ConfigError("PolyGLU: activations must name at least one activation")
        for name in activations:
            if name not in ACTIVATIONS:
                raise ConfigError(f"PolyGLU: unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})")
        if routing_pool not in ROUTING_POOLS:
            raise ConfigError(f"PolyGLU: routing_pool must be one of {ROUTING_POOLS}, got {routing_pool!r}")
        if eval_routing not in ("soft", "hard"):
            raise ConfigError(f"PolyGLU: eval_routing must be 'soft' or 'hard', got {eval_routing!r}")
        if routing_mode not in ROUTING_MODES:
            raise ConfigError(f"PolyGLU: routing_mode must be one of {ROUTING_MODES}, got {routing_mode!r}")
        if mixed_impl not in MIXED_IMPLS:
            raise ConfigError(f"PolyGLU: mixed_impl must be one of {MIXED_IMPLS}, got {mixed_impl!r}")
        if routing_scope not in ROUTING_SCOPES:
            raise ConfigError(f"PolyGLU: routing_scope must be one of {ROUTING_SCOPES}, got {routing_scope!r}")
        if routing_scope == "neuron" and routing_mode == "static":
            raise ConfigError("PolyGLU: routing_scope='neuron' needs dynamic routing (routing_mode='static' has none)")
        if routing_rank < 1:
            raise ConfigError(f"PolyGLU: routing_rank must be positive, got {routing_rank}")
        self.d_model, self.d_ff = d_model, d_ff
        self.activations = activations
        self.routing_pool = routing_pool
        self.eval_routing = eval_routing
        self.routing_noise = routing_noise
        self.mixed_impl = mixed_impl
        self.routing_mode = routing_mode
        self.routing_scope = routing_scope
        K = len(activations)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        if routing_mode == "dynamic":  # ablation: no static preference, alpha stays 0
            self.register_buffer("alpha", torch.zeros(d_ff, K), persistent=True)
        else:
            self.alpha = nn.Parameter(torch.zeros(d_ff, K))
        self.routing_map = None
        if routing_mode == "static":  # ablation: no input-dependent routing network
            self.beta, self.gate_net = None, None
        else:
            self.beta = nn.Parameter(torch.ones(K))
            outputs = K if routing_scope == "layer" else routing_rank
            self.gate_net = nn.Sequential(nn.Linear(d_model, gate_hidden), nn.ReLU(), nn.Linear(gate_hidden, outputs))
            if routing_scope == "neuron":
                self.routing_map = nn.Parameter(identity_routing_map(d_ff, K, routing_rank))
        self.register_buffer("tau", torch.tensor(float(tau)), persistent=True)

    @classmethod
    def from_config(cls, config: ModelConfig) -> PolyGLU:
        """The FFN block of a PolychromaticLM layer built from `config`."""
        return cls(d_model=config.d_model, d_ff=config.d_ff, activations=config.activations,
                   gate_hidden=config.gate_hidden, routing_pool=config.routing_pool,
                   eval_routing=config.eval_routing, routing_noise=config.routing_noise, tau=config.tau,
                   mixed_impl=config.mixed_impl, routing_mode=config.routing_mode,
                   routing_scope=config.routing_scope, routing_rank=config.routing_rank)

    @property
    def n_activations(self) -> int:
        return len(self.activations)

    @property
    def causal(self) -> bool:
        """Whether the output at position t reads only positions <= t (a KV cache decodes it exactly)."""
        return routing_is_causal(self.routing_pool, n_activations=self.n_activations, routing_mode=self.routing_mode)

    def extra_repr(self) -> str:
        scope = "" if self.routing_map is None else f", routing_scope='neuron', routing_rank={self.routing_map.shape[-1]}"
        small = f", small_inference={small_inference.describe(self.activations)!r}" if small_inference else ""
        return (f"activations={self.activations}, routing_pool={self.routing_pool!r}, routing_mode={self.routing_mode!r}"
                f"{scope}, eval_routing={self.eval_routing!r}, routing_noise={self.routing_noise}{small}")

    def dynamic_logits(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                       doc_ids: torch.Tensor | None = None, pool_state: PoolState | None = None) -> torch.Tensor:
        """beta * gate_net(pool(x)): (B, T', K), T' = 1 for "sequence" pooling without documents;
        per neuron (B, T', d_ff, K) with routing_scope="neuron" (`neuron_logits` of `routing_inputs`)."""
        dynamic, routing_map = self.routing_inputs(x, positions, doc_ids, pool_state)
        return dynamic if routing_map is None else neuron_logits(dynamic, routing_map)

    def routing_inputs(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                       doc_ids: torch.Tensor | None = None, pool_state: PoolState | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dynamic routing as the mixed activation takes it, (dynamic, routing_map): in layer scope
        (beta * gate_net(pool(x)) (B, T', K), None); in neuron scope (gate_net(pool(x)) (B, T', r), the
        map with beta folded in (d_ff, K, r)), whose product `neuron_logits` is each neuron's logits
        (the fused kernel computes it in its loops: no (B, T', d_ff, K) tensor either way).

        The mean is taken after gate_net's first (linear) layer, which commutes with it: the same
        function, but the running state and the pooled tensor are gate_hidden wide, not d_model.
        """
        if self.gate_net is None:  # static-only routing
            return x.new_zeros(x.shape[0], 1, self.n_activations), None
        first, second = self.gate_net[0], self.gate_net[2]
        if pool_state is not None and not self.causal:
            raise ValueError(f"routing_pool={self.routing_pool!r} is non-causal and cannot be decoded with a cache")
        proj = F.linear(x, first.weight)  # (B, T, H)
        if pool_state is not None and proj.shape[1] == 1 and proj.dtype == torch.float32 \
                and self.routing_pool == "causal" and not (torch.is_grad_enabled() and proj.requires_grad):
            # one decoded token per row without autograd: the same sums in five ops, in place
            hidden = _causal_step(proj, positions, pool_state, first.bias)
            if self.routing_map is not None:
                return second(hidden), self.scaled_map()
            if torch.compiler.is_compiling():
                # a traced step: the K-wide product as a reduction joins the pooling's loop (no mm call)
                return self.beta * ((hidden[..., None, :] * second.weight).sum(-1) + second.bias), None
            return second(hidden).mul_(self.beta), None
        if self.routing_pool == "token":
            pooled = proj
        elif self.routing_pool == "sequence":
            if doc_ids is None:
                pooled = proj.float().mean(dim=1, keepdim=True).to(proj.dtype)  # (B, 1, H)
            else:
                pooled = _document_mean(proj, doc_ids)
        else:
            if pool_state is None and self.routing_map is None and _fused_native is not None:
                # training, a prefill without a cache: pooling and the rest of gate_net in one native call
                dynamic = _fused_native.routing_head(proj, positions, first.bias, second.weight, second.bias, self.beta)
                if dynamic is not None:
                    return dynamic, None
            pooled = _causal_mean(proj, positions, pool_state).to(proj.dtype)
        out = second(F.relu(pooled + first.bias))
        return (self.beta * out, None) if self.routing_map is None else (out, self.scaled_map())

    def _projected_hidden(self, x: torch.Tensor, positions: torch.Tensor | None,
                          noise: torch.Tensor | None) -> torch.Tensor | None:
        """The hidden activations of a CPU training call with gate and gate_net's first projection from
        one product, x [W_gate; W1]^T (`fused_native.projected_mix`: one product each way where
        there were two, one a skinny d_model x gate_hidden); None where it does not apply (then the
        separate projections, the same function)."""
        if self.gate_net is None or self.routing_pool != "causal" or self.routing_map is not None \
                or self.n_activations == 1 or (not self.training and self.eval_routing == "hard"):
            return None
        first, relu, second = self.gate_net
        if not (plain_linear(self.gate_proj) and plain_linear(first) and plain_linear(second)) \
                or type(relu) is not nn.ReLU or self.gate_proj.bias is not None or first.bias is None \
                or second.bias is None or global_module_hooks():
            return None
        noisy = noise is not None or (self.training and self.routing_noise)
        routing = (self.alpha, first.bias, second.weight, second.bias, self.beta)
        if not _fused_native.projected_mix_applies(x, self.d_ff, self.activations, noisy, positions, routing,
                                                   self.mixed_impl):
            return None
        gp = F.linear(x, torch.cat([self.gate_proj.weight, first.weight]))  # (B, T, F + H)
        up = self.up_proj(x)
        if noise is None and noisy:  # one Gumbel draw per (sequence, neuron, activation), as `forward`
            noise = sample_gumbel((x.shape[0], self.d_ff, self.n_activations), x.device)
        return _fused_native.projected_mix(gp, up, self.alpha, first.bias, second.weight, second.bias, self.beta,
                                           positions, noise, self.tau, self.activations)

    def scaled_map(self) -> torch.Tensor:
        """routing_map with beta folded in, (d_ff, K, r): beta multiplies the small map, not a
        full-size product."""
        return self.routing_map * self.beta[:, None]

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, pool_state: PoolState | None = None,
                return_routing: bool = False, noise: torch.Tensor | None = None):
        """x: (B, T, d_model). `positions` (B, T): token positions inside their documents (derived
        from doc_ids when not given). `noise` (B, d_ff, K) overrides the sampled Gumbel noise.
        `return_routing="logits"` returns the routing logits alpha + dynamic + noise (B, T', d_ff, K)
        before the division by tau instead of the weights (the analysis reads them at two taus)."""
        if pool_state is not None and x.shape[1] == 1 and noise is None and not return_routing \
                and x.is_cpu and x.dtype == torch.float32:
            hidden = small_inference.decode_hidden(self, x, positions, pool_state) if small_inference else None
            if hidden is not None:
                return self.down_proj(hidden)
        if positions is None and doc_ids is not None:
            positions = document_positions(doc_ids)
        if pool_state is None and not return_routing and _fused_native is not None:
            hidden = self._projected_hidden(x, positions, noise)
            if hidden is not None:
                return self.down_proj(hidden)
        gate = self.gate_proj(x)  # (B, T, F)
        up = self.up_proj(x)  # (B, T, F)
        if self.n_activations == 1:
            # softmax over a single activation is identically 1: exactly a fixed-activation GLU
            hidden = ACTIVATIONS[self.activations[0]](gate) * up
            routing = torch.full((x.shape[0], 1, self.d_ff, 1), float(return_routing != "logits"),
                                 device=x.device) if return_routing else None
            out = self.down_proj(hidden)
            return (out, routing) if return_routing else out
        # (B, T', K), or in neuron scope gate_net's (B, T', r) with the map (d_ff, K, r)
        dynamic, routing_map = self.routing_inputs(x, positions, doc_ids, pool_state)
        hard = False
        if self.training:
            if noise is None and self.routing_noise:
                # one Gumbel draw per (sequence, neuron, activation), shared across positions
                noise = sample_gumbel((x.shape[0], self.d_ff, self.n_activations), x.device)
        else:
            hard = self.eval_routing == "hard"
        hidden = mixed_activation(gate, up, self.alpha, dynamic, noise, self.tau, self.activations, hard,
                                  self.mixed_impl, routing_map=routing_map)
        out = self.down_proj(hidden)
        if return_routing:
            with torch.no_grad():
                if routing_map is not None:
                    dynamic = neuron_logits(dynamic, routing_map)
                routing = routing_logits(self.alpha, dynamic, noise) if return_routing == "logits" \
                    else routing_weights(self.alpha, dynamic, noise, self.tau, hard)
            return out, routing
        return out


def identity_routing_map(d_ff: int, n_activations: int, rank: int) -> torch.Tensor:
    """(d_ff, K, r): every neuron reads gate_net's k-th output as its k-th logit (k < min(K, r)), so a
    neuron-scope layer starts as the layer scope's routing (exactly, for r >= K)."""
    eye = torch.eye(n_activations, rank)  # (K, r)
    return eye.expand(d_ff, n_activations, rank).clone()


def layer_to_neuron_state(state: dict[str, torch.Tensor], prefix: str, d_ff: int, rank: int) -> None:
    """Turn one layer-scope PolyGLU's routing tensors in `state` (keys `prefix` + name) into the
    neuron scope's, in place, computing the same logits: gate_net's last layer keeps its K rows
    (zero rows added up to `rank`), and `routing_map` is the identity. Needs rank >= K."""
    weight, bias = state[prefix + "gate_net.2.weight"], state[prefix + "gate_net.2.bias"]
    K = weight.shape[0]
    if rank < K:
        raise ConfigError(f"{prefix}gate_net: a layer-scope checkpoint with {K} activations needs routing_rank >= {K} "
                          f"to load into routing_scope='neuron' with the same logits, got routing_rank={rank}")
    state[prefix + "gate_net.2.weight"] = torch.cat([weight, weight.new_zeros(rank - K, weight.shape[1])])
    state[prefix + "gate_net.2.bias"] = torch.cat([bias, bias.new_zeros(rank - K)])
    state[prefix + "routing_map"] = identity_routing_map(d_ff, K, rank).to(weight.dtype)


def _causal_mean(proj: torch.Tensor, positions: torch.Tensor | None, pool_state: PoolState | None) -> torch.Tensor:
    """Mean over positions <= t of t's document, in float32: (B, T, H).

    With `pool_state`, continues its running sums across cached chunks and updates them in place
    (so a compiled decode step can keep the state at one address). One decoded token (T = 1) takes
    a few elementwise ops, no host sync and no data-dependent branch.
    """
    B, T, H = proj.shape
    if pool_state is not None and positions is None:
        raise ValueError("causal pooling with a cache needs token positions")
    if pool_state is not None and T == 1:
        # continue the row's running sum unless the token starts a new document (the same additions
        # as the cumsum below, so cached decoding equals the uncached forward bit for bit)
        total = torch.where(positions[..., None] > 0, pool_state.total[:, None] + proj, proj.float())  # (B, 1, H)
        pool_state.total.copy_(total[:, 0].detach())
        return total / (positions[..., None] + 1)
    if pool_state is None and _fused_native is not None:  # training, a prefill without a cache: one native pass
        pooled = _fused_native.causal_mean(proj, positions)
        if pooled is not None:
            return pooled
    csum = proj.float().cumsum(dim=1)  # (B, T, H)
    if positions is None:  # one document per row
        return csum / torch.arange(1, T + 1, device=proj.device)[:, None]
    # subtract the running sum just before each token's document start (a zero row for a start at 0)
    start = torch.arange(T, device=proj.device) - positions  # (B, T): chunk index of the document's first token
    before = torch.gather(F.pad(csum, (0, 0, 1, 0)), 1, start.clamp(min=0)[..., None].expand(B, T, H))
    total = csum - before
    if pool_state is not None:
        # documents that began before this chunk continue the cached running sum
        total = torch.where((start < 0)[..., None], total + pool_state.total[:, None], total)
        pool_state.total.copy_(total[:, -1].detach())
    return total / (positions[..., None] + 1)


def _causal_step(proj: torch.Tensor, positions: torch.Tensor | None, pool_state: PoolState,
                 bias: torch.Tensor) -> torch.Tensor:
    """relu(causal mean + bias) for one float32 token per row (B, 1, H), continuing `pool_state`'s
    running sums in place: `_causal_mean`'s T = 1 case (the same sum, the same division) in the
    fewest eager ops, without autograd. A decode step's shared `keep` / `count` are used when set."""
    if positions is None:
        raise ValueError("causal pooling with a cache needs token positions")
    keep, count = pool_state.keep, pool_state.count
    if keep is None or count is None:
        keep, count = (positions > 0).float(), (positions + 1).float()
    total = pool_state.total  # (B, H): zeroed where a document starts, then the token added
    torch.addcmul(proj[:, 0], total, keep, out=total)
    return torch.addcdiv(bias, total, count).relu_()[:, None]


def _document_mean(proj: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Mean over all tokens of each token's document (non-causal): (B, T, H)."""
    segments = segment_ids(doc_ids)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    weights = same.float() / same.sum(-1, keepdim=True)
    return torch.bmm(weights, proj.float()).to(proj.dtype)


class GLU(nn.Module):
    """Gated linear unit FFN with one fixed activation: down(act(gate(x)) * up(x)).

    Same interface and parameter names as PolyGLU (without routing parameters).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"GLU: unknown activation {activation!r} (known: {', '.join(ACTIVATIONS)})")
        self.activation = activation
        self.d_model, self.d_ff = d_model, d_ff
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    @classmethod
    def from_config(cls, config: ModelConfig) -> GLU:
        """A fixed-activation baseline block (`config.ffn` "swiglu", "geglu", ...) built from `config`."""
        (activation,) = config.ffn_activations
        return GLU(d_model=config.d_model, d_ff=config.d_ff, activation=activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, *, positions=None, pool_state=None,
                return_routing: bool = False, noise=None):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if _fused is not None and _fused.glu_kernel_applies(gate, self.activation):  # CUDA: PolyGLU's kernel
            out = self.down_proj(_fused.glu_fused(gate, up, self.activation))
        else:
            out = self.down_proj(ACTIVATIONS[self.activation](gate) * up)
        return (out, None) if return_routing else out


class SwiGLU(GLU):
    """The SwiGLU baseline: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__(d_model, d_ff, "silu")


def max_routing_entropy(n_activations: int) -> float:
    return math.log(n_activations)

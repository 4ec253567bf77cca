"""Routing statistics of a PolychromaticLM, as plain JSON-able dicts.

Two views of every PolyGLU layer:

- **static** routing `softmax(alpha / tau)`: what the per-neuron preference alone would choose
  (the quantity the original tooling logged for half of training; it ignores the dynamic part);
- **dynamic** routing: the full weights `g = softmax((alpha + beta * gate_net(pool(h))) / tau)` the
  model uses on real tokens, in eval mode (deterministic, no Gumbel noise).

Dynamic statistics are accumulated batch by batch (sums over positions, never the (B, T, F, K)
tensors themselves) and are token-weighted: every position of g is one sample, and a row routed
once for the whole sequence ("sequence" pooling, g of shape (B, 1, F, K)) counts once per token.

Entropies are reported in nats and as a fraction of the maximum ln K (1.0 = uniform mix over the K
activations, 0.0 = one activation). `routing_entropy` is the one entropy function of the project.
Dynamic routing is also read at tau = 1 (`entropy_tau1`, `variance_tau1`): the same logits, the
same forward, divided by 1 instead of the model's tau. At a small final tau (0.1) any logits look
near-deterministic; at tau = 1 the entropy says how decided the logits themselves are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from polyglu.model.polyglu import PolyGLU, max_routing_entropy
from polyglu.model.routing import routing_entropy, static_routing, weights_from_logits

HISTOGRAM_BINS = 20
FORMAT = "polyglu-analysis/1"

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None] | Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# helpers


def polyglu_layers(model: torch.nn.Module) -> list[tuple[int, PolyGLU]]:
    """(block index, PolyGLU) for every block whose feed-forward is a PolyGLU."""
    return [(i, block.ffn) for i, block in enumerate(model.layers) if isinstance(block.ffn, PolyGLU)]


def _sig(x: float, digits: int = 6) -> float | None:
    """A float rounded to `digits` significant digits; None for NaN/inf (not valid JSON)."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _sig_list(values, digits: int = 4) -> list[float | None]:
    return [_sig(v, digits) for v in np.asarray(values, dtype=np.float64).ravel().tolist()]


def entropy_histogram(fractions, bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    """Counts of normalized entropies in `bins` equal bins over [0, 1]."""
    values = np.clip(np.asarray(fractions, dtype=np.float64), 0.0, 1.0)
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return {"edges": [_sig(e) for e in edges], "counts": counts.astype(int).tolist()}


def _neuron_summary(mean_routing: torch.Tensor, neuron_entropy: torch.Tensor, activations: Sequence[str]
                    ) -> dict[str, Any]:
    """Layer statistics from per-neuron mean routing (F, K) and per-neuron entropy in nats (F,)."""
    mean_routing = mean_routing.double().cpu()
    neuron_entropy = neuron_entropy.double().cpu()
    K = mean_routing.shape[1]
    fraction = neuron_entropy / max_routing_entropy(K) if K > 1 else torch.zeros_like(neuron_entropy)
    confidence, preferred = mean_routing.max(dim=1)
    preferred_shares = torch.bincount(preferred, minlength=K).double() / max(len(preferred), 1)
    return {
        "n_neurons": int(mean_routing.shape[0]),
        "entropy": _sig(fraction.mean()),
        "entropy_nats": _sig(neuron_entropy.mean()),
        "entropy_histogram": entropy_histogram(fraction.numpy()),
        # mean routing weight of each activation over neurons (and tokens)
        "shares": _sig_list(mean_routing.mean(0), 6),
        # fraction of neurons whose preferred activation is each activation
        "preferred_shares": _sig_list(preferred_shares, 6),
        "dominant": activations[int(preferred_shares.argmax())],
        "neuron_preferred": preferred.tolist(),
        "neuron_confidence": _sig_list(confidence),
        "neuron_entropy": _sig_list(fraction),
    }


# --------------------------------------------------------------------------------------------
# static routing


def static_routing_stats(model: torch.nn.Module) -> dict[str, Any]:
    """Per PolyGLU layer: entropy of softmax(alpha/tau), preferred activation per neuron, shares."""
    layers = []
    for index, layer in polyglu_layers(model):
        g = static_routing(layer)  # (F, K)
        entry = {"layer": index, "tau": _sig(layer.tau), "beta": _sig_list(layer.beta.detach().float(), 6),
                 "alpha_abs_mean": _sig(layer.alpha.detach().abs().mean())}
        entry.update(_neuron_summary(g, routing_entropy(g), layer.activations))
        layers.append(entry)
    return {"layers": layers}


# --------------------------------------------------------------------------------------------
# dynamic routing, streamed


class RoutingAccumulator:
    """Sums over the samples of one layer's routing weights g (B, T', F, K), enough to report
    entropy, preferences, shares and how routing varies across inputs versus across neurons.

    Variance decomposition, per activation k then summed over k, over samples s and neurons n:
        total          Var_{s,n} g[s,n,k]
        between_inputs Var_s  mean_n g[s,n,k]   (the layer as a whole routes differently per input)
        between_neurons Var_n mean_s g[s,n,k]   (neurons differ in a stable way)
        interaction    the rest                 (neuron-specific reactions to the input)
    """

    def __init__(self, d_ff: int, n_activations: int, device: torch.device | str = "cpu") -> None:
        F, K = d_ff, n_activations
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        self.d_ff, self.n_activations = F, K
        self.weight = 0.0  # sum of sample weights (tokens)
        self.samples = 0  # routing decisions seen (positions of g)
        self.sum_g = z(F, K)  # sum_s w g
        self.sum_entropy = z(F)  # sum_s w H(g) in nats
        self.sum_g2 = z(K)  # sum_s w sum_n g^2
        self.sum_input_mean2 = z(K)  # sum_s w (mean_n g)^2
        self.picks = z(F, K)  # sum_s w [argmax_k g == k]
        self.majority = z(K)  # sum_s w [layer's majority pick == k]
        self.sum_agreement = 0.0  # sum_s w (fraction of neurons picking the majority)

    @torch.no_grad()
    def update(self, g: torch.Tensor, weight: float = 1.0) -> None:
        """g: (B, T', F, K) routing weights; `weight`: tokens each position stands for."""
        F, K = self.d_ff, self.n_activations
        g = g.detach().float().reshape(-1, F, K)  # (S, F, K)
        S = g.shape[0]
        w = float(weight)
        dev = self.sum_g.device
        self.weight += w * S
        self.samples += S
        self.sum_g += w * g.sum(0).to(dev, torch.float64)
        self.sum_entropy += w * routing_entropy(g).sum(0).to(dev, torch.float64)
        self.sum_g2 += w * (g * g).sum((0, 1)).to(dev, torch.float64)
        self.sum_input_mean2 += w * g.mean(1).pow(2).sum(0).to(dev, torch.float64)
        pick = g.argmax(-1)  # (S, F)
        per_input = torch.empty(S, K, dtype=torch.long, device=g.device)  # neurons picking k, per input
        for k in range(K):
            chosen = pick == k  # (S, F)
            per_input[:, k] = chosen.sum(1)
            self.picks[:, k] += w * chosen.sum(0).to(dev, torch.float64)
        agree, majority = per_input.max(dim=1)
        self.majority += w * torch.bincount(majority, minlength=K).to(dev, torch.float64)
        self.sum_agreement += w * float(agree.sum()) / F

    def result(self, activations: Sequence[str]) -> dict[str, Any]:
        if self.weight == 0:
            raise ValueError("RoutingAccumulator.result: no routing weights were accumulated")
        W, F = self.weight, self.d_ff
        mean_routing = self.sum_g / W  # (F, K)
        out = _neuron_summary(mean_routing, self.sum_entropy / W, activations)
        grand = mean_routing.mean(0)  # (K,)
        total = (self.sum_g2 / (W * F) - grand**2).sum()
        between_inputs = (self.sum_input_mean2 / W - grand**2).sum()
        between_neurons = (mean_routing.pow(2).mean(0) - grand**2).sum()
        parts = {"total": total, "between_inputs": between_inputs, "between_neurons": between_neurons,
                 "interaction": total - between_inputs - between_neurons}
        parts = {k: max(float(v), 0.0) for k, v in parts.items()}
        # fractions are meaningless when routing is constant over inputs and neurons
        fractions = ({k: _sig(parts[k] / parts["total"]) for k in ("between_inputs", "between_neurons",
                                                                   "interaction")}
                     if parts["total"] > 1e-12 else None)
        picks = self.picks / W  # (F, K) fraction of tokens on which each neuron picks each activation
        out.update({
            "tokens": int(round(W)),
            "samples": self.samples,
            "pick_shares": _sig_list(picks.mean(0), 6),
            "variance": {**{k: _sig(v) for k, v in parts.items()}, "fractions": fractions},
            # per input, the fraction of neurons that pick the layer's most common activation
            "agreement": _sig(self.sum_agreement / W),
            "majority_shares": _sig_list(self.majority / W, 6),
            # per neuron, the fraction of inputs on which it picks its own most common activation
            "neuron_consistency": _sig(picks.max(1).values.mean()),
        })
        return out


def _unpack(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch.get("doc_ids")
    input_ids, doc_ids = batch
    return input_ids, doc_ids


@torch.no_grad()
def dynamic_routing_stats(model: torch.nn.Module, batches: Iterable[Batch], max_tokens: int | None = None
                          ) -> dict[str, Any]:
    """Per PolyGLU layer statistics of the full routing weights on `batches`.

    batches: (B, T) token tensors, (input_ids, doc_ids) pairs or {"input_ids", "doc_ids"} dicts.
    The model runs in eval mode (deterministic routing; with eval_routing="hard" the weights are
    one-hot, so load with eval_routing="soft" to measure entropy). Stops after `max_tokens`.
    Each layer's routing logits are read once and weighed twice: at the layer's tau (the routing
    the model uses) and at tau = 1 (`entropy_tau1`, `variance_tau1`).
    """
    layers = polyglu_layers(model)
    device = next(model.parameters()).device
    accumulators = {i: RoutingAccumulator(layer.d_ff, layer.n_activations, device) for i, layer in layers}
    at_tau1 = {i: RoutingAccumulator(layer.d_ff, layer.n_activations, device) for i, layer in layers}
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for batch in batches:
            if max_tokens is not None and tokens >= max_tokens:
                break
            input_ids, doc_ids = _unpack(batch)
            context = getattr(getattr(model, "config", None), "max_seq_len", None)
            if context is not None and input_ids.shape[-1] > context:
                raise ValueError(f"batches of {input_ids.shape[-1]} tokens per row exceed the model context "
                                 f"max_seq_len={context}; make them with seq_len={context} or less "
                                 f"(load_token_batches(..., seq_len=...), polyglu analyze --seq-len)")
            input_ids = input_ids.to(device)
            doc_ids = doc_ids.to(device) if doc_ids is not None else None
            out = model(input_ids, doc_ids, return_routing="logits", compute_logits=False)
            T = input_ids.shape[1]
            for i, layer in layers:
                logits = out.routing[i]  # (B, T', F, K), before tau
                weight = T / logits.shape[1]
                accumulators[i].update(weights_from_logits(logits, layer.tau, layer.eval_routing == "hard"), weight)
                at_tau1[i].update(weights_from_logits(logits, 1.0), weight)
            tokens += input_ids.numel()
            del out
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("dynamic_routing_stats: no tokens in the batches")
    results = []
    for i, layer in layers:
        entry = {"layer": i, "eval_routing": layer.eval_routing, "routing_scope": layer.routing_scope}
        entry.update(accumulators[i].result(layer.activations))
        tau1 = at_tau1[i].result(layer.activations)
        entry.update({"entropy_tau1": tau1["entropy"], "entropy_tau1_nats": tau1["entropy_nats"],
                      "variance_tau1": tau1["variance"]})
        results.append(entry)
    return {"tokens": tokens, "layers": results}


# --------------------------------------------------------------------------------------------
# comparisons


def compare_to_static(static: Mapping[str, Any], dynamic: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per layer: how far the full routing departs from what alpha alone would choose."""
    out = []
    for s, d in zip(static["layers"], dynamic["layers"]):
        same = np.mean(np.asarray(s["neuron_preferred"]) == np.asarray(d["neuron_preferred"]))
        out.append({"layer": s["layer"], "entropy_diff": _sig(d["entropy"] - s["entropy"]),
                    "preferred_same_as_static": _sig(same)})
    return out


def compare_domains(dynamic: Mapping[str, Mapping[str, Any]], reference: str | None = None) -> dict[str, Any]:
    """Differences of each domain's dynamic statistics from a reference domain (the first by default).

    Per layer: entropy difference, share differences (soft and hard picks), the fraction of neurons
    whose preferred activation changes, and the change in between-input variance and agreement.
    """
    names = list(dynamic)
    if not names:
        return {"reference": None, "domains": [], "pairs": []}
    reference = reference or names[0]
    if reference not in dynamic:
        raise ValueError(f"compare_domains: reference {reference!r} is not one of {names}")
    ref = dynamic[reference]
    pairs = []
    for name in names:
        if name == reference:
            continue
        layers = []
        for a, b in zip(ref["layers"], dynamic[name]["layers"]):
            changed = np.mean(np.asarray(a["neuron_preferred"]) != np.asarray(b["neuron_preferred"]))
            fa, fb = (a["variance"]["fractions"] or {}), (b["variance"]["fractions"] or {})
            layers.append({
                "layer": a["layer"],
                "entropy_diff": _sig(b["entropy"] - a["entropy"]),
                "share_diff": [_sig(y - x) for x, y in zip(a["shares"], b["shares"])],
                "pick_share_diff": [_sig(y - x) for x, y in zip(a["pick_shares"], b["pick_shares"])],
                "preferred_changed": _sig(changed),
                "agreement_diff": _sig(b["agreement"] - a["agreement"]),
                "between_inputs_diff": (_sig(fb["between_inputs"] - fa["between_inputs"])
                                        if fa and fb else None),
            })
        pairs.append({"reference": reference, "domain": name, "layers": layers})
    return {"reference": reference, "domains": names, "pairs": pairs}


def summarize_layers(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-layer scalars of a static or dynamic result, without per-neuron lists."""
    keep = ("layer", "entropy", "entropy_tau1", "entropy_nats", "shares", "preferred_shares", "pick_shares",
            "dominant", "agreement", "neuron_consistency", "variance", "variance_tau1", "tokens")
    return [{k: layer[k] for k in keep if k in layer} for layer in stats["layers"]]


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    c = model.config
    layers = polyglu_layers(model)
    return {"ffn": c.ffn, "activations": list(c.activations) if c.ffn == "polyglu" else list(c.ffn_activations),
            "n_layers": c.n_layers, "d_model": c.d_model, "d_ff": c.d_ff, "routing_pool": c.routing_pool,
            "routing_scope": c.routing_scope, "routing_rank": c.routing_rank if c.routing_scope == "neuron" else None,
            "eval_routing": c.eval_routing, "polyglu_layers": [i for i, _ in layers],
            "tau": _sig(layers[0][1].tau) if layers else None}


def analyze_model(model: torch.nn.Module, datasets: Mapping[str, Iterable[Batch]] | None = None,
                  max_tokens: int | None = None, reference: str | None = None) -> dict[str, Any]:
    """Static routing, dynamic routing on each named dataset, and their comparisons, in one dict."""
    static = static_routing_stats(model)
    dynamic = {}
    for name, batches in (datasets or {}).items():
        dynamic[name] = dynamic_routing_stats(model, batches, max_tokens)
    return {
        "format": FORMAT,
        "model": model_summary(model),
        "static": static,
        "dynamic": dynamic,
        "static_vs_dynamic": {name: compare_to_static(static, d) for name, d in dynamic.items()},
        "domain_comparison": compare_domains(dynamic, reference) if len(dynamic) > 1 else None,
    }

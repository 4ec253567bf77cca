"""Routing analysis: statistics of a PolychromaticLM's routing as JSON-able dicts.

    from polyglu.analysis import analyze_model, load_token_batches
    analysis = analyze_model(model, {"math": batches}, max_tokens=65_536)

Figures (`polyglu.analysis.plots`, matplotlib) and the HTML report (`polyglu.analysis.report`)
read only that dict, and are imported separately.
"""

from polyglu.analysis.data import load_token_batches
from polyglu.analysis.runs import checkpoint_evolution, find_checkpoints, training_curves
from polyglu.analysis.stats import (
    RoutingAccumulator,
    analyze_model,
    compare_domains,
    compare_to_static,
    dynamic_routing_stats,
    routing_entropy,
    static_routing,
    static_routing_stats,
    summarize_layers,
)

__all__ = [
    "RoutingAccumulator", "analyze_model", "checkpoint_evolution", "compare_domains", "compare_to_static",
    "dynamic_routing_stats", "find_checkpoints", "load_token_batches", "routing_entropy", "static_routing",
    "static_routing_stats", "summarize_layers", "training_curves",
]

"""polyglu info MODEL_DIR|PRESET [key=value ...] [--json]"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR|PRESET", help="a model directory or a preset name (debug, small, paper-600m, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="model config fields to change first, e.g. routing_scope=neuron routing_rank=8")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def describe(target: str, overrides: list[str] | None = None) -> dict:
    """Config and parameter counts of a model directory or preset, built on the meta device (no memory)."""
    from pathlib import Path

    import torch

    from polyglu.config_loader import set_dotted
    from polyglu.model.parameters import parameter_counts
    from polyglu.model.transformer import PolychromaticLM
    from polyglu.model_config import MODEL_PRESETS, ModelConfig
    from polyglu.model_io import read_model_config

    if Path(target).is_dir():
        config, _ = read_model_config(target)
        source = "directory"
    elif target in MODEL_PRESETS:
        config, source = ModelConfig.from_preset(target), "preset"
    else:
        from polyglu.commands import CommandError

        raise CommandError(f"{target!r} is neither a model directory nor a preset ({', '.join(MODEL_PRESETS)})")
    if overrides:
        data = config.to_dict()
        for item in overrides:
            set_dotted(data, item)
        config = ModelConfig.from_dict(data, where="model")
    with torch.device("meta"):
        model = PolychromaticLM(config)
    return {"model": target, "source": source, "config": config.to_dict(), "parameters": parameter_counts(model)}


def run(args: argparse.Namespace) -> int:
    info = describe(args.model, args.overrides)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c, p = info["config"], info["parameters"]
    print(f"{args.model} ({info['source']})")
    print(f"  ffn={c['ffn']} activations={','.join(c['activations'])} routing_pool={c['routing_pool']} "
          f"eval_routing={c['eval_routing']} routing_scope={c['routing_scope']}"
          + (f" routing_rank={c['routing_rank']}" if c["routing_scope"] == "neuron" else ""))
    print(f"  d_model={c['d_model']} d_ff={c['d_ff']} layers={c['n_layers']} heads={c['n_heads']}/{c['n_kv_heads']}"
          f"x{c['head_dim']} vocab={c['vocab_size']} context={c['max_seq_len']} tied={c['tie_embeddings']}")
    print("  parameters:")
    for key in ("total", "embedding", "attention", "ffn", "routing", "norm"):
        print(f"    {key:<10} {p[key]:>15,}")
    print(f"    {'routing share':<14} {100 * p['routing_share']:.3f}%")
    return 0

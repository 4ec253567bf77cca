"""A model directory -> its routing analysis on disk: DIR/analysis.json, one PNG per figure and
DIR/report.html. What `polyglu analyze` and the demo's report run.

    analyze_to_directory("runs/demo/sft", {"math": "val.jsonl"}, "runs/demo/report", run_dir="runs/demo/pretrain")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from polyglu import hardware
from polyglu.analysis.data import load_token_batches
from polyglu.analysis.plots import render_plots
from polyglu.analysis.report import findings, render_report
from polyglu.analysis.runs import METRICS_NAME, checkpoint_evolution, find_checkpoints, training_curves
from polyglu.analysis.stats import analyze_model
from polyglu.atomic import atomic_directory, atomic_write_text, strict_json
from polyglu.loading import load_model

ROUTING_MEMORY_BUDGET = 1 << 30  # bytes of routing weights one forward may return (all layers)


class AnalysisError(ValueError):
    """The inputs of an analysis do not fit the model (context length, tokenizer, run directory)."""


def analyze_to_directory(model_dir: str | Path, datasets: Mapping[str, str], out_dir: str | Path,
                         run_dir: str | Path | None = None, *, max_tokens: int = 32_768,
                         evolution_tokens: int = 8_192, seq_len: int | None = None, batch_size: int | None = None,
                         tokenizer: str | None = None, text_field: str = "text", device: str | None = None,
                         dtype: str = "auto", log: Callable[..., Any] = print,
                         progress: bool | None = None) -> dict[str, Any]:
    """Analyse the model in `model_dir` on `datasets` ({name: token shard directory or .jsonl/.txt}) and,
    with `run_dir`, across that run's checkpoints and metrics; write the JSON, figures and report to
    `out_dir`. Returns the analysis dict. `progress`: bars per dataset and over the checkpoints (None:
    on a terminal only, False: never)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = hardware.choose_precision(dtype, device, purpose="inference")  # "auto": what the device does fast
    log(precision.describe())
    # soft routing whatever the saved eval mode: hard one-hot weights would have zero entropy
    model = load_model(model_dir, device=device, dtype=precision.dtype, eval_routing="soft")
    config = model.config
    seq_len = seq_len or min(config.max_seq_len, 1024)
    if seq_len > config.max_seq_len:
        raise AnalysisError(f"--seq-len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    per_row = seq_len * config.d_ff * config.n_activations * 4 * config.n_layers
    batch_size = batch_size or max(1, min(32, ROUTING_MEMORY_BUDGET // per_row))

    specs = dict(datasets)
    text_tokenizer = _text_tokenizer(model_dir, tokenizer, specs)
    batches = {}
    for name, path in specs.items():
        batches[name] = load_token_batches(path, seq_len, batch_size, max_tokens, tokenizer=text_tokenizer,
                                           eos_id=config.eos_token_id, vocab_size=config.vocab_size,
                                           text_field=text_field)
        n_tokens = sum(ids.numel() for ids, _ in batches[name])
        log(f"{name}: {n_tokens:,} tokens from {path}")

    disable = None if progress is None else not progress
    with ExitStack() as bars:
        ticking = {name: _Ticking(b, bars.enter_context(tqdm(total=len(b), desc=f"analyze {name}", unit="batch",
                                                                disable=disable)))
                   for name, b in batches.items()}
        analysis = analyze_model(model, ticking, max_tokens)
    analysis["source"] = {"model": str(model_dir), "data": specs, "seq_len": seq_len, "device": device,
                          "dtype": precision.name}
    del model
    if run_dir:
        analysis.update(_run_history(Path(run_dir), next(iter(batches.values()), None), evolution_tokens,
                                     device, disable, log))
    _write_analysis(analysis, Path(out_dir), log)
    return analysis


def _text_tokenizer(model_dir: str | Path, tokenizer: str | None, specs: Mapping[str, str]):
    """The tokenizer for text data: `tokenizer`, else the model's own (model_dir/tokenizer), which must
    be the one token shards were prepared with; None when there is none and every dataset is shards."""
    tok_spec = tokenizer or Path(model_dir) / "tokenizer"
    if tokenizer is not None or Path(tok_spec).is_dir():
        from polyglu.data.tokenizer import load_tokenizer

        return load_tokenizer(tok_spec)
    if any(Path(p).is_file() for p in specs.values()):
        raise AnalysisError(f"text data needs a tokenizer: {tok_spec} does not exist; pass --tokenizer")
    return None


def _run_history(run_dir: Path, first: list | None, evolution_tokens: int, device: str, disable: bool | None,
                 log: Callable[..., Any]) -> dict[str, Any]:
    """A run directory's part of the analysis: "evolution" (routing across its checkpoints, measured on
    `first`, the first dataset's batches) and "training" (its metrics curves), each when the run has it."""
    if not run_dir.is_dir():
        raise AnalysisError(f"--run {run_dir}: not a directory")
    history: dict[str, Any] = {}
    try:
        checkpoints = find_checkpoints(run_dir)
    except FileNotFoundError:
        checkpoints = []
    if checkpoints:
        log(f"evolution: {len(checkpoints)} checkpoints in {run_dir}")
        with tqdm(total=len(checkpoints) * len(first or ()), desc="analyze checkpoints", unit="batch",
                  disable=disable) as bar:
            history["evolution"] = checkpoint_evolution(run_dir, _Ticking(first, bar) if first else None,
                                                        evolution_tokens, device=device)
    if (run_dir / METRICS_NAME).is_file():
        history["training"] = training_curves(run_dir / METRICS_NAME)
    if not checkpoints and "training" not in history:
        raise AnalysisError(f"--run {run_dir}: neither checkpoints nor {METRICS_NAME} found")
    return history


def _write_analysis(analysis: dict[str, Any], out: Path, log: Callable[..., Any]) -> None:
    """analysis.json, the figures and report.html into `out`, replacing an earlier analysis there whole;
    the findings are logged."""
    foreign = [p.name for p in out.iterdir() if not is_analysis_output(p)] if out.is_dir() else []
    if foreign:  # checked again here: the directory is replaced whole
        raise AnalysisError(f"--out {out}: holds files analyze did not write ({', '.join(sorted(foreign)[:5])}); "
                            f"choose a new directory")
    # built beside and swapped in whole: an interrupted analysis leaves the old report, figures and
    # JSON together, never the new JSON beside old figures
    with atomic_directory(out) as tmp:
        atomic_write_text(tmp / "analysis.json", strict_json(analysis, indent=None) + "\n")
        figures = render_plots(analysis, tmp)
        render_report(analysis, figures, tmp / "report.html")
    for line in findings(analysis):
        log(f"  {line}")
    log(f"wrote {out / 'analysis.json'}, {len(figures)} figures, {out / 'report.html'}")


def is_analysis_output(path: Path) -> bool:
    """A file `analyze_to_directory` writes (analysis.json, report.html, a figure): what an earlier
    analysis left in the output directory, which the next one replaces."""
    return path.is_file() and (path.name in ("analysis.json", "report.html") or path.suffix == ".png")


class _Ticking:
    """Batches that advance a progress bar as they are read (re-iterable, as the batches are)."""

    def __init__(self, batches, bar) -> None:
        self.batches, self.bar = batches, bar

    def __iter__(self):
        for batch in self.batches:
            yield batch
            self.bar.update(1)

"""`polyglu <verb>`: one verb, one module under `polyglu.commands`, imported only when used so that
`polyglu --help` is instant. Each command module defines `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from polyglu.commands import CommandError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("polyglu.commands.demo", "the built-in end-to-end demo: data, tokenizer, pre-training, SFT, evaluation"),
    "info": ("polyglu.commands.info", "parameter counts and config of a model directory or preset"),
    "build-kernels": ("polyglu.commands.build_kernels", "compile the native CPU decode kernels now (else built on first use)"),
    "train": ("polyglu.commands.train", "pre-train a model from a run config (torchrun-compatible)"),
    "sft": ("polyglu.commands.sft", "supervised fine-tuning on chat data, loss on assistant tokens only"),
    "convert": ("polyglu.commands.convert", "import a checkpoint (original PolyGLU .pt/.safetensors, Qwen3)"),
    "prepare": ("polyglu.commands.prepare", "tokenise text (files, HF datasets, the built-in math corpus) into shards"),
    "verify-data": ("polyglu.commands.verify_data", "check a prepared data directory: manifest, checksums, token ids"),
    "tokenizer": ("polyglu.commands.tokenizer", "train a byte-level BPE tokenizer on local text"),
    "export-hf": ("polyglu.commands.export_hf", "export a model directory for transformers (trust_remote_code, no polyglu needed)"),
    "generate": ("polyglu.commands.generate", "generate text from a prompt (KV cache, sampling, stop strings)"),
    "chat": ("polyglu.commands.chat", "multi-turn ChatML chat on standard input, streaming replies"),
    "eval": ("polyglu.commands.eval", "lm-evaluation-harness tasks through the polyglu model adapter"),
    "eval-math": ("polyglu.commands.eval_math", "exact-match accuracy on GSM8K-format JSONL (chat or plain, few-shot)"),
    "perplexity": ("polyglu.commands.perplexity", "perplexity per source over token shards, sliding windows, JSON"),
    "analyze": ("polyglu.commands.analyze", "routing analysis: entropy, routing maps, domains, training -> JSON, PNGs, report.html"),
    "ablate": ("polyglu.commands.ablate", "controlled ablation: PolyGLU variants vs SwiGLU/GEGLU/ReGLU/Tanh-GLU, resumable, report"),
}


def _build_parser(verb: str | None) -> argparse.ArgumentParser:
    from polyglu import __version__

    parser = argparse.ArgumentParser(
        prog="polyglu",
        description="PolyGLU / PolychromaticLM: train, fine-tune, generate, evaluate and analyse.",
        epilog="Run 'polyglu VERB --help' for a verb's options.",
    )
    parser.add_argument("--version", action="version", version=f"polyglu {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:  # only the chosen verb's module is imported
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(verb if verb in VERBS else None)
    # `key=value` overrides may follow flags (`train --resume train.max_steps=6`): argparse stops
    # collecting a positional list at the first flag, so gather the rest here
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.verb is None:
        parser.print_help()
        return 0
    module = importlib.import_module(VERBS[args.verb][0])
    from polyglu.commands.common import check_utf8_arguments, os_error_line
    from polyglu.config_loader import ConfigError
    from polyglu.model_io import CheckpointError

    previous = _unwind_on_sigterm()
    try:
        check_utf8_arguments(argv)
        from polyglu.commands.common import check_device_argument

        check_device_argument(getattr(args, "device", None))  # every verb with --device, before any work
        result = module.run(args)
    except (CommandError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"polyglu {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a symlink loop, a permission error on a path no check foresaw
        print(f"polyglu {args.verb}: error: {os_error_line(e, args.verb)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"polyglu {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(result or 0)


def _unwind_on_sigterm():
    """SIGTERM (a scheduler stopping the job) exits with 143 by unwinding, as Ctrl-C does, so that
    writers remove their temporaries; the trainer replaces it with a checkpoint-and-stop handler.
    Returns the previous handler (None off the main thread, where none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    owner = os.getpid()

    def terminate(signum, frame):
        if os.getpid() != owner:  # a forked child (a tokenising pool worker): die as SIGTERM's default would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(128 + signum)

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, terminate)
    return previous if previous is not None else signal.SIG_DFL


if __name__ == "__main__":
    raise SystemExit(main())

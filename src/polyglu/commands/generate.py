"""polyglu generate MODEL_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
[--seed S] [--chat] [--stop STR]...

Also the shared pieces of the model-reading verbs (generate, chat, eval, eval-math, perplexity):
`add_model_arguments` and `load_model_and_tokenizer`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOKENIZER_SUBDIR = "tokenizer"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="model directory (config.json + model.safetensors)")
    p.add_argument("--tokenizer", default=None,
                   help="'byte', a tokenizer directory or a Hugging Face name (default: MODEL_DIR/tokenizer)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the weights (default: as stored)")


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of mass >= p")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def torch_dtype(name):
    """'bfloat16' -> torch.bfloat16; None, 'auto' (as stored) and torch dtypes pass through."""
    import torch

    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return None if name == "auto" else name
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(dtypes)})")
    return dtypes[name]


def load_model_and_tokenizer(model_dir: str | Path, tokenizer=None, *, device: str | None = None,
                             dtype=None):
    """(model in eval mode, tokenizer) from a model directory. The tokenizer is `tokenizer` (an object,
    or a spec for `load_tokenizer`), else MODEL_DIR/tokenizer, else the one named in config.json."""
    from polyglu.checkpoint import read_model_config
    from polyglu.cli import CommandError
    from polyglu.data.tokenizer import load_tokenizer
    from polyglu.loading import load_model

    model = load_model(model_dir, device=resolve_device(device), dtype=torch_dtype(dtype))
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        spec = tokenizer
        if spec is None and (Path(model_dir) / TOKENIZER_SUBDIR).is_dir():
            spec = Path(model_dir) / TOKENIZER_SUBDIR
        if spec is None:
            _, meta = read_model_config(model_dir)
            named = meta.get("tokenizer")
            spec = named.get("name") if isinstance(named, dict) else named
        if spec is None:
            raise CommandError(f"{model_dir} has no {TOKENIZER_SUBDIR}/ directory and names no tokenizer; "
                               f"pass --tokenizer byte|DIR|NAME")
        tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CommandError(f"tokenizer {getattr(tokenizer, 'name', '?')} has {tokenizer.vocab_size} tokens but "
                           f"the model's vocabulary is {model.config.vocab_size}")
    return model, tokenizer


def chat_stop_ids(tokenizer) -> list[int]:
    """EOS and <|im_end|> (when the tokenizer has it): the tokens that end an assistant turn."""
    from polyglu.data.special_tokens import IM_END

    ids = [tokenizer.eos_id]
    im_end = tokenizer.token_id(IM_END)
    if im_end is not None:
        ids.append(im_end)
    return ids


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads it from standard input)")
    add_sampling_arguments(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn and stop at <|im_end|>")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow; for checks)")
    p.add_argument("--json", action="store_true", help="print JSON (text, token ids, counts) instead of streaming")


def run(args: argparse.Namespace) -> int:
    from polyglu.cli import CommandError
    from polyglu.data.chat import render_chatml
    from polyglu.data.special_tokens import EOS_TOKEN, IM_END
    from polyglu.generation import TextStreamer, generate

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device=args.device, dtype=args.dtype)
    stop_strings = list(args.stop)
    eos_ids = [tokenizer.eos_id]
    if args.chat:
        prompt = render_chatml([{"role": "user", "content": prompt}], add_generation_prompt=True)
        eos_ids = chat_stop_ids(tokenizer)
        stop_strings += [IM_END, EOS_TOKEN]
    ids = tokenizer.encode(prompt)
    if not ids:
        raise CommandError("the prompt is empty")
    streamer = None if args.json else TextStreamer(tokenizer, stop_strings=stop_strings, skip_token_ids=eos_ids)
    out = generate(model, [ids], args.max_new_tokens, use_cache=not args.no_cache, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_token_id=eos_ids,
                   stop_strings=stop_strings, tokenizer=tokenizer, stream=streamer)
    if args.json:
        print(json.dumps({"prompt": prompt, "text": out.texts[0], "tokens": out.token_lists()[0],
                          "prompt_tokens": len(ids), "generated_tokens": int(out.lengths[0]),
                          "finished": bool(out.finished[0]), "used_cache": out.used_cache}))
    else:
        streamer.finish()
        print()
    return 0

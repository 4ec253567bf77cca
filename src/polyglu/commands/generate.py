"""polyglu generate MODEL_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
[--seed S] [--chat] [--stop STR]... [--compile [MODE]]

Also the shared options of the model-reading verbs (generate, chat, eval, eval-math, perplexity):
`add_model_arguments`, `add_sampling_arguments`; they load with `commands.common.load_inference_model`.
"""

from __future__ import annotations

import argparse
import json
import sys

from polyglu.commands.common import (
    add_compile_argument,
    add_quiet_argument,
    check_compile_argument,
    default_max_new_tokens,
    load_inference_model,
    progress_visible,
)

DEFAULT_MAX_NEW_TOKENS = 128


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="model directory (config.json + model.safetensors)")
    p.add_argument("--tokenizer", default=None,
                   help="'byte', a tokenizer directory or a Hugging Face name (default: MODEL_DIR/tokenizer)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the weights' dtype (default auto: bfloat16 on CUDA with bf16, float32 on CPU)")


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 128, after: str = "the prompt") -> None:
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: {max_new_tokens}, or what the model context leaves after {after}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of mass >= p")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """The sampling flags' ranges, checked before the model is loaded."""
    import math

    from polyglu.commands import CommandError

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CommandError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        raise CommandError(f"--top-k must be >= 0 (0 or unset: no top-k), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CommandError(f"--top-p must be in (0, 1] (1 or unset: no nucleus), got {args.top_p}")


def check_fits_context(max_new_tokens: int, model, prompt_tokens: int = 1) -> None:
    """--max-new-tokens must leave room for the prompt (at least one token) in the model context; the
    advice is a value that then fits."""
    from polyglu.commands import CommandError

    context = model.config.max_seq_len
    if prompt_tokens >= context:
        raise CommandError(f"the prompt has {prompt_tokens} tokens; the model context max_seq_len={context} leaves "
                           f"no room to generate: shorten it to at most {context - 1} tokens")
    if max_new_tokens + prompt_tokens > context:
        prompt = f"the prompt's {prompt_tokens} tokens" if prompt_tokens > 1 else "the prompt"
        raise CommandError(f"--max-new-tokens {max_new_tokens} does not fit the model context of {context} tokens "
                           f"with {prompt}; use at most {context - prompt_tokens}")


def read_stdin(what: str) -> str:
    """Standard input as UTF-8 text (a leading BOM dropped); other bytes are one line naming `what`."""
    from polyglu.commands import CommandError

    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise CommandError(f"{what}: standard input is UTF-16 (it starts with a UTF-16 byte-order mark); pass UTF-8 "
                           f"(e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise CommandError(f"{what}: standard input is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset "
                           f"{e.start}); pass UTF-8 (e.g. convert it with iconv -t UTF-8)") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads it from standard input)")
    add_sampling_arguments(p, DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn and stop at <|im_end|>")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    p.add_argument("--special-tokens", action="store_true",
                   help="read control tokens written in the prompt (<|im_end|>, <|endoftext|>, ...) as those tokens "
                        "(default: as text, so a prompt cannot forge them)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow; for checks)")
    add_compile_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON (text, token ids, counts) instead of streaming")
    add_quiet_argument(p)


def run(args: argparse.Namespace) -> int:
    from polyglu.commands import CommandError
    from polyglu.data.chat import encode_chatml, render_chatml
    from polyglu.data.special_tokens import EOS_TOKEN, IM_END
    from polyglu.inference import TextStreamer, generate
    from polyglu.loading import chat_stop_ids

    check_sampling_arguments(args)
    check_compile_argument(args.compile)
    prompt = read_stdin("--prompt -") if args.prompt == "-" else args.prompt
    model, tokenizer = load_inference_model(args)
    if args.max_new_tokens is not None:
        check_fits_context(args.max_new_tokens, model)  # before the prompt is read: no room even for one token
    stop_strings = list(args.stop)
    eos_ids = [tokenizer.eos_id]
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        prompt = render_chatml(messages, add_generation_prompt=True)
        ids = encode_chatml(messages, tokenizer, add_generation_prompt=True, special_in_content=args.special_tokens)
        eos_ids = chat_stop_ids(tokenizer)
        stop_strings += [IM_END, EOS_TOKEN]
    else:
        ids = tokenizer.encode(prompt, split_special=not args.special_tokens)
    if not ids:
        raise CommandError("the prompt is empty")
    context = model.config.max_seq_len
    if args.max_new_tokens is None:
        check_fits_context(1, model, len(ids))
        max_new_tokens = default_max_new_tokens(context, len(ids), cap=DEFAULT_MAX_NEW_TOKENS)
    else:
        check_fits_context(args.max_new_tokens, model, len(ids))
        max_new_tokens = args.max_new_tokens
    streamer = None if args.json else TextStreamer(tokenizer, stop_strings=stop_strings, skip_token_ids=eos_ids)
    if args.compile and progress_visible(args):
        print("polyglu generate: compiling the decode step (seconds to minutes, once per process) ...",
              file=sys.stderr, flush=True)
    out = generate(model, [ids], max_new_tokens, use_cache=not args.no_cache, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_token_id=eos_ids,
                   stop_strings=stop_strings, tokenizer=tokenizer, stream=streamer, compile=args.compile)
    if args.json:
        print(json.dumps({"prompt": prompt, "text": out.texts[0], "tokens": out.token_lists()[0],
                          "prompt_tokens": len(ids), "generated_tokens": int(out.lengths[0]),
                          "finished": bool(out.finished[0]), "used_cache": out.used_cache}))
    else:
        streamer.finish()
        print()
    return 0

"""polyglu chat MODEL_DIR [--system TEXT] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]

Multi-turn ChatML conversation. Each line of standard input is a user turn; the reply streams to
the terminal as it is generated. `/reset` starts a new conversation, `/quit` (or end of input) ends.
When the conversation outgrows the context, the oldest turns are dropped (the system prompt stays).
Works with piped input: `printf 'hi\\nwhat is 2+3?\\n' | polyglu chat runs/demo/model`.
"""

from __future__ import annotations

import argparse
import sys

from polyglu.commands.generate import add_model_arguments, add_sampling_arguments

DEFAULT_MAX_NEW_TOKENS = 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, after="half of it (the rest holds the turns)")
    p.add_argument("--system", default=None, help="system prompt")


def fit_history(messages: list[dict], encode, budget: int) -> list[dict] | None:
    """The longest suffix of the conversation (system prompt kept) whose prompt (`encode(messages)`:
    its token ids with the assistant turn opened) fits in `budget` tokens; None when even the last
    user turn alone does not fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    for start in range(len(turns)):
        candidate = system + turns[start:]
        if turns[start]["role"] == "user" and len(encode(candidate)) <= budget:
            return candidate
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    from polyglu.commands.common import default_max_new_tokens, load_inference_model
    from polyglu.commands.generate import check_fits_context, check_sampling_arguments
    from polyglu.data.chat import encode_chatml
    from polyglu.data.special_tokens import EOS_TOKEN, IM_END
    from polyglu.inference import TextStreamer, generate
    from polyglu.loading import chat_stop_ids

    check_sampling_arguments(args)
    model, tokenizer = load_inference_model(args)
    if args.max_new_tokens is None:  # a reply of up to half the context; the other half holds the turns
        args.max_new_tokens = default_max_new_tokens(model.config.max_seq_len, cap=DEFAULT_MAX_NEW_TOKENS)
    check_fits_context(args.max_new_tokens, model)
    # one sampling stream for the whole conversation: --seed makes the session reproducible
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(args.seed)
    interactive = sys.stdin.isatty()
    budget = model.config.max_seq_len - args.max_new_tokens
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    stop_ids, stop_strings = chat_stop_ids(tokenizer), [IM_END, EOS_TOKEN]
    if interactive:
        print("polyglu chat: type a message; /reset starts over, /quit or Ctrl-D ends.", flush=True)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/quit":
            break
        if text.strip() == "/reset":
            messages = list(system)
            print("(conversation reset)", flush=True)
            continue
        messages.append({"role": "user", "content": text})
        # what the user typed is text: a <|im_end|> in it cannot close the turn (encode_chatml)
        encode = lambda conversation: encode_chatml(conversation, tokenizer, add_generation_prompt=True)  # noqa: E731
        fitted = fit_history(messages, encode, budget)
        if fitted is None:
            messages.pop()
            print(f"(message too long for the model context of {model.config.max_seq_len} tokens)", flush=True)
            continue
        messages = fitted
        ids = encode(messages)
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, stop_strings=stop_strings, skip_token_ids=stop_ids)
        generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, generator=generator, eos_token_id=stop_ids, stop_strings=stop_strings,
                 tokenizer=tokenizer, stream=streamer)
        reply = streamer.finish()
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})
    return 0

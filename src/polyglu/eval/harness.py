"""lm-evaluation-harness adapter: a polyglu model as the lm_eval model `polyglu`.

    from polyglu.eval.harness import PolygluLM
    lm = PolygluLM(pretrained="runs/demo/model")          # or PolygluLM(model=m, tokenizer=tok)
    lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"])

or `lm_eval.simple_evaluate(model="polyglu", model_args="pretrained=DIR,batch_size=16", ...)` once this
module is imported (importing it registers the name), or `polyglu eval DIR --tasks ...`.

- loglikelihood: batched, longest first (`polyglu.eval.scoring`), the head applied only to the
  continuation positions.
- loglikelihood_rolling: lm-eval's rolling windows over the model context (`context_len` tokens of
  overlap, default 1 as in lm-eval's Hugging Face model, so numbers are comparable).
- generate_until: batched KV-cache generation (`polyglu.generate`) that stops each row at the
  `until` strings or EOS itself; contexts keep their last `max_length - max_gen_toks` tokens.

Requires the optional `lm-eval` package (`pip install polyglu[eval]`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from polyglu.data.chat import render_chatml
from polyglu.eval.scoring import score_continuations


@register_model("polyglu")
class PolygluLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_size: int | str = 16,
                 device: str | None = None, dtype: str | torch.dtype | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, context_len: int = 1,
                 seed: int = 1234, compile: bool | str = False, **kwargs) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("PolygluLM needs pretrained=MODEL_DIR or a model object")
            from polyglu.loading import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(pretrained, tokenizer, device=device, dtype=dtype)
        elif isinstance(tokenizer, (str, Path)) or tokenizer is None:
            from polyglu.data.tokenizer import load_tokenizer

            if tokenizer is None:
                raise ValueError("PolygluLM(model=...) needs its tokenizer")
            tokenizer = load_tokenizer(tokenizer)
        self.model, self.polyglu_tokenizer = model.eval(), tokenizer
        self._device = model.device
        self.batch_size = 16 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self._max_length = min(int(max_length or model.config.max_seq_len), model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.context_len = int(context_len)
        self.seed = int(seed)
        from polyglu.inference import compile_setting

        self.compile = compile_setting(compile)  # lm_eval passes model_args as text: compile=true

    # ---- tokenizer surface lm-eval expects

    @property
    def eot_token_id(self) -> int:
        return self.polyglu_tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.polyglu_tokenizer, "name", "polyglu")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.polyglu_tokenizer.encode(string)

    def tok_decode(self, tokens, skip_special_tokens: bool = False) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.polyglu_tokenizer.decode(tokens, skip_special=skip_special_tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "chatml" if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render_chatml(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="polyglu loglikelihood") as bar:
            scores = score_continuations(self.model, pairs, batch_size=self.batch_size, progress=bar.update)
        results = []
        for (key, _, _), score in zip(requests, scores):
            result = (score.logprob, score.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=self.context_len)):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from polyglu.inference import generate

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="polyglu generate_until")
        eos_text = self.tok_decode(self.eot_token_id)
        for indices in groups.values():
            options = _generation_options(requests[indices[0]].args[1], self.max_gen_toks)
            until = [s for s in options["until"] if s]
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_ctx = self.max_length - options["max_gen_toks"]
            if max_ctx < 1:
                raise ValueError(f"max_gen_toks={options['max_gen_toks']} leaves no room for a context in "
                                 f"max_length={self.max_length}")
            contexts = {i: self.tok_encode(requests[i].args[0])[-max_ctx:] or [self.eot_token_id]
                        for i in indices}
            order = sorted(indices, key=lambda i: -len(contexts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                out = generate(self.model, [contexts[i] for i in batch], options["max_gen_toks"],
                               temperature=options["temperature"], top_k=options["top_k"],
                               top_p=options["top_p"], generator=generator, eos_token_id=[self.eot_token_id],
                               stop_strings=until, tokenizer=self.polyglu_tokenizer, compile=self.compile)
                for i, text in zip(batch, out.texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]


def _generation_options(gen_kwargs: dict, default_max_gen_toks: int) -> dict:
    """lm-eval generation kwargs -> until, max_gen_toks, temperature (0 = greedy), top_k, top_p."""
    if not isinstance(gen_kwargs, dict):
        raise ValueError(f"expected generation kwargs as a dict, got {type(gen_kwargs).__name__}")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen_toks = next((gen_kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                         if gen_kwargs.get(k) is not None), default_max_gen_toks)
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    if not gen_kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    top_k = gen_kwargs.get("top_k")
    top_p = gen_kwargs.get("top_p")
    return {"until": until, "max_gen_toks": int(max_gen_toks), "temperature": temperature,
            "top_k": int(top_k) if top_k is not None else None,
            "top_p": float(top_p) if top_p is not None else None}


def evaluate(lm: PolygluLM, tasks: list[str], *, num_fewshot: int | None = None, limit: float | None = None,
             include_path: str | list[str] | None = None, include_defaults: bool = True,
             apply_chat_template: bool = False, log_samples: bool = False, seed: int = 1234,
             bootstrap_iters: int = 100_000) -> dict:
    """Run lm-eval tasks on a PolygluLM: lm_eval's results dict (results, configs, versions, n-shot...)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=task_manager, apply_chat_template=apply_chat_template,
                                   log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                   torch_random_seed=seed, fewshot_random_seed=seed,
                                   bootstrap_iters=bootstrap_iters)

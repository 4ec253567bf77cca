import io
import json
import warnings

import pytest
import torch

from polyglu.cli import main
from polyglu.config import ROUTING_POOLS, ModelConfig, routing_is_causal
from polyglu.data.tokenizer import load_tokenizer
from polyglu.inference import (
    DecodeStep,
    IncrementalDecoder,
    KVCache,
    StopStringMatcher,
    TextStreamer,
    filter_logits,
    generate,
    sample_next,
)
from polyglu.model.transformer import PolychromaticLM

PROMPTS = [[5, 17, 99, 3, 42, 8, 250], [7, 7], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


def make_model(seed: int = 0, **overrides) -> PolychromaticLM:
    """A tiny byte-vocabulary model with non-trivial routing (random alpha, beta) and spread-out logits."""
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("debug", **{"vocab_size": 260, "d_model": 48, "d_ff": 96, "n_heads": 4,
                                                 "n_kv_heads": 2, "head_dim": 12, "max_seq_len": 64,
                                                 "gate_hidden": 8, "init_std": 0.1, **overrides})
    model = PolychromaticLM(config)
    with torch.no_grad():
        for layer in model.polyglu_layers():
            layer.alpha.normal_(0.0, 2.0)
            layer.beta.normal_(1.0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def trained_model() -> PolychromaticLM:
    """Briefly trained (AdamW, Gumbel noise on) on random tokens: weights off their initial scale."""
    model = make_model(seed=1)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        batch = torch.randint(0, 260, (4, 33), generator=generator)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 260), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def assert_same_generation(a, b, atol=1e-4):
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.logits, b.logits, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("trained", [False, True])
def test_cached_decoding_matches_full_recompute(trained, trained_model):
    model = trained_model if trained else make_model()
    cached = generate(model, PROMPTS, 24, return_logits=True, eos_token_id=[])
    full = generate(model, PROMPTS, 24, use_cache=False, return_logits=True, eos_token_id=[])
    assert cached.used_cache and not full.used_cache
    assert_same_generation(cached, full)
    # and the first step's logits are the plain forward's
    direct = model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    torch.testing.assert_close(cached.logits[0, 0], direct, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides", [{"routing_pool": "token"}, {"ffn": "swiglu"}, {"eval_routing": "hard"}])
def test_cached_matches_recompute_for_other_ffns(overrides):
    model = make_model(**overrides)
    cached = generate(model, PROMPTS, 12, return_logits=True, eos_token_id=[])
    full = generate(model, PROMPTS, 12, use_cache=False, return_logits=True, eos_token_id=[])
    assert cached.used_cache
    assert_same_generation(cached, full)


def test_static_routing_decodes_with_the_cache_whatever_its_pool():
    """Static routing (alpha only) never reads its pool, so even a `sequence` pool is causal there."""
    torch.manual_seed(0)
    model = PolychromaticLM(ModelConfig.from_preset("debug", vocab_size=260, max_seq_len=64, routing_pool="sequence",
                                                    routing_mode="static")).eval()
    with torch.no_grad():
        for layer in model.polyglu_layers():
            layer.alpha.normal_(0.0, 2.0)
    cached = generate(model, PROMPTS, 12, return_logits=True, eos_token_id=[])
    full = generate(model, PROMPTS, 12, use_cache=False, return_logits=True, eos_token_id=[])
    assert cached.used_cache
    assert_same_generation(cached, full)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    import polyglu.inference.compiled as generation

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(generation, "_COMPILED_STEPS", generation.weakref.WeakKeyDictionary())
    monkeypatch.setattr(generation, "_COMPILE_FAILED", set())
    model = make_model(seed=2)
    eager = generate(model, PROMPTS, 6, return_logits=True, eos_token_id=[])
    with pytest.warns(RuntimeWarning, match=r"RuntimeError: no compiler here\); decoding eagerly") as caught:
        fallback = generate(model, PROMPTS, 6, return_logits=True, eos_token_id=[], compile=True)
        again = generate(model, PROMPTS, 6, return_logits=True, eos_token_id=[], compile=True)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    # the same tokens; logits to float tolerance (a generation meant to be compiled rounds its cache up
    # to a bucket, and attention over more masked slots sums in another order)
    assert_same_generation(fallback, eager)
    assert_same_generation(again, eager, atol=0)  # compiling known to fail: the eager step throughout
    with pytest.raises(ValueError, match="compile"):
        generate(model, PROMPTS, 2, compile=3)
    with pytest.raises(ValueError, match=r"compile='fast' is neither a torch.compile mode .* nor a backend \(.*inductor"):
        generate(model, PROMPTS, 2, compile="fast")


@pytest.mark.slow
@pytest.mark.parametrize("overrides, compile", [({}, True), ({"ffn": "swiglu"}, True),
                                               ({"routing_pool": "token"}, "eager")])
def test_compiled_decode_step_matches_eager_and_recompute(overrides, compile):
    """torch.compile(fullgraph) of the whole decode step: same tokens and logits, left-padded batch,
    causal pooling; a second generation of the same shape reuses the compiled step."""
    model = make_model(seed=3, **overrides)
    full = generate(model, PROMPTS, 10, use_cache=False, return_logits=True, eos_token_id=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure would fall back silently
        compiled = generate(model, PROMPTS, 10, return_logits=True, eos_token_id=[], compile=compile)
    assert_same_generation(compiled, full)
    again = generate(model, PROMPTS, 10, return_logits=True, eos_token_id=[], compile=compile)
    assert_same_generation(again, compiled, atol=0)


def test_decode_step_compile_options_keep_tensor_guards_and_the_mode():
    import inspect

    import polyglu.inference.compiled as generation

    if not hasattr(torch.compiler, "keep_tensor_guards_unsafe") \
            or "isolate_recompiles" not in inspect.signature(torch.compile).parameters:
        assert generation._compile_options("reduce-overhead") == {"mode": "reduce-overhead"}
        pytest.skip("this torch keeps every guard")
    assert generation._compile_options("reduce-overhead")["isolate_recompiles"] is True
    options = generation._compile_options("reduce-overhead")["options"]
    assert options["triton.cudagraphs"] is True  # the mode's own inductor options are kept
    assert generation._compile_options("default")["options"].keys() == {"guard_filter_fn"}
    assert generation._compile_options(None)["options"].keys() == {"guard_filter_fn"}
    kept = options["guard_filter_fn"]
    assert kept.func is torch.compiler.keep_tensor_guards_unsafe and kept.keywords == {"keep_parameters": True}


def test_compiled_steps_of_two_models_of_one_shape_never_mix():
    """A SwiGLU model and a PolyGLU model of the same sizes decoded compiled in one process: each gets
    its own compiled step (torch.compile's cache is per function, and tensor guards alone would let
    one model's graph serve the other)."""
    swiglu, polyglu = make_model(seed=6, ffn="swiglu"), make_model(seed=6)
    for model in (swiglu, polyglu):
        eager = generate(model, PROMPTS, 5, return_logits=True, eos_token_id=[])
        compiled = generate(model, PROMPTS, 5, return_logits=True, eos_token_id=[], compile="eager")
        assert_same_generation(compiled, eager)


@pytest.mark.slow
def test_compiled_decode_step_follows_a_weight_layout_change_and_the_training_flag():
    """Only tensor guards are kept: a new weight layout still compiles again (parameters' strides are
    guarded), and a model switched to training mode gets its own step (DecodeStep's key)."""
    model = make_model(seed=4)
    eager = generate(model, PROMPTS, 6, return_logits=True, eos_token_id=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for columns in (True, False):
            model.use_decode_layout(columns)
            compiled = generate(model, PROMPTS, 6, return_logits=True, eos_token_id=[], compile=True)
            assert_same_generation(compiled, eager)
        step = DecodeStep(model, compile="aot_eager")
        model.train()  # Gumbel noise: a different graph, not the eval one
        torch.manual_seed(0)
        cache = KVCache.for_model(model, 1, 4)
        with torch.no_grad():
            noisy = [step(torch.tensor([[3]]), cache) for _ in range(2)]
        model.eval()
    import polyglu.inference.compiled as generation

    keys = set(generation._COMPILED_STEPS[model])
    assert ("aot_eager", True, False) in keys and ("default", False, False) in keys
    assert all(torch.isfinite(logits).all() for logits in noisy)


def test_compiled_generation_rounds_the_cache_up_to_a_bucket_within_the_context(monkeypatch):
    import polyglu.inference.compiled as generation
    import polyglu.inference.engine as engine

    model = make_model(seed=5)
    lengths, new_cache = [], engine.new_cache
    monkeypatch.setattr(engine, "new_cache", lambda m, b, n: lengths.append(n) or new_cache(m, b, n))
    monkeypatch.setattr(engine, "_CACHES", engine.weakref.WeakKeyDictionary())  # no cache kept from before
    monkeypatch.setattr(generation, "COMPILED_CACHE_BUCKET", 16)
    outputs = [generate(model, [prompt], 5, eos_token_id=[], compile=compile, return_logits=True)
               for prompt in (PROMPTS[0], PROMPTS[2]) for compile in (False, "eager")]
    # 7 + 5 - 1 = 11 -> 16 slots (a power of two up to the bucket), 13 + 5 - 1 = 17 -> 32 (a multiple
    # beyond); eager generation allocates what it needs
    assert lengths == [11, 16, 17, 32]
    assert [generation.compiled_cache_length(n, 64) for n in (1, 3, 9, 16, 33, 48, 49, 70)] == \
        [1, 4, 16, 16, 48, 48, 64, 70]
    assert_same_generation(outputs[1], outputs[0])
    assert_same_generation(outputs[3], outputs[2])
    generate(model, [PROMPTS[2]], 45, eos_token_id=[], compile="eager")  # 57 slots -> 64, the context
    assert lengths[-1] == 64
    assert generation.compiled_cache_length(40, 44) == 44  # never past the context


def test_batched_prompts_of_different_lengths_equal_one_by_one(trained_model):
    batched = generate(trained_model, PROMPTS, 16, return_logits=True, eos_token_id=[])
    for row, prompt in enumerate(PROMPTS):
        alone = generate(trained_model, [prompt], 16, return_logits=True, eos_token_id=[])
        assert torch.equal(alone.tokens[0], batched.tokens[row])
        torch.testing.assert_close(alone.logits[0], batched.logits[row], atol=1e-4, rtol=1e-4)


def test_input_forms_agree():
    model = make_model()
    as_lists = generate(model, PROMPTS, 6, eos_token_id=[]).tokens
    # a right-padded tensor with an attention mask: padding side does not matter
    width = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):
        ids[row, :len(prompt)] = torch.tensor(prompt)
        mask[row, :len(prompt)] = 1
    assert torch.equal(generate(model, ids, 6, attention_mask=mask, eos_token_id=[]).tokens, as_lists)
    single = generate(model, torch.tensor(PROMPTS[0]), 6, eos_token_id=[]).tokens
    assert torch.equal(single[0], as_lists[0])
    assert torch.equal(generate(model, PROMPTS[0], 6, eos_token_id=[]).tokens, single)


def test_seeded_sampling_is_reproducible():
    model = make_model()
    kwargs = dict(temperature=1.0, top_k=50, top_p=0.95, eos_token_id=[])
    first = generate(model, PROMPTS, 20, seed=123, **kwargs).tokens
    assert torch.equal(first, generate(model, PROMPTS, 20, seed=123, **kwargs).tokens)
    assert not torch.equal(first, generate(model, PROMPTS, 20, seed=124, **kwargs).tokens)
    generator = torch.Generator().manual_seed(123)
    assert torch.equal(first, generate(model, PROMPTS, 20, generator=generator, **kwargs).tokens)
    # top_k=1 sampling is greedy
    greedy = generate(model, PROMPTS, 10, eos_token_id=[]).tokens
    assert torch.equal(generate(model, PROMPTS, 10, temperature=0.8, top_k=1, seed=0, eos_token_id=[]).tokens,
                       greedy)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone is not enough, 0.5 + 0.3 is
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=generator)) for _ in range(50)}
    assert draws == {0, 1}


def test_top_k_keeps_exactly_k_tokens_when_tied():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])
    kept = ~torch.isinf(filter_logits(logits, top_k=2))
    assert int(kept.sum()) == 2 and bool(kept[0, 0])
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=generator)) for _ in range(100)}
    assert len(draws) == 2


def test_top_p_near_zero_is_greedy_and_out_of_range_is_an_error():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    assert (~torch.isinf(filter_logits(logits, top_p=0.0))).tolist() == [[False, True, False]]
    assert int(sample_next(logits, 1.0, top_p=1e-9)) == 1
    model = make_model()
    for kwargs, name in [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature"),
                         ({"top_k": -1}, "top_k"), ({"temperature": float("nan")}, "temperature")]:
        with pytest.raises(ValueError, match=name):
            generate(model, PROMPTS, 3, **{"temperature": 1.0, **kwargs})


def test_stops_on_eos_and_pads_after():
    model = make_model()
    free = generate(model, PROMPTS, 10, eos_token_id=[])
    eos = int(free.tokens[0, 3])  # the token row 0 produces at step 3 becomes EOS
    out = generate(model, PROMPTS, 10, eos_token_id=eos, pad_token_id=0)
    n = int(out.lengths[0])
    assert n <= 4 and out.finished[0] and int(out.tokens[0, n - 1]) == eos
    assert torch.equal(out.tokens[0, :n], free.tokens[0, :n])
    assert (out.tokens[0, n:] == 0).all()
    for row in range(len(PROMPTS)):  # other rows are unaffected until they emit it themselves
        m = int(out.lengths[row])
        assert torch.equal(out.tokens[row, :m], free.tokens[row, :m])
        assert bool(out.finished[row]) == (eos in free.tokens[row].tolist())


def test_stop_strings_cut_the_text():
    tokenizer = load_tokenizer("byte")
    model = make_model()
    prompt = tokenizer.encode("The answer is")
    free = generate(model, [prompt], 30, eos_token_id=[], tokenizer=tokenizer)
    text = free.texts[0]
    stop = tokenizer.decode(free.tokens[0, 8:10].tolist())  # two bytes from the middle
    out = generate(model, [prompt], 30, eos_token_id=[], stop_strings=[stop], tokenizer=tokenizer)
    cut = text.index(stop)
    assert out.texts[0] == text[:cut]
    assert out.finished[0] and int(out.lengths[0]) <= 10
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [prompt], 5, stop_strings=["x"])


def scripted_model(script: list[int]) -> PolychromaticLM:
    """A model whose greedy next token depends on the current token only: script[i] -> script[i+1]
    (cyclically). Every block adds zero to the residual stream, so the head sees the token's own
    embedding; the head's row for script[i+1] is that embedding. `script` holds distinct ids."""
    model = make_model(seed=0, tie_embeddings=False)
    with torch.no_grad():
        for block in model.layers:
            block.attn.o_proj.weight.zero_()
            block.ffn.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        embed = model.embed_tokens.weight
        for current, following in zip(script, script[1:] + script[:1]):
            model.lm_head.weight[following] = 10 * embed[current] / embed[current].norm()
    return model


def _distinct_byte_text(n_chars: int, width: int) -> str:
    """n_chars characters of `width` UTF-8 bytes, no byte used twice (so a scripted model can spell them)."""
    lead = 0xE4 if width == 3 else 0xF1  # leads whose continuation bytes may be any of 0x80..0xBF
    continuation = iter(range(0x80, 0xC0))
    return "".join(bytes([lead + i] + [next(continuation) for _ in range(width - 1)]).decode()
                   for i in range(n_chars))


@pytest.mark.parametrize("width, n_chars", [(3, 5), (4, 3)])
def test_stop_string_of_many_byte_tokens_is_found(width, n_chars):
    """CJK / emoji-like characters as byte tokens: the stop string spans more tokens than characters."""
    tokenizer = load_tokenizer("byte")
    stop = _distinct_byte_text(n_chars, width)
    script = tokenizer.encode("Q:") + tokenizer.encode(stop) + tokenizer.encode("!x")
    model = scripted_model(script)
    prompt = script[:2]
    free = generate(model, [prompt], 30, eos_token_id=[], tokenizer=tokenizer)
    assert free.tokens[0, :len(script) - 2].tolist() == script[2:]  # the model spells the script
    out = generate(model, [prompt], 30, eos_token_id=[], tokenizer=tokenizer, stop_strings=[stop])
    assert bool(out.finished[0]) and int(out.lengths[0]) == len(tokenizer.encode(stop))
    assert out.texts[0] == ""


def test_stop_string_matcher_equals_a_search_of_the_whole_text():
    tokenizer = load_tokenizer("byte")
    text = "ab 你好，世界 😀 end你好"
    ids = tokenizer.encode(text)
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.push(t) for t in ids) == text
    for stop in ["你好，世界", "😀 e", "d你", "b", "nothing"]:
        matcher = StopStringMatcher(tokenizer, [stop])
        found = [matcher.push(t) for t in ids]
        expected = [stop in tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]
        # the first step on which the matcher fires is the first on which the whole text contains it
        assert (found.index(True) if any(found) else None) == (expected.index(True) if any(expected) else None), stop


def test_prompt_too_long_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match=r"60 tokens \+ max_new_tokens=10 exceeds .*max_seq_len=64"):
        generate(model, [list(range(60))], 10)
    generate(model, [list(range(54))], 10, eos_token_id=[])  # exactly fits
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 999]], 3)


NON_CAUSAL_POOLS = [pool for pool in ROUTING_POOLS if not routing_is_causal(pool)]


def test_there_is_a_non_causal_pool_to_test():
    assert NON_CAUSAL_POOLS == ["sequence"]


@pytest.mark.parametrize("pool", NON_CAUSAL_POOLS)
def test_non_causal_pool_model_generates_by_recomputing(pool):
    model = make_model(routing_pool=pool)
    out = generate(model, PROMPTS, 8, return_logits=True, eos_token_id=[])
    assert not out.used_cache
    # reference: the original's loop, a plain forward over the whole sequence at each step
    for row, prompt in enumerate(PROMPTS):
        seq = torch.tensor([prompt])
        for step in range(8):
            logits = model(seq).logits[0, -1]
            torch.testing.assert_close(out.logits[row, step], logits, atol=1e-4, rtol=1e-4)
            seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
        assert seq[0, len(prompt):].tolist() == out.tokens[row].tolist()


def test_stream_callback_and_text_streamer():
    tokenizer = load_tokenizer("byte")
    model = make_model()
    seen = []
    out = generate(model, PROMPTS, 7, eos_token_id=[], stream=lambda tokens, emitted: seen.append(
        (tokens.clone(), emitted.clone())))
    assert len(seen) == 7 and all(e.all() for _, e in seen)
    assert torch.equal(torch.stack([t for t, _ in seen], dim=1), out.tokens)

    written = []
    prompt = tokenizer.encode("hello")
    free = generate(model, [prompt], 20, eos_token_id=[], tokenizer=tokenizer)
    stop = free.texts[0][5:7]
    streamer = TextStreamer(tokenizer, write=written.append, stop_strings=[stop])
    out = generate(model, [prompt], 20, eos_token_id=[], tokenizer=tokenizer, stop_strings=[stop], stream=streamer)
    assert streamer.finish() == out.texts[0] == "".join(written)
    assert stop not in "".join(written)


def test_training_mode_is_restored_and_generation_is_deterministic():
    model = make_model()
    model.train()
    a = generate(model, PROMPTS, 5, eos_token_id=[])
    assert model.training
    assert torch.equal(a.tokens, generate(model, PROMPTS, 5, eos_token_id=[]).tokens)


@pytest.fixture
def model_dir(tmp_path):
    model = make_model()
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    load_tokenizer("byte").save(directory / "tokenizer")
    return directory


def test_cli_generate(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["generated_tokens"] == 6 and len(result["tokens"]) == 6 and result["used_cache"]
    assert main(["generate", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == result["text"] + "\n"
    assert main(["generate", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "4", "--chat",
                 "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--json"]) == 0
    chat = json.loads(capsys.readouterr().out)
    assert chat["prompt"].startswith("<|im_start|>user\nHi") and chat["generated_tokens"] <= 4
    assert main(["generate", str(model_dir), "--prompt", "x" * 70, "--max-new-tokens", "4"]) == 2
    assert "max_seq_len=64" in capsys.readouterr().err


def test_cli_generate_compile_flag_reaches_generate(model_dir, capsys, monkeypatch):
    import polyglu.inference as generation

    seen, real = [], generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: seen.append(k["compile"]) or real(*a, **k))
    outputs = []
    for extra in ([], ["--compile", "eager"]):  # "eager": a torch.compile backend that checks the capture quickly
        assert main(["generate", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "5", *extra, "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert seen == [False, "eager"] and outputs[0] == outputs[1]
    assert main(["generate", str(model_dir), "--prompt", "Hi", "--compile", "fast"]) == 2
    assert "--compile: compile='fast' is neither a torch.compile mode" in capsys.readouterr().err
    assert main(["eval-math", str(model_dir), "--data", "absent.jsonl", "--compile", "fast"]) == 2  # before the data
    assert "--compile: compile='fast'" in capsys.readouterr().err


def test_cli_chat_reads_turns_from_stdin(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n/reset\nsecond turn\nthird\n"))
    assert main(["chat", str(model_dir), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 3 and "(conversation reset)" in out
    # an overlong history is trimmed to the turns that fit; a too-long single message is skipped
    monkeypatch.setattr("sys.stdin", io.StringIO("a" * 80 + "\nok\n"))
    assert main(["chat", str(model_dir), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "too long" in out and out.count("assistant> ") == 1


def test_decode_step_keeps_cache_tensors_at_their_addresses(tiny_config):
    """The static decode step changes the cache only in place (what CUDA graphs replay against):
    the key/value buffers and every layer's running pool sum keep their storage across steps."""
    torch.manual_seed(0)
    model = PolychromaticLM(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 5))
    cache = KVCache.for_model(model, 2, 12)
    with torch.no_grad():
        model(ids, cache=cache)
        addresses = [t.data_ptr() for t in cache.static_tensors()]
        before = [cache.pool_state(i).total.clone() for i in range(tiny_config.n_layers)]
        model.decode_step(ids[:, -1:], cache)
    assert [t.data_ptr() for t in cache.static_tensors()] == addresses
    after = [cache.pool_state(i).total for i in range(tiny_config.n_layers)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the running pool sums did advance


def test_generate_leaves_the_weight_layout_alone(tiny_config):
    """generate never changes the model's tensors (the decode layout is the loader's choice)."""
    model = PolychromaticLM(tiny_config)
    before = {name: p.stride() for name, p in model.named_parameters()}
    generate(model, torch.randint(0, tiny_config.vocab_size, (1, 4)), max_new_tokens=3)
    assert {name: p.stride() for name, p in model.named_parameters()} == before


def test_reading_the_device_every_few_steps_gives_the_same_results():
    """Sampled ids stay on the device and the host reads them every `sync_every` steps: EOS, stop
    strings (found mid-stretch, what a row decodes after them discarded), compaction and the stream
    give what reading every step gives."""
    tokenizer = load_tokenizer("byte")
    model = make_model(seed=3)
    free = generate(model, PROMPTS, 12, eos_token_id=[], tokenizer=tokenizer)
    eos = int(free.tokens[1, 2])
    stop = tokenizer.decode(free.tokens[0, 5:7].tolist())
    outputs, streams = [], []
    for sync_every in (1, 4, 5, 100):
        seen = []
        out = generate(model, PROMPTS, 12, eos_token_id=eos, tokenizer=tokenizer, stop_strings=[stop],
                       return_logits=True, sync_every=sync_every,
                       stream=lambda tokens, emitted, seen=seen: seen.append((tokens.clone(), emitted.clone())))
        outputs.append(out)
        streams.append(seen)
    assert outputs[0].finished[0] and outputs[0].finished[1]  # both stops happen
    for out, seen in zip(outputs[1:], streams[1:]):
        assert_same_generation(out, outputs[0])
        assert out.texts == outputs[0].texts and torch.equal(out.finished, outputs[0].finished)
        assert len(seen) == len(streams[0])
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(seen, streams[0]))
    with pytest.raises(ValueError, match="sync_every must be >= 1"):
        generate(model, PROMPTS, 2, sync_every=0)


def test_engine_yields_one_step_per_token_and_generate_collects_them():
    from polyglu.inference import Engine, Sampling

    model = make_model(seed=4)
    out = generate(model, PROMPTS, 6, eos_token_id=[])
    steps = list(Engine(model).steps(PROMPTS, 6, sampling=Sampling(), pad_token_id=0))
    assert [s.index for s in steps] == list(range(6))
    assert torch.equal(torch.stack([s.tokens for s in steps], 1), out.tokens)
    assert all(s.emitted.all() and not s.stopped.any() for s in steps)
    # a consumer that stops early leaves the engine cleanly (the cache goes back to the pool)
    first = next(iter(Engine(model).steps(PROMPTS, 6)))
    assert torch.equal(first.tokens, out.tokens[:, 0])


def test_compiled_generations_of_one_shape_reuse_one_cache(monkeypatch):
    """One cache per (batch, length) kept per model and reset in place: a second compiled generation
    of that shape decodes into the same tensors (what CUDA graphs replay) and gives the same tokens."""
    import polyglu.inference.engine as engine

    monkeypatch.setattr(engine, "_CACHES", engine.weakref.WeakKeyDictionary())
    made, new_cache = [], engine.new_cache
    monkeypatch.setattr(engine, "new_cache", lambda m, b, n: made.append(new_cache(m, b, n)) or made[-1])
    model = make_model(seed=5)
    first = generate(model, PROMPTS, 5, eos_token_id=[], return_logits=True, compile="eager")
    addresses = [t.data_ptr() for t in made[0].static_tensors()]
    second = generate(model, PROMPTS, 5, eos_token_id=[], return_logits=True, compile="eager")
    assert len(made) == 1 and [t.data_ptr() for t in made[0].static_tensors()] == addresses
    assert_same_generation(second, first, atol=0)
    generate(model, PROMPTS[:2], 5, eos_token_id=[], compile="eager")  # another batch size: another cache
    assert len(made) == 2
    eager = generate(model, PROMPTS, 5, eos_token_id=[], return_logits=True)
    assert_same_generation(first, eager)


def test_padding_ids_of_a_padded_vocabulary_are_never_sampled():
    """A model whose vocabulary is padded past the tokenizer's (260 byte ids -> 320) never emits a
    padding id: greedy or sampled, with the tokenizer's size taken by default."""
    from polyglu.inference import mask_padding

    tokenizer = load_tokenizer("byte")
    assert tokenizer.vocab_size < 320
    model = make_model(seed=6, vocab_size=320)
    with torch.no_grad():  # the padding rows of the head win every argmax unless masked
        model.embed_tokens.weight[tokenizer.vocab_size:] *= 50
    prompt = tokenizer.encode("abc")
    unmasked = generate(model, [prompt], 8, eos_token_id=[], vocab_limit=320)
    assert (unmasked.tokens >= tokenizer.vocab_size).any()
    for temperature in (0.0, 50.0):
        out = generate(model, [prompt] * 4, 40, eos_token_id=[], tokenizer=tokenizer, temperature=temperature, seed=0)
        assert int(out.tokens.max()) < tokenizer.vocab_size
    logits = torch.randn(2, 8)
    masked = mask_padding(logits, 5)
    assert torch.equal(masked[:, :5], logits[:, :5]) and torch.isinf(masked[:, 5:]).all()
    assert mask_padding(logits, None) is logits
    with pytest.raises(ValueError, match="vocab_limit must be >= 1"):
        generate(model, [prompt], 2, vocab_limit=0)


def test_text_streamer_reads_one_incremental_decoder_and_never_writes_half_a_character():
    """The streamer decodes with the same IncrementalDecoder as the stop strings: what it writes, piece
    by piece, is the whole text cut before the stop string, and no piece holds half a character."""
    tokenizer = load_tokenizer("byte")
    text = "数学 12 + 30 = 42 ✓ done"
    ids = tokenizer.encode(text)
    written = []
    streamer = TextStreamer(tokenizer, write=written.append, stop_strings=["✓ d"])
    for token in ids:
        streamer(torch.tensor([token]), torch.tensor([True]))
    assert streamer.finish() == "".join(written) == text[:text.index("✓ d")]
    assert all("\ufffd" not in piece for piece in written) and len(written) > 3
    assert isinstance(streamer.decoder, IncrementalDecoder)

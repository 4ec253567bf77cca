"""transformers classes: config, save/load through the Auto classes, generate(), standalone export."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402
from transformers import __version__ as transformers_version  # noqa: E402

from polyglu.cli import main  # noqa: E402
from polyglu.config import ROUTING_POOLS, ConfigError, routing_is_causal  # noqa: E402
from polyglu.interop.hf_export import byte_level_tokenizer, copy_tokenizer, standalone_sources  # noqa: E402
from polyglu.interop.transformers import (  # noqa: E402
    CACHE_KWARG,
    PolychromaticCache,
    PolychromaticConfig,
    PolychromaticForCausalLM,
)
from polyglu.model.transformer import PolychromaticLM  # noqa: E402


def _model(config, **changes) -> PolychromaticLM:
    """A seeded model whose greedy continuations vary (large init, non-uniform routing)."""
    torch.manual_seed(0)
    model = PolychromaticLM(config.replace(init_std=0.3, **changes)).eval()
    with torch.no_grad():
        for layer in model.polyglu_layers():
            layer.alpha.normal_(0.0, 1.0)
    return model


def _greedy(model: PolychromaticLM, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference: re-run the whole sequence each step, no cache."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_config_mirrors_model_config(tiny_config):
    hf = PolychromaticConfig(**tiny_config.to_dict())
    assert hf.model_config() == tiny_config
    assert hf.hidden_size == tiny_config.d_model and hf.num_hidden_layers == tiny_config.n_layers
    assert hf.tie_word_embeddings is tiny_config.tie_embeddings
    assert PolychromaticConfig(tie_word_embeddings=False).tie_embeddings is False
    with pytest.raises(ConfigError, match="n_heads"):
        PolychromaticConfig(n_heads=3, n_kv_heads=2)


def test_forward_is_the_core_model(tiny_config):
    wrapper = PolychromaticForCausalLM.from_polyglu(_model(tiny_config))
    ids = torch.randint(0, tiny_config.vocab_size, (2, 11))
    with torch.no_grad():
        out = wrapper(ids, labels=ids)
        ref = wrapper.model(ids).logits
        last = wrapper(ids, logits_to_keep=1).logits
    assert torch.equal(out.logits, ref)
    assert torch.allclose(last, ref[:, -1:], atol=1e-5)  # a smaller matmul may round differently
    expected = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_auto_roundtrip(tiny_config, tmp_path, tied):
    model = _model(tiny_config, tie_embeddings=tied)
    model.set_tau(0.37)
    wrapper = PolychromaticForCausalLM.from_polyglu(model)
    wrapper.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "polychromatic"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PolychromaticConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, PolychromaticForCausalLM) and not loaded.training
    assert loaded.model.tau == pytest.approx(0.37)
    assert (loaded.model.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_generate_uses_cache_and_matches_uncached_loop(tiny_config):
    model = _model(tiny_config)
    wrapper = PolychromaticForCausalLM.from_polyglu(model)
    ids = torch.randint(0, tiny_config.vocab_size, (3, 7))
    out = wrapper.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, CACHE_KWARG)
    assert isinstance(cache, PolychromaticCache)
    assert cache.get_seq_length() == 7 + 12 - 1
    assert torch.equal(out.sequences, _greedy(model, ids, 12))
    assert len(set(out.sequences[:, 7:].flatten().tolist())) > 3  # a continuation that discriminates


def test_generate_matches_polyglu_generate(tiny_config):
    generation = pytest.importorskip("polyglu.inference")
    model = _model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 6))
    ours = generation.generate(model, ids, 10, eos_token_id=[])
    theirs = PolychromaticForCausalLM.from_polyglu(model).generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(theirs[:, 6:], ours.tokens)


def test_generate_left_padding_matches_unpadded_rows(tiny_config):
    model = _model(tiny_config)
    wrapper = PolychromaticForCausalLM.from_polyglu(model)
    short, long = torch.randint(0, tiny_config.vocab_size, (1, 4)), torch.randint(0, tiny_config.vocab_size, (1, 8))
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    out = wrapper.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(out[0, 8:], _greedy(model, short, 8)[0, 4:])
    assert torch.equal(out[1, 8:], _greedy(model, long, 8)[0, 8:])


@pytest.mark.parametrize("pool", [pool for pool in ROUTING_POOLS if not routing_is_causal(pool)])
def test_generate_non_causal_pooling_recomputes(tiny_config, pool):
    model = _model(tiny_config, routing_pool=pool)
    wrapper = PolychromaticForCausalLM.from_polyglu(model)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 5))
    out = wrapper.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert getattr(out, CACHE_KWARG) is None
    assert torch.equal(out.sequences, _greedy(model, ids, 6))


def test_beam_search_with_cache_matches_without(tiny_config):
    wrapper = PolychromaticForCausalLM.from_polyglu(_model(tiny_config))
    ids = torch.randint(0, tiny_config.vocab_size, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2)
    assert torch.equal(wrapper.generate(ids, **kwargs), wrapper.generate(ids, use_cache=False, **kwargs))


def test_foreign_cache_is_refused(tiny_config):
    wrapper = PolychromaticForCausalLM.from_polyglu(_model(tiny_config))
    for name in ("cache", "past_key_values"):
        with pytest.raises(TypeError, match="PolychromaticCache"):
            wrapper(torch.zeros(1, 3, dtype=torch.long), **{name: DynamicCache()})


def test_forward_takes_the_cache_under_either_name(tiny_config):
    """transformers >= 5.24 passes `cache=`, earlier versions `past_key_values=`: both continue the cache."""
    model = _model(tiny_config)
    wrapper = PolychromaticForCausalLM.from_polyglu(model)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 6))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            prefix = wrapper(ids[:, :5], use_cache=True)
            cache = getattr(prefix, CACHE_KWARG)
            step = wrapper(ids[:, 5:], **{name: cache}).logits[:, -1]
            assert cache.get_seq_length() == 6
            assert torch.allclose(step, full, atol=1e-5), name


def test_generate_warns_about_nothing(tiny_config):
    """No FutureWarning or transformers log warning (e.g. "past_key_values is deprecated") per call."""
    import logging

    wrapper = PolychromaticForCausalLM.from_polyglu(_model(tiny_config))
    ids = torch.randint(0, tiny_config.vocab_size, (2, 5))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = wrapper.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                   pad_token_id=0, return_dict_in_generate=True)
            getattr(out, CACHE_KWARG)
    finally:
        hf_logger.removeHandler(handler)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    assert [r.getMessage() for r in records] == []


def test_bundle_imports_nothing_from_polyglu(tmp_path):
    from transformers.dynamic_module_utils import get_imports

    for name, source in standalone_sources().items():
        (tmp_path / name).write_text(source)
        # what transformers checks before running remote code: third-party packages only
        third_party = set(get_imports(tmp_path / name)) - set(sys.stdlib_module_names)
        assert third_party <= {"torch", "transformers", "yaml"}, (name, third_party)
        compile(source, name, "exec")


def test_byte_level_tokenizer_matches_byte_tokenizer():
    from polyglu.data.tokenizer import ByteTokenizer

    ours, theirs = ByteTokenizer(), byte_level_tokenizer()
    text = "héllo wörld 🙂\n<|im_start|>user\n2+2=?<|im_end|><|endoftext|>"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text
    assert theirs.eos_token_id == ours.eos_id and theirs.pad_token_id == ours.pad_id


def test_copy_hf_tokenizer(tmp_path):
    tok_dir, out = tmp_path / "tokenizer", tmp_path / "out"
    byte_level_tokenizer().save_pretrained(str(tok_dir))
    out.mkdir()
    assert copy_tokenizer(tok_dir, out) == "hf"
    assert (out / "tokenizer.json").is_file()


STANDALONE_CHECK = """
import sys
sys.modules["polyglu"] = None  # as on a machine without polyglu
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ref = torch.load({ref!r})
with torch.no_grad():
    diff = (model(ref["ids"]).logits - ref["logits"]).abs().max().item()
tokens = model.generate(ref["ids"], max_new_tokens=8, do_sample=False)
tok = AutoTokenizer.from_pretrained({out!r}, trust_remote_code=True)
print(diff, torch.equal(tokens, ref["greedy"]), tok.encode("hé<|endoftext|>", add_special_tokens=False))
"""


def test_export_hf_loads_without_polyglu(tiny_config, tmp_path):
    from polyglu.data.tokenizer import ByteTokenizer

    config = tiny_config.replace(vocab_size=ByteTokenizer().vocab_size)
    model = _model(config, mixed_impl="reference")  # the path the standalone code takes (no fused kernel)
    model.save_pretrained(tmp_path / "model")
    ByteTokenizer().save(tmp_path / "model" / "tokenizer")
    out = tmp_path / "export"
    assert main(["export-hf", str(tmp_path / "model"), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_polychromatic.PolychromaticForCausalLM"
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits, "greedy": _greedy(model, ids, 8)}, tmp_path / "ref.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "OMP_NUM_THREADS": "1"}
    script = textwrap.dedent(STANDALONE_CHECK.format(out=str(out), ref=str(tmp_path / "ref.pt")))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    diff, same_tokens, encoded = result.stdout.strip().splitlines()[-1].split(" ", 2)
    assert float(diff) <= 1e-6
    assert same_tokens == "True"
    assert encoded == str(ByteTokenizer().encode("hé<|endoftext|>"))
    assert main(["export-hf", str(tmp_path / "model"), str(out)]) == 2  # refuses a non-empty directory


@pytest.mark.parametrize("method", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_config, tmp_path, method):
    """`gradient_checkpointing_enable()` (what PEFT and TRL call; transformers 5.24 renames it
    `activation_checkpointing_enable` and warns about the old name) checkpoints every Block."""
    model = _model(tiny_config)
    wrapper = PolychromaticForCausalLM.from_polyglu(model).train()
    if not hasattr(wrapper, method):
        pytest.skip(f"transformers {transformers_version} has no {method}")
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9))
    names = list(wrapper.state_dict())

    def grads():
        wrapper.zero_grad()
        wrapper(ids, labels=ids).loss.backward()
        return {name.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                for name, p in wrapper.named_parameters() if p.grad is not None}

    torch.manual_seed(1)
    plain = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        getattr(wrapper, method)()
    assert wrapper.gradient_checkpointing
    assert all(type(block).__name__ == "CheckpointWrapper" for block in wrapper.model.layers)
    torch.manual_seed(1)  # the same Gumbel routing noise in the first forward
    checkpointed = grads()
    assert checkpointed.keys() == plain.keys() and len(plain) > 10
    for name in plain:
        assert torch.allclose(checkpointed[name], plain[name], atol=1e-6), name
    # tensor names and saving are unchanged; eval-mode generation still uses the cache
    assert list(wrapper.state_dict()) == names
    wrapper.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path).model.embed_tokens.weight,
                       model.embed_tokens.weight)
    wrapper.eval()
    prompt = ids[:, :4]
    assert torch.equal(wrapper.generate(prompt, max_new_tokens=5, do_sample=False), _greedy(model, prompt, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wrapper.gradient_checkpointing_disable()
    assert not wrapper.gradient_checkpointing
    assert all(type(block).__name__ == "Block" for block in wrapper.model.layers)


def test_base_model_returns_hidden_states(tiny_config):
    """What TRL's fused loss calls: model.base_model(...).last_hidden_state, then get_output_embeddings()."""
    wrapper = PolychromaticForCausalLM.from_polyglu(_model(tiny_config))
    ids = torch.randint(0, tiny_config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        hidden = wrapper.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = wrapper(ids, attention_mask=mask).logits
    assert hidden.shape == (2, 7, tiny_config.d_model)
    assert torch.allclose(wrapper.get_output_embeddings()(hidden), logits, atol=1e-6)
    assert dict(wrapper.named_parameters()).keys() == dict(wrapper.model.named_parameters(prefix="model")).keys()


def _hf_and_polyglu(wrapper, model, ids, mask, seed: int, **sampling):
    """(cached HF, uncached HF, polyglu.generate) token continuations, each drawn after the same seed."""
    from polyglu.inference import generate

    steps = 10
    hf = dict(max_new_tokens=steps, do_sample=True, top_p=1.0, pad_token_id=0, **sampling)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(seed)
        runs.append(wrapper.generate(ids, attention_mask=mask, use_cache=use_cache, **hf)[:, ids.shape[1]:])
    torch.manual_seed(seed)  # polyglu draws from torch's global RNG when given no seed or generator
    ours = generate(model, ids, steps, attention_mask=mask, eos_token_id=[], pad_token_id=0, **sampling).tokens
    return runs[0], runs[1], ours


@pytest.mark.parametrize("padded", [False, True])
def test_sampling_with_a_seed_matches_uncached_and_polyglu_generate(tiny_config, padded):
    model = _model(tiny_config)
    wrapper = PolychromaticForCausalLM.from_polyglu(model)
    ids = torch.randint(1, tiny_config.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    if padded:  # left padding, as a tokenizer with padding_side="left" gives
        mask[0, :3] = 0
        mask[2, :5] = 0
        ids[mask == 0] = 0
    cached, uncached, ours = _hf_and_polyglu(wrapper, model, ids, mask, seed=5, temperature=0.9, top_k=40)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ours)
    torch.manual_seed(6)
    assert not torch.equal(wrapper.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=40,
                                            temperature=0.9, top_p=1.0, pad_token_id=0)[:, 7:], cached)


def test_left_padded_greedy_batch_matches_polyglu_generate(tiny_config):
    from polyglu.inference import generate

    model = _model(tiny_config)
    wrapper = PolychromaticForCausalLM.from_polyglu(model)
    rows = [torch.randint(1, tiny_config.vocab_size, (n,)).tolist() for n in (3, 9, 6)]
    ours = generate(model, rows, 8, eos_token_id=[], pad_token_id=0)
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, 9 - len(row):] = torch.tensor(row)
        mask[b, 9 - len(row):] = 1
    for use_cache in (True, False):
        out = wrapper.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=use_cache,
                               pad_token_id=0)
        assert torch.equal(out[:, 9:], ours.tokens), use_cache


def test_left_padded_beam_search_with_cache_matches_without(tiny_config):
    wrapper = PolychromaticForCausalLM.from_polyglu(_model(tiny_config))
    ids = torch.randint(1, tiny_config.vocab_size, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=3,
                  pad_token_id=0)
    cached = wrapper.generate(ids, **kwargs)
    assert torch.equal(cached, wrapper.generate(ids, use_cache=False, **kwargs))
    # the padded row's beams are those of the row alone
    alone = wrapper.generate(ids[1:, 3:], **{**kwargs, "attention_mask": None})
    assert torch.equal(cached[3:, 6:], alone[:, 3:])

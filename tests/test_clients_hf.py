"""Stock Hugging Face clients on a `polyglu export-hf` directory: pipeline on chat messages, PEFT LoRA,
TRL's SFTTrainer. (lm-eval's stock `--model hf`: tests/test_clients_lm_eval.py.)

The exported model is loaded through the Auto classes as any user would; importing
`polyglu.interop.transformers` only registers the same classes the export bundles (loading the bundle
itself, without polyglu, is pinned by tests/test_interop_hf.py::test_export_hf_loads_without_polyglu).
"""

import json
import os
import stat

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import polyglu.interop.transformers  # noqa: E402, F401  (registers model_type "polychromatic")
from polyglu.cli import main  # noqa: E402
from polyglu.config import ModelConfig  # noqa: E402
from polyglu.data.chat import render_chatml  # noqa: E402
from polyglu.data.special_tokens import IM_END  # noqa: E402
from polyglu.data.tokenizer import ByteTokenizer  # noqa: E402
from polyglu.inference import generate  # noqa: E402
from polyglu.loading import chat_stop_ids  # noqa: E402
from polyglu.model.transformer import PolychromaticLM  # noqa: E402

TOKENIZER = ByteTokenizer()
QUESTION = [{"role": "user", "content": "2+2?"}]
CONVERSATIONS = [
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3*3?"},
     {"role": "assistant", "content": "9"}],
    [{"role": "user", "content": "capital of France?"}, {"role": "assistant", "content": "Paris"}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
]


def _chat_model() -> PolychromaticLM:
    """A byte-vocabulary model (no routing noise, so training steps are deterministic) whose greedy
    reply to QUESTION ends with <|im_end|> after a few tokens, as a trained chat model's would."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("debug", vocab_size=TOKENIZER.vocab_size, d_model=32, d_ff=64, n_heads=4,
                                     n_kv_heads=2, head_dim=8, max_seq_len=96, gate_hidden=8, init_std=0.3,
                                     routing_noise=False, tie_embeddings=False)
    model = PolychromaticLM(config).eval()
    prompt = TOKENIZER.encode(render_chatml(QUESTION, add_generation_prompt=True))
    free = generate(model, [prompt], 12, eos_token_id=[]).tokens[0].tolist()
    step = next(i for i in range(3, 12) if free[i] not in free[:i])
    im_end = TOKENIZER.token_id(IM_END)
    with torch.no_grad():  # <|im_end|> outscores the token greedy picks at `step`
        model.lm_head.weight[im_end] = model.lm_head.weight[free[step]] * 1.5
    return model


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory):
    """(polyglu model, model directory, export directory) of a model trained with task "sft"."""
    root = tmp_path_factory.mktemp("chat_export")
    model = _chat_model()
    model.save_pretrained(root / "model", extra={"task": "sft"})
    TOKENIZER.save(root / "model" / "tokenizer")
    assert main(["export-hf", str(root / "model"), str(root / "export")]) == 0
    return model, root / "model", root / "export"


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_export_carries_template_stop_and_pad_ids(chat_export):
    model, model_dir, out = chat_export
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == chat_stop_ids(TOKENIZER) == [TOKENIZER.eos_id, TOKENIZER.token_id(IM_END)]
    assert generation["pad_token_id"] == TOKENIZER.pad_id
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == TOKENIZER.eos_id and config["pad_token_id"] == TOKENIZER.pad_id
    hf_model, tok = _load(out)
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == \
                render_chatml(messages, add_generation_prompt=prompt)
    umask = os.umask(0o022)
    os.umask(umask)
    # readable by others as any file the user writes (mkstemp and safetensors make 0o600)
    for path in [*out.iterdir(), *model_dir.iterdir()]:
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_pipeline_on_messages_stops_where_polyglu_chat_does(chat_export):
    from transformers import pipeline

    model, _, out = chat_export
    hf_model, tok = _load(out)
    prompt = TOKENIZER.encode(render_chatml(QUESTION, add_generation_prompt=True))
    ours = generate(model, [prompt], 20, eos_token_id=chat_stop_ids(TOKENIZER))
    n = int(ours.lengths[0])
    assert n < 20 and ours.tokens[0, n - 1] == TOKENIZER.token_id(IM_END)  # the reply ended itself

    chat = pipeline("text-generation", model=hf_model, tokenizer=tok)
    reply = chat(QUESTION, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    assert reply[:-1] == QUESTION and reply[-1]["role"] == "assistant"
    assert reply[-1]["content"] == TOKENIZER.decode(ours.tokens[0, :n - 1].tolist())
    # the same through generate with and without the cache: it stops at <|im_end|>, not at max_new_tokens
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    for use_cache in (True, False):
        tokens = hf_model.generate(**ids, max_new_tokens=20, do_sample=False, use_cache=use_cache)
        assert tokens[0, ids["input_ids"].shape[1]:].tolist() == ours.tokens[0, :n].tolist()


def test_peft_lora_train_save_reload_merge(chat_export, tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install -e '.[finetune]')")

    _, _, out = chat_export
    hf_model, tok = _load(out)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                             task_type="CAUSAL_LM")
    lora = peft.get_peft_model(hf_model, config)
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    batch = tok([render_chatml(c) for c in CONVERSATIONS], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    losses = []
    for _ in range(5):
        loss = lora(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora.eval()
    with torch.no_grad():
        tuned = lora(**batch).logits
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = peft.PeftModel.from_pretrained(_load(out)[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, tuned, atol=1e-5)
        merged = reloaded.merge_and_unload()
        assert type(merged).__name__ == "PolychromaticForCausalLM"
        merged_logits = merged(**batch).logits
        base_logits = _load(out)[0](**batch).logits
    assert torch.allclose(merged_logits, tuned, atol=1e-4)
    assert not torch.allclose(base_logits, tuned, atol=1e-3)
    # the merged model is a plain export again: save, load, generate with the cache == without
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = batch["input_ids"][:1, :12]
    assert torch.equal(again.generate(ids, max_new_tokens=8, do_sample=False),
                       again.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False))


def test_trl_sft_trainer_defaults_three_steps_on_messages(chat_export, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[finetune]')")
    datasets = pytest.importorskip("datasets", reason="datasets is not installed")

    _, _, out = chat_export
    hf_model, tok = _load(out)
    before = {name: p.detach().clone() for name, p in hf_model.state_dict().items()}
    data = datasets.Dataset.from_list([{"messages": c} for c in CONVERSATIONS])
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, report_to="none", logging_steps=1,
                         save_strategy="no", use_cpu=True)
    trainer = trl.SFTTrainer(model=hf_model, args=args, train_dataset=data, processing_class=tok)
    # TRL tokenised the conversations with the export's chat template: polyglu's ChatML
    first = trainer.train_dataset[0]["input_ids"]
    assert tok.decode(first) == render_chatml(CONVERSATIONS[0])
    # TRL's loss (a fused head over model.base_model's hidden states) is the model's own loss
    batch = next(iter(trainer.get_train_dataloader()))
    reference = _load(out)[0].train()
    with torch.no_grad():
        expected = reference(**batch).loss.item()
        assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(expected, rel=1e-5)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # the first step's loss, under TRL's default bf16 autocast where the Trainer applies it on CPU
    assert losses[0] == pytest.approx(expected, rel=5e-2)
    # state_dict names: TRL's default gradient_checkpointing=True wraps the blocks
    changed = [name for name, p in hf_model.state_dict().items() if not torch.equal(p, before[name])]
    assert len(changed) > 10


def test_saved_tokenizers_carry_the_chatml_template(tmp_path):
    """Trained BPE tokenizers and HF tokenizers polyglu saves into a run get the export's template."""
    from polyglu.data.tokenizer import CHATML_TEMPLATE, load_tokenizer, train_bpe_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("12 + 30 = 42\nthe answer is 42\n" * 50)
    trained = train_bpe_tokenizer([corpus], 300, tmp_path / "bpe")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "bpe")
    assert loaded.chat_template == CHATML_TEMPLATE
    messages = CONVERSATIONS[1]
    assert loaded.apply_chat_template(messages, tokenize=False) == render_chatml(messages)
    assert loaded.apply_chat_template(messages, tokenize=True, return_dict=False) == \
        trained.encode(render_chatml(messages))
    # a tokenizer without a template gains it when saved (e.g. data.tokenizer copied into a run)
    bare = load_tokenizer(tmp_path / "bpe")
    bare.tok.chat_template = None
    bare.save(tmp_path / "copy")
    assert AutoTokenizer.from_pretrained(tmp_path / "copy").chat_template == CHATML_TEMPLATE

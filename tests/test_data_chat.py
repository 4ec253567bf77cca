"""ChatML formatting, assistant-only targets, SFT packing/padding, truncation, sources, determinism."""

import json
import random

import pytest
import torch

from polyglu.config import ConfigError
from polyglu.data.chat import (
    PACKING_POLICIES,
    SFTDataset,
    chat_segments,
    encode_chat,
    pack_rows,
    render_chatml,
)
from polyglu.data.sources import DataError, HFSource
from polyglu.data.special_tokens import IM_END
from polyglu.data.synthetic import chat_messages, generate_problems, pretraining_text
from polyglu.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe_tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "2 + 3 = 5\n#### 5"}, {"role": "user", "content": "And 4 * 2?"},
                {"role": "assistant", "content": "4 * 2 = 8\n#### 8"}]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_bpe")
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": pretraining_text(p)}) + "\n"
                              for p in generate_problems("train", 200, seed=9)))
    train_bpe_tokenizer([corpus], 380, root / "tok")
    return load_tokenizer(root / "tok")


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"messages": chat_messages(p)} for p in generate_problems("train", 24, seed=4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_render_chatml():
    text = render_chatml(CONVERSATION[1:3], add_generation_prompt=True)
    assert text == ("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5\n#### 5"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert "".join(t for t, _ in chat_segments(CONVERSATION)) == render_chatml(CONVERSATION)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_encode_chat_matches_whole_text_and_masks_assistant_only(kind, bpe):
    tok = ByteTokenizer() if kind == "byte" else bpe
    ids, trained = encode_chat(CONVERSATION, tok)
    assert ids == tok.encode(render_chatml(CONVERSATION))
    trained_text = tok.decode([i for i, t in zip(ids, trained) if t])
    assert trained_text == f"2 + 3 = 5\n#### 5{IM_END}4 * 2 = 8\n#### 8{IM_END}"
    # the context before an answer is exactly the generation prompt
    prompt = tok.encode(render_chatml(CONVERSATION[:2], add_generation_prompt=True))
    assert ids[:len(prompt)] == prompt and not any(trained[:len(prompt)])


def test_sft_batches_targets_and_doc_ids(sft_file, bpe):
    data = SFTDataset(sft_file, bpe, seq_len=400, batch_size=4, seed=1)
    assert data.stats["examples"] == data.stats["kept"] == 24 and data.stats["truncated"] == 0
    batch = data.get_batch(0)
    x, y, doc = batch["input_ids"], batch["targets"], batch["doc_ids"]
    assert x.shape == y.shape == doc.shape == (4, 400) and y.dtype == torch.long
    trained = y != -100
    assert torch.equal(y[:, :-1][trained[:, :-1]], x[:, 1:][trained[:, :-1]])  # targets = next tokens
    for row in range(4):
        text = bpe.decode(y[row][trained[row]].tolist())
        assert text.count(IM_END) == int(doc[row][x[row] != bpe.pad_id].max()) + 1  # one answer per example
        assert "<|im_start|>" not in text and "user" not in text
    padding = x == bpe.pad_id
    assert (y[padding] == -100).all()
    for row in range(4):  # padding is a document of its own
        if padding[row].any():
            assert doc[row][padding[row]].unique().numel() == 1
            assert doc[row][padding[row]][0] > doc[row][~padding[row]].max()
    assert "24/24 examples kept" in data.describe()


def test_padding_mode_truncation_and_drop(sft_file):
    tok = ByteTokenizer()
    padded = SFTDataset(sft_file, tok, seq_len=400, batch_size=2, packing=False)
    assert len(padded) == 24 and padded.stats["rows"] == 24
    assert padded.get_batch(0)["doc_ids"].amax(dim=1).tolist() == [1, 1]  # example 0, padding 1
    short = SFTDataset(sft_file, tok, seq_len=160, batch_size=2, truncation="truncate")
    long_examples = sum(len(encode_chat(json.loads(line)["messages"], tok)[0]) - 1 > 160
                        for line in sft_file.read_text().splitlines())
    assert long_examples > 0
    assert short.stats["truncated"] + short.stats["dropped_too_long"] == long_examples
    dropped = SFTDataset(sft_file, tok, seq_len=160, batch_size=2, truncation="drop")
    assert dropped.stats["dropped_too_long"] == long_examples and dropped.stats["kept"] == 24 - long_examples
    with pytest.raises(DataError, match="no usable example"):
        SFTDataset(sft_file, tok, seq_len=8, batch_size=2, truncation="drop")


def test_problem_solution_fields_hf_dataset_and_rows(tmp_path):
    problems = generate_problems("test", 10, seed=2)
    path = tmp_path / "ps.jsonl"
    path.write_text("".join(json.dumps({"problem": p["question"], "solution": p["answer"]}) + "\n" for p in problems))
    tok = ByteTokenizer()
    kwargs = dict(seq_len=512, batch_size=3, problem_field="problem", solution_field="solution")
    local = SFTDataset(path, tok, **kwargs)
    hf = SFTDataset(HFSource("json", data_files=str(path)), tok, **kwargs)
    rows = SFTDataset([{"messages": chat_messages(p)} for p in problems], tok, seq_len=512, batch_size=3)
    for step in range(3):
        a, b, c = local.get_batch(step), hf.get_batch(step), rows.get_batch(step)
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    alias = SFTDataset(path, tok, seq_len=512, batch_size=3, prompt_field="problem", response_field="solution")
    assert torch.equal(alias.get_batch(0)["targets"], local.get_batch(0)["targets"])
    system = SFTDataset(path, tok, system_prompt="Solve it.", **kwargs)
    assert "<|im_start|>system\nSolve it.<|im_end|>" in tok.decode(system.input_ids[0].tolist())


def test_bad_rows_name_file_and_line(tmp_path):
    tok = ByteTokenizer()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"msgs": []}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: missing field 'messages' \(fields: msgs\)"):
        SFTDataset(path, tok, seq_len=64, batch_size=1)
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 1: messages\[0\].role is 'robot'"):
        SFTDataset(path, tok, seq_len=64, batch_size=1)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(DataError, match="1 without an assistant turn"):
        SFTDataset(path, tok, seq_len=64, batch_size=1)
    path.write_text("")
    with pytest.raises(DataError, match="bad.jsonl: empty source"):
        SFTDataset(path, tok, seq_len=64, batch_size=1)
    with pytest.raises(ConfigError, match="both problem_field and solution_field"):
        SFTDataset(path, tok, seq_len=64, batch_size=1, problem_field="q")


def test_sft_determinism_ranks_epochs_and_state(sft_file):
    tok = ByteTokenizer()
    make = lambda **kw: SFTDataset(sft_file, tok, seq_len=256, batch_size=2, seed=5, **kw)
    data = make(grad_accum_steps=2)
    n = len(data)
    assert all(torch.equal(data.get_batch(3, 1)[k], make(grad_accum_steps=2).get_batch(3, 1)[k])
               for k in ("input_ids", "targets", "doc_ids"))
    # every row once per epoch
    seen = [int(i) for step in range(n) for i in make().row_indices(step)]
    assert sorted(seen[:n]) == list(range(n))
    single = SFTDataset(sft_file, tok, seq_len=256, batch_size=4, seed=5).get_batch(2)
    ranks = [SFTDataset(sft_file, tok, seq_len=256, batch_size=2, seed=5, rank=r, world_size=2).get_batch(2)
             for r in range(2)]
    assert torch.equal(torch.cat([r["input_ids"] for r in ranks]), single["input_ids"])
    data.get_batch(6, 0)
    state = json.loads(json.dumps(data.state_dict()))
    again = make(grad_accum_steps=2)
    again.load_state_dict(state)
    assert again.next_step == 7
    with pytest.raises(DataError, match="SFT data changed"):
        SFTDataset(sft_file, tok, seq_len=300, batch_size=2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="micro_step 2 outside"):
        data.get_batch(0, 2)


def test_max_examples_tokenises_only_the_first_conversations(sft_file):
    tok = ByteTokenizer()
    capped = SFTDataset(sft_file, tok, seq_len=256, batch_size=2, packing=False, shuffle=False, max_examples=5)
    whole = SFTDataset(sft_file, tok, seq_len=256, batch_size=2, packing=False, shuffle=False)
    assert capped.stats["examples"] == capped.stats["kept"] == len(capped) == 5
    assert whole.stats["examples"] == 24
    assert (capped.input_ids == whole.input_ids[:5]).all()  # the file's first five, in order


@pytest.mark.parametrize("value", [0, -3, "many"])
def test_sft_max_examples_config_rejects_non_positive(value):
    from polyglu.config import RunConfig

    with pytest.raises(ConfigError, match="data.sft_max_examples"):
        RunConfig.load(None, [f"data.sft_max_examples={value}"], task="sft")
    assert RunConfig.load(None, ["data.sft_max_examples=7"], task="sft").data.sft_max_examples == 7


def test_pack_rows_policies():
    rng = random.Random(3)
    lengths = [rng.randint(50, 160) for _ in range(400)]
    rows = {policy: pack_rows(lengths, 256, policy) for policy in PACKING_POLICIES}
    for policy, groups in rows.items():
        assert sorted(i for g in groups for i in g) == list(range(len(lengths))), policy  # each example once
        assert all(sum(lengths[i] for i in g) <= 256 for g in groups), policy
        assert all(g == sorted(g) for g in groups), policy  # a row keeps its examples in their order
    assert len(rows["none"]) == 400
    assert len(rows["best_fit"]) < 0.92 * len(rows["in_order"])  # tighter rows: less padding
    in_order = rows["in_order"]
    assert [i for g in in_order for i in g] == list(range(400))  # one row after another
    assert pack_rows(lengths, 256, "best_fit") == rows["best_fit"]  # deterministic
    assert pack_rows([], 256, "best_fit") == []
    assert pack_rows([256, 1, 255], 256, "best_fit") == [[0], [1, 2]]


def test_packing_setting(sft_file):
    tok = ByteTokenizer()
    best = SFTDataset(sft_file, tok, seq_len=600, batch_size=2)
    in_order = SFTDataset(sft_file, tok, seq_len=600, batch_size=2, packing="in_order")
    assert best.packing == "best_fit" and in_order.packing == "in_order"
    assert best.stats["rows"] <= in_order.stats["rows"]
    assert best.stats["target_tokens"] == in_order.stats["target_tokens"]
    assert SFTDataset(sft_file, tok, seq_len=600, batch_size=2, packing="none").stats["rows"] == 24
    with pytest.raises(ConfigError, match="packing must be"):
        SFTDataset(sft_file, tok, seq_len=600, batch_size=2, packing="tight")


def test_difficulty_filter(tmp_path):
    problems = generate_problems("train", 40, seed=5)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": chat_messages(p), "difficulty": p["difficulty"]}) + "\n"
                            for p in problems))
    tok = ByteTokenizer()
    easy = SFTDataset(path, tok, seq_len=600, batch_size=2, packing="none", shuffle=False, difficulties=[1, 2])
    expected = [p for p in problems if p["difficulty"] in (1, 2)]
    assert 0 < len(expected) < len(problems) and easy.stats["kept"] == len(expected)
    first = tok.decode(easy.input_ids[0][easy.input_ids[0] != tok.pad_id].tolist())
    assert expected[0]["question"] in first  # file order, the other difficulties skipped
    capped = SFTDataset(path, tok, seq_len=600, batch_size=2, difficulties=[1, 2], max_examples=5)
    assert capped.stats["examples"] == 5  # the cap counts kept rows
    with pytest.raises(DataError, match="no rows of difficulty 9"):
        SFTDataset(path, tok, seq_len=600, batch_size=2, difficulties=[9])
    bare = tmp_path / "bare.jsonl"  # rows without a difficulty field: the error names the row
    bare.write_text(json.dumps({"messages": chat_messages(problems[0])}) + "\n")
    with pytest.raises(DataError, match=r"bare.jsonl line 1: missing field 'difficulty'"):
        SFTDataset(bare, tok, seq_len=600, batch_size=2, difficulties=[1])

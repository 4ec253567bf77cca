"""Export a polyglu model directory as a self-contained Hugging Face directory.

    export_hf("runs/demo/final", "exported/")
    AutoModelForCausalLM.from_pretrained("exported/", trust_remote_code=True)   # no polyglu needed

The directory holds config.json (with `auto_map`), model.safetensors, generation_config.json, the
tokenizer when the model directory has one (with a ChatML chat template unless it has its own), and
two generated files: `configuration_polychromatic.py`
and `modeling_polychromatic.py`. They are not a second implementation: `bundle_source` copies the
top-level definitions the HF classes need, from the package's own modules, in dependency order
(a "tree-shaken" concatenation), and drops polyglu imports. Functions that reach outside the bundle
(saving a polyglu directory, the optional fused kernel) raise ImportError there instead.

Stopping and padding: config.json's `eos_token_id` is the document separator (`<|endoftext|>`) and
`pad_token_id` the tokenizer's padding; generation_config.json stops at the tokens `polyglu generate`
stops at: the separator, and `<|im_end|>` too for a chat model (trained with task "sft", or whose
config already ends at `<|im_end|>`, as Qwen3 chat models do).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from polyglu.atomic import atomic_directory

CONFIG_FILE = "configuration_polychromatic.py"
MODELING_FILE = "modeling_polychromatic.py"
AUTO_MAP = {
    "AutoConfig": "configuration_polychromatic.PolychromaticConfig",
    "AutoModelForCausalLM": "modeling_polychromatic.PolychromaticForCausalLM",
}
# (modules to inline, in dependency order; roots; polyglu modules imported from a sibling file)
CONFIG_BUNDLE = (("polyglu.config_loader", "polyglu.model_config", "polyglu.interop.hf_config"),
                 ("PolychromaticConfig",), {})
MODELING_BUNDLE = (
    ("polyglu.config_loader", "polyglu.model_config", "polyglu.documents", "polyglu.model.layers",
     "polyglu.model.activations", "polyglu.model.polyglu", "polyglu.model.flex", "polyglu.model.attention",
     "polyglu.inference.cache", "polyglu.model.transformer", "polyglu.interop.transformers"),
    ("PolychromaticForCausalLM", "PolychromaticCache"),
    {"polyglu.interop.hf_config": ".configuration_polychromatic"},
)
# files of a polyglu model directory that a tokenizer copy must never overwrite
_MODEL_FILES = {"config.json", "model.safetensors", "generation_config.json", CONFIG_FILE, MODELING_FILE}


class BundleError(RuntimeError):
    """The modules cannot be concatenated (a name defined twice, a polyglu name outside the bundle)."""


def _defined_names(node: ast.stmt) -> set[str]:
    """Names a top-level statement binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            names.add(sub.id)
        elif isinstance(sub, (ast.FunctionDef, ast.ClassDef)) and sub is not node:
            names.add(sub.name)
    return names


def _used_names(node: ast.stmt) -> set[str]:
    return {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)}


def _is_polyglu(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").split(".")[0] == "polyglu"
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "polyglu" for a in node.names)
    return False


def _rewrite_nested_imports(source: str, inlined: set[str], siblings: dict[str, str]) -> str:
    """Replace polyglu imports inside functions/blocks: inlined names need nothing, a sibling
    module becomes a relative import, anything else raises ImportError when reached."""
    tree = ast.parse(source)
    top = set(map(id, tree.body))
    lines = source.splitlines()
    edits = []
    for node in ast.walk(tree):
        if id(node) in top or not _is_polyglu(node):
            continue
        indent = lines[node.lineno - 1][: node.col_offset]
        module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
        if isinstance(node, ast.ImportFrom) and module in inlined:
            aliases = [f"{a.asname} = {a.name}" for a in node.names if a.asname and a.asname != a.name]
            text = "; ".join(aliases) or "pass"
        elif isinstance(node, ast.ImportFrom) and module in siblings:
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
            text = f"from {siblings[module]} import {names}"
        else:
            text = f'raise ImportError("{module} is not part of this standalone export; install polyglu")'
        edits.append((node.lineno, node.end_lineno, indent + text + "  # bundled by polyglu export-hf"))
    for start, end, text in sorted(edits, reverse=True):
        lines[start - 1:end] = [text]
    return "\n".join(lines) + "\n"


def _statement_source(lines: list[str], node: ast.stmt) -> str:
    """A statement's lines with its decorators and the comment lines right above it."""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    while start > 1 and lines[start - 2].lstrip().startswith("#"):
        start -= 1
    return "\n".join(lines[start - 1:node.end_lineno])


@dataclass
class _Collected:
    """What the bundled modules define and import at top level."""

    imports: dict[tuple, str] = field(default_factory=dict)  # (module or None, level, name, asname) -> the name it binds
    definitions: dict[str, tuple[int, str, set[str]]] = field(default_factory=dict)  # name -> (order, source, names used)
    foreign: dict[str, str] = field(default_factory=dict)  # name -> the polyglu module it would come from
    relative: dict[str, str] = field(default_factory=dict)  # name -> import line from a sibling
    order: int = 0


def _collect_polyglu_import(found: _Collected, module_name: str, node: ast.stmt, inlined: set[str],
                            siblings: dict[str, str]) -> None:
    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
    for alias in node.names:
        name = alias.asname or alias.name
        if isinstance(node, ast.ImportFrom) and module in siblings:
            found.relative[name] = f"from {siblings[module]} import {alias.name}" + (
                f" as {alias.asname}" if alias.asname else "")
        elif not (isinstance(node, ast.ImportFrom) and module in inlined):
            found.foreign[name] = module
        elif alias.asname and alias.asname != alias.name:
            raise BundleError(f"{module_name}: 'import {alias.name} as {alias.asname}' from an "
                              f"inlined module is not supported")


def _collect(found: _Collected, module_name: str, inlined: set[str], siblings: dict[str, str]) -> None:
    """Add one module's top-level imports and definitions to `found`."""
    source = _rewrite_nested_imports(inspect.getsource(importlib.import_module(module_name)), inlined, siblings)
    lines = source.splitlines()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Expr, ast.Assert)):
            continue  # docstrings and import-time checks
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if _is_polyglu(node):
            _collect_polyglu_import(found, module_name, node, inlined, siblings)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found.imports[(None, 0, alias.name, alias.asname)] = (alias.asname or alias.name).split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                found.imports[(node.module, node.level, alias.name, alias.asname)] = alias.asname or alias.name
        else:
            text = _statement_source(lines, node)
            for name in _defined_names(node):
                if name in found.definitions and found.definitions[name][1] != text:
                    raise BundleError(f"{module_name}: top-level name {name!r} is also defined by an earlier "
                                      f"bundled module; rename one of them")
                found.definitions.setdefault(name, (found.order, text, _used_names(node)))
            found.order += 1


def _reachable(found: _Collected, roots: tuple[str, ...], modules: tuple[str, ...]) -> set[str]:
    """Names reachable from the roots, following top-level definitions only."""
    keep, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        if name in found.foreign:
            raise BundleError(f"the bundle needs {name!r} from {found.foreign[name]}, which is not inlined")
        if name in found.definitions:
            todo.extend(found.definitions[name][2] - keep)
    missing = [r for r in roots if r not in found.definitions]
    if missing:
        raise BundleError(f"roots not defined by {', '.join(modules)}: {', '.join(missing)}")
    return keep


def _render(found: _Collected, keep: set[str]) -> str:
    # one import line per module, with only the names used
    grouped: dict[tuple, list[ast.alias]] = {}
    for (module, level, name, asname), bound in found.imports.items():
        if bound in keep:
            key = ("from", module, level) if module is not None else ("import", name, asname)
            grouped.setdefault(key, []).append(ast.alias(name, asname))
    kept_imports = [ast.unparse(ast.ImportFrom(key[1], aliases, key[2]) if key[0] == "from" else ast.Import(aliases))
                    for key, aliases in grouped.items()]
    kept_relative = sorted({line for name, line in found.relative.items() if name in keep})
    blocks = {}
    for name in keep & set(found.definitions):
        position, text, _ = found.definitions[name]
        blocks[position] = text
    header = ('"""Generated by `polyglu export-hf` from the polyglu package: the definitions the Hugging\n'
              'Face classes need, copied from polyglu\'s own modules. Do not edit; re-export instead."""\n\n'
              "from __future__ import annotations\n\n")
    body = "\n".join(kept_imports + kept_relative) + "\n\n\n" + "\n\n\n".join(blocks[p] for p in sorted(blocks))
    return header + body + "\n"


def bundle_source(modules: tuple[str, ...], roots: tuple[str, ...], siblings: dict[str, str]) -> str:
    """One module's source holding `roots` and everything they reference from `modules`.

    siblings: polyglu module -> relative module (e.g. ".configuration_polychromatic") to import
    names from instead of inlining them.
    """
    found = _Collected()
    for module_name in modules:
        _collect(found, module_name, set(modules), siblings)
    return _render(found, _reachable(found, roots, modules))


def standalone_sources() -> dict[str, str]:
    """{file name: source} of the two generated modules."""
    return {CONFIG_FILE: bundle_source(*CONFIG_BUNDLE), MODELING_FILE: bundle_source(*MODELING_BUNDLE)}


def export_hf(model_dir: str | Path, out_dir: str | Path, dtype=None, chat: bool | None = None) -> Path:
    """Write `out_dir`: a Hugging Face directory loadable with trust_remote_code=True anywhere, and
    with plain `AutoModelForCausalLM` where `polyglu.interop.transformers` is imported.

    chat: whether generation also stops at `<|im_end|>` (default: a model trained with task "sft",
    or whose config ends at `<|im_end|>`)."""
    from polyglu.data.tokenizer import load_tokenizer
    from polyglu.interop.transformers import PolychromaticForCausalLM
    from polyglu.loading import load_model
    from polyglu.model_io import read_model_config

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _, meta = read_model_config(model_dir)
    # the fused kernel is not bundled: the standalone code takes the reference path ("auto")
    model = load_model(model_dir, dtype=dtype, mixed_impl="auto")
    wrapper = PolychromaticForCausalLM.from_polyglu(model)
    wrapper.config.auto_map = dict(AUTO_MAP)
    tokenizer_dir = model_dir / "tokenizer"
    if tokenizer_dir.is_dir():
        set_generation_ids(wrapper, load_tokenizer(tokenizer_dir), chat, meta.get("task"))
    # built beside and renamed into place whole: an interrupted export leaves no directory with weights
    # but no code or tokenizer (which transformers would then fail to load)
    with atomic_directory(out_dir) as tmp:
        wrapper.save_pretrained(tmp)
        for name, source in standalone_sources().items():
            (tmp / name).write_text(source)
        if tokenizer_dir.is_dir():
            copy_tokenizer(tokenizer_dir, tmp)
        # safetensors writes its files 0o600: make them readable as any other file this user writes
        for path in tmp.iterdir():
            if path.is_file():
                path.chmod(_new_file_mode())
    return out_dir


def set_generation_ids(wrapper, tokenizer, chat: bool | None = None, task: str | None = None) -> list[int]:
    """Put the document separator and padding ids in `wrapper.config`, and the tokens generation
    stops at in `wrapper.generation_config` (those of `polyglu generate`, with --chat for a chat
    model). Returns the stop ids."""
    from polyglu.data.special_tokens import IM_END
    from polyglu.loading import chat_stop_ids

    im_end = tokenizer.token_id(IM_END)
    if chat is None:
        chat = task == "sft" or (im_end is not None and wrapper.config.eos_token_id == im_end)
    stop_ids = chat_stop_ids(tokenizer) if chat else [tokenizer.eos_id]
    wrapper.config.eos_token_id = tokenizer.eos_id
    wrapper.config.pad_token_id = tokenizer.pad_id
    wrapper.generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    wrapper.generation_config.pad_token_id = tokenizer.pad_id
    return stop_ids


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> str:
    """Copy a tokenizer next to the weights, where AutoTokenizer looks. Returns its kind.

    A Hugging Face tokenizer is copied file by file (and given the ChatML chat template when it has
    none); polyglu's byte tokenizer is written as an equivalent `tokenizers` byte-level tokenizer
    (ids 0..255 = bytes, then the special tokens)."""
    from polyglu.data.tokenizer import BYTE_TOKENIZER_FILE, load_tokenizer, with_chat_template

    if (tokenizer_dir / BYTE_TOKENIZER_FILE).is_file():
        byte_level_tokenizer().save_pretrained(str(out_dir))
        return "byte"
    for path in tokenizer_dir.iterdir():
        if path.is_file() and path.name not in _MODEL_FILES:
            shutil.copy2(path, out_dir / path.name)
    tok = load_tokenizer(tokenizer_dir).tok
    if not getattr(tok, "chat_template", None):
        with_chat_template(tok).save_pretrained(str(out_dir))
    return "hf"


def _new_file_mode() -> int:
    """The mode `open()` gives a new file under the process umask (0o644 for umask 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def byte_level_tokenizer():
    """A PreTrainedTokenizerFast that encodes and decodes exactly like polyglu's ByteTokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from polyglu.data.special_tokens import EOS_TOKEN, PAD_TOKEN
    from polyglu.data.tokenizer import CHATML_TEMPLATE, ByteTokenizer

    byte_tok = ByteTokenizer()
    # ByteLevel maps each byte to a printable character; a vocabulary of those 256 characters with
    # no merges makes every byte its own token, id = byte value
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = sorted(byte_tok.special.items(), key=lambda item: item[1])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
    for token, token_id in specials:
        if tok.token_to_id(token) != token_id:
            raise RuntimeError(f"byte tokenizer special token {token} got id {tok.token_to_id(token)}, "
                               f"expected {token_id}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   chat_template=CHATML_TEMPLATE)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the one ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))

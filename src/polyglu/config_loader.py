"""Reading settings: YAML/JSON files and `key=value` overrides into validated dataclasses.

What the settings are lives beside what they configure (`polyglu.model_config` for the model,
`polyglu.train.config` for a run); this module knows only how to read them. A key read from a file
or the command line is checked by name: an unknown or mistyped key is an error that names it (and the
file, or the override), never silently dropped. Values are checked once, by the dataclass itself
(`__post_init__`). No torch here: the CLI reads configs before it imports torch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""



# --------------------------------------------------------------------------------------------
# generic dict -> dataclass conversion with strict key and type checks


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) `value` against a type annotation. Returns (ok, value)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True, value
    if origin is Literal:
        return value in args, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, coerced = _type_ok(value, arg)
            if ok:
                return True, coerced
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        item_type = args[0] if args else Any
        out = []
        for item in value:
            ok, coerced = _type_ok(item, item_type)
            if not ok:
                return False, value
            out.append(coerced)
        return True, (tuple(out) if origin is tuple else out)
    if origin is dict:
        return isinstance(value, dict), value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (dict, annotation)), value
    return True, value


def dataclass_from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types by name.

    Nested dataclass fields are built recursively; `where` prefixes key names in errors
    (e.g. "train.lr").
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{name}' (known keys: {known})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            kwargs[key] = dataclass_from_dict(annotation, value, name)
            continue
        ok, coerced = _type_ok(value, annotation)
        if not ok:
            raise ConfigError(
                f"config key '{name}' has {type(value).__name__} value {value!r}, expected {_type_name(annotation)}"
            )
        kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if where and not str(e).startswith(where):
            raise ConfigError(f"{where}: {e}") from None
        raise


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return getattr(annotation, "__name__", str(annotation))


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict, with errors that name the file (and line): unreadable,
    not UTF-8, a syntax error, a duplicate key, an empty file, or a top level that is not a mapping.
    YAML floats follow YAML 1.2 (`lr: 1e-3` is a float, as on the command line)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte offset "
                          f"{e.start}); save it as UTF-8") from None
    if not text.strip() or (path.suffix != ".json" and all(
            not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())):
        raise ConfigError(f"config file {path} is empty; expected a mapping (e.g. sections model, data, train)")
    try:
        data = _parse_json(text) if path.suffix == ".json" else _parse_yaml(text)
    except _ParseError as e:
        raise ConfigError(f"config file {path} line {e.line}: {e.message}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


class _ParseError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


def _parse_json(text: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _ParseError(0, f"duplicate key {key!r}")
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise _ParseError(e.lineno, f"invalid JSON at column {e.colno}: {e.msg}") from None
    except _ParseError as e:  # json gives no position for a duplicate: find the key's second occurrence
        key = e.message.split(" ", 2)[2]
        lines = [i for i, line in enumerate(text.splitlines(), 1) if f'"{key[1:-1]}"' in line]
        raise _ParseError(lines[1] if len(lines) > 1 else 1, e.message) from None


def _yaml_loader():
    """A SafeLoader that reads YAML 1.2 floats (`1e-3`, which YAML 1.1 leaves a string) and refuses
    duplicate keys (which YAML silently resolves to the last)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            # an alias (`*name`) may repeat a node exponentially often (a 1 KB "billion laughs" file
            # expands to gigabytes): a run config has no use for one, so it is refused where it appears
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise _ParseError(mark.line + 1, f"YAML alias '*{self.peek_event().anchor}' at column "
                                  f"{mark.column + 1}: aliases are not accepted in polyglu configs; write the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _ParseError(line, f"duplicate key {key!r} (first at line {seen[key]})")
                seen[key] = line
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
                   r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
        list("-+0123456789."))
    return Loader


def _parse_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        where = f" at column {mark.column + 1}" if mark is not None else ""
        context = ""
        if e.context and e.context_mark is not None and e.problem:
            context = f" ({e.context} started at line {e.context_mark.line + 1})"
        raise _ParseError(line, f"YAML syntax error{where}: {e.problem or e.context}{context}") from None
    except yaml.YAMLError as e:
        raise _ParseError(1, f"YAML error: {str(e).splitlines()[0]}") from None


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    return obj



def load_config(cls: type, path: str | Path | None, overrides: list[str] | None = None, **defaults: Any) -> Any:
    """Dataclass `cls` from a YAML/JSON file (or nothing), `defaults` for missing top-level keys, then
    dotted `key=value` overrides, built (and so checked) once. An error names its source: the file
    when the file is wrong without the overrides, else the override whose key the error names."""
    data = load_mapping(path) if path is not None else {}
    for key, value in defaults.items():
        data.setdefault(key, value)
    overrides = list(overrides or [])
    merged = copy.deepcopy(data) if overrides else data
    for item in overrides:
        # an override inside a mapping-valued section the file does not have (`model.d_model=128`
        # with no `model:`) refines that section's default ({"preset": "debug"}), not an empty one
        top = item.split("=", 1)[0].strip().split(".")[0]
        if "." in item.split("=", 1)[0] and top not in merged:
            default = _mapping_default(cls, top)
            if default is not None:
                merged[top] = default
        set_dotted(merged, item)
    try:
        return dataclass_from_dict(cls, merged)
    except ConfigError as e:
        error = e
    if overrides:  # only now, on the way to an error: is the file wrong on its own?
        try:
            dataclass_from_dict(cls, data)
        except ConfigError as e:
            error, overrides = e, []
    if overrides:
        raise ConfigError(f"{_command_line_culprit(str(error), overrides)}: {error}") from None
    raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from None


def _command_line_culprit(message: str, overrides: list[str]) -> str:
    """'command-line override KEY=VALUE' for the override whose key the error names, else all of them."""
    import re

    keys = [item.split("=", 1)[0].strip() for item in overrides]
    named = [item for item, key in zip(overrides, keys) if f"'{key}'" in message]  # as the key errors quote it
    if not named:  # a value error names the field: 'ModelConfig.n_heads (3) must be ...'
        named = [item for item, key in zip(overrides, keys)
                 if re.search(rf"\b{re.escape(key.split('.')[-1])}\b", message.split(" (known keys:")[0])]
    chosen = named or overrides
    return f"command-line override{'s' if len(chosen) > 1 else ''} {' '.join(chosen)}"


def _mapping_default(cls: type, name: str) -> dict[str, Any] | None:
    """A fresh copy of dataclass field `name`'s default when that default is a mapping, else None."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            return value if isinstance(value, dict) else None
    return None


def bundled_configs_dir() -> Path:
    """The repository's configs/ (demo, ablation and size presets as YAML) next to src/ in an
    editable install; the package ships no second copy."""
    return Path(__file__).resolve().parents[2] / "configs"


def set_dotted(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict; the value is parsed as YAML."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_steps=20)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_yaml_loader()) if raw != "" else None
    except (yaml.YAMLError, _ParseError):
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{part}' is not a section")
    node[parts[-1]] = value

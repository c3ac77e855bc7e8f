"""Strict dataclass configs: JSON files and `--set KEY=VALUE` overrides parsed into frozen dataclasses.

    cfg = from_dict(DPGRecipeConfig, {"learning_rate": 3e-4, "steps": 6}, "train.dpg")
    cfg = load_json(MyConfig, "configs/run.json", ["train.dpg.learning_rate=1e-2"])
    data = to_dict(cfg)                       # JSON-ready, round-trips through from_dict
    digest = config_hash(cfg)                 # 12 hex digits of the canonical JSON

Every field of a config dataclass has one default (or none: then it is required). An unknown or misspelled
key is an error that names the key, where it was found and the valid keys; a missing required field too.
Nested dataclass fields are built from nested dicts; lists become tuples where the field is a tuple;
ints are accepted for float fields. A field typed `dict[str, X]` maps any names to X (a dataclass or a plain
value). A dataclass may define `from_dict_hook(cls, data, where)` to build itself (e.g. a section whose
value types depend on its keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config key or value that does not fit its dataclass; the message names the key and the fix."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _convert(t, value, where: str):
    """`value` (parsed JSON) as type `t`, recursing into dataclasses, tuples, lists and dicts."""
    if t is Any or value is None and _allows_none(t):
        return value
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {t}")
    if _is_dataclass_type(t):
        return from_dict(t, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args or [Any] * len(value), value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0] if args else Any, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (a JSON object), got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if t is int:
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if t is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _allows_none(t) -> bool:
    return t is type(None) or typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in typing.get_args(t)


def from_dict(cls, data, where: str = "config"):
    """Build the dataclass `cls` from a dict; `where` names the section in error messages (e.g. "train.dpg").

    An unknown key -> ConfigError naming it and the valid keys; a missing required field -> ConfigError.
    An instance of `cls` is returned unchanged.
    """
    if isinstance(data, cls):
        return data
    if hook := getattr(cls, "from_dict_hook", None):
        return hook(data, where)
    return build(cls, data, where)


def build(cls, data, where: str = "config"):
    """`from_dict` without `cls.from_dict_hook` (what a hook calls after adjusting `data`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a section (a JSON object) for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where} ({cls.__name__}); valid keys: {', '.join(fields)}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where} ({cls.__name__}) needs {', '.join(repr(m) for m in missing)}")
    types_ = _field_types(cls)
    kwargs = {k: _convert(types_[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where} ({cls.__name__}): {e}") from None


def to_dict(obj):
    """A config as JSON-ready data (dataclasses -> dicts, tuples -> lists); `from_dict` inverts it."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def config_hash(obj) -> str:
    """12 hex digits of the SHA-256 of the config's canonical JSON (sorted keys): equal configs, equal hashes."""
    text = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_setting(item: str) -> tuple[list[str], Any]:
    """`KEY=VALUE` -> (the dotted KEY split into names, VALUE as JSON when it parses, else the string)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. --set train.dpg.learning_rate=3e-4")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def apply_settings(data: dict, settings: list[str]) -> dict:
    """A copy of the dict `data` with `KEY=VALUE` overrides applied (missing sections are created). Whether
    a key exists is checked when the result is parsed into its dataclass (`from_dict`), which names it."""
    out = json.loads(json.dumps(data))
    for item in settings:
        path, value = parse_setting(item)
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {name!r} is not a section of the config")
        node[path[-1]] = value
    return out


def load_json(cls, path: str | pathlib.Path, settings: list[str] = (), where: str | None = None):
    """The JSON file `path` with `KEY=VALUE` overrides, parsed into `cls`."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_dict(cls, apply_settings(data, list(settings)), where or str(path))

"""Typed config machinery: dataclass schemas, YAML overlay, `--set key=value` overrides.

A config is a tree of dataclasses. Every field is declared with `opt(default, "help line")`. A YAML file
overlays the defaults; `--set section.key=value` overlays the YAML. Unknown keys are errors that name the
key and suggest the closest valid one; values are converted to the declared type or rejected.

Supported field types: bool, int, float, str, Literal[...], X | None, list[T], dict[str, T], nested dataclasses.
A dataclass that defines `from_scalar(value)` also accepts a bare scalar (used by schedules: `eps_low: 0.2`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the key."""


def opt(default: Any, help: str, *, path: bool = False) -> Any:
    """A config field with a default and a one-line help text. path=True: a file system path (see resolve_paths)."""
    meta = {"help": help, "path": path}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):

        def factory(d=default):
            return _copy(d)

        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def resolve_paths(obj: Any, data: dict, base: Path) -> Any:
    """Make the relative path fields that `data` (a YAML mapping) sets relative to `base` (its directory), as
    absolute paths: the resolved config (saved in every checkpoint) then means the same from any directory."""

    changes = {}
    for f in dataclasses.fields(obj):
        if f.name not in data:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and isinstance(data[f.name], dict):
            changes[f.name] = resolve_paths(value, data[f.name], base)
        elif f.metadata.get("path") and isinstance(value, str) and value and not Path(value).is_absolute():
            changes[f.name] = os.path.abspath(base / value)
    return dataclasses.replace(obj, **changes) if changes else obj


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


def field_help(cls: type, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _suggest(key: str, options: list[str], parent: str = "") -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    prefix = f"{parent}." if parent else ""
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys under '{parent or 'the top level'}': {', '.join(sorted(options))}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if hasattr(tp, "from_scalar"):
        return f"{tp.__name__} (or a number)"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def convert(value: Any, tp: Any, where: str, *, from_cli: bool = False) -> Any:
    """Convert `value` to the annotated type `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_cli and str(value).lower() in ("null", "none", "~"))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, where, from_cli=from_cli)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads off/no/false and on/yes/true as booleans
            spelled = [c for c in choices if str(c).lower() in (_TRUE if value else _FALSE)]
            if len(spelled) == 1:
                return spelled[0]
        if value in choices:
            return value
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return overlay(tp(), value, where)
        if hasattr(tp, "from_scalar") and not isinstance(value, (list, dict)):
            return tp.from_scalar(convert(value, float, where, from_cli=from_cli))
        raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
    if origin is list:
        if from_cli and isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if from_cli and isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {str(k): convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads "1e-6" as a string; accept it as the number it is
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # no setting means anything at inf or NaN; they poison a run silently
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def overlay(obj: Any, data: dict, where: str = "") -> Any:
    """Return a copy of dataclass `obj` with the values in `data` applied (recursively, type-checked)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj) if f.init]
    changes = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{path}'" + _suggest(str(key), names, where))
        tp = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = overlay(current, value, path)
        elif typing.get_origin(tp) is dict and isinstance(value, dict) and isinstance(current, dict):
            _, val_tp = typing.get_args(tp)
            merged = dict(current)
            for k, v in value.items():
                sub = f"{path}.{k}"
                if dataclasses.is_dataclass(val_tp) and isinstance(v, dict) and k in merged:
                    merged[str(k)] = overlay(merged[k], v, sub)
                else:
                    merged[str(k)] = convert(v, val_tp, sub)
            changes[key] = merged
        else:
            changes[key] = convert(value, tp, path)
    return dataclasses.replace(obj, **changes)


def set_override(obj: Any, assignment: str) -> Any:
    """Apply one `a.b.c=value` override (value converted to the field's type) and return the new config."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = [k for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"override '{assignment}' has an empty key")
    return _set_path(obj, keys, raw, "")


def _set_path(obj: Any, keys: list[str], raw: str, where: str) -> Any:
    key, rest = keys[0], keys[1:]
    path = f"{where}.{key}" if where else key
    names = [f.name for f in dataclasses.fields(obj) if f.init]
    if key not in names:
        raise ConfigError(f"unknown key '{path}'" + _suggest(key, names, where))
    tp = _hints(type(obj))[key]
    current = getattr(obj, key)
    if not rest:
        new = convert(_cli_value(raw, tp), tp, path, from_cli=True)
        field = next(f for f in dataclasses.fields(obj) if f.name == key)
        if field.metadata.get("path") and isinstance(new, str) and new:
            new = os.path.abspath(new)  # relative to the current directory
    elif dataclasses.is_dataclass(current):
        new = _set_path(current, rest, raw, path)
    elif isinstance(current, dict):
        # a mapping with free keys (e.g. rewards.<name>): set or create one entry
        _, val_tp = typing.get_args(tp)
        entry, entry_rest = rest[0], rest[1:]
        entry_path = f"{path}.{entry}"
        new = dict(current)
        if not entry_rest:
            new[entry] = convert(_cli_value(raw, val_tp), val_tp, entry_path, from_cli=True)
        elif dataclasses.is_dataclass(val_tp):
            child = new[entry] if entry in new else val_tp()
            new[entry] = _set_path(child, entry_rest, raw, entry_path)
        else:
            raise ConfigError(
                f"'{entry_path}' is a value, not a section; cannot set '{entry_path}.{'.'.join(entry_rest)}'"
            )
    else:
        raise ConfigError(f"'{path}' is a value, not a section; cannot set '{path}.{'.'.join(rest)}'")
    return dataclasses.replace(obj, **{key: new})


def _cli_value(raw: str, tp: Any) -> Any:
    """Strings stay strings for str fields; everything else is read as YAML first (lists, mappings, null)."""
    if tp is str or (typing.get_origin(tp) is Literal and raw in typing.get_args(tp)):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def to_dict(obj: Any) -> Any:
    if hasattr(obj, "to_yaml"):
        return obj.to_yaml()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, help) for every field, for `ttsrl config keys`-style listings and docs."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp) and not hasattr(tp, "from_scalar"):
            rows.extend(describe(tp, key + "."))
        else:
            rows.append((key, _type_name(tp), f.metadata.get("help", "")))
    return rows

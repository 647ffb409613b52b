"""Read a HyperPyYAML model config (upstream `flow/config.yaml`) without executing anything.

HyperPyYAML's `!new:module.Class` tag instantiates arbitrary Python classes at load time. Here the tags are only
parsed: `!new:<dotted.name>` on a mapping becomes `TaggedObject(name, kwargs)`, and the caller decides what the
name may be. Any other tag (`!ref`, `!name:`, `!apply:`, `!include:`, ...) is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


class HyperPyYAMLError(ValueError):
    """The file uses a construct this reader does not evaluate, or is not valid YAML."""


@dataclass(frozen=True)
class TaggedObject:
    name: str  # e.g. "flow.flow.Flow"
    kwargs: dict


class _Loader(yaml.SafeLoader):
    pass


def _new(loader: _Loader, suffix: str, node: yaml.Node) -> TaggedObject:
    if not isinstance(node, yaml.MappingNode):
        raise HyperPyYAMLError(
            f"line {node.start_mark.line + 1}: !new:{suffix} must tag a mapping of keyword arguments"
        )
    return TaggedObject(suffix, loader.construct_mapping(node, deep=True))


def _refuse(loader: _Loader, suffix: str, node: yaml.Node):
    raise HyperPyYAMLError(
        f"line {node.start_mark.line + 1}: tag '{node.tag}' is not supported (only !new:<class> with literal "
        f"keyword arguments is read; nothing in a config file is executed)"
    )


_Loader.add_multi_constructor("!new:", _new)
_Loader.add_multi_constructor("!", _refuse)


def read_hyperpyyaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except HyperPyYAMLError as e:
        raise HyperPyYAMLError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise HyperPyYAMLError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise HyperPyYAMLError(f"{path}: expected a mapping at the top level")
    return data


def expect_object(data: dict, key: str, allowed: dict[str, type], where: str):
    """Instantiate `data[key]`, a !new:<name> object, with `allowed[name]` (a class), checking kwargs."""
    import inspect

    obj = data.get(key)
    if not isinstance(obj, TaggedObject):
        raise HyperPyYAMLError(f"{where}: expected `{key}: !new:<class>` with keyword arguments")
    if obj.name not in allowed:
        raise HyperPyYAMLError(f"{where}: class '{obj.name}' is not supported; expected one of {sorted(allowed)}")
    cls = allowed[obj.name]
    params = inspect.signature(cls).parameters
    unknown = [k for k in obj.kwargs if k not in params]
    if unknown:
        raise HyperPyYAMLError(f"{where}: {obj.name} has no argument(s) {unknown}; it takes {list(params)}")
    return cls(**obj.kwargs)

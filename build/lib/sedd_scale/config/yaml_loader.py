"""Recipe YAML: PyYAML's safe loader with the fixes recipes need (floats like 3e-4, duplicate keys and non-finite
numbers refused, errors naming file and line), and `--set key.path=value` overrides parsed the same way."""
from __future__ import annotations

import re
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be used: the message names the key and the fix."""


# ---------------------------------------------------------------------------------------------
# YAML: PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string; recipes mean a float.
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # PyYAML keeps the last of two equal keys; in a recipe that silently drops a setting.
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark,
                f"found the key {key!r} twice (first on line {seen[key].start_mark.line + 1}): "
                "keep one of them", key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str, source: str = "<text>") -> Any:
    """Parse YAML text, reading `1e-4`-style numbers as floats; a syntax error or a duplicate key is a
    RecipeError naming `source` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        raise RecipeError(f"{where}: {problem}{f' ({context})' if context else ''}: fix the YAML") from None



def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a raw recipe mapping, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=1e-4)")
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = parse_yaml(text, f"override {item!r}")
    return data

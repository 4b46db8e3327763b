"""YAML loading that remembers the line of every key, so errors can say `file:line: key`."""

from __future__ import annotations

from typing import Any

import yaml

from mergecli.errors import RecipeError

Path_ = tuple[str | int, ...]


def load_yaml_with_lines(text: str, filename: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML text; return the data and a map from key path to 1-based line number."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or str(exc)
        raise RecipeError([f"{filename}:{line}: invalid YAML: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([f"{filename}: invalid YAML: {exc}"]) from None
    lines: dict[Path_, int] = {}
    duplicates: list[str] = []
    if node is not None:
        _walk(node, (), lines, duplicates, filename)
    if duplicates:
        raise RecipeError(duplicates)
    return data, lines


def _walk(
    node: yaml.Node, path: Path_, lines: dict[Path_, int], duplicates: list[str], filename: str
) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*path, key)
            if key in seen:
                # PyYAML silently keeps the last value; a recipe with two `lr:` is a mistake.
                dotted = ".".join(str(p) for p in child)
                duplicates.append(
                    f"{filename}:{key_node.start_mark.line + 1}: {dotted}: duplicate key"
                )
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            _walk(value_node, child, lines, duplicates, filename)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), lines, duplicates, filename)

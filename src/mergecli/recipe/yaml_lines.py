"""YAML loading that remembers the line of every key, so errors can say `file:line: key`.

Aliases make a small file stand for a huge document ("billion laughs"), and PyYAML composes
and constructs recursively. So the text's nesting is checked on the parser's events before
anything is composed, and the size and depth the aliases would expand to are counted on the
composed node graph (shared nodes once) before any data is constructed.
"""

from __future__ import annotations

from typing import Any

import yaml

from mergecli.errors import Problem, RecipeError

Path_ = tuple[str | int, ...]

MAX_NODES = 100_000  # values after expanding aliases; real recipes have a few hundred
MAX_DEPTH = 100  # nesting levels, also after expanding aliases


def load_yaml_with_lines(text: str, filename: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML text; return the data and a map from key path to 1-based line number."""
    loader = yaml.SafeLoader(text)
    lines: dict[Path_, int] = {}
    try:
        _check_nesting(text, filename)
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _check_expansion(node, filename)
        # Before constructing, which flattens `<<` merge keys into the nodes in place.
        duplicates = _walk(node, lines, filename)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or str(exc)
        raise RecipeError([Problem(f"invalid YAML: {problem}", filename, line)]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(f"invalid YAML: {exc}", filename)]) from None
    finally:
        loader.dispose()
    if duplicates:
        raise RecipeError(duplicates)
    return data, lines


def _check_nesting(text: str, filename: str) -> None:
    """Refuse text nested deeper than MAX_DEPTH: PyYAML's composer would hit Python's recursion
    limit. The parser itself keeps an explicit stack, so scanning its events is safe."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise RecipeError([_too_deep(filename, event.start_mark.line + 1)])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _too_deep(filename: str, line: int) -> Problem:
    return Problem(
        f"nested deeper than {MAX_DEPTH} levels (aliases included); "
        "a recipe needs a handful: flatten it",
        filename,
        line,
    )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, filename: str) -> None:
    """Refuse a document whose aliases expand to more than MAX_NODES values, deeper than
    MAX_DEPTH, or into themselves. An alias is the very node it names, so sizes are memoised
    per node: each node is counted once, however often it is referred to."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once expanded
    open_nodes: set[int] = set()  # on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            below = [sizes[id(child)] for child in _children(node)]
            values = 1 + sum(size for size, _ in below)
            nests = isinstance(node, (yaml.MappingNode, yaml.SequenceNode))
            depth = int(nests) + max((d for _, d in below), default=0)
            line = node.start_mark.line + 1
            if values > MAX_NODES:
                raise RecipeError(
                    [
                        Problem(
                            f"its aliases expand to more than {MAX_NODES:,} values; write the "
                            "values out or use fewer nested aliases",
                            filename,
                            line,
                        )
                    ]
                )
            if depth > MAX_DEPTH:
                raise RecipeError([_too_deep(filename, line)])
            sizes[key] = (values, depth)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise RecipeError(
                [
                    Problem(
                        "an alias refers to a value that contains it (a recursive structure); "
                        "recipes cannot be recursive",
                        filename,
                        node.start_mark.line + 1,
                    )
                ]
            )
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))


def _walk(root: yaml.Node, lines: dict[Path_, int], filename: str) -> list[Problem]:
    """Record the line of every key path; return the duplicate-key problems.

    Iterative, and each node is entered once: a subtree reached again through an alias has its
    lines recorded under its first path only (a key holding the alias still has its own line).
    """
    duplicates: list[Problem] = []
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, Path_]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in entered:
            continue
        entered.add(id(node))
        pending: list[tuple[yaml.Node, Path_]] = []
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # a list or mapping as a key: constructing the data refuses it
                key = key_node.value
                child = (*path, key)
                if key in seen:
                    # PyYAML silently keeps the last value; a recipe with two `lr:` is a mistake.
                    dotted = ".".join(str(p) for p in child)
                    duplicates.append(
                        Problem("duplicate key", filename, key_node.start_mark.line + 1, dotted)
                    )
                seen.add(key)
                lines[child] = key_node.start_mark.line + 1
                pending.append((value_node, child))
        elif isinstance(node, yaml.SequenceNode):
            pending = [(item, (*path, index)) for index, item in enumerate(node.value)]
        stack.extend(reversed(pending))  # popped in document order: problems come in order
    return duplicates

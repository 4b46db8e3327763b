"""Recipe problems as ``file:line: key: message`` lines: where a key path stands in the file,
pydantic's errors in the recipe's own keys, and "did you mean" for unknown names."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Tag, ValidationError

from mergecli.errors import Problem
from mergecli.recipe.yaml_lines import Path_


@dataclass(frozen=True)
class Locator:
    """Turns a key path into ``file:line: dotted.key`` (or ``--set dotted.key`` when overridden)."""

    filename: str
    lines: dict[Path_, int]
    overridden: set[Path_]

    def __call__(self, path: Path_, message: str) -> Problem:
        dotted = ".".join(str(p) for p in path) or "(top level)"
        for length in range(len(path), 0, -1):
            if path[:length] in self.overridden:
                option = f"--set {'.'.join(str(p) for p in path[:length])}"
                return Problem(message, key=dotted, text=f"{option}: {dotted}: {message}")
        for length in range(len(path), -1, -1):
            if path[:length] in self.lines:
                return Problem(message, self.filename, self.lines[path[:length]], dotted)
        return Problem(message, self.filename, key=dotted)


def validation_problems(
    exc: ValidationError,
    root: type[BaseModel],
    prefix: Path_,
    data: dict[str, Any],
    where: Locator,
) -> list[Problem]:
    """One ``file:line: key: message`` line per pydantic error."""
    problems = []
    errors = [(tuple(p for p in e["loc"] if not _is_internal(p)), e) for e in exc.errors()]
    # A misspelt required key is reported once, as the misspelling, not also as missing.
    suggested = set()
    for loc, error in errors:
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _allowed_keys(root, loc[:-1]), n=1)
            suggested.update((*loc[:-1], name) for name in close)
    reported: set[Path_] = set()
    for loc, error in errors:
        path = _data_path(data, prefix, loc, missing=error["type"] == "missing")
        if error["type"] == "missing" and loc in suggested:
            continue
        if path in reported:
            continue  # a value failing every form of a union: report its first (scalar) form
        reported.add(path)
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc[:-1])
            message = unknown_name("key", str(loc[-1]), allowed)
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = error["msg"]
            message = message[0].lower() + message[1:]
            if message.startswith("value error, "):
                message = message[len("value error, ") :]
            given = error.get("input")
            if isinstance(given, (int, float, str, bool)) and error["type"] != "value_error":
                message += f" (got {given!r})"
        problems.append(where(path, message))
    return problems


def _data_path(data: Any, prefix: Path_, loc: Path_, missing: bool) -> Path_:
    """The error's location as keys of the recipe, dropping pydantic's union-member tags."""
    node: Any = data
    for part in prefix:
        node = node[part] if isinstance(node, (dict, list)) else None
    path = list(prefix)
    for i, part in enumerate(loc):
        if _has(node, part):
            node = node[part]
        elif not (missing and i == len(loc) - 1):
            continue  # a tag pydantic added, not a key of the recipe
        path.append(part)
    return tuple(path)


def _has(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and part < len(node)


def _is_internal(part: str | int) -> bool:
    """Pydantic adds entries such as 'function-after[...]' to error locations."""
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _allowed_keys(model: type[BaseModel], loc: Path_) -> list[str]:
    """The keys the schema accepts at ``loc`` (used for "did you mean")."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        tagged = _tagged_member(annotation, part)
        if tagged is not None:
            annotation = tagged  # a form of a tagged union (e.g. a parameter's list of filters)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = annotation.model_fields
            field = fields.get(str(part)) or next(
                (f for f in fields.values() if f.alias == part), None
            )
            if field is None:
                return []
            annotation = field.annotation
        elif typing.get_origin(annotation) in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [field.alias or name for name, field in annotation.model_fields.items()]
    return []


def _tagged_member(annotation: Any, part: str | int) -> Any:
    """The member of a union marked ``Tag(part)``, if there is one."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    for member in typing.get_args(annotation):
        if typing.get_origin(member) is typing.Annotated:
            tags = [m.tag for m in member.__metadata__ if isinstance(m, Tag)]
            if part in tags:
                return member
    return None


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` -> ``X``; ``X | None`` -> ``X``; both, nested in any order."""
    while True:
        while typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
            return annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return annotation
        annotation = args[0]


def unknown_name(what: str, name: str, allowed: Any) -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    listing = f" (allowed: {', '.join(allowed)})" if allowed else ""
    return f"unknown {what} '{name}'{hint}{listing}"

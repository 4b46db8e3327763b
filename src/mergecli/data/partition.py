"""Splitting one dataset between models: a class subset (the NP Merge paper's 50/50 CIFAR-100
pairs) or a label-skewed Dirichlet partition (Hsu et al. 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification").

A data spec's ``partition:`` holds one of
``{classes: "0-49"}`` (the labels kept as they are, so the heads of the pair stay comparable) or
``{dirichlet: ALPHA, parts: N, part: I, seed: S}``; ``mergecli train --split`` writes the same
mapping from ``classes:0-49`` or ``dirichlet:alpha=0.5:part=0/2[:seed=S]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mergecli.data.batches import TensorData
from mergecli.errors import MergeCliError

CLASSES_HELP = "a range '0-49', a list '0,2,5-9', or a YAML list of integer labels"
SPLIT_HELP = "classes:0-49 or dirichlet:alpha=0.5:part=0/2 (optionally :seed=N)"
# The Dirichlet partition's seed when the spec gives none: the same for every model, so that
# part 0 and part 1 of a pair are disjoint whatever --seed each model is trained with.
DEFAULT_SEED = 0


@dataclass(frozen=True)
class ClassSplit:
    """Keep only these labels (as they are: no renumbering)."""

    classes: tuple[int, ...]


@dataclass(frozen=True)
class DirichletSplit:
    """Part ``part`` of ``parts``: per class, shares ~ Dirichlet(alpha) over the parts."""

    alpha: float
    parts: int
    part: int
    seed: int


Partition = ClassSplit | DirichletSplit


def parse_classes(value: Any, where: str) -> tuple[int, ...]:
    """``"0-49"``, ``"0,2,5-9"``, ``7`` or ``[0, 1, 2]`` -> the sorted distinct labels."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        labels: list[int] = []
        for piece in value.split(","):
            low, dash, high = piece.strip().partition("-")
            try:
                first, last = int(low), int(high) if dash else int(low)
            except ValueError:
                raise MergeCliError(
                    f"{where}: cannot read {value!r} as classes; use {CLASSES_HELP}"
                ) from None
            if first < 0 or last < first:
                raise MergeCliError(
                    f"{where}: {piece.strip()!r} is not a range of labels low-high with "
                    f"0 <= low <= high; use {CLASSES_HELP}"
                )
            labels.extend(range(first, last + 1))
        value = labels
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value)
    ):
        raise MergeCliError(f"{where}: cannot read {value!r} as classes; use {CLASSES_HELP}")
    return tuple(sorted(set(value)))


def parse_partition(value: Any, where: str) -> Partition:
    """A data spec's ``partition`` mapping, checked: one line naming the key otherwise."""
    if isinstance(value, (ClassSplit, DirichletSplit)):
        return value
    if not isinstance(value, Mapping):
        raise MergeCliError(
            f"{where}: expected a mapping such as {{classes: '0-49'}} or "
            f"{{dirichlet: 0.5, parts: 2, part: 0}}, got {value!r}"
        )
    kinds = [key for key in ("classes", "dirichlet") if key in value]
    if len(kinds) != 1:
        raise MergeCliError(
            f"{where}: give exactly one of classes or dirichlet, got "
            f"{', '.join(map(str, value)) or 'neither'}"
        )
    allowed = {"classes"} if kinds == ["classes"] else {"dirichlet", "parts", "part", "seed"}
    unknown = [str(key) for key in value if key not in allowed]
    if unknown:
        raise MergeCliError(
            f"{where}: {kinds[0]} takes no {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(allowed))}"
        )
    if kinds == ["classes"]:
        return ClassSplit(parse_classes(value["classes"], f"{where}.classes"))
    alpha = value["dirichlet"]
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise MergeCliError(
            f"{where}.dirichlet: the concentration alpha must be a number > 0 (e.g. 0.5; smaller "
            f"is more skewed), got {alpha!r}"
        )
    parts, part, seed = value.get("parts"), value.get("part"), value.get("seed", DEFAULT_SEED)
    for key, number, low in (("parts", parts, 2), ("part", part, 0), ("seed", seed, 0)):
        if isinstance(number, bool) or not isinstance(number, int) or number < low:
            raise MergeCliError(f"{where}.{key}: expected an integer >= {low}, got {number!r}")
    if part >= parts:
        raise MergeCliError(
            f"{where}.part: {part} is not one of the {parts} parts; "
            f"parts are numbered 0..{parts - 1}"
        )
    return DirichletSplit(float(alpha), parts, part, seed)


def parse_split_option(text: str, where: str = "--split") -> dict[str, Any]:
    """``--split`` on the command line -> the data spec's ``partition`` mapping."""
    kind, _, rest = text.strip().partition(":")
    if kind == "classes":
        partition: dict[str, Any] = {"classes": rest}
    elif kind == "dirichlet":
        fields: dict[str, str] = {}
        for item in rest.split(":") if rest else []:
            key, eq, raw = item.partition("=")
            if not eq or key not in ("alpha", "part", "seed") or key in fields:
                raise MergeCliError(f"{where} {text}: cannot read {item!r}; use {SPLIT_HELP}")
            fields[key] = raw
        if "alpha" not in fields or "part" not in fields:
            raise MergeCliError(f"{where} {text}: needs alpha= and part=I/N; use {SPLIT_HELP}")
        part, slash, parts = fields["part"].partition("/")
        if not slash:
            raise MergeCliError(f"{where} {text}: part is I/N (part I of N); use {SPLIT_HELP}")
        try:
            partition = {
                "dirichlet": float(fields["alpha"]),
                "parts": int(parts),
                "part": int(part),
            }
            if "seed" in fields:
                partition["seed"] = int(fields["seed"])
        except ValueError:
            raise MergeCliError(
                f"{where} {text}: cannot read its numbers; use {SPLIT_HELP}"
            ) from None
    else:
        raise MergeCliError(f"{where} {text}: unknown split {kind!r}; use {SPLIT_HELP}")
    try:
        parse_partition(partition, "partition")
    except MergeCliError as exc:  # in the option's words: "--split TEXT: part: ..."
        reason = str(exc).removeprefix("partition").lstrip(".: ")
        raise MergeCliError(f"{where} {text}: {reason}") from None
    return partition


def describe_partition(value: Any) -> str:
    """A partition in the ``--split`` syntax, e.g. for a log line or checkpoint metadata."""
    split = parse_partition(value, "partition")
    if isinstance(split, ClassSplit):
        return f"classes:{_ranges(split.classes)}"
    return f"dirichlet:alpha={split.alpha:g}:part={split.part}/{split.parts}:seed={split.seed}"


def _ranges(labels: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    runs: list[list[int]] = []
    for label in labels:
        if runs and label == runs[-1][1] + 1:
            runs[-1][1] = label
        else:
            runs.append([label, label])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def dirichlet_parts(labels: Tensor, alpha: float, parts: int, seed: int) -> Tensor:
    """Which part (0..parts-1) each example belongs to: for every class in turn (ascending),
    its examples are shuffled and cut at shares p ~ Dirichlet(alpha, ..., alpha) over the
    parts, so every example is in exactly one part (Hsu et al. 2019). numpy's PCG64 draws
    them: the same seed gives the same partition on every machine."""
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    owner = np.empty(len(y), dtype=np.int64)
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        rows = rows[rng.permutation(len(rows))]
        shares = rng.dirichlet(np.full(parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
        for index, piece in enumerate(np.split(rows, cuts)):
            owner[piece] = index
    return torch.from_numpy(owner)


def apply_partition(data: TensorData, value: Any, where: str) -> TensorData:
    """The examples of ``data`` in the partition ``value`` (None: all of them)."""
    if value is None:
        return data
    split = parse_partition(value, where)
    if isinstance(split, ClassSplit):
        keep = torch.isin(data.y, torch.tensor(split.classes, dtype=torch.int64))
    else:
        keep = dirichlet_parts(data.y, split.alpha, split.parts, split.seed) == split.part
    return data.take(keep)

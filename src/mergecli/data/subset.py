"""Choosing which examples to keep: slice splits, class filters, per-class fractions (a
class-biased share, as ZipIt!'s and NP Merge's biased splits), balancing and fractions."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mergecli.data.batches import TensorData
from mergecli.data.partition import CLASSES_HELP, apply_partition, describe_partition, parse_classes
from mergecli.errors import MergeCliError

SPLIT_HELP = "a slice 'a:b' such as '0:1000', ':500' or '9000:'"


def parse_slice(split: Any, n: int, where: str) -> tuple[int, int]:
    """Resolve a python-style ``"a:b"`` slice against ``n`` examples to ``(start, stop)``."""
    key = f"{where}.split"
    if not isinstance(split, str) or split.count(":") != 1:
        raise MergeCliError(f"{key}: cannot parse {split!r}; use {SPLIT_HELP}")
    bounds: list[int | None] = []
    for part in split.split(":"):
        part = part.strip()
        if not part:
            bounds.append(None)
            continue
        try:
            bounds.append(int(part))
        except ValueError:
            raise MergeCliError(f"{key}: cannot parse {split!r}; use {SPLIT_HELP}") from None
    start = _resolve(bounds[0], 0, n)
    stop = _resolve(bounds[1], n, n)
    if not (0 <= start <= n and 0 <= stop <= n):
        # Python would silently clamp; a typo like "0:80000" should be loud instead.
        raise MergeCliError(
            f"{key}: {split!r} is out of range for {n} examples; keep both bounds within 0..{n}"
        )
    if stop <= start:
        raise MergeCliError(
            f"{key}: {split!r} selects no examples out of {n}; use start < stop, e.g. '0:{n}'"
        )
    return start, stop


def _resolve(bound: int | None, default: int, n: int) -> int:
    """Turn an optional, possibly negative, slice bound into an absolute index."""
    if bound is None:
        return default
    return bound + n if bound < 0 else bound


def parse_class_fractions(value: Any, where: str) -> dict[int, float]:
    """``{"5-9": 0.1, 3: 0.5}`` -> ``{5: 0.1, ..., 9: 0.1, 3: 0.5}``: each key a label or labels
    (as ``classes`` reads them), each value the share of that class's examples to keep."""
    if not isinstance(value, Mapping) or not value:
        raise MergeCliError(
            f"{where}: expected a mapping from labels to the share kept, e.g. {{'5-9': 0.1}}, "
            f"got {value!r}"
        )
    shares: dict[int, float] = {}
    for key, share in value.items():
        labels = parse_classes(key, f"{where}.{key}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise MergeCliError(f"{where}.{key}: expected a share in (0, 1], got {share!r}")
        twice = sorted(set(labels) & set(shares))
        if twice:
            raise MergeCliError(
                f"{where}.{key}: label {twice[0]} is named twice; give each label one share "
                f"({CLASSES_HELP} as keys)"
            )
        shares.update(dict.fromkeys(labels, float(share)))
    return shares


def format_labels(labels: Tensor) -> str:
    """Describe a set of labels compactly, e.g. ``0..9`` or ``1, 3, 7``."""
    present = sorted(int(v) for v in torch.unique(labels).tolist())
    if not present:
        return "none"
    if len(present) > 2 and present[-1] - present[0] + 1 == len(present):
        return f"{present[0]}..{present[-1]}"
    shown = ", ".join(str(v) for v in present[:20])
    return shown + (", ..." if len(present) > 20 else "")


def _take(data: TensorData, index: Tensor) -> TensorData:
    """Rows of ``data`` at ``index`` (kept in dataset order so results read naturally)."""
    index, _ = torch.sort(index)
    return data.take(index)


def apply_subset(data: TensorData, spec: Mapping[str, Any], seed: int, where: str) -> TensorData:
    """Apply the ``classes``, ``partition``, ``class_fractions``, ``balanced`` and ``fraction``
    options of ``spec``, in that order."""
    labels_before = format_labels(data.y)
    gen = torch.Generator().manual_seed(int(seed))
    applied: list[str] = []

    classes = spec.get("classes")
    if classes is not None:
        if not isinstance(classes, (list, tuple)) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in classes
        ):
            raise MergeCliError(
                f"{where}.classes: expected a list of integer labels, got {classes!r}"
            )
        keep = torch.isin(data.y, torch.tensor(list(classes), dtype=torch.int64))
        data = data.take(keep)
        applied.append(f"classes={list(classes)}")

    if spec.get("partition") is not None:
        data = apply_partition(data, spec["partition"], f"{where}.partition")
        applied.append(f"partition {describe_partition(spec['partition'])}")

    if spec.get("class_fractions") is not None:
        shares = parse_class_fractions(spec["class_fractions"], f"{where}.class_fractions")
        chosen = [torch.nonzero(~torch.isin(data.y, torch.tensor(list(shares)))).flatten()]
        for label, share in sorted(shares.items()):
            rows = torch.nonzero(data.y == label).flatten()
            # Round half up, as `fraction`; a class present keeps at least one example.
            k = max(math.floor(share * len(rows) + 0.5), min(1, len(rows)))
            chosen.append(rows[torch.randperm(len(rows), generator=gen)[:k]])
        data = _take(data, torch.cat(chosen))
        applied.append(f"class_fractions={shares}")

    balanced = spec.get("balanced", False)
    if balanced is None:
        balanced = False
    if not isinstance(balanced, bool):
        raise MergeCliError(f"{where}.balanced: expected true or false, got {balanced!r}")
    if balanced:
        applied.append("balanced=true")
    if balanced and len(data):
        present, counts = torch.unique(data.y, return_counts=True)
        per_class = int(counts.min())
        chosen = []
        for label in present.tolist():
            rows = torch.nonzero(data.y == label).flatten()
            chosen.append(rows[torch.randperm(len(rows), generator=gen)[:per_class]])
        data = _take(data, torch.cat(chosen))

    fraction = spec.get("fraction")
    if fraction is not None:
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 < fraction <= 1
        ):
            raise MergeCliError(f"{where}.fraction: expected a number in (0, 1], got {fraction!r}")
        applied.append(f"fraction={fraction}")
        n = len(data)
        k = math.floor(fraction * n + 0.5)  # round half up, not Python's banker's rounding
        if k == 0 and n > 0:
            raise MergeCliError(
                f"{where}: no examples left after {', '.join(applied)} "
                f"({fraction} of {n} rounds to 0); raise fraction to at least {1 / n:.3g}"
            )
        if k < n:
            data = _take(data, torch.randperm(n, generator=gen)[:k])

    if len(data) == 0:
        what = ", ".join(applied) if applied else "loading"
        raise MergeCliError(
            f"{where}: no examples left after {what} (labels present: {labels_before}); "
            "widen the subset"
        )
    return data

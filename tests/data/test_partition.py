"""Class splits and Dirichlet label-skewed partitions (data/partition.py), alone and through a
data spec's ``partition:``."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mergecli.data import load_data
from mergecli.data.partition import (
    describe_partition,
    dirichlet_parts,
    parse_classes,
    parse_partition,
    parse_split_option,
)
from mergecli.errors import MergeCliError
from mergecli.recipe import DataSpec

# 10 classes of uneven sizes (50..95 examples), in a shuffled order.
LABELS = torch.cat([torch.full((50 + 5 * k,), k) for k in range(10)])[
    torch.randperm(725, generator=torch.Generator().manual_seed(0))
]


def test_classes_forms() -> None:
    assert parse_classes("0-4", "w") == (0, 1, 2, 3, 4)
    assert parse_classes("7, 0-2,9", "w") == (0, 1, 2, 7, 9)
    assert parse_classes([3, 1, 3], "w") == (1, 3)
    assert parse_classes(5, "w") == (5,)
    for bad in ("4-1", "a-b", "", [], [-1], [True], "1-2-3"):
        with pytest.raises(MergeCliError, match="^w"):
            parse_classes(bad, "w")


def test_split_option_is_the_partition_mapping() -> None:
    assert parse_split_option("classes:0-49") == {"classes": "0-49"}
    assert parse_split_option("dirichlet:alpha=0.5:part=1/3") == {
        "dirichlet": 0.5,
        "parts": 3,
        "part": 1,
    }
    assert parse_split_option("dirichlet:part=0/2:alpha=2:seed=7")["seed"] == 7
    assert describe_partition({"dirichlet": 0.5, "parts": 2, "part": 1}) == (
        "dirichlet:alpha=0.5:part=1/2:seed=0"
    )
    assert describe_partition({"classes": [0, 1, 2, 3, 7]}) == "classes:0-3,7"
    messages = {
        "dirichlet:alpha=0.5:part=2/2": "--split dirichlet:alpha=0.5:part=2/2: part: 2 is not "
        "one of the 2 parts; parts are numbered 0..1",
        "dirichlet:alpha=0:part=0/2": "--split dirichlet:alpha=0:part=0/2: dirichlet: the "
        "concentration alpha must be a number > 0 (e.g. 0.5; smaller is more skewed), got 0.0",
        "dirichlet:alpha=0.5:part=0": "--split dirichlet:alpha=0.5:part=0: part is I/N (part I "
        "of N); use classes:0-49 or dirichlet:alpha=0.5:part=0/2 (optionally :seed=N)",
        "dirichlet:alpha=0.5": "--split dirichlet:alpha=0.5: needs alpha= and part=I/N; use "
        "classes:0-49 or dirichlet:alpha=0.5:part=0/2 (optionally :seed=N)",
        "dirichlet:alpha=0.5:part=0/1": "--split dirichlet:alpha=0.5:part=0/1: parts: expected "
        "an integer >= 2, got 1",
        "dirichlet:alpha=x:part=0/2": "--split dirichlet:alpha=x:part=0/2: cannot read its "
        "numbers; use classes:0-49 or dirichlet:alpha=0.5:part=0/2 (optionally :seed=N)",
        "classes:9-3": "--split classes:9-3: classes: '9-3' is not a range of labels low-high "
        "with 0 <= low <= high; use a range '0-49', a list '0,2,5-9', or a YAML list of integer "
        "labels",
        "half:0": "--split half:0: unknown split 'half'; use classes:0-49 or "
        "dirichlet:alpha=0.5:part=0/2 (optionally :seed=N)",
    }
    for text, message in messages.items():
        with pytest.raises(MergeCliError) as info:
            parse_split_option(text)
        assert str(info.value) == message


@pytest.mark.parametrize("parts", [2, 5])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 10.0])
def test_dirichlet_parts_are_disjoint_and_cover_the_data(parts: int, alpha: float) -> None:
    owner = dirichlet_parts(LABELS, alpha, parts, seed=3)
    assert owner.shape == LABELS.shape and owner.dtype == torch.int64
    assert ((owner >= 0) & (owner < parts)).all()  # each example in exactly one part
    # The parts as sets of rows: pairwise disjoint, their union every row.
    rows = [set(torch.nonzero(owner == p).flatten().tolist()) for p in range(parts)]
    assert sum(len(r) for r in rows) == len(LABELS)
    assert set().union(*rows) == set(range(len(LABELS)))
    assert torch.equal(owner, dirichlet_parts(LABELS, alpha, parts, seed=3)), "seeded"
    assert not torch.equal(owner, dirichlet_parts(LABELS, alpha, parts, seed=4))


def skew(alpha: float, parts: int = 4, seeds: int = 20) -> float:
    """Mean total-variation distance between a part's label distribution and the whole's."""
    whole = torch.bincount(LABELS, minlength=10).double()
    whole /= whole.sum()
    distances = []
    for seed in range(seeds):
        owner = dirichlet_parts(LABELS, alpha, parts, seed)
        for p in range(parts):
            counts = torch.bincount(LABELS[owner == p], minlength=10).double()
            if counts.sum():
                distances.append(0.5 * (counts / counts.sum() - whole).abs().sum().item())
    return sum(distances) / len(distances)


def test_smaller_alpha_skews_the_labels_more() -> None:
    low, mid, high = skew(0.1), skew(1.0), skew(100.0)
    assert low > mid > high
    assert high < 0.1 < 0.5 < low  # alpha 100: nearly iid parts; 0.1: mostly a few classes


def test_data_spec_partition_keeps_labels_and_composes() -> None:
    spec = {"source": "mnist", "split": "0:2000"}
    whole = load_data(spec)
    halves = [
        load_data({**spec, "partition": {"dirichlet": 0.5, "parts": 2, "part": p}}) for p in (0, 1)
    ]
    rows = [set(h.rows.tolist()) for h in halves]
    assert not rows[0] & rows[1] and rows[0] | rows[1] == set(range(2000))
    # An example keeps its label and pixels: the rows index the whole.
    for half in halves:
        assert torch.equal(half.y, whole.y[half.rows]) and torch.equal(half.x, whole.x[half.rows])
    # The seed in the spec chooses another partition; --seed (load_data's seed) does not.
    reseeded = load_data(
        {**spec, "partition": {"dirichlet": 0.5, "parts": 2, "part": 0, "seed": 1}}
    )
    assert set(reseeded.rows.tolist()) != rows[0]
    assert torch.equal(
        load_data({**spec, "partition": {"dirichlet": 0.5, "parts": 2, "part": 0}}, seed=9).rows,
        halves[0].rows,
    )
    # A class split keeps the labels as they are (no renumbering), after `classes`, before
    # `fraction`.
    upper = load_data({**spec, "partition": {"classes": "5-9"}})
    assert set(upper.y.tolist()) == {5, 6, 7, 8, 9}
    assert torch.equal(upper.rows, torch.nonzero(whole.y >= 5).flatten())
    both = load_data({**spec, "classes": [1, 5, 6], "partition": {"classes": "5-9"}})
    assert set(both.y.tolist()) == {5, 6}
    share = load_data({**spec, "partition": {"classes": "5-9"}, "fraction": 0.5})
    assert len(share) == round(len(upper) / 2) and set(share.rows.tolist()) <= set(
        upper.rows.tolist()
    )


def test_schema_checks_the_partition() -> None:
    assert DataSpec.model_validate(
        {"source": "mnist", "partition": {"classes": "0-4"}}
    ).partition == {"classes": "0-4"}
    cases = {
        "partition: dirichlet takes no alpha; it takes dirichlet, part, parts, seed": {
            "dirichlet": 0.5,
            "alpha": 1,
            "parts": 2,
            "part": 0,
        },
        "partition: give exactly one of classes or dirichlet, got classes, dirichlet": {
            "classes": "0-4",
            "dirichlet": 1,
        },
        "partition: parts: expected an integer >= 2, got None": {"dirichlet": 0.5, "part": 0},
    }
    for message, partition in cases.items():
        with pytest.raises(ValidationError) as info:
            DataSpec.model_validate({"source": "mnist", "partition": partition})
        error = info.value.errors()[0]
        assert (
            ".".join(map(str, error["loc"])) + ": " + error["msg"].removeprefix("Value error, ")
            == message
        )
    with pytest.raises(ValidationError, match="source 'text' has no classes"):
        DataSpec.model_validate({"source": "text", "path": "a.txt", "partition": {"classes": 1}})
    with pytest.raises(MergeCliError, match="^data.partition.classes: cannot read .x. as classes"):
        parse_partition({"classes": "x"}, "data.partition")

"""Log rendering: JSON lines for machines, table widths for people."""

from __future__ import annotations

import json
import warnings

import pytest

from mergecli.runtime.log import Column, Log, capture_warnings, percent
from mergecli.runtime.tables import PROSE_MIN, chrome, layout


def test_python_warnings_become_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    saved = warnings.showwarning
    try:
        capture_warnings(Log("json"))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("careful", UserWarning, stacklevel=1)
    finally:
        warnings.showwarning = saved
    (record,) = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert record["level"] == "warning" and record["message"] == "careful"
    assert record["category"] == "UserWarning" and record["file"] == __file__


def test_json_tables_keep_values_and_people_see_them_formatted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    columns = ["model", Column("accuracy", "accuracy_fraction", percent), Column("note")]
    rows = [["a", 0.9235, None], ["b", 0.5, None]]
    Log("json").table("t", columns, rows)
    (table,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert table["rows"] == [
        {"model": "a", "accuracy_fraction": 0.9235, "note": None},
        {"model": "b", "accuracy_fraction": 0.5, "note": None},
    ]
    Log("plain").table("t", columns, rows)
    shown = capsys.readouterr().out
    assert "92.35%" in shown and "50.00%" in shown
    assert "note" not in shown  # an empty column is left out for people


@pytest.mark.parametrize("width", [40, 60, 80, 100, 200])
def test_layout_fits_the_width_without_breaking_names_or_numbers(width: int) -> None:
    headers = ["model", "kind", "accuracy", "what it does"]
    cells = [
        ["merged (weight_matching + np_merge)", "mlp8-seed0"],
        ["aligned_average", "endpoint"],
        ["92.35%", "100.00%"],
        ["Weight matching (Git Re-Basin, Ainsworth et al., 2023): permutations " * 2, "x"],
    ]
    plan = layout(headers, cells, [True, True, False, False], [False, False, True, False], width)
    # The longest name words, the header "accuracy" (longer than its numbers), prose's least.
    least = [len("(weight_matching"), len("aligned_average"), len("accuracy"), PROSE_MIN]
    if sum(least) + chrome(4, False) > width:
        assert plan.widths == least and not plan.boxed  # as wide as it must be, nothing cut
        return
    assert plan.width <= width
    if plan.widths is not None:
        assert sum(plan.widths) + chrome(4, plan.boxed) <= width
        assert all(w >= m for w, m in zip(plan.widths, least, strict=True))

"""Every figure the README quotes comes from `make figures` (scripts/figures.py): each marked
value has a recipe behind it and a recorded value, and no percentage stands outside a marker."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def figures_script():
    spec = importlib.util.spec_from_file_location("figures", ROOT / "scripts" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_marked_figure_is_computed_and_recorded() -> None:
    script = figures_script()
    recorded = json.loads((ROOT / "figures" / "figures.json").read_text())
    inline = dict(re.findall(r"<!--fig:(\w+)-->(.*?)<!--/fig-->", README, flags=re.S))
    assert inline, "the README marks no figures"
    assert set(inline) <= set(script.FIGURES), set(inline) - set(script.FIGURES)
    for key, value in inline.items():  # the README shows what the last `make figures` wrote
        assert recorded["figures"][key] == value, key
    blocks = re.findall(
        r"<!-- fig-block:(\w+) -->\n```\n(.*?)\n```\n<!-- /fig-block -->", README, re.S
    )
    assert {k for k, _ in blocks} <= set(script.BLOCKS) | set(script.COMPUTED_BLOCKS)
    for key, text in blocks:
        assert recorded["blocks"][key] == text, key
    assert {"cpu", "torch_threads", "torch", "date"} <= set(recorded["machine"])


def test_no_percentage_outside_a_marker() -> None:
    prose = re.sub(r"<!--fig:\w+-->.*?<!--/fig-->", "", README, flags=re.S)
    prose = re.sub(r"```.*?```", "", prose, flags=re.S)
    loose = [line for line in prose.splitlines() if re.search(r"\d\s?%", line)]
    assert not loose, "figures not from `make figures`:\n" + "\n".join(loose)


def test_biased_table_has_a_zipit_row_only_when_zipit_ran(tmp_path: Path, monkeypatch) -> None:
    """The class-biased pair's table: every row read from the run's report, in order; the ZipIt!
    row (a second run of the recipe with align: zipit) only when that run is one of RUNS."""
    script = figures_script()
    monkeypatch.setattr(script, "OUT", tmp_path)
    names = {"mlp8-biased0-4": ("endpoint", 0.8), "mlp8-biased5-9": ("endpoint", 0.7)}
    kinds = ["ensemble", "average", "fisher", "regmean", "aligned_average", "aligned_fisher"]
    rows = [{"name": n, "kind": k, "accuracy": a, "loss": 1.0} for n, (k, a) in names.items()]
    rows += [{"name": k, "kind": k, "accuracy": 0.5, "loss": 1.5} for k in kinds]
    rows += [{"name": "aligned_regmean", "kind": "aligned_regmean", "accuracy": 0.6, "loss": 1.0}]
    rows += [{"name": "merged", "kind": "merged", "accuracy": 0.9444, "loss": 0.25}]
    for key, results in (("biased", rows), ("biased_zipit", [{**rows[-1], "accuracy": 0.6}])):
        (tmp_path / key).mkdir()
        report = {"evaluate": {"results": results}}
        (tmp_path / key / "report.json").write_text(json.dumps(report))
    monkeypatch.delitem(script.RUNS, "biased_zipit", raising=False)
    lines = script.biased_table().splitlines()
    assert len(lines) == 1 + len(script.BIASED_ROWS) - 1
    assert not any("ZipIt" in line for line in lines)
    assert lines[1].split()[-2:] == ["80.00%", "1.0000"]
    assert lines[-1].startswith("NP Merge") and lines[-1].split()[-2:] == ["94.44%", "0.2500"]
    monkeypatch.setitem(script.RUNS, "biased_zipit", (script.BIASED, [script.ZIPIT_STEPS]))
    lines = script.biased_table().splitlines()
    assert lines[-2].startswith("ZipIt! (align: zipit, then average)")
    assert lines[-2].split()[-2:] == ["60.00%", "0.2500"]

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


def test_biased_table_reads_every_row_from_its_run(tmp_path: Path, monkeypatch) -> None:
    """The class-biased pair's table: every row read from its run's report, in order."""
    script = figures_script()
    monkeypatch.setattr(script, "OUT", tmp_path)
    names = {"mlp8-biased0-4": ("endpoint", 0.8), "mlp8-biased5-9": ("endpoint", 0.7)}
    kinds = ["ensemble", "average", "fisher", "regmean", "aligned_average", "aligned_fisher"]
    rows = [{"name": n, "kind": k, "accuracy": a, "loss": 1.0} for n, (k, a) in names.items()]
    rows += [{"name": k, "kind": k, "accuracy": 0.5, "loss": 1.5} for k in kinds]
    rows += [{"name": "aligned_regmean", "kind": "aligned_regmean", "accuracy": 0.6, "loss": 1.0}]
    rows += [{"name": "merged", "kind": "merged", "accuracy": 0.9444, "loss": 0.25}]
    partial = [
        {"name": "aligned ensemble", "kind": "aligned_ensemble", "accuracy": 0.7, "loss": 0.5},
        {"name": "merged", "kind": "merged", "accuracy": 0.65, "loss": 0.75},
    ]
    for key, results in (
        ("biased", rows),
        ("biased_zipit", [{**rows[-1], "accuracy": 0.6}]),
        ("biased_zipit_search", [{**rows[-1], "accuracy": 0.91}]),
        ("biased_zipit_partial", partial),
    ):
        (tmp_path / key).mkdir()
        report = {"evaluate": {"results": results}}
        (tmp_path / key / "report.json").write_text(json.dumps(report))
    lines = script.biased_table().splitlines()
    assert len(lines) == 1 + len(script.BIASED_ROWS)
    assert lines[1].split()[-2:] == ["80.00%", "1.0000"]
    assert lines[-1].startswith("NP Merge") and lines[-1].split()[-2:] == ["94.44%", "0.2500"]
    assert lines[-5].startswith("ZipIt! (align: zipit, then average)")
    assert lines[-5].split()[-2:] == ["60.00%", "0.2500"]
    assert lines[-4].startswith("ZipIt!, alpha and beta searched")
    assert lines[-4].split()[-2:] == ["91.00%", "0.2500"]
    assert lines[-3].split()[-2:] == ["70.00%", "0.5000"]
    assert lines[-2].split()[-2:] == ["65.00%", "0.7500"]

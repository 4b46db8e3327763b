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
    assert {k for k, _ in blocks} <= set(script.BLOCKS)
    for key, text in blocks:
        assert recorded["blocks"][key] == text, key
    assert {"cpu", "torch_threads", "torch", "date"} <= set(recorded["machine"])


def test_no_percentage_outside_a_marker() -> None:
    prose = re.sub(r"<!--fig:\w+-->.*?<!--/fig-->", "", README, flags=re.S)
    prose = re.sub(r"```.*?```", "", prose, flags=re.S)
    loose = [line for line in prose.splitlines() if re.search(r"\d\s?%", line)]
    assert not loose, "figures not from `make figures`:\n" + "\n".join(loose)

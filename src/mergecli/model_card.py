"""README.md for a merged Hugging Face model directory: a model card as mergekit writes one
(YAML front matter the Hub reads, then what was merged, how, and how well it scored)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergecli import __version__
from mergecli.report import evaluation_section

if TYPE_CHECKING:
    from mergecli.state import MergeState

CARD_NAME = "README.md"
# A Hub repository id (``org/name``): the only form of base_model the Hub links.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(folder: Path) -> str | None:
    """The Hub id a model directory was saved from (``_name_or_path`` in its config.json, as
    ``save_pretrained`` writes it), or None when that is unknown or a local path."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    if not isinstance(name, str) or not _HUB_ID.match(name) or Path(name).exists():
        return None
    return name


def model_card(state: MergeState) -> str:
    """The card's text: front matter (base_model where known, library_name, tags), the method
    and its parameters, the inputs with their sha256, the evaluation, the resolved recipe."""
    loaded = state.loaded
    bases = [state.base] if state.base is not None else state.checkpoints
    known = [name for c in bases if (name := hub_id(Path(c.spec.path))) is not None]
    # JSON strings are YAML scalars: names from config files cannot break the front matter.
    front = ["---"]
    if known:
        front += ["base_model:", *(f"- {json.dumps(name)}" for name in known)]
    front += ["library_name: transformers", "tags:", "- merge", "- mergecli", "---", ""]
    method = " + ".join(state.history) or "none"
    lines = [
        f"# {loaded.recipe.name}",
        "",
        f"A merge of {len(state.models)} models made with mergecli {__version__} "
        f"(method: {method}), from the recipe below (sha256 `{loaded.sha256()}`).",
        "",
        "## Merge method",
        "",
        "The recipe's steps in order, with every parameter (defaults filled in):",
        "",
    ]
    for step in loaded.steps:
        params = step.as_dict()[step.kind]
        shown = ", ".join(f"{k}: {json.dumps(v)}" for k, v in params.items() if k != "method")
        lines.append(
            f"{step.index}. `{step.kind}`: `{step.method}`" + (f" ({shown})" if shown else "")
        )
    lines += [
        "",
        "## Inputs",
        "",
        "| model | role | weight | path | sha256 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in state.checkpoints:
        role = c.spec.role or ("reference" if c is state.reference else "")
        lines.append(
            f"| {_cell(c.name)} | {role} | {_weight(c.spec.weight)} | `{_cell(c.spec.path)}` | "
            f"`{c.sha256}` |"
        )
    lines.append("")
    if "evaluate" in state.report:
        lines += evaluation_section(state.report["evaluate"])
    recipe = loaded.resolved_yaml().rstrip()
    fence = "```"
    while fence in recipe:  # a fence longer than any run of backticks in the text
        fence += "`"
    lines += ["## Recipe", "", f"{fence}yaml", recipe, fence, ""]
    return "\n".join(front + lines)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _weight(weight: object) -> str:
    """A model's weight for the card: the number, or that it varies by tensor."""
    return f"{weight:g}" if isinstance(weight, (int, float)) else "varies by tensor"

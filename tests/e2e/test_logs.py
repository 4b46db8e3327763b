"""Logs as users read them and as machines parse them: --log json on every line, the global
options after the command, tables that fit 80 and 100 columns, log lines that say what ran."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import cli_env, run_cli, write_recipe

pytestmark = pytest.mark.slow


def safe_metadata(path: Path) -> dict[str, str]:
    """A checkpoint's safetensors metadata (its architecture), to copy onto an edited one."""
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def json_lines(text: str) -> list[dict]:
    """Every line parsed as JSON: fails on the first line that is not a JSON object."""
    records = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(r, dict) for r in records)
    return records


def chain_recipe(tmp_path: Path, pair: tuple[Path, Path]) -> Path:
    """Weight matching, then NP Merge over three models (two stages), then evaluate."""
    a, b = pair
    recipe = write_recipe(tmp_path, a, b)
    text = recipe.read_text().replace(f"  - path: {b}\n", f"  - path: {b}\n  - path: {a}\n")
    text = text.replace("data:\n", 'data:\n  fit: {source: mnist, split: "3000:3500"}\n')
    text = text.replace(
        "  - merge: {method: average}\n",
        "  - align: {method: weight_matching}\n  - fit: {method: np_merge, steps: 3}\n",
    )
    text = text.replace("[endpoints, ensemble, average]", "[endpoints, ensemble, aligned_average]")
    recipe.write_text(text)
    return recipe


def test_json_log_is_json_on_every_line(tmp_path: Path, trained_pair) -> None:
    # Success, with the options after the command; tables carry numbers.
    recipe = chain_recipe(tmp_path, trained_pair)
    result = run_cli("run", str(recipe), "--log", "json", "--log-every", "0")
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stderr)
    assert all({"time", "level", "message"} <= r.keys() for r in records)
    tables = {t["table"]: t["rows"] for t in json_lines(result.stdout)}
    (rows,) = [rows for title, rows in tables.items() if title.startswith("evaluation")]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for row, expected in zip(rows, report["evaluate"]["results"], strict=True):
        assert row["model"] == expected["name"] and row["kind"] == expected["kind"]
        assert row["accuracy_fraction"] == expected["accuracy"]  # the same number, not "92.35%"
        assert row["loss"] == expected["loss"] and row["ece"] == expected["ece"]
    assert isinstance(rows[-1]["fit_seconds"], float) and rows[0]["fit_seconds"] is None
    # Multi-model fits say which stage each line belongs to.
    messages = [r["message"] for r in records]
    for stage in ("1/2", "2/2"):
        assert any(m.startswith(f"fit stage {stage} epoch 1/") for m in messages), stage
        assert f"fit stage {stage}: 3 steps" in " ".join(messages)
    assert "fit stage 2/2 progress" in messages
    assert any(
        m.startswith("fit stage 2/2: aligned mlp-seed0#2 to the running merge") for m in messages
    )

    # A recipe mistake: one object per problem with its file, line and key.
    recipe.write_text(recipe.read_text().replace("steps: 3", "stpes: 3"))
    result = run_cli("--log", "json", "run", str(recipe))
    assert result.returncode == 2 and result.stdout == ""
    (error,) = json_lines(result.stderr)
    assert error["level"] == "error" and error["exit_code"] == 2
    assert error["file"] == str(recipe) and error["key"] == "steps.1.fit.stpes"
    line = next(i for i, t in enumerate(recipe.read_text().splitlines(), 1) if "stpes" in t)
    assert error["line"] == line
    assert error["message"].startswith("unknown key 'stpes'; did you mean 'steps'?")
    assert "traceback" not in error

    # The same with --debug: the traceback is a field, not lines of text.
    result = run_cli("run", str(recipe), "--debug", "--log", "json")
    (error,) = json_lines(result.stderr)
    assert result.returncode == 2 and error["key"] == "steps.1.fit.stpes"
    assert error["traceback"].startswith("Traceback") and "RecipeError" in error["traceback"]

    # An input mistake found only in the data (exit 1: a NaN weight) and a deprecation
    # warning, in the same run.
    broken = tmp_path / "nan.safetensors"
    tensors = load_file(trained_pair[1])
    first = next(iter(tensors))
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, broken, safe_metadata(trained_pair[1]))
    text = (
        recipe.read_text()
        .replace("stpes: 3", "steps: 3")
        .replace(str(trained_pair[1]), str(broken))
    )
    analyze = "  - analyze: {kind: averaging_vs_ensembling}\n"
    recipe.write_text(text.replace("  - evaluate:", analyze + "  - evaluate:"))
    result = run_cli("--log", "json", "run", str(recipe))
    records = json_lines(result.stderr)
    assert result.returncode == 1, result.stderr
    warning = next(r for r in records if r["level"] == "warning")
    assert "deprecated; write `method:` instead" in warning["message"]
    assert records[-1]["level"] == "error" and records[-1]["exit_code"] == 1
    assert "nan.safetensors" in records[-1]["message"] and "NaN" in records[-1]["message"]

    # A missing checkpoint is found before anything runs: exit 2, with its line and key.
    recipe.write_text(recipe.read_text().replace(str(broken), "no.st"))
    result = run_cli("--log", "json", "run", str(recipe))
    error = json_lines(result.stderr)[-1]
    assert result.returncode == 2 and error["key"] == "checkpoints.1.path", result.stderr
    assert "no.st" in error["message"]

    # Mistakes on the command line itself.
    for args in (["run", "--log", "json"], ["--log", "json", "methods", "--bogus"]):
        result = run_cli(*args)
        (error,) = json_lines(result.stderr)
        assert result.returncode == 2 and error["level"] == "error"
        assert error["usage"].startswith("Usage: mergecli")

    # `methods`: tables whose lists are lists.
    result = run_cli("methods", "--log", "json", check=True)
    assert result.stderr == ""
    methods = {(r["step"], r["method"]): r for r in json_lines(result.stdout)[0]["rows"]}
    assert "normalize=True" in methods[("merge", "average")]["parameters"]
    assert methods[("fit", "np_merge (default)")]["needs"] == ["data.fit", "model"]


def test_global_options_after_the_command(tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    result = run_cli("run", str(recipe), "--log", "plain", "--log-every", "5", check=True)
    assert re.match(r"\d{4}-\d\d-\d\dT\S+ recipe test-merge: 2 step\(s\)", result.stderr)
    # After the command wins over before it.
    result = run_cli("--log", "plain", "methods", "--log", "json", check=True)
    assert json.loads(result.stdout.splitlines()[0])["table"] == "step methods"
    # --debug after the command shows the traceback.
    result = run_cli("run", str(tmp_path / "missing.yaml"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr
    help_text = run_cli("run", "--help", check=True).stdout
    assert "--log" in help_text and "--debug" in help_text and "--log-every" in help_text


def test_tables_fit_80_and_100_columns(tmp_path: Path, trained_pair) -> None:
    names = [
        (r["step"], r["method"].removesuffix(" (default)"))
        for r in json_lines(run_cli("--log", "json", "methods", check=True).stdout)[0]["rows"]
    ]
    for width in (80, 100):
        shown = run_cli("methods", env=cli_env(COLUMNS=str(width)), check=True).stdout
        assert max(map(len, shown.splitlines())) <= width
        words = set(shown.split())
        assert all(step in words and method in words for step, method in names), width
        assert "…" not in shown and "``" not in shown
        # Prose is left-aligned: the description starts right after the needs column.
        assert re.search(r" model +(│ )?Weight\b", shown), width

    # The evaluation table of an aligned merge, on an 80-column terminal.
    recipe = write_recipe(tmp_path, *trained_pair)
    text = recipe.read_text().replace("steps:\n", "steps:\n  - align: weight_matching\n")
    recipe.write_text(text.replace("ensemble, average]", "ensemble, average, aligned_average]"))
    result = run_cli("run", str(recipe), env=cli_env(COLUMNS="80"), check=True)
    assert max(map(len, result.stdout.splitlines())) <= 80
    for name in ("mlp-seed0", "mlp-seed1", "aligned_average", "(weight_matching", "ensemble"):
        assert name in result.stdout.split(), name
    assert "…" not in result.stdout


def test_align_from_a_file_says_so(tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    recipe.write_text(
        recipe.read_text().replace("steps:\n", "steps:\n  - align: weight_matching\n")
    )
    run_cli("run", str(recipe), check=True)
    saved = tmp_path / "alignment.safetensors"
    saved.write_bytes((tmp_path / "out" / "alignment.safetensors").read_bytes())
    recipe.write_text(
        recipe.read_text().replace("align: weight_matching", f"align: {{from: {saved}}}")
    )
    result = run_cli("--log", "plain", "run", str(recipe), check=True)
    assert f"step 0: align from {saved}" in result.stderr
    assert f"aligned mlp-seed1 to mlp-seed0 with the transforms from {saved}" in result.stderr
    assert "weight matching" not in result.stderr and "(weight_matching)" not in result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["align"]["from"] == str(saved)
    assert f"Transforms from `{saved}`" in (tmp_path / "out" / "report.md").read_text()

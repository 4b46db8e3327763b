"""Shared fixtures: a real pair of small MLPs trained on bundled MNIST, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL_MLP = ["--arch", "mlp", "--arg", "depth=3", "--arg", "hidden=32"]
TESTS = Path(__file__).parent


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a mergecli subprocess: this one, with tests/ importable (for test
    models such as gated_mlp) and ``extra`` set."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "COLUMNS": "200", "PYTHONPATH": path, **extra}


def run_cli(
    *args: str, cwd: Path | None = None, check: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m mergecli ARGS` as a user would, capturing its output."""
    result = subprocess.run(
        [sys.executable, "-m", "mergecli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mergecli {' '.join(args)} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 3-layer MLPs trained from different seeds on 3,000 MNIST images (a few seconds)."""
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for seed in (0, 1):
        out = root / f"mlp-seed{seed}.safetensors"
        run_cli(
            "--log", "plain", "train", *SMALL_MLP, "--data", "mnist:0:3000",
            "--eval-data", "mnist:test", "--epochs", "3", "--seed", str(seed), "--out", str(out),
            check=True,
        )  # fmt: skip
        paths.append(out)
    return paths[0], paths[1]


def write_recipe(directory: Path, a: Path, b: Path) -> Path:
    """A small average-and-evaluate recipe over checkpoints ``a`` and ``b``."""
    path = directory / "recipe.yaml"
    path.write_text(
        f"""\
version: 1
name: test-merge
model:
  arch: mlp
  args: {{depth: 3, hidden: 32}}
checkpoints:
  - path: {a}
  - path: {b}
data:
  eval: {{source: mnist, split: "9000:"}}
steps:
  - merge: {{method: average}}
  - evaluate: {{baselines: [endpoints, ensemble, average]}}
output:
  dir: {directory / "out"}
"""
    )
    return path

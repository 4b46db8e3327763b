"""Shared fixtures: a real pair of small MLPs trained on bundled MNIST, and the one-process
results of the recipes that the signal, multi-process and SLURM tests share (the plain helpers
they use are in helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import (
    GATED_OUTPUTS,
    GATED_STEPS,
    SMALL_MLP,
    data_parallel_recipe,
    gated_recipe,
    run_cli,
)


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


@pytest.fixture(scope="session")
def finetuned_triple(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A base 3-layer MLP (500 MNIST images) and two fine-tunes of it, on digits 0-4 and 5-9
    (as `make demo-datafree` trains them, smaller): the setting of task-vector merges."""
    root = tmp_path_factory.mktemp("finetunes")
    base = root / "base.safetensors"
    run_cli(
        "--log", "plain", "train", *SMALL_MLP, "--data", "mnist:0:500", "--epochs", "3",
        "--seed", "0", "--out", str(base), check=True,
    )  # fmt: skip
    tuned = []
    for seed, classes in ((1, "[0, 1, 2, 3, 4]"), (2, "[5, 6, 7, 8, 9]")):
        out = root / f"ft{seed}.safetensors"
        run_cli(
            "--log", "plain", "train", *SMALL_MLP, "--init", str(base), "--epochs", "1",
            "--lr", "3e-4", "--data", f"{{source: mnist, split: '0:3000', classes: {classes}}}",
            "--seed", str(seed), "--out", str(out), check=True,
        )  # fmt: skip
        tuned.append(out)
    return base, tuned[0], tuned[1]


@pytest.fixture(scope="session")
def one_process_fit(tmp_path_factory: pytest.TempPathFactory, trained_pair) -> Path:
    """The output directory of the data-parallel recipe run by one process."""
    folder = tmp_path_factory.mktemp("one-process")
    (folder / "recipe.yaml").write_text(data_parallel_recipe(*trained_pair))
    run_cli("run", "recipe.yaml", cwd=folder, check=True)
    return folder / "out"


@pytest.fixture(scope="session")
def uninterrupted_gated(tmp_path_factory: pytest.TempPathFactory, trained_pair) -> dict[str, bytes]:
    """The output files of the recipe run once without interruption (json logs, a progress
    record after every step)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    (folder / "recipe.yaml").write_text(gated_recipe(*trained_pair))
    result = run_cli("--log", "json", "--log-every", "0", "run", "recipe.yaml", cwd=folder)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    progress = [r for r in records if r["message"] == "fit progress"]
    assert [r["step"] for r in progress] == list(range(1, GATED_STEPS + 1))
    for record in progress:
        assert {"time", "rank", "step", "steps", "epoch", "epochs", "loss"} <= record.keys()
        assert record["rank"] == 0 and record["steps"] == GATED_STEPS and record["loss"] > 0
        assert record["examples_per_s"] > 0 and record["steps_per_s"] > 0
    return {name: (folder / "out" / name).read_bytes() for name in GATED_OUTPUTS}

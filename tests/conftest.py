"""Shared fixtures: a real pair of small MLPs trained on bundled MNIST, a CLI runner, and the
recipes (with their one-process results) that the signal, multi-process and SLURM tests share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SMALL_MLP = ["--arch", "mlp", "--arg", "depth=3", "--arg", "hidden=32"]
TESTS = Path(__file__).parent


# Set by SLURM and torchrun: a test run inside a job (or under torchrun) must not hand them
# to the runs it starts, which would join that job's ranks or requeue it.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a mergecli subprocess: this one without launcher or SLURM variables,
    with tests/ importable (for test models such as gated_mlp) and ``extra`` set."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    own = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")
    }
    return {**own, "COLUMNS": "200", "PYTHONPATH": path, **extra}


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


def saved_fit_state(path: Path) -> dict:
    """The plain values of a fit state (step, finished...), read as any safetensors reader would."""
    from safetensors import safe_open

    from mergecli.fit.loop import PLAIN_KEY

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[PLAIN_KEY])


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


def data_parallel_recipe(a: Path, b: Path, arch: str = "mlp") -> str:
    """A recipe exercising every all-reduce of a multi-process run: activation statistics
    (activation matching), the fit's gradients (a global batch of 50 over 999 examples, so the
    last batch splits unevenly), its l2 term and validation, and the evaluation. On the CPU
    (gloo) on any machine, so that a GPU machine's nccl is not asked to share one GPU between
    two processes. The output dir is relative: run it from different directories."""
    return f"""\
version: 1
name: data-parallel
device: cpu
model: {{arch: "{arch}", args: {{depth: 3, hidden: 32}}}}
checkpoints:
  - path: {a}
  - path: {b}
data:
  fit: {{source: mnist, split: "3000:3999", batch_size: 50}}
  eval: {{source: mnist, split: "9000:9999"}}
steps:
  - align: {{method: activation_matching}}
  - fit: {{steps: 30, lr: 0.01, l2: 0.01}}
  - evaluate: {{baselines: [endpoints, ensemble]}}
output: {{dir: out}}
"""


@pytest.fixture(scope="session")
def one_process_fit(tmp_path_factory: pytest.TempPathFactory, trained_pair) -> Path:
    """The output directory of the data-parallel recipe run by one process."""
    folder = tmp_path_factory.mktemp("one-process")
    (folder / "recipe.yaml").write_text(data_parallel_recipe(*trained_pair))
    run_cli("run", "recipe.yaml", cwd=folder, check=True)
    return folder / "out"


def assert_same_fit(one: Path, several: Path) -> None:
    """What several processes computed equals what one did: the same alignment, coefficients
    within 1e-4, the same evaluation (counts all-reduced or gathered)."""
    assert (
        load_file(several / "alignment.safetensors").keys()
        == load_file(one / "alignment.safetensors").keys()
    )
    for name, tensor in load_file(one / "alignment.safetensors").items():
        assert torch.equal(load_file(several / "alignment.safetensors")[name], tensor), name
    expected, got = (
        load_file(one / "coefficients.safetensors"),
        load_file(several / "coefficients.safetensors"),
    )
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst <= 1e-4, f"coefficients differ by up to {worst:.3g}"
    assert any(float((expected[k] - 0.5).abs().max()) > 1e-3 for k in expected), "nothing fit"
    reports = [json.loads((d / "report.json").read_text()) for d in (one, several)]
    rows = [{r["name"]: r for r in rep["evaluate"]["results"]} for rep in reports]
    assert rows[0].keys() == rows[1].keys()
    for name, row in rows[0].items():
        assert abs(rows[1][name]["accuracy"] - row["accuracy"]) <= 1e-3, name
        assert abs(rows[1][name]["loss"] - row["loss"]) <= 1e-4, name
    histories = [rep["fit"]["stages"][0]["history"] for rep in reports]
    for first, second in zip(*histories, strict=True):
        assert abs(first["val_loss"] - second["val_loss"]) <= 1e-4
        assert abs(first["train_loss"] - second["train_loss"]) <= 1e-4


GATED_OUTPUTS = ("model.safetensors", "coefficients.safetensors", "alignment.safetensors")
GATED_STEPS = 40


def gated_recipe(a: Path, b: Path) -> str:
    """A small NP Merge recipe on the gated MLP; the output dir is relative, so the same recipe
    run from different directories has the same resolved text (and output bytes)."""
    return f"""\
version: 1
name: gated
model: {{arch: "gated_mlp:build", args: {{depth: 3, hidden: 32}}}}
checkpoints:
  - path: {a}
  - path: {b}
data:
  fit: {{source: mnist, split: "3000:4000", batch_size: 64}}
  eval: {{source: mnist, split: "9000:"}}
steps:
  - align: {{method: weight_matching}}
  - fit: {{steps: {GATED_STEPS}, lr: 0.01, checkpoint_every: 1000}}
  - evaluate: {{baselines: [endpoints]}}
output: {{dir: out}}
"""


@pytest.fixture(scope="session")
def uninterrupted_gated(tmp_path_factory: pytest.TempPathFactory, trained_pair) -> dict[str, bytes]:
    """The output files of the recipe run once without interruption (json logs, a progress
    record after every step)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    (folder / "recipe.yaml").write_text(gated_recipe(*trained_pair))
    result = run_cli("--log", "json", "--log-every", "0", "run", "recipe.yaml", cwd=folder)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    progress = [r for r in records if r["msg"] == "fit progress"]
    assert [r["step"] for r in progress] == list(range(1, GATED_STEPS + 1))
    for record in progress:
        assert {"time", "rank", "step", "steps", "epoch", "epochs", "loss"} <= record.keys()
        assert record["rank"] == 0 and record["steps"] == GATED_STEPS and record["loss"] > 0
        assert record["examples_per_s"] > 0 and record["steps_per_s"] > 0
    return {name: (folder / "out" / name).read_bytes() for name in GATED_OUTPUTS}

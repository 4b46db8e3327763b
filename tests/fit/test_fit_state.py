"""The fit's resumable state is safetensors + JSON, never a pickle: a file planted in
``output.dir/.state/`` cannot run code, and another fit's state is refused before its tensors
are read."""

from __future__ import annotations

import ast
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import ROOT, error_line, run_cli, small_fit
from mergecli.errors import MergeCliError
from mergecli.fit.loop import FINGERPRINT_KEY, PLAIN_KEY, FitCheckpoint
from mergecli.io.safetensors_format import write_safetensors

SRC = ROOT / "src" / "mergecli"
RESUME_HINT = "run with --resume never to start over (or delete the .state directory)"


class Planted:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def fit_recipe(folder: Path, a: Path, b: Path) -> None:
    """A short fit (no align: only its state matters here); output in ``folder/out``."""
    (folder / "recipe.yaml").write_text(
        f"""\
version: 1
model: {{arch: mlp, args: {{depth: 3, hidden: 32}}}}
checkpoints:
  - path: {a}
  - path: {b}
data:
  fit: {{source: mnist, split: "3000:3200", batch_size: 50}}
steps:
  - fit: {{steps: 3, lr: 0.01}}
output: {{dir: out}}
"""
    )


@pytest.mark.slow
def test_a_planted_pickle_is_never_unpickled(tmp_path: Path, trained_pair) -> None:
    fit_recipe(tmp_path, *trained_pair)
    state, marker = tmp_path / "out" / ".state", tmp_path / "code-ran"
    state.mkdir(parents=True)
    for name in ("step0-fit-stage1.safetensors", "fit-stage1.pt"):  # the name read, the old name
        torch.save({"fingerprint": "x", "step": Planted(marker)}, state / name)
    # Under the name the state has now, a pickle is a broken state: one line says what to do.
    result = run_cli("--log", "plain", "run", "recipe.yaml", cwd=tmp_path)
    assert not marker.exists(), "resuming ran code from the state directory"
    assert result.returncode == 1, result.stderr
    line = error_line(result)
    assert line.startswith(
        "error: steps.0 (fit np_merge): out/.state/step0-fit-stage1.safetensors: "
        "not a readable fit state"
    )
    assert line.endswith(RESUME_HINT), line
    # An earlier version's pickle is left unread, with a warning; the fit starts over.
    (state / "step0-fit-stage1.safetensors").unlink()
    result = run_cli("--log", "plain", "run", "recipe.yaml", cwd=tmp_path)
    assert not marker.exists(), "resuming ran code from the state directory"
    assert result.returncode == 0, result.stderr
    assert (
        "warning: fit: ignoring out/.state/fit-stage1.pt, a fit state from an older mergecli "
        "(a pickle, which could run code if loaded); the fit starts over"
    ) in result.stderr
    assert "resuming" not in result.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_another_fits_state_is_refused_before_its_tensors_are_read(
    tmp_path: Path, trained_pair
) -> None:
    fit_recipe(tmp_path, *trained_pair)
    path = tmp_path / "out" / ".state" / "step0-fit-stage1.safetensors"
    path.parent.mkdir(parents=True)
    metadata = {FINGERPRINT_KEY: "another recipe", PLAIN_KEY: json.dumps({"step": 2})}
    write_safetensors(path, {"logits": torch.zeros(1000)}, metadata)
    # Cut into the tensor data: any tensor read (or a full check of the file) would fail.
    path.write_bytes(path.read_bytes()[:-100])
    result = run_cli("--log", "plain", "run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert error_line(result) == (
        "error: steps.0 (fit np_merge): out/.state/step0-fit-stage1.safetensors: saved fit state "
        f"belongs to a different recipe or different inputs; {RESUME_HINT}"
    )


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_state_is_plain_safetensors_and_resumes_bit_identical(
    tmp_path: Path, optimizer: str
) -> None:
    uninterrupted = small_fit(optimizer=optimizer)
    checkpoint = FitCheckpoint(tmp_path / "fit.safetensors", "fingerprint")
    stopped = small_fit(
        checkpoint=checkpoint,
        should_stop=lambda step: signal.SIGTERM if step == 13 else None,
        optimizer=optimizer,
    )
    assert stopped.steps == 13
    # Any safetensors reader opens it: the fingerprint and plain values are in its metadata.
    with safe_open(str(checkpoint.path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata[FINGERPRINT_KEY] == "fingerprint"
    assert json.loads(metadata[PLAIN_KEY])["step"] == 13
    tensors = load_file(checkpoint.path)
    assert torch.equal(tensors["logits"], stopped.logits)
    assert tensors["epoch_generator"].dtype == torch.uint8
    assert any(name.startswith("optimizer.state.0.") for name in tensors)
    resumed = small_fit(checkpoint=checkpoint, optimizer=optimizer)
    assert resumed.steps == uninterrupted.steps
    assert torch.equal(resumed.logits, uninterrupted.logits)


def test_a_broken_or_foreign_state_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "fit.safetensors"
    checkpoint = FitCheckpoint(path, "fingerprint")
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(MergeCliError, match=r"not a readable fit state \(shorter than the 8-byte"):
        checkpoint.load()
    write_safetensors(path, {"w": torch.zeros(2)}, {"format": "pt"})
    with pytest.raises(MergeCliError, match="fit.safetensors: not a mergecli fit state; run"):
        checkpoint.load()
    write_safetensors(
        path, {"w": torch.zeros(2)}, {FINGERPRINT_KEY: "fingerprint", PLAIN_KEY: "{}"}
    )
    with pytest.raises(MergeCliError, match=r"not a readable fit state \(it lacks step, epoch"):
        checkpoint.load()


def unsafe_loads(source: str) -> list[int]:
    """Lines calling torch.load (however it is imported) without ``weights_only=True``."""
    tree = ast.parse(source)
    aliases = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization")
        for alias in node.names
        if alias.name == "load"
    }
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name not in aliases and name not in ("torch.load", "torch.serialization.load"):
            continue
        safe = any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        )
        if not safe:
            lines.append(node.lineno)
    return lines


def test_no_torch_load_without_weights_only() -> None:
    # The checker finds what it must, so that an empty result below means something.
    assert unsafe_loads("import torch\ntorch.load(p, weights_only=False)\n") == [2]
    assert unsafe_loads("from torch import load as l\nl(p)\n") == [2]
    assert unsafe_loads("import torch\ntorch.load(p, weights_only=True)\n") == []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = [
        f"{path.relative_to(SRC.parent)}:{line}"
        for path in files
        for line in unsafe_loads(path.read_text())
    ]
    assert not found, f"torch.load without weights_only=True unpickles arbitrary code: {found}"

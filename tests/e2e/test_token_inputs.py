"""Token ids stay integers from a tensors file through align, fit and evaluate, for a model
that returns its logits in a dict (as Hugging Face models do)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from fixtures.token_models import token_task, trained
from helpers import run_cli


@pytest.mark.slow
def test_a_token_classifier_aligns_fits_and_evaluates(tmp_path: Path) -> None:
    ids, labels = token_task(1200, seed=0)
    for seed in (0, 1):
        save_file(trained(seed, ids[:800], labels[:800]), tmp_path / f"m{seed}.safetensors")
    save_file({"x": ids[800:1000], "y": labels[800:1000]}, tmp_path / "fit.safetensors")
    save_file({"x": ids[1000:].int(), "y": labels[1000:]}, tmp_path / "eval.safetensors")
    recipe = tmp_path / "tokens.yaml"
    recipe.write_text(
        "version: 1\n"
        "model: {arch: 'fixtures.token_models:build'}\n"
        f"checkpoints: [{{path: {tmp_path / 'm0.safetensors'}}}, "
        f"{{path: {tmp_path / 'm1.safetensors'}}}]\n"
        "data:\n"
        f"  fit: {{source: tensors, path: {tmp_path / 'fit.safetensors'}, batch_size: 50}}\n"
        f"  eval: {{source: tensors, path: {tmp_path / 'eval.safetensors'}}}\n"
        "steps:\n"
        "  - align: {method: weight_matching}\n"
        "  - fit: {method: np_merge, epochs: 2, lr: 0.05}\n"
        "  - evaluate: {method: classification, baselines: [endpoints, average]}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    result = run_cli("--log", "plain", "run", str(recipe))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {row["kind"]: row for row in report["evaluate"]["results"]}
    # Both endpoints learnt the rule; the merged model keeps most of it.
    for row in report["evaluate"]["results"]:
        if row["kind"] == "endpoint":
            assert row["accuracy"] > 0.85
    assert rows["merged"]["accuracy"] > 0.8
    merged = (tmp_path / "out" / "model.safetensors").exists()
    assert merged

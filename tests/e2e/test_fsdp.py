"""`fit: {shard: fsdp}` as a user runs it: two processes under torchrun, each holding half of
the stacked Llama copies, fit what one unsharded process fits; what it refuses, in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import cli_env, error_line, run_cli
from mergecli.models import build_model

TORCHRUN = Path(sys.executable).parent / "torchrun"


def _llama_recipe(folders: list[Path], tokens: Path, shard: bool, out: str) -> str:
    """Coefficients per row over two fine-tunes' task vectors; batches of 127 over 128
    sequences, so that the last batch (one sequence) leaves one of two ranks without a share."""
    extra = ", shard: fsdp" if shard else ""
    return f"""\
version: 1
device: cpu
model: {{arch: hf}}
checkpoints: [{{path: {folders[0]}, role: base}}, {{path: {folders[1]}}}, {{path: {folders[2]}}}]
data:
  fit: {{source: tensors, path: {tokens}, batch_size: 127}}
  eval: {{held_out: {{source: tensors, path: {tokens}, batch_size: 50}}}}
steps:
  - fit: {{loss: causal_lm, start: ties, granularity: row, steps: 6, lr: 0.02, l2: 0.01{extra}}}
output: {{dir: {out}}}
"""


@pytest.mark.slow
def test_two_processes_shard_the_stacks_and_fit_what_one_process_fits(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from fixtures.hf_models import llama_family, lm_tokens_file

    folders = llama_family(tmp_path)
    tokens = lm_tokens_file(tmp_path / "tokens.safetensors")
    (tmp_path / "one.yaml").write_text(_llama_recipe(folders, tokens, False, "one"))
    (tmp_path / "two.yaml").write_text(_llama_recipe(folders, tokens, True, "two"))
    env = cli_env(OMP_NUM_THREADS="1", MERGECLI_LOG="plain")
    assert run_cli("run", "one.yaml", cwd=tmp_path, env=env).returncode == 0
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "mergecli", "run",
         "two.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Each rank holds half of the three stacked copies (its FSDP shard), not all of them.
    held = re.findall(
        r"\[rank (\d)/2\] fit: the 3 stacked copies \((\S+) KiB\) sharded over 2 rank\(s\) "
        r"with FSDP: (\S+) KiB on this one",
        result.stderr,
    )
    assert sorted(rank for rank, _, _ in held) == ["0", "1"], result.stderr
    for _, total, mine in held:
        assert abs(float(mine) / float(total) - 0.5) < 0.02
    one, two = tmp_path / "one", tmp_path / "two"
    expected, got = (load_file(d / "coefficients.safetensors") for d in (one, two))
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst <= 1e-5, f"coefficients differ by up to {worst:.3g}"
    assert any(float(c.abs().max()) > 1e-3 for c in got.values())
    models = [load_file(d / "model.safetensors") for d in (one, two)]
    for name, tensor in models[0].items():
        torch.testing.assert_close(models[1][name], tensor, rtol=0, atol=1e-6)
    reports = [json.loads((d / "report.json").read_text())["fit"] for d in (one, two)]
    assert reports[1]["shard"] == {"method": "fsdp", "ranks": 2} and "shard" not in reports[0]
    assert reports[0]["kept"] == reports[1]["kept"] == "fit"
    for key in ("start", "end"):
        assert abs(reports[0]["fit_loss"][key] - reports[1]["fit_loss"][key]) <= 1e-5
    for first, second in zip(reports[0]["stages"][0]["history"],
                             reports[1]["stages"][0]["history"], strict=True):  # fmt: skip
        assert abs(first["val_loss"] - second["val_loss"]) <= 1e-5


def test_shard_refuses_batchnorm_and_compile_in_one_line(tmp_path: Path) -> None:
    args = {"depth": 3, "hidden": 16, "batchnorm": True}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"bn{seed}.safetensors")
        save_file(build_model("mlp", args).state_dict(), paths[-1])
    head = (
        "version: 1\nmodel: {arch: mlp, args: {depth: 3, hidden: 16, batchnorm: true}}\n"
        f"checkpoints: [{{path: {paths[0]}}}, {{path: {paths[1]}}}]\n"
        "data: {fit: {source: mnist, split: '0:200', batch_size: 50}}\n"
    )
    (tmp_path / "bn.yaml").write_text(
        head + "steps: [{fit: {steps: 2, shard: fsdp}}]\noutput: {dir: out}\n"
    )
    result = run_cli("run", "bn.yaml", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert error_line(result).endswith(
        "fit: shard: fsdp is for models without BatchNorm (their statistics are recomputed "
        "from whole merged weights); drop shard for this model"
    )
    assert not (tmp_path / "out").exists()
    (tmp_path / "compiled.yaml").write_text(
        head + "steps: [{fit: {steps: 2, shard: fsdp, compile: true}}]\noutput: {dir: out}\n"
    )
    result = run_cli("run", "compiled.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "compile and shard: fsdp do not go together; drop one" in error_line(result)
    assert "Traceback" not in result.stderr

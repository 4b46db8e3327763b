"""The CLI as a user runs it, in a subprocess, on real small models trained on bundled MNIST."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import ROOT, SMALL_MLP, cli_env, run_cli, run_cli_side_by_side, write_recipe
from mergecli.io import checkpoint_sha256

pytestmark = pytest.mark.slow

OUTPUTS = ("model.safetensors", "report.json", "report.md", "recipe.resolved.yaml")
MANIFEST = ".mergecli-manifest.json"  # what the run wrote, so that a rerun replaces only that


def assert_nothing_written(out_dir: Path) -> None:
    present = [name for name in OUTPUTS if (out_dir / name).exists()]
    assert not present, f"a failed run left {present}"
    if out_dir.exists():
        assert not [p.name for p in out_dir.iterdir() if ".tmp" in p.name]


def test_version_and_help_without_torch() -> None:
    result = run_cli("--version", check=True)
    assert result.stdout.strip().startswith("mergecli ")
    # -X importtime lists every module imported: --help must not pay for torch.
    import subprocess
    import sys

    probe = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mergecli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.split("|")[-1].strip() for line in probe.stderr.splitlines()}
    assert "torch" not in imported and "pydantic" not in imported
    assert "run" in probe.stdout and "validate" in probe.stdout


EXITING = """
import atexit, sys, threading, time
import mergecli.cli


class Noisy:
    def __del__(self):  # runs only if the interpreter tears its modules down
        print("torn down")


KEEP = Noisy()
atexit.register(lambda: print("atexit ran"))
sys.stdout.write("unflushed, ")
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread ended"))).start()
sys.argv = ["mergecli", *sys.argv[2:]]
mergecli.cli.main()
"""


@pytest.mark.parametrize(
    ("args", "code"),
    [(["none", "methods"], 0), (["none", "run", "missing.yaml"], 2), (["none", "--bogus"], 2)],
)
def test_the_process_ends_without_teardown_and_keeps_its_status(
    tmp_path: Path, args: list[str], code: int
) -> None:
    """Skipping the interpreter's teardown (half a second with torch loaded) loses nothing:
    the status, buffered output and atexit handlers are all there."""
    result = subprocess.run(
        [sys.executable, "-c", EXITING, *args], capture_output=True, text=True, cwd=tmp_path,
        env=cli_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == code, result.stderr
    assert result.stdout.startswith("unflushed, ") and result.stdout.endswith("atexit ran\n")
    assert "torn down" not in result.stdout
    if code:
        assert result.stderr.strip(), "a failure says why"


def test_the_process_waits_for_a_thread_still_working(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", EXITING, "thread", "--version"], capture_output=True, text=True,
        cwd=tmp_path, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "mergecli " in result.stdout and "thread ended" in result.stdout


def test_train_writes_checkpoint_with_metadata(trained_pair: tuple[Path, Path]) -> None:
    path = trained_pair[0]
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["mergecli.arch"] == "mlp"
    assert json.loads(metadata["mergecli.args"]) == {"depth": 3, "hidden": 32}
    assert metadata["mergecli.seed"] == "0"
    assert json.loads(metadata["mergecli.data"]) == {"source": "mnist", "split": "0:3000"}
    assert float(metadata["mergecli.eval_accuracy"]) > 0.8


def test_run_average_end_to_end(tmp_path: Path, trained_pair: tuple[Path, Path]) -> None:
    a, b = trained_pair
    recipe = write_recipe(tmp_path, a, b)
    result = run_cli("--log", "plain", "run", str(recipe), check=True)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, MANIFEST])
    # The table is printed, and the report holds the same rows.
    assert "ensemble" in result.stdout and "merged (average)" in result.stdout
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["evaluate"]["results"]}
    assert set(rows) == {"mlp-seed0", "mlp-seed1", "ensemble", "average", "merged (average)"}
    assert report["evaluate"]["examples"] == 1000
    # Trained, far above chance (0.1). Here they score 0.801 and 0.825, but the training takes
    # other float paths on another CPU or thread count (a point or so either way), so the
    # bound leaves room rather than quoting this machine.
    assert rows["mlp-seed0"]["accuracy"] > 0.7 and rows["ensemble"]["accuracy"] > 0.7
    # The baseline and the step run the same merge of the same inputs: the same model, exactly.
    assert rows["average"]["accuracy"] == rows["merged (average)"]["accuracy"]
    # The merged checkpoint is the plain average, tensor by tensor.
    merged, ta, tb = load_file(out / "model.safetensors"), load_file(a), load_file(b)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (ta[name] + tb[name]) / 2)
    # Provenance in the safetensors metadata.
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["mergecli.recipe_sha256"] == report["recipe_sha256"]
    assert json.loads(metadata["mergecli.inputs"]) == {
        str(a): checkpoint_sha256(a),
        str(b): checkpoint_sha256(b),
    }
    assert json.loads(metadata["mergecli.steps"])[0] == {
        "merge": {
            "method": "average",
            "compute_dtype": "float32",
            "missing": "error",
            "normalize": True,
        }
    }
    assert metadata["mergecli.seed"] == "0" and metadata["mergecli.version"]
    resolved = (out / "recipe.resolved.yaml").read_text()
    assert "normalize: true" in resolved and "baselines:" in resolved


def test_run_is_reproducible_and_pins_verify(tmp_path: Path, trained_pair) -> None:
    a, b = trained_pair
    recipe = write_recipe(tmp_path, a, b)
    merged = tmp_path / "out" / "model.safetensors"
    run_cli("run", str(recipe), check=True)
    first = merged.read_bytes()
    first_tensors = load_file(merged)
    run_cli("run", str(recipe), check=True)
    assert merged.read_bytes() == first, "the same recipe on the same inputs is bit-identical"
    # A correct pin passes (and, being part of the recipe, changes only the recipe hash).
    pin = f"checkpoints.0.sha256={checkpoint_sha256(a)}"
    run_cli("run", str(recipe), "--set", pin, check=True)
    pinned = load_file(merged)
    assert all(torch.equal(pinned[name], t) for name, t in first_tensors.items())


def test_sharded_bfloat16_output_keeps_integer_buffers(tmp_path: Path) -> None:
    # BatchNorm models carry integer num_batches_tracked buffers: they come from the reference.
    torch.manual_seed(0)
    from mergecli.models import build_model

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = build_model("mlp", {"depth": 3, "hidden": 16, "batchnorm": True}).state_dict()
        state["norms.0.num_batches_tracked"] = torch.tensor(10 + seed)
        paths.append(tmp_path / f"bn{seed}.safetensors")
        save_file(state, paths[-1])
    recipe = tmp_path / "bn.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {{arch: mlp, args: {{depth: 3, hidden: 16, batchnorm: true}}}}\n"
        f"checkpoints: [{{path: {paths[0]}}}, {{path: {paths[1]}}}]\n"
        f"steps: [{{merge: {{method: average}}}}]\n"
        f"output: {{dir: {tmp_path / 'out'}, dtype: bfloat16, shard_size: 20KB}}\n"
    )
    run_cli("run", str(recipe), check=True)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(load_file(out / shard))
    assert merged["norms.0.num_batches_tracked"].item() == 10
    assert merged["norms.0.num_batches_tracked"].dtype == torch.int64
    assert merged["head.weight"].dtype == torch.bfloat16
    # The merged output is itself a checkpoint that `inspect` reads.
    listing = run_cli("inspect", str(out), check=True).stdout
    assert "norms.0.num_batches_tracked" in listing and "bfloat16" in listing


def test_validate_prints_resolved_recipe(tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    result = run_cli("validate", str(recipe), "--set", "seed=3", check=True)
    assert "valid" in result.stdout and "seed: 3" in result.stdout
    assert not (tmp_path / "out").exists()


def test_validate_misspelled_key(tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    recipe.write_text(recipe.read_text().replace("checkpoints:", "checkpoint:"))
    result = run_cli("validate", str(recipe))
    assert result.returncode == 2
    assert f"{recipe}:6: checkpoint: unknown key 'checkpoint'; did you mean 'checkpoints'?" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_inspect_one_and_two_checkpoints(trained_pair) -> None:
    a, b = trained_pair
    single = run_cli("inspect", str(a), check=True).stdout
    assert "layers.0.weight" in single and "[32, 784]" in single and "float32" in single
    assert "mergecli.arch" in single
    pair = run_cli("inspect", str(a), str(b), check=True).stdout
    assert "‖A−B‖" in pair and "head.bias" in pair
    same = run_cli("--log", "json", "inspect", str(a), str(a), check=True).stdout
    rows = [json.loads(line) for line in same.splitlines()][-1]["rows"]
    assert all(row["diff_norm"] == 0 for row in rows)


def test_methods_lists_parameters() -> None:
    result = run_cli("methods", check=True)
    assert "average" in result.stdout and "normalize=True" in result.stdout
    assert "classification" in result.stdout and "resnet20" in result.stdout


def test_json_log_lines_parse(tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    result = run_cli("--log", "json", "run", str(recipe), check=True)
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(r["message"].startswith("step 0: merge") for r in records)
    table = json.loads(result.stdout.strip().splitlines()[-1])
    assert table["rows"][0]["model"] == "mlp-seed0"


# --- bad input: one line naming the problem, a non-zero exit, nothing under the final names ---


def fails(tmp_path: Path, recipe: Path, *sets: str, code: int | None = None) -> str:
    args = []
    for item in sets:
        args += ["--set", item]
    result = run_cli("run", str(recipe), *args)
    assert result.returncode != 0
    if code is not None:
        assert result.returncode == code
    assert "Traceback" not in result.stderr
    # Progress lines start with a timestamp; the failure itself is exactly one line.
    lines = [line for line in result.stderr.strip().splitlines() if not line[:4].isdigit()]
    assert len(lines) == 1, result.stderr
    assert_nothing_written(tmp_path / "out")
    return lines[0]


def test_missing_checkpoint(tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    line = fails(tmp_path, recipe, f"checkpoints.1.path={tmp_path / 'nope.safetensors'}")
    assert "nope.safetensors" in line and "no such file" in line


def test_corrupt_and_truncated_safetensors(tmp_path: Path, trained_pair) -> None:
    a, b = trained_pair
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
    recipe = write_recipe(tmp_path, a, truncated)
    line = fails(tmp_path, recipe)
    assert "truncated.safetensors: not a readable safetensors file" in line
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 10)
    line = fails(tmp_path, recipe, f"checkpoints.1.path={garbage}")
    assert "garbage.safetensors: not a readable safetensors file" in line


def test_checkpoint_that_does_not_fit_the_model(tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    line = fails(tmp_path, recipe, "model.args.hidden=64")
    assert "does not fit the model" in line and "'layers.0.weight' has shape (32, 784)" in line
    line = fails(tmp_path, recipe, "model.args.depth=4")
    assert "missing 'layers.2.weight'" in line


def test_mismatched_checkpoints(tmp_path: Path, trained_pair) -> None:
    a, b = trained_pair
    state = load_file(b)
    state["layers.0.weight"] = state["layers.0.weight"][:16]
    odd = tmp_path / "odd.safetensors"
    save_file(state, odd)
    line = fails(tmp_path, write_recipe(tmp_path, a, odd))
    assert "odd.safetensors: tensor 'layers.0.weight' has shape (16, 784)" in line
    del state["layers.0.weight"]
    save_file(state, odd)
    line = fails(tmp_path, write_recipe(tmp_path, a, odd))
    assert "odd.safetensors: lacks 'layers.0.weight'" in line


def test_nan_in_checkpoint(tmp_path: Path, trained_pair) -> None:
    a, b = trained_pair
    state = load_file(b)
    state["head.bias"][3] = float("nan")
    broken = tmp_path / "nan.safetensors"
    save_file(state, broken)
    line = fails(tmp_path, write_recipe(tmp_path, a, broken))
    assert "nan.safetensors: tensor 'head.bias' contains NaN or inf values" in line


def test_wrong_sha256_pin(tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    line = fails(tmp_path, recipe, "checkpoints.1.sha256=" + "f" * 64, code=2)
    assert line.startswith("--set checkpoints.1.sha256: ") and "the recipe pins fff" in line
    assert "mlp-seed1.safetensors has sha256 " in line


def test_unwritable_output_dir(tmp_path: Path, trained_pair) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    recipe = write_recipe(tmp_path, *trained_pair)
    line = fails(tmp_path, recipe, f"output.dir={blocker / 'out'}")
    assert "cannot write the output directory" in line and "afile" in line


def test_empty_data_subset(tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    line = fails(tmp_path, recipe, "data.eval.classes=[11]")
    assert "data.eval: no examples left after classes=[11]" in line
    assert not (tmp_path / "out").exists(), "a failed run removes the empty dir it created"


def test_recipe_errors_exit_2(tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    line = fails(tmp_path, recipe, "steps.0.merge.normalize=sometimes", code=2)
    assert line.startswith("--set steps.0.merge.normalize: ")
    recipe.write_text(recipe.read_text().replace("weight", "x").replace("  - path:", "  - pth:", 1))
    line = fails(tmp_path, recipe, code=2)
    assert ":7: checkpoints.0.pth: unknown key 'pth'; did you mean 'path'?" in line


def test_debug_shows_traceback(tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    missing = f"checkpoints.1.path={tmp_path / 'nope.safetensors'}"
    result = run_cli("--debug", "run", str(recipe), "--set", missing)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_train_errors_are_one_line(tmp_path: Path) -> None:
    result = run_cli("train", "--arch", "mpl", "--out", str(tmp_path / "x.safetensors"))
    assert result.returncode == 1 and "did you mean 'mlp'" in result.stderr
    result = run_cli("train", "--data", "imagenet", "--out", str(tmp_path / "x.safetensors"))
    assert result.returncode == 1 and "--data" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_python_module_entry_point_and_demo_recipe(tmp_path: Path, trained_pair) -> None:
    # The demo recipe validates and runs against checkpoints in the layout `make demo` makes.
    root = ROOT
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(trained_pair[0], runs / "mlp8-seed0.safetensors")
    shutil.copy(trained_pair[1], runs / "mlp8-seed1.safetensors")
    recipe = root / "configs/examples/mnist-mlp8-average.yaml"
    sets = ["--set", "model.args.depth=3", "--set", "model.args.hidden=32"]
    result = run_cli("run", str(recipe), *sets, cwd=tmp_path, check=True)
    assert "mlp8-seed0" in result.stdout
    assert (tmp_path / "out/mnist-mlp8-average/model.safetensors").exists()


def test_user_model_and_data_without_model_key(tmp_path: Path) -> None:
    # A user's own architecture and dataset, importable from the working directory. Checkpoint
    # metadata never chooses code: the recipe must name the user's model to build it.
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def tiny(width=8):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, width),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(width, 3))\n"
    )
    (tmp_path / "mydata.py").write_text(
        "import torch\n"
        "def blobs(n=300):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    y = torch.arange(n) % 3\n"
        "    x = torch.randn(n, 4, generator=g) + 3 * torch.nn.functional.one_hot(y, 4)\n"
        "    return torch.utils.data.TensorDataset(x, y)\n"
    )
    data = "{source: python, factory: 'mydata:blobs', args: {n: 300}}"
    run_cli_side_by_side(
        *(["train", "--arch", "mymodels:tiny", "--arg", "width=8", "--data", data,
           "--eval-data", "none", "--epochs", "10", "--lr", "0.02", "--batch-size", "32",
           "--seed", str(seed), "--out", f"m{seed}.safetensors"] for seed in (0, 1)),
        cwd=tmp_path,
    )  # fmt: skip
    (tmp_path / "r.yaml").write_text(
        "version: 1\n"
        "checkpoints: [{path: m0.safetensors}, {path: m1.safetensors, weight: 3}]\n"
        f"data: {{eval: {data}}}\n"
        "steps: [{merge: {method: average}}, {evaluate: {baselines: [endpoints]}}]\n"
    )
    refused = run_cli("run", "r.yaml", cwd=tmp_path)
    assert refused.returncode == 2 and "its metadata names user code" in refused.stderr
    assert 'add `model: {arch: "mymodels:tiny", args: {"width": 8}}`' in refused.stderr
    sets = ["--set", "model.arch=mymodels:tiny", "--set", "model.args.width=8"]
    run_cli("run", "r.yaml", *sets, cwd=tmp_path, check=True)
    report = json.loads((tmp_path / "out/r/report.json").read_text())
    rows = {row["name"]: row for row in report["evaluate"]["results"]}
    assert rows["m0"]["accuracy"] > 0.9 and rows["m1"]["accuracy"] > 0.9
    merged = load_file(tmp_path / "out/r/model.safetensors")
    a, b = load_file(tmp_path / "m0.safetensors"), load_file(tmp_path / "m1.safetensors")
    torch.testing.assert_close(merged["1.weight"], 0.25 * a["1.weight"] + 0.75 * b["1.weight"])


def test_train_init_fine_tunes_from_a_checkpoint(tmp_path: Path, trained_pair) -> None:
    base = trained_pair[0]
    out = tmp_path / "ft.safetensors"
    # lr 0: a fine-tune that cannot move is its starting checkpoint.
    run_cli(
        "train", *SMALL_MLP, "--init", str(base), "--data", "{source: mnist, split: '0:300', "
        "classes: [0, 1]}", "--eval-data", "none", "--epochs", "1", "--lr", "0", "--out", str(out),
        check=True,
    )  # fmt: skip
    start, tuned = load_file(base), load_file(out)
    assert all(torch.equal(start[k], tuned[k]) for k in start)
    wrong = run_cli(
        "train", "--arch", "mlp", "--arg", "depth=2", "--init", str(base),
        "--eval-data", "none", "--epochs", "1", "--out", str(tmp_path / "x.safetensors"),
    )  # fmt: skip
    # The checkpoint's metadata names depth 3: --arg depth=2 contradicts it (a usage error).
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.startswith("--arg depth=2: the --init checkpoint")
    assert not (tmp_path / "x.safetensors").exists()

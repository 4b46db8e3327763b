"""The output directory's guarantees, as a user meets them: a run never replaces or removes an
input or a file it did not write, two runs never share a directory, and a kill at any moment
leaves either the complete old set of files or the complete new one."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import cli_env, run_cli
from mergecli.errors import MergeCliError
from mergecli.io.output_dir import LOCK, MANIFEST, OutputDir

pytestmark = pytest.mark.slow


def pair(folder: Path) -> tuple[Path, Path]:
    """Two small checkpoints with the same tensors (a data-free merge needs nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        tensors = {f"layer{i}.weight": torch.randn(64, 64, generator=generator) for i in range(4)}
        save_file(tensors, folder / f"m{seed}.safetensors")
        paths.append(folder / f"m{seed}.safetensors")
    return paths[0], paths[1]


def recipe(folder: Path, a: Path, b: Path, out: Path, weight: float = 1.0, **output) -> Path:
    extra = "".join(f", {key}: {value}" for key, value in output.items())
    path = folder / f"recipe-{out.name}-{weight}.yaml"
    path.write_text(
        f"version: 1\nname: out-test\ncheckpoints: [{{path: {a}, weight: {weight}}}, "
        f"{{path: {b}}}]\nsteps: [{{merge: {{method: linear}}}}]\noutput: {{dir: {out}{extra}}}\n"
    )
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (the lock file aside)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def one_line_error(result: subprocess.CompletedProcess, code: int = 1) -> str:
    assert result.returncode == code, result.stderr
    # Progress lines carry a timestamp; the error is the one line that does not.
    lines = [line for line in result.stderr.splitlines() if not re.match(r"\d{4}-\d\d-", line)]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_output_over_an_input_is_refused_and_the_input_survives(tmp_path: Path) -> None:
    a, b = pair(tmp_path / "runs")
    before = snapshot(tmp_path / "runs")
    # The checkpoints' own directory, and an input that is an earlier run's output.
    line = one_line_error(run_cli("run", str(recipe(tmp_path, a, b, tmp_path / "runs"))))
    assert str(a) in line and "inside the output directory" in line
    assert snapshot(tmp_path / "runs") == before
    run_cli("run", str(recipe(tmp_path, a, b, tmp_path / "first")), check=True)
    merged = tmp_path / "first" / "model.safetensors"
    again = recipe(tmp_path, merged, b, tmp_path / "first", weight=2.0)
    first = snapshot(tmp_path / "first")
    line = one_line_error(run_cli("run", str(again), "--overwrite"))
    assert str(merged) in line and str(tmp_path / "first") in line
    assert snapshot(tmp_path / "first") == first


def test_a_foreign_model_in_the_output_dir_survives(tmp_path: Path) -> None:
    a, b = pair(tmp_path / "runs")
    out = tmp_path / "out"
    out.mkdir()
    for index in (1, 2):
        save_file({"x": torch.ones(3)}, out / f"model-0000{index}-of-00002.safetensors")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    line = one_line_error(run_cli("run", str(recipe(tmp_path, a, b, out))))
    assert "did not write" in line and "model-00001-of-00002.safetensors" in line
    assert "--overwrite" in line
    assert snapshot(out) == before
    # Said plainly, the directory is replaced by this run's set.
    run_cli("run", str(recipe(tmp_path, a, b, out)), "--overwrite", check=True)
    names = set(snapshot(out))
    assert "model.safetensors" in names and MANIFEST in names and "notes.txt" not in names


def test_a_rerun_replaces_only_its_own_files_and_leaves_no_old_one(tmp_path: Path) -> None:
    a, b = pair(tmp_path / "runs")
    out = tmp_path / "out"
    run_cli("run", str(recipe(tmp_path, a, b, out, shard_size="20KB")), check=True)
    assert (out / "model.safetensors.index.json").is_file()
    run_cli("run", str(recipe(tmp_path, a, b, out)), check=True)
    names = set(snapshot(out))
    assert not [n for n in names if n.startswith("model-")], "old shards beside the new model"
    assert "model.safetensors.index.json" not in names
    assert names == {"model.safetensors", "report.json", "report.md", "recipe.resolved.yaml",
                     MANIFEST}  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name or ".old-" in p.name]


def test_a_second_run_into_a_locked_dir_refuses_naming_the_pid(tmp_path: Path) -> None:
    a, b = pair(tmp_path / "runs")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, str(os.getpid()).encode())\n"
         "print('locked', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_line_error(run_cli("run", str(recipe(tmp_path, a, b, out))))
        assert f"another mergecli run (PID {holder.pid})" in line
        assert not (out / "model.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    # The lock goes with its holder; a finished run leaves no lock file behind.
    run_cli("run", str(recipe(tmp_path, a, b, out)), check=True)
    assert not (out / LOCK).exists()
    fd = os.open(out / MANIFEST, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nothing else holds anything
    os.close(fd)


# Run mergecli in a child that SIGKILLs itself at the Nth call of a function, before or after
# the call: the real code up to that point, then a kill no handler can see.
KILLER = """\
import importlib, os, signal, sys
target, when, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
module, _, attribute = target.partition(":")
owner = importlib.import_module(module)
*path, name = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), [0]
def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == count and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if calls[0] == count and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, name, wrapper)
sys.argv = ["mergecli", *sys.argv[4:]]
from mergecli.cli import main
main()
"""

KILL_POINTS = [
    ("mergecli.io.writer:ShardWriter.add", "before", 3),  # mid-way through the model
    ("mergecli.io.writer:os.replace", "after", 1),  # first shard renamed (in staging)
    ("mergecli.io.writer:ShardWriter.close", "after", 1),  # model complete, report not yet
    ("mergecli.io.output_dir:fsync_tree", "after", 1),  # whole set staged, not swapped
    ("mergecli.io.output_dir:swap", "after", 1),  # swapped, the old set not yet removed
]


@pytest.mark.parametrize(("target", "when", "count"), KILL_POINTS)
def test_kill_9_leaves_the_old_set_or_the_new_set(
    tmp_path: Path, target: str, when: str, count: int
) -> None:
    a, b = pair(tmp_path / "runs")
    out = tmp_path / "out"
    # Sharded, so that the rename step has several files; the new run has other weights.
    run_cli("run", str(recipe(tmp_path, a, b, out, shard_size="20KB")), check=True)
    old = snapshot(out)
    new_recipe = recipe(tmp_path, a, b, out, weight=3.0, shard_size="20KB")
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, target, when, str(count), "run", str(new_recipe)],
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    after_kill = snapshot(out)
    # The next run cleans what the dead one left, finishes, and shows what the new set is.
    run_cli("run", str(new_recipe), check=True)
    new = snapshot(out)

    def computed(files: dict[str, bytes]) -> dict[str, bytes]:
        skip = ("report.json", "report.md")  # timings differ from run to run
        return {k: v for k, v in files.items() if k not in skip}

    assert computed(old) != computed(new)
    assert after_kill == old or computed(after_kill) == computed(new), (
        f"a mixed set after a kill at {target}: {sorted(after_kill)}"
    )
    assert "report.json" in after_kill and "recipe.resolved.yaml" in after_kill
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name or ".old-" in p.name]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_temporaries_of_dead_runs_are_removed(tmp_path: Path) -> None:
    a, b = pair(tmp_path / "runs")
    out = tmp_path / "out"
    run_cli("run", str(recipe(tmp_path, a, b, out)), check=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # What earlier versions and killed runs left: a temporary model, a temporary shard.
    (out / f".model.safetensors.tmp-{dead}").write_bytes(b"half")
    (out / f".shard-1.tmp-{dead}").write_bytes(b"half")
    run_cli("run", str(recipe(tmp_path, a, b, out, weight=2.0)), check=True)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_report_rewrites_in_place_and_records_what_it_wrote(tmp_path: Path) -> None:
    a, b = pair(tmp_path / "runs")
    out = tmp_path / "out"
    run_cli("run", str(recipe(tmp_path, a, b, out)), check=True)
    (out / "report.md").unlink()
    run_cli("report", str(out), check=True)
    assert (out / "report.md").is_file() and not (out / LOCK).exists()
    # Everything there is the tool's own: a rerun goes ahead without --overwrite.
    run_cli("run", str(recipe(tmp_path, a, b, out, weight=2.0)), check=True)


def test_output_file_names_stay_inside_and_cwd_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = OutputDir(tmp_path / "out")
    output.open()
    try:
        for bad in ("../escape.safetensors", "aligned/../../x", "/abs/x"):
            with pytest.raises(MergeCliError, match="must stay inside the output directory"):
                output.file(bad)
        assert output.file("aligned/a.safetensors").parent.name == "aligned"
    finally:
        output.release()
    assert not (tmp_path / "out").exists(), "a directory the run made and left empty goes"
    monkeypatch.chdir(tmp_path / "runs" if (tmp_path / "runs").exists() else tmp_path)
    with pytest.raises(MergeCliError, match="contains the current directory"):
        OutputDir(tmp_path).open()


def test_train_never_writes_over_its_init_checkpoint(tmp_path: Path) -> None:
    base = tmp_path / "base.safetensors"
    run_cli("train", "--arch", "mlp", "--arg", "depth=2", "--arg", "hidden=8", "--data",
            "mnist:0:100", "--eval-data", "none", "--epochs", "1", "--out", str(base),
            check=True)  # fmt: skip
    before = base.read_bytes()
    result = run_cli("train", "--arch", "mlp", "--arg", "depth=2", "--arg", "hidden=8",
                     "--data", "mnist:0:100", "--init", str(base), "--out", str(base))  # fmt: skip
    assert "is the --init checkpoint" in one_line_error(result, code=2)
    assert base.read_bytes() == before


def test_the_two_rename_swap_and_its_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system without RENAME_EXCHANGE the swap is two renames; a run killed between
    them leaves the old set under .NAME.old-HOST-PID, which the next run puts back."""
    import mergecli.io.output_dir as output_dir

    class NoExchange:  # a C library without renameat2 (macOS, old glibc)
        def __init__(self, *args, **kwargs) -> None:
            pass

    monkeypatch.setattr(output_dir.ctypes, "CDLL", NoExchange)
    new, old = tmp_path / "staging", tmp_path / "out"
    for folder, text in ((new, "new"), (old, "old")):
        folder.mkdir()
        (folder / "model.safetensors").write_text(text)
    output_dir.swap(new, old)
    assert (old / "model.safetensors").read_text() == "new"
    assert (new / "model.safetensors").read_text() == "old", "the old set, for the caller to drop"
    # Killed between the renames: no output dir, the old set beside it under a dead PID.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    leftover = tmp_path / f".out.old-{output_dir.HOST}-{dead}"
    old.rename(leftover)
    output = OutputDir(old, overwrite=True)  # no manifest in this hand-made set
    output.open()
    output.release()
    assert (old / "model.safetensors").read_text() == "new" and not leftover.exists()

"""mergecli in real SLURM jobs, on a private single-node cluster started for these tests
(tests/slurm/local-slurm.sh: slurmctld, slurmd and munged from Debian's packages).

Where the cluster cannot start (not root, no packages), the tests skip and say why; CI sets
MERGECLI_REQUIRE_SLURM=1 so that there they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    GATED_STEPS,
    TESTS,
    assert_same_fit,
    cli_env,
    data_parallel_recipe,
    gated_recipe,
    write_recipe,
)

# One worker runs them all (`make test` distributes by file, pytest-xdist's loadfile): one
# private cluster at a time.
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = TESTS / "slurm" / "local-slurm.sh"
PYTHON = sys.executable


def _unavailable(reason: str) -> None:
    if os.environ.get("MERGECLI_REQUIRE_SLURM") == "1":
        pytest.fail(f"MERGECLI_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running one-node cluster; yields the environment that reaches it (SLURM_CONF)."""
    if os.geteuid() != 0:
        _unavailable("a local SLURM node needs root (slurmd)")
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(t)]
    if missing:
        _unavailable(f"{', '.join(missing)} not installed (tests/slurm/local-slurm.sh install)")
    folder = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in cli_env().items() if k != "SLURM_CONF"}
    ports = {"SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())}
    started = subprocess.run(
        [str(SCRIPT), "start", str(folder)], env={**env, **ports}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    if started.returncode != 0:
        subprocess.run([str(SCRIPT), "stop", str(folder)], env=env, timeout=120)
        _unavailable(f"the local SLURM cluster did not start: {started.stderr.strip()[-800:]}")
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run([str(SCRIPT), "stop", str(folder)], env=env, timeout=120)


def sbatch(env: dict[str, str], folder: Path, script: str, *options: str) -> str:
    """Submit ``script`` from ``folder``; returns the job id (or waits, given --wait)."""
    path = folder / "job.sh"
    path.write_text(script)
    result = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={folder}", f"--output={folder}/job.out", *options,
         str(path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"sbatch failed: {result.stderr}\n{log(folder)}"
    return result.stdout.strip().split(";")[0]


def job_field(env: dict[str, str], job: str, field: str) -> str:
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True
    ).stdout
    found = re.search(rf"\b{field}=(\S+)", shown)
    return found.group(1) if found else ""


def log(folder: Path) -> str:
    path = folder / "job.out"
    return path.read_text() if path.exists() else "(no job output)"


def test_sbatch_wait_runs_a_merge_job(cluster, tmp_path: Path, trained_pair) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    sbatch(
        cluster, tmp_path,
        f"#!/bin/bash\n#SBATCH --job-name=merge\nexec {PYTHON} -m mergecli run {recipe}\n",
        "--wait",
    )  # fmt: skip
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "report.json").exists(), log(tmp_path)
    text = log(tmp_path)
    # No terminal: plain timestamped lines, and the table once.
    assert re.search(r"^\d{4}-\d\d-\d\dT\S+ wrote .*report\.json$", text, re.MULTILINE), text
    assert text.count("evaluation on data.eval") == 1


def test_a_signalled_job_requeues_resumes_and_ends_like_an_uninterrupted_run(
    cluster, tmp_path: Path, trained_pair, uninterrupted_gated
) -> None:
    (tmp_path / "recipe.yaml").write_text(gated_recipe(*trained_pair))
    env = {**cluster, "MERGECLI_TEST_GATE": "fit:5", "MERGECLI_TEST_GATE_DIR": str(tmp_path)}
    # As configs/slurm/ does: exec, so that mergecli is the batch step's process and gets the
    # signal; append, so that the requeued run does not truncate the first run's log.
    script = (
        "#!/bin/bash\n"
        "#SBATCH --requeue --open-mode=append\n"
        'echo "restart count ${SLURM_RESTART_COUNT:-0}"\n'
        f"exec {PYTHON} -m mergecli --log plain run recipe.yaml --requeue\n"
    )
    job = sbatch(env, tmp_path, script)
    deadline = time.monotonic() + 120
    while not (tmp_path / "reached").exists():
        assert time.monotonic() < deadline, f"the job never reached step 5:\n{log(tmp_path)}"
        time.sleep(0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster, check=True)
    # scancel returns once slurmctld has the request; slurmstepd delivers the signal after it.
    # Released before delivery, the fit would run on past step 5 (seen once: stopped at 17).
    time.sleep(2)
    (tmp_path / "release").touch()
    # The job saves, requeues itself and waits (BeginTime, the cluster's 10 s cred_expire)
    # before it starts again. Not sooner: a job started at once after its requeue is killed
    # with "Job credential revoked" (seen in slurmctld.log on a loaded machine).
    deadline = time.monotonic() + 180
    seen: list[str] = []
    while (state := job_field(cluster, job, "JobState")) != "COMPLETED":
        if not seen or seen[-1] != state:
            seen.append(state)
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT"), (
            f"{' -> '.join(seen)}:\n{log(tmp_path)}"
        )
        assert time.monotonic() < deadline, f"job {job} is still {state}:\n{log(tmp_path)}"
        time.sleep(0.25)
    assert job_field(cluster, job, "Restarts") == "1"
    text = log(tmp_path)
    first, _, second = text.partition("restart count 1")
    assert "restart count 0" in first and second, text
    assert re.search(
        rf"stopped by SIGUSR1 after fit step 5/{GATED_STEPS} \(epoch 1\); fit state saved in "
        rf"out/\.state/step1-fit-stage1\.safetensors; run the same command to resume; "
        rf"SLURM job {job} requeued; exit 138$",
        first,
        re.MULTILINE,
    ), text
    assert "fit: resuming from out/.state/step1-fit-stage1.safetensors step=5 epoch=1" in second
    out = tmp_path / "out"
    for name, expected in uninterrupted_gated.items():
        assert (out / name).read_bytes() == expected, f"{name} differs from the uninterrupted run"
    assert not (out / ".state").exists()


def test_srun_two_tasks_fit_what_one_process_fits(
    cluster, tmp_path: Path, trained_pair, one_process_fit: Path
) -> None:
    (tmp_path / "recipe.yaml").write_text(data_parallel_recipe(*trained_pair))
    script = (
        "#!/bin/bash\n"
        "#SBATCH --ntasks=2\n"
        f"srun --kill-on-bad-exit=1 {PYTHON} -m mergecli --log plain run recipe.yaml\n"
    )
    sbatch(cluster, tmp_path, script, "--wait")
    text = log(tmp_path)
    assert "[rank 1/2] rank 1 of 2 (srun, gloo) on cpu" in text, text
    assert "[rank 0/2] rank 0 of 2 (srun, gloo) on cpu" in text, text
    assert_same_fit(one_process_fit, tmp_path / "out")

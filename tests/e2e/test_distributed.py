"""Several processes: launcher detection, batch shares, and real 2-process runs under torchrun
that must compute what one process computes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    TESTS,
    assert_same_fit,
    cli_env,
    data_parallel_recipe,
    run_cli,
    saved_fit_state,
)
from mergecli.data import TensorData
from mergecli.errors import MergeCliError
from mergecli.runtime import slurm
from mergecli.runtime.distributed import World, detect
from mergecli.runtime.log import Log

TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_torchrun_environment() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    env |= {"MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
    launch = detect(env)
    assert launch is not None and launch.launcher == "torchrun"
    assert (launch.rank, launch.size, launch.local_rank, launch.local_size) == (3, 4, 1, 2)
    assert (launch.master_addr, launch.master_port) == ("node7", 29500)
    assert detect({**env, "WORLD_SIZE": "1"}) is None  # torchrun --nproc-per-node 1
    with pytest.raises(MergeCliError, match="MASTER_PORT is not"):
        detect({k: v for k, v in env.items() if k != "MASTER_PORT"})


def test_one_gpu_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen on a one-GPU machine: two torchrun processes must not share the GPU (nccl refuses),
    while srun tasks bound to one GPU each all see theirs as GPU 0."""
    from mergecli.runtime.distributed import Launch, rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    second = {"rank": 1, "size": 2, "local_rank": 1, "local_size": 2,
              "master_addr": "localhost", "master_port": 29500}  # fmt: skip
    assert rank_device("auto", Launch("srun", **second)) == torch.device("cuda", 0)
    with pytest.raises(MergeCliError, match="no GPU of its own .* or set device: cpu"):
        rank_device("auto", Launch("torchrun", **second))
    assert rank_device("cpu", Launch("torchrun", **second)) == torch.device("cpu")
    first = {**second, "rank": 0, "local_rank": 0}
    assert rank_device("cuda", Launch("torchrun", **first)) == torch.device("cuda", 0)


def test_srun_environment_and_the_batch_script_itself() -> None:
    step = {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_NODELIST": "gpu[03-04]",
        "SLURM_JOB_NODELIST": "gpu[01-04]",
    }
    launch = detect(step)
    assert launch is not None and launch.launcher == "srun"
    assert (launch.rank, launch.size, launch.local_rank, launch.local_size) == (5, 8, 1, 4)
    # Rank 0 runs on the step's first node; the port is the job's (the same on every task).
    assert launch.master_addr == "gpu03"
    assert launch.master_port == slurm.master_port("4242") == 12000 + 4242
    assert detect({**step, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}).master_port == 1234
    # The batch script of an `sbatch --ntasks=8` job is one process, not rank 0 of 8.
    batch = {k: v for k, v in step.items() if not k.startswith("SLURM_STEP")}
    assert detect(batch) is None
    assert detect({}) is None


def test_first_host_of_node_lists_without_scontrol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the list is read here
    assert slurm.first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert slurm.first_host("login2,gpu[1-2]") == "login2"
    assert slurm.first_host("a100-[003-004]") == "a100-003"


def test_rank_shares_of_a_batch_cover_it_once_in_order() -> None:
    data = TensorData(torch.arange(23.0).unsqueeze(1), torch.arange(23))
    for world in (1, 2, 3, 8):
        shares = [list(data.batches(5, part=(rank, world))) for rank in range(world)]
        batches = list(data.batches(5))
        for i, (_, y) in enumerate(batches):
            pieces = [shares[rank][i][1] for rank in range(world)]
            assert torch.equal(torch.cat(pieces), y)
            assert max(map(len, pieces)) - min(map(len, pieces)) <= 1  # even, some empty
    # The same shuffle for every world size: the generator decides, not the rank.
    first = torch.cat([y for _, y in data.batches(5, True, torch.Generator().manual_seed(1))])
    parts = [
        torch.cat([y for _, y in data.batches(5, True, torch.Generator().manual_seed(1), part=p)])
        for p in ((0, 2), (1, 2))
    ]
    assert sorted(torch.cat(parts).tolist()) == sorted(first.tolist())


def test_a_world_of_one_does_nothing_collective() -> None:
    world = World()
    t = torch.ones(3)
    assert world.all_reduce_(t) is t and torch.equal(t, torch.ones(3))
    assert world.gather_rows(t) is t and world.part(10) == (0, 10)
    assert world.any(True) and not world.any(False)
    assert World(rank=1, size=3).part(10) == (3, 6)


def test_log_lines_name_their_rank(capsys: pytest.CaptureFixture) -> None:
    Log("plain", rank=1, world=2).info("only rank 0 says this")
    Log("plain", rank=1, world=2).info("rank 1 is ready", every_rank=True)
    Log("plain", rank=1, world=2).table("t", ["a"], [[1]])
    Log("json", rank=1, world=2).warn("careful")
    out, err = capsys.readouterr()
    assert out == "" and "only rank 0" not in err
    assert re.search(r"^\S+ \[rank 1/2\] rank 1 is ready$", err, re.MULTILINE)
    assert '"level": "warning", "rank": 1, "world": 2, "message": "careful"' in err


# --- real processes ------------------------------------------------------------------------


def torchrun(*args: str) -> list[str]:
    """The torchrun command line for 2 processes of `mergecli run recipe.yaml`;
    the log mode comes from MERGECLI_LOG (torchrun would take --log for its --log-dir)."""
    return [
        str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "mergecli",
        "run", "recipe.yaml", *args,
    ]  # fmt: skip


@pytest.mark.slow
def test_two_processes_under_torchrun_compute_what_one_does(
    tmp_path: Path, trained_pair, one_process_fit: Path
) -> None:
    (tmp_path / "recipe.yaml").write_text(data_parallel_recipe(*trained_pair))
    result = subprocess.run(
        torchrun(), cwd=tmp_path, env=cli_env(MERGECLI_LOG="plain"), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_same_fit(one_process_fit, tmp_path / "out")
    # Each rank says where it runs; rank 0 alone logs the steps and prints the table once.
    assert "[rank 0/2] rank 0 of 2 (torchrun, gloo) on cpu" in result.stderr
    assert "[rank 1/2] rank 1 of 2 (torchrun, gloo) on cpu" in result.stderr
    assert "[rank 1/2] step" not in result.stderr and "[rank 0/2] step 1: fit" in result.stderr
    assert result.stdout.count("evaluation on data.eval (999 examples)") == 1
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in one_process_fit.iterdir()
    ), "rank 0 alone writes: no stray or temporary files"


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(
    tmp_path: Path, trained_pair, one_process_fit: Path
) -> None:
    (tmp_path / "recipe.yaml").write_text(
        data_parallel_recipe(*trained_pair, arch="fixtures.gated_mlp:build")
    )
    env = cli_env(
        MERGECLI_LOG="plain", MERGECLI_TEST_GATE="fit:5", MERGECLI_TEST_GATE_DIR=str(tmp_path)
    )
    process = subprocess.Popen(
        torchrun(), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    reached = [tmp_path / "reached-0", tmp_path / "reached-1"]
    deadline = time.monotonic() + 120
    while not all(p.exists() for p in reached):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    os.kill(int(reached[1].read_text()), signal.SIGTERM)  # rank 1 only
    (tmp_path / "release").touch()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    for rank in (0, 1):
        assert re.search(
            rf"\[rank {rank}/2\] stopped by SIGTERM after fit step 5/30 \(epoch 1\); fit state "
            rf"saved in out/.state/step1-fit-stage1.safetensors; run the same command to resume; "
            rf"exit 143$",
            stderr,
            re.MULTILINE,
        ), stderr
    assert saved_fit_state(tmp_path / "out/.state/step1-fit-stage1.safetensors")["step"] == 5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".state"]
    # The shares and the shuffle do not depend on the world size: one process may resume it.
    result = run_cli("--log", "plain", "run", "recipe.yaml", cwd=tmp_path, env=cli_env())
    assert result.returncode == 0, result.stderr
    assert "fit: resuming from out/.state/step1-fit-stage1.safetensors step=5" in result.stderr
    assert_same_fit(one_process_fit, tmp_path / "out")


LEAVE_SCRIPT = """
import os, torch
from mergecli.runtime import distributed
distributed.start("cpu")
logits = torch.zeros(5, requires_grad=True)
optimizer = torch.optim.Adam([logits])
logits.sum().backward()
distributed.current().all_reduce_(logits.grad)
optimizer.step()
distributed.stop()
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(f"threads-{os.environ['RANK']}", "w") as out:
    out.write(" ".join(sorted(threads)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_leaving_the_process_group_ends_its_threads(tmp_path: Path) -> None:
    """A process group that outlives destroy_process_group (torch._dynamo, imported by the
    optimiser's first step, holds it) keeps gloo's threads running, and the process can abort
    at exit; mergecli imports it first."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_SCRIPT)
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(script)],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        threads = (tmp_path / f"threads-{rank}").read_text()
        assert "gloo" not in threads, f"rank {rank} still runs {threads}"


@pytest.mark.parametrize(
    "script", sorted((TESTS.parent / "configs" / "slurm").glob("*.sbatch")), ids=lambda p: p.stem
)
def test_example_sbatch_scripts_signal_requeue_and_resume(script: Path) -> None:
    """The examples keep what preemption needs (see README, Running on a cluster)."""
    text = script.read_text()
    options = re.findall(r"^#SBATCH (\S+)", text, re.MULTILINE)
    assert {"--requeue", "--open-mode=append"} <= set(options), script.name
    [signal_option] = [o for o in options if o.startswith("--signal=")]
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    [command] = [line for line in lines if "mergecli run" in line]
    if command.startswith("srun"):
        # Every task of the step gets the signal; a failed rank stops the others.
        assert command.startswith("srun --kill-on-bad-exit=1 mergecli run ")
        assert signal_option == "--signal=USR1@120"
    else:
        # The batch shell gets the signal: exec makes it mergecli.
        assert command.startswith("exec mergecli run ") and signal_option == "--signal=B:USR1@120"
    assert command.endswith(" --requeue")
    recipe = command.split("mergecli run ")[1].split()[0]
    assert (TESTS.parent / recipe).is_file(), recipe
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

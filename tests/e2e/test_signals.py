"""Stop signals: a real `mergecli run` signalled mid-fit or mid-step saves, exits with the
signal's code, and the next run resumes to the same bytes as an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import GATED_STEPS, cli_env, gated_recipe, run_cli, saved_fit_state
from mergecli.runtime.signals import Stopped, StopSignals, exit_code


def start_gated(folder: Path, trained_pair, rule: str, *args: str) -> subprocess.Popen:
    """Start `mergecli run` on the gated recipe; it waits at ``rule`` until released."""
    (folder / "recipe.yaml").write_text(gated_recipe(*trained_pair))
    env = cli_env(MERGECLI_TEST_GATE=rule, MERGECLI_TEST_GATE_DIR=str(folder))
    return subprocess.Popen(
        [sys.executable, "-m", "mergecli", "--log", "plain", "run", "recipe.yaml", *args],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signal_at_gate(process: subprocess.Popen, folder: Path, signum: int) -> str:
    """Wait for the run to reach its gate, signal it there, release it; return its stderr."""
    deadline = time.monotonic() + 120
    while not (folder / "reached").exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the run never reached its gate"
        time.sleep(0.02)
    process.send_signal(signum)
    (folder / "release").touch()
    _, stderr = process.communicate(timeout=120)
    return stderr


def stop_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "stopped by" in line]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGTERM, 143), (signal.SIGUSR1, 138), (signal.SIGINT, 130)],
    ids=["TERM", "USR1", "INT"],
)
def test_signal_mid_fit_saves_exits_and_resumes_bit_identical(
    tmp_path: Path, trained_pair, uninterrupted_gated, signum: int, code: int
) -> None:
    # --requeue outside a SLURM job only says so.
    process = start_gated(tmp_path, trained_pair, "fit:5", "--requeue")
    stderr = signal_at_gate(process, tmp_path, signum)
    assert process.returncode == code, stderr
    # One line says what happened: the step it finished, where the state is, the exit code.
    name = signal.Signals(signum).name
    state = Path("out") / ".state" / "step1-fit-stage1.safetensors"
    [line] = stop_lines(stderr)
    assert re.search(
        rf"stopped by {name} after fit step 5/{GATED_STEPS} \(epoch 1\); fit state saved in "
        rf"{re.escape(str(state))}; run the same command to resume; "
        rf"{'' if signum == signal.SIGINT else 'not requeued: not inside a SLURM job; '}"
        rf"exit {code}$",
        line,
    ), line
    assert "Traceback" not in stderr
    saved = saved_fit_state(tmp_path / state)
    assert saved["step"] == 5 and not saved["finished"]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [".state"], "no output under a final name"
    if signum == signal.SIGTERM:
        # A changed recipe refuses the saved state rather than mixing two fits.
        changed = run_cli("run", "recipe.yaml", "--set", "steps.1.fit.lr=0.02", cwd=tmp_path)
        assert changed.returncode == 1
        assert "belongs to a different recipe or different inputs; run with --resume never" in (
            changed.stderr
        )
    # The next run resumes from step 5 and ends with the bytes of an uninterrupted run; how it
    # runs (`slurm:`) is not what it computes, so adding it does not stop the resume. With
    # --resume never it starts over, and ends the same.
    never = signum == signal.SIGINT
    resumed = run_cli(
        "--log", "plain", "--log-every", "0", "run", "recipe.yaml", "--set", "slurm.requeue=true",
        *(["--resume", "never"] if never else []), cwd=tmp_path,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    resuming = "fit: resuming from out/.state/step1-fit-stage1.safetensors step=5 epoch=1"
    assert (resuming not in resumed.stderr) if never else (resuming in resumed.stderr)
    # Batch-log lines: time, rank, step, epoch, loss and throughput, after every step here.
    progress = re.findall(
        r"^\S+ fit rank=0 step=(\d+)/40 epoch=\d/3 loss=\d\.\d{4} "
        r"examples/s=[\d.]+ steps/s=[\d.]+$",
        resumed.stderr,
        re.MULTILINE,
    )
    assert [int(s) for s in progress] == list(range(1 if never else 6, GATED_STEPS + 1))
    for name, expected in uninterrupted_gated.items():
        assert (out / name).read_bytes() == expected, f"{name} differs from the uninterrupted run"
    assert not (out / ".state").exists()


@pytest.mark.slow
def test_signal_outside_the_fit_stops_at_once_and_the_rerun_skips_the_finished_fit(
    tmp_path: Path, trained_pair, uninterrupted_gated
) -> None:
    process = start_gated(tmp_path, trained_pair, "evaluate")
    stderr = signal_at_gate(process, tmp_path, signal.SIGTERM)
    assert process.returncode == 143, stderr
    [line] = stop_lines(stderr)
    assert line.endswith(
        "stopped by SIGTERM during step 2 (evaluate); fit state saved in out/.state; "
        "run the same command to resume; exit 143"
    ), line
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [".state"]
    assert saved_fit_state(out / ".state" / "step1-fit-stage1.safetensors")["finished"]
    resumed = run_cli("--log", "plain", "--log-every", "0", "run", "recipe.yaml", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    finished = "fit: already finished in an earlier run (out/.state/step1-fit-stage1.safetensors)"
    assert f"{finished} steps={GATED_STEPS}" in resumed.stderr
    assert " fit rank=0 step=" not in resumed.stderr, "no fit step runs again"
    for name, expected in uninterrupted_gated.items():
        assert (out / name).read_bytes() == expected


def test_stop_signals_raise_outside_deferred_blocks_and_wait_inside() -> None:
    stops = StopSignals()
    with stops.installed():
        with pytest.raises(Stopped) as raised:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
        assert raised.value.exit_code == 138 and stops.pending() == signal.SIGUSR1
    with stops.installed():
        assert stops.pending() is None  # a fresh run forgets the last one's signal
        with stops.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR1)  # later signals do not replace the first
            time.sleep(0.01)
        assert stops.pending() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "handlers are restored"
    assert (exit_code(signal.SIGTERM), exit_code(signal.SIGINT)) == (143, 130)


@pytest.mark.parametrize(
    ("state", "requeued"),
    [
        ("JobState=RUNNING Reason=None", True),  # --signal=USR1@N, scancel --signal
        ("JobState=COMPLETING Reason=TimeLimit", True),  # SIGTERM at the time limit
        ("JobState=COMPLETING Reason=None", False),  # scancel: someone wants the job gone
        ("JobState=PREEMPTED Reason=Preempted", False),  # SLURM requeues or cancels it itself
    ],
)
def test_requeue_only_a_job_that_runs_or_reached_its_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str, requeued: bool
) -> None:
    from mergecli.runtime import slurm

    # A stand-in scontrol that reports the job's state and records what it was asked.
    calls = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        f'[ "$1" = show ] && echo "JobId=7 JobName=x {state} Restarts=0"\nexit 0\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    problem = slurm.requeue("7")
    asked = calls.read_text().splitlines()
    assert asked[0] == "show job -o 7"
    if requeued:
        assert problem is None and asked[1:] == ["requeue 7"]
    else:
        assert problem.startswith("not requeued: SLURM job 7 is ending") and asked[1:] == []

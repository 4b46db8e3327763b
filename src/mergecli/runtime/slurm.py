"""What mergecli asks of SLURM: where the job's tasks run, a rendezvous port, and requeueing."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping

# A rendezvous port per job: jobs sharing a node get different ports, and a requeued job (same
# id) gets its own port back. The range stays below Linux's ephemeral ports (32768 and up).
PORT_BASE, PORT_SPAN = 12000, 20000


def job_id(env: Mapping[str, str] = os.environ) -> str | None:
    """The SLURM job this process belongs to, if any."""
    return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")


def master_port(job: str) -> int:
    """The port rank 0 listens on, derived from the job id (the same for every task)."""
    digits = re.sub(r"\D", "", job) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as ``gpu[03-05,09],cpu1``.

    Asks ``scontrol show hostnames`` as SLURM's own tools do; where scontrol is missing (a
    copied environment), the first entry is expanded here, which is all a rendezvous needs.
    """
    try:
        result = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = head.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def requeue(job: str) -> str | None:
    """Put the job back in the queue (``scontrol requeue``); None on success, else why not.

    SLURM then ends this run of the job (SIGTERM, SIGKILL after KillWait) and starts the batch
    script again later with SLURM_RESTART_COUNT one higher. A job that is ending for another
    reason than its time limit is left alone: its SIGTERM came from `scancel` (someone wants it
    gone) or from a preemption (SLURM requeues or cancels it itself, as configured).
    """
    state, reason = _job_state(job)
    ending = state is not None and state != "RUNNING"
    if ending and reason != "TimeLimit":
        why = "cancelled" if reason in (None, "None") else reason
        return f"not requeued: SLURM job {job} is ending ({state}, {why})"
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        return "not requeued: scontrol is not on PATH"
    except subprocess.TimeoutExpired:
        return "not requeued: scontrol requeue did not answer within 60 s"
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        return f"not requeued: scontrol requeue {job}: {message[-1] if message else 'failed'}"
    return None


def _job_state(job: str) -> tuple[str | None, str | None]:
    """The job's state and reason as `scontrol show job` tells them (None: unknown)."""
    try:
        result = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    state = re.search(r"\bJobState=(\S+)", result.stdout)
    reason = re.search(r"\bReason=(\S+)", result.stdout)
    return (state.group(1) if state else None), (reason.group(1) if reason else None)

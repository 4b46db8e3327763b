"""Several processes, one per device, under torchrun or srun: who we are and how ranks talk.

mergecli has no launcher of its own. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; srun sets SLURM_PROCID, SLURM_LOCALID and, inside a job step only,
SLURM_STEP_NUM_TASKS (the batch script itself, even with ``--ntasks=4``, is one process and
must not wait for three others). Under srun, rank 0's address is the first host of the step's
nodes and the port is derived from the job id, unless MASTER_ADDR / MASTER_PORT are set.

``current()`` is the world of this process; a single process is a world of one whose
collectives do nothing, so callers never branch on the launcher.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import torch
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.runtime import slurm
from mergecli.runtime.device import resolve_device

# Ranks wait this long for each other (start-up, a slow rank's step) before failing.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Launch:
    """How this process was started: its rank among ``size`` and where rank 0 listens."""

    launcher: Literal["torchrun", "srun"]
    rank: int
    size: int
    local_rank: int
    local_size: int
    master_addr: str
    master_port: int


def detect(env: Mapping[str, str] = os.environ) -> Launch | None:
    """The launch this environment describes; None for a single process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        size = _int(env, "WORLD_SIZE")
        if size <= 1:
            return None
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise MergeCliError(
                f"RANK and WORLD_SIZE are set but {' and '.join(missing)} is not; start "
                "several processes with torchrun (or srun), which sets all of them"
            )
        return Launch(
            "torchrun",
            rank=_int(env, "RANK"),
            size=size,
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_size=_int(env, "LOCAL_WORLD_SIZE", size),
            master_addr=env["MASTER_ADDR"],
            master_port=_int(env, "MASTER_PORT"),
        )
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        size = _int(env, "SLURM_STEP_NUM_TASKS")
        if size <= 1:
            return None
        job = slurm.job_id(env) or "0"
        port = env.get("MASTER_PORT") or str(slurm.master_port(job))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
        return Launch(
            "srun",
            rank=_int(env, "SLURM_PROCID"),
            size=size,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_size=_tasks_on_this_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), size),
            master_addr=env.get("MASTER_ADDR") or slurm.first_host(nodes),
            master_port=_int({"MASTER_PORT": port}, "MASTER_PORT"),
        )
    return None


@dataclass
class World:
    """This process's place among the ranks, its device, and the collectives the run uses."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # the rank's device, fixed at start (None: from recipe)
    launcher: str | None = None
    backend: str | None = None
    _group: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the output and prints the tables."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device_for(self, requested: str) -> torch.device:
        """The device to run on: the rank's own device, or the recipe's for a single process."""
        return self.device if self.device is not None else resolve_device(requested)

    def part(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [start, end) of n items; shares differ by at most one."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; every rank gets the same result."""
        if self._group:
            import torch.distributed as dist

            carrier = self._carrier(tensor)
            dist.all_reduce(carrier)
            if carrier is not tensor:
                tensor.copy_(carrier)
        return tensor

    def gather_rows(self, local: Tensor) -> Tensor:
        """Every rank's rows concatenated in rank order (shares may differ in length)."""
        if not self._group:
            return local
        import torch.distributed as dist

        counts = torch.zeros(self.size, dtype=torch.int64)
        counts[self.rank] = local.shape[0]
        self.all_reduce_(counts)
        longest = int(counts.max())
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        carrier = self._carrier(padded)
        parts = [torch.empty_like(carrier) for _ in range(self.size)]
        dist.all_gather(parts, carrier)
        rows = [p[: int(c)].to(local.device) for p, c in zip(parts, counts, strict=True)]
        return torch.cat(rows)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank gets the answer; a barrier too)."""
        if not self._group:
            return flag
        return bool(self.all_reduce_(torch.tensor([float(flag)]))[0] > 0)

    def _carrier(self, tensor: Tensor) -> Tensor:
        """The tensor on the device the backend works on: CUDA for nccl, the CPU for gloo."""
        if self.backend == "nccl" and tensor.device.type != "cuda":
            return tensor.to(self.device)
        if self.backend == "gloo" and tensor.device.type != "cpu":
            return tensor.cpu()
        return tensor


_CURRENT = World()


def current() -> World:
    """The world of this process (a world of one unless ``start`` joined several)."""
    return _CURRENT


def start(requested_device: str, env: Mapping[str, str] = os.environ) -> World:
    """Join the other ranks if a launcher started several processes; pick this rank's device.

    One device per local rank: CUDA when the recipe allows it (nccl), else the CPU (gloo).
    """
    global _CURRENT
    launch = detect(env)
    if launch is None:
        _CURRENT = World()
        return _CURRENT
    import torch._dynamo  # noqa: F401 - see below
    import torch.distributed as dist

    # Imported after the process group exists, torch._dynamo (which the optimisers import on
    # their first step) keeps a reference to it: destroy_process_group then leaves gloo's
    # threads running and the process may abort at exit ("terminate called without an active
    # exception"). Imported first, it does not.
    device = rank_device(requested_device, launch)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in env:
        # Ranks sharing a node share its cores; oversubscribed threads only slow every rank.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        torch.set_num_threads(max(1, cores // launch.local_size))
    host = f"[{launch.master_addr}]" if ":" in launch.master_addr else launch.master_addr
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.size,
            timeout=TIMEOUT,
        )
    except (RuntimeError, ValueError) as exc:
        raise MergeCliError(
            f"rank {launch.rank}/{launch.size} ({launch.launcher}): cannot join the other ranks "
            f"at {launch.master_addr}:{launch.master_port} ({str(exc).splitlines()[0]}); check "
            "that the host is reachable and the port free (set MASTER_ADDR / MASTER_PORT)"
        ) from None
    _CURRENT = World(
        rank=launch.rank,
        size=launch.size,
        local_rank=launch.local_rank,
        device=device,
        launcher=launch.launcher,
        backend=backend,
        _group=True,
    )
    return _CURRENT


def stop(wait: bool = False) -> None:
    """Leave the process group (if any); this process is a world of one again.

    ``wait``: every rank finished normally, so wait for the others first. A rank tearing
    gloo down while another still writes its outputs could abort at exit ("terminate called
    without an active exception"); after a failure no rank waits, since another may never come.
    """
    global _CURRENT
    if _CURRENT._group:
        import torch.distributed as dist

        if wait:
            dist.barrier()
        dist.destroy_process_group()
    _CURRENT = World()


def rank_device(requested: str, launch: Launch) -> torch.device:
    """Local rank k takes GPU k (or the one GPU it sees when SLURM binds one per task)."""
    if requested in ("cpu", "mps") or not torch.cuda.is_available():
        if requested.startswith("cuda"):
            resolve_device(requested)  # raises the usual "no CUDA GPU" error
        return torch.device("cpu")
    if re.fullmatch(r"cuda:\d+", requested):
        raise MergeCliError(
            f"device: {requested} pins one GPU, but {launch.size} processes run (one per GPU); "
            "use device: auto or cuda and each local rank takes its own GPU"
        )
    count = torch.cuda.device_count()
    if launch.local_rank < count:
        return torch.device("cuda", launch.local_rank)
    if count == 1 and launch.launcher == "srun":
        # SLURM binds one GPU per task (--gpus-per-task=1): each task sees its own as GPU 0.
        # torchrun's processes all see the same GPUs, so there one GPU would be shared, which
        # nccl refuses.
        return torch.device("cuda", 0)
    raise MergeCliError(
        f"local rank {launch.local_rank} has no GPU of its own ({count} visible); start at most "
        f"{count} processes per node, or set device: cpu"
    )


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise MergeCliError(f"{key} is not set; it must be an integer")
        return default
    try:
        return int(value)
    except ValueError:
        raise MergeCliError(f"{key}={value!r} is not an integer") from None


def _tasks_on_this_node(tasks_per_node: str, size: int) -> int:
    """From SLURM's compact form such as ``4(x2),3``: the most tasks any node runs."""
    counts = [int(m) for m in re.findall(r"(\d+)(?:\(x\d+\))?", tasks_per_node)]
    return max(counts) if counts else size

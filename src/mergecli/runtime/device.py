"""Choosing the torch device a recipe runs on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mergecli.errors import MergeCliError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MergeCliError(
                f"device: {name} was asked for but torch sees no CUDA GPU "
                f"(torch {torch.__version__}); use device: auto or cpu"
            )
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise MergeCliError(
                f"device: {name} does not exist (this machine has "
                f"{torch.cuda.device_count()} GPU(s)); use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise MergeCliError("device: mps was asked for but is not available; use auto or cpu")
    return torch.device(name)


@contextmanager
def one_core_spared() -> Iterator[None]:
    """torch on one intra-op thread fewer for the block, so that the run's own threads (hashing
    the inputs, writing the output) have a core: on 2 cores, intra-op threads that wait for the
    core those hold stall every parallel operation (a streamed Model Stock merge of three 1 GB
    models took 3.7 s with 1 thread and 4.6-5.0 s with 2; TIES the same with either).

    A fixed count for the whole block, not one that follows the background work: a parallel
    reduction's result may depend on the thread count, and a run must not depend on timing.
    """
    with _threads(max(1, torch.get_num_threads() - 1)):
        yield


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block: for work in pieces too small for a second
    thread, which on a busy machine makes them several times slower, not faster."""
    with _threads(1):
        yield


@contextmanager
def _threads(count: int) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

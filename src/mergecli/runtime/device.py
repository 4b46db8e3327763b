"""Choosing the torch device a recipe runs on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


class SpareCore:
    """torch on one intra-op thread fewer while ``busy()`` (work on other threads, such as
    hashing the inputs) holds; `update` checks, `restore` gives the thread back.

    On few cores, an intra-op thread waiting for a core that the other work holds stalls every
    parallel operation: a streamed Model Stock merge on 2 cores took 6.2 s with 2 threads
    beside the hashing and 5.2 s with 1.
    """

    def __init__(self, busy: Callable[[], bool]) -> None:
        self.busy = busy
        self.threads = torch.get_num_threads()
        self.spared = False

    def update(self) -> None:
        spare = self.threads > 1 and self.busy()
        if spare != self.spared:
            torch.set_num_threads(self.threads - 1 if spare else self.threads)
            self.spared = spare

    def restore(self) -> None:
        if self.spared:
            torch.set_num_threads(self.threads)
            self.spared = False


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block: for work in pieces too small for a second
    thread, which on a busy machine makes them several times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

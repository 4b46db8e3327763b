"""An in-memory dataset and fast batch iteration over it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from mergecli.errors import MergeCliError


@dataclass
class TensorData:
    """A whole dataset held in memory: inputs ``x`` (N, ...) float32 and labels ``y`` (N,) int64."""

    x: Tensor
    y: Tensor
    # Each example's row in its source (file, dataset), so that messages about one example
    # name the row a user can find; None: example i is row i.
    rows: Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dim() == 0 or self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"TensorData needs x (N, ...) and y (N,), got {tuple(self.x.shape)} "
                f"and {tuple(self.y.shape)}"
            )
        if self.rows is not None and self.rows.shape != self.y.shape:
            raise ValueError(f"TensorData rows {tuple(self.rows.shape)} do not match y")

    def __len__(self) -> int:
        """Number of examples."""
        return int(self.y.shape[0])

    def source_row(self, index: int) -> int:
        """The row in its source of example ``index``."""
        return index if self.rows is None else int(self.rows[index])

    def take(self, index: Tensor) -> TensorData:
        """The examples at ``index`` (a boolean mask or positions), with their source rows."""
        rows = self.rows if self.rows is not None else torch.arange(len(self))
        return TensorData(self.x[index], self.y[index], rows[index])

    def pin_memory(self) -> TensorData:
        """A copy in page-locked memory, so copies to the GPU can overlap compute (no-op on CPU)."""
        if not torch.cuda.is_available() or self.x.device.type != "cpu":
            return self
        return TensorData(self.x.pin_memory(), self.y.pin_memory(), self.rows)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        part: tuple[int, int] | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` batches on ``device``; one full pass (epoch) per call.

        ``part=(rank, world)`` yields only that rank's contiguous share of every batch (shares
        differ by at most one example and may be empty), cut before the copy to ``device``:
        the batches, their order and the shuffle stay those of one process, whatever the world.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise MergeCliError(f"batch_size must be a positive integer, got {batch_size!r}")
        device = torch.device(device)
        n = len(self)
        x, y = self.x, self.y
        pinned = x.is_pinned()
        if shuffle:
            # One gather per epoch, then cheap contiguous views: far faster than per-item indexing.
            perm = torch.randperm(n, generator=generator).to(x.device)
            if pinned:
                # A plain gather would land in pageable memory and lose the async copy.
                x_perm = torch.empty_like(x, pin_memory=True)
                y_perm = torch.empty_like(y, pin_memory=True)
                torch.index_select(x, 0, perm, out=x_perm)
                torch.index_select(y, 0, perm, out=y_perm)
                x, y = x_perm, y_perm
            else:
                x, y = x[perm], y[perm]
        non_blocking = pinned and device.type == "cuda"
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if part is not None:
                start, end = share(start, end, *part)
            yield (
                x[start:end].to(device, non_blocking=non_blocking),
                y[start:end].to(device, non_blocking=non_blocking),
            )


def share(start: int, end: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous piece of [start, end) when ``world`` ranks split it."""
    size = end - start
    return start + size * rank // world, start + size * (rank + 1) // world

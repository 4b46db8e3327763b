"""An in-memory dataset and fast batch iteration over it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mergecli.errors import MergeCliError

if TYPE_CHECKING:
    from mergecli.data.transforms import BatchTransform


@dataclass(frozen=True)
class TokenBatch:
    """Token ids (B, L) with their attention mask (B, L): 1 for a real token, 0 for padding."""

    ids: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenBatch:
        return TokenBatch(
            self.ids.to(device, non_blocking=non_blocking),
            self.mask.to(device, non_blocking=non_blocking),
        )

    def __getitem__(self, index: Any) -> TokenBatch:
        return TokenBatch(self.ids[index], self.mask[index])


@dataclass
class TensorData:
    """A whole dataset held in memory: inputs ``x`` (N, ...) — float32, int64 token ids, or
    uint8 pixels with the ``transform`` that makes them model inputs — and labels ``y`` (N,)
    int64; token ids may come with an attention ``mask`` (N, L)."""

    x: Tensor
    y: Tensor
    # Each example's row in its source (file, dataset), so that messages about one example
    # name the row a user can find; None: example i is row i.
    rows: Tensor | None = None
    # 1 for a real token, 0 for padding; batches then carry it with the ids (TokenBatch).
    mask: Tensor | None = None
    # Images are kept as stored (uint8: a quarter of float32) and become inputs per batch:
    # to float, normalised, and augmented in training passes (see `batches`).
    transform: BatchTransform | None = None

    def __post_init__(self) -> None:
        if self.x.dim() == 0 or self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"TensorData needs x (N, ...) and y (N,), got {tuple(self.x.shape)} "
                f"and {tuple(self.y.shape)}"
            )
        if self.rows is not None and self.rows.shape != self.y.shape:
            raise ValueError(f"TensorData rows {tuple(self.rows.shape)} do not match y")
        if self.mask is not None and self.mask.shape != self.x.shape[:2]:
            raise ValueError(
                f"TensorData mask {tuple(self.mask.shape)} does not match x {tuple(self.x.shape)}"
            )

    def __len__(self) -> int:
        """Number of examples."""
        return int(self.y.shape[0])

    def source_row(self, index: int) -> int:
        """The row in its source of example ``index``."""
        return index if self.rows is None else int(self.rows[index])

    def take(self, index: Tensor) -> TensorData:
        """The examples at ``index`` (a boolean mask or positions), with their source rows."""
        rows = self.rows if self.rows is not None else torch.arange(len(self))
        mask = self.mask[index] if self.mask is not None else None
        return TensorData(self.x[index], self.y[index], rows[index], mask, self.transform)

    def with_labels(self, y: Tensor) -> TensorData:
        """The same inputs (and mask) with other labels, e.g. example indices for a fit."""
        return TensorData(self.x, y, self.rows, self.mask, self.transform)

    def inputs(self, index: Any = slice(None)) -> Tensor | TokenBatch:
        """The inputs at ``index`` as a model takes them: the tensor (stored pixels transformed,
        never augmented), or ids with their mask."""
        if self.mask is None:
            return self.features(index)
        return TokenBatch(self.x[index], self.mask[index])

    def features(self, index: Any = slice(None)) -> Tensor:
        """The input tensor at ``index``: ``x``, or stored pixels through ``transform``."""
        x = self.x[index]
        return self.transform(x) if self.transform is not None else x

    def pin_memory(self) -> TensorData:
        """A copy in page-locked memory, so copies to the GPU can overlap compute (no-op on CPU)."""
        if not torch.cuda.is_available() or self.x.device.type != "cpu":
            return self
        mask = self.mask.pin_memory() if self.mask is not None else None
        return TensorData(self.x.pin_memory(), self.y.pin_memory(), self.rows, mask, self.transform)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        part: tuple[int, int] | None = None,
        augment: bool | None = None,
    ) -> Iterator[tuple[Tensor | TokenBatch, Tensor]]:
        """Yield ``(x, y)`` batches on ``device``; one full pass (epoch) per call. With a mask,
        ``x`` is a ``TokenBatch`` of the ids and their mask.

        Stored pixels go through ``transform`` per batch, on ``device`` (a quarter of the bytes
        copied). ``augment`` (default: ``shuffle``, since a shuffled pass is a training pass:
        `train` and `fit` shuffle, evaluation, statistics and alignment do not) runs its random
        steps, vectorised over the batch and drawn from ``generator`` after the shuffle, so a
        seeded pass is reproducible; they run only for data loaded with ``augment: true``.

        ``part=(rank, world)`` yields only that rank's contiguous share of every batch (shares
        differ by at most one example and may be empty), cut before the copy to ``device``:
        the batches, their order and the shuffle stay those of one process, whatever the world.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise MergeCliError(f"batch_size must be a positive integer, got {batch_size!r}")
        device = torch.device(device)
        n = len(self)
        x, y, mask = self.x, self.y, self.mask
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
                if mask is not None:
                    mask_perm = torch.empty_like(mask, pin_memory=True)
                    torch.index_select(mask, 0, perm, out=mask_perm)
                    mask = mask_perm
            else:
                x, y = x[perm], y[perm]
                mask = mask[perm] if mask is not None else None
        non_blocking = pinned and device.type == "cuda"
        train = shuffle if augment is None else augment
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            # A rank draws the whole batch's augmentations and keeps its share's: every rank's
            # generator then stays in step with one process's.
            batch = (start, end - start)
            if part is not None:
                start, end = share(start, end, *part)
            inputs = x[start:end].to(device, non_blocking=non_blocking)
            if self.transform is not None:
                inputs = self.transform(inputs, train, generator, (start - batch[0], batch[1]))
            if mask is not None:
                inputs = TokenBatch(inputs, mask[start:end].to(device, non_blocking=non_blocking))
            yield inputs, y[start:end].to(device, non_blocking=non_blocking)


def share(start: int, end: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous piece of [start, end) when ``world`` ranks split it."""
    size = end - start
    return start + size * rank // world, start + size * (rank + 1) // world

"""Buffers that a tensor-by-tensor merge reuses from one tensor to the next."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Workspace:
    """One buffer per role (the stack, a read, the base), grown to the largest tensor so far.

    A fresh allocation of hundreds of MB costs the kernel's zeroing of every page, and a merge
    makes several per tensor: for a cheap method such as Model Stock that costs more than its
    arithmetic. A buffer's contents are only valid until the next ``take`` of its role.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, Tensor] = {}

    def take(
        self,
        role: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` in ``role``'s buffer."""
        device = self.device if device is None else torch.device(device)
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < nbytes or buffer.device != device:
            self._buffers.pop(role, None)  # freed first: never the old and the new at once
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._buffers[role] = buffer
        return buffer[:nbytes].view(dtype).view(shape)

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` lies in one of the buffers (and so changes with the next take)."""
        if not tensor.numel():
            return False
        pointer = tensor.untyped_storage().data_ptr()
        return any(
            b.device == tensor.device and b.untyped_storage().data_ptr() == pointer
            for b in self._buffers.values()
        )

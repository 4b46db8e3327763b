"""Writing a model tensor by tensor straight to disk, from a plan made before merging.

Every output tensor's name, shape and dtype are known before any is computed (from the inputs'
headers), so each shard's safetensors header can be written first and each tensor appended the
moment it is ready: nothing is buffered. Shards carry temporary names until ``close`` renames
them (``model-0000k-of-0000N.safetensors``, or ``model.safetensors`` for one) and writes the
index last.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mergecli.errors import MergeCliError
from mergecli.io.checkpoint import INDEX_NAME
from mergecli.io.safetensors_format import safetensors_header
from mergecli.io.writer import SINGLE_NAME, shard_name

Plan = list[tuple[str, tuple[int, ...], torch.dtype]]


class ShardWriter:
    """Streams tensors, in plan order, into shards of at most ``shard_size`` bytes."""

    def __init__(
        self, out_dir: Path, plan: Plan, metadata: dict[str, str], shard_size: int | None
    ) -> None:
        self.out_dir, self.metadata = out_dir, metadata
        self.shards: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            spec = torch.empty(shape, dtype=dtype, device="meta")  # shape and dtype, no memory
            nbytes = spec.numel() * spec.element_size()
            if shard_size is not None and self.shards[-1] and size + nbytes > shard_size:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, spec))
            size += nbytes
        self.total_size = sum(
            s.numel() * s.element_size() for shard in self.shards for _, s in shard
        )
        self._order = [
            (i, name, spec) for i, shard in enumerate(self.shards) for name, spec in shard
        ]
        self._next = 0
        self._temps: list[Path] = []
        self._handle = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        shard, expected, spec = self._order[self._next]
        if name != expected or tuple(tensor.shape) != tuple(spec.shape):
            raise RuntimeError(f"writer expected {expected} {tuple(spec.shape)}, got {name}")
        if shard == len(self._temps):
            self._open(shard)
        data = tensor.detach().to("cpu", spec.dtype).contiguous().reshape(-1)
        try:
            if data.numel():
                self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        except OSError as exc:
            self.abort()
            raise self._error(exc) from None
        self._next += 1

    def _open(self, shard: int) -> None:
        if self._handle is not None:
            self._handle.close()
        tmp = self.out_dir / f".shard-{shard + 1}.tmp-{os.getpid()}"
        self._temps.append(tmp)
        try:
            self._handle = open(tmp, "wb")  # noqa: SIM115 - closed by the next shard or close()
            self._handle.write(safetensors_header(dict(self.shards[shard]), self.metadata))
        except OSError as exc:
            self.abort()
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> MergeCliError:
        return MergeCliError(
            f"{self.out_dir}: cannot write the output directory ({exc.strerror or exc}); "
            "free some space or choose another output.dir"
        )

    def close(self) -> list[Path]:
        """Move every shard (and the index) to its final name once all tensors are in."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} tensors")
        if not self._temps:
            self._open(0)
        self._handle.close()
        count = len(self._temps)
        names = [SINGLE_NAME] if count == 1 else [shard_name(i + 1, count) for i in range(count)]
        finals = []
        for tmp, final in zip(self._temps, names, strict=True):
            os.replace(tmp, self.out_dir / final)
            finals.append(self.out_dir / final)
        stale = [INDEX_NAME] if count == 1 else [SINGLE_NAME]
        stale += [p.name for p in self.out_dir.glob("model-*-of-*.safetensors") if p not in finals]
        if count > 1:
            index = {
                "metadata": {"total_size": self.total_size, **self.metadata},
                "weight_map": {
                    n: f for shard, f in zip(self.shards, names, strict=True) for n, _ in shard
                },
            }
            tmp = self.out_dir / f".{INDEX_NAME}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(index, indent=2))
            os.replace(tmp, self.out_dir / INDEX_NAME)
            finals.append(self.out_dir / INDEX_NAME)
        for name in stale:
            (self.out_dir / name).unlink(missing_ok=True)
        return finals

    def abort(self) -> None:
        """Remove every shard written so far (a failed run leaves nothing behind)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for tmp in self._temps:
            tmp.unlink(missing_ok=True)

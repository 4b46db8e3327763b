"""Writing a model tensor by tensor: shards are flushed as they fill, renamed at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mergecli.errors import MergeCliError
from mergecli.io.checkpoint import INDEX_NAME
from mergecli.io.safetensors_format import write_safetensors
from mergecli.io.writer import SINGLE_NAME, shard_name


class ShardWriter:
    """Buffers tensors up to ``shard_size`` bytes, writes each full shard under a temporary
    name, and on ``close`` renames them to ``model-0000k-of-0000N.safetensors`` (or
    ``model.safetensors`` when one shard holds everything) and writes the index last.
    Peak memory is one shard's buffer; nothing appears under a final name before ``close``.
    """

    def __init__(
        self,
        out_dir: Path,
        metadata: dict[str, str],
        shard_size: int | None,
        dtype: torch.dtype | None,
    ) -> None:
        self.out_dir, self.metadata = out_dir, metadata
        self.shard_size, self.dtype = shard_size, dtype
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.shard_size is not None and self._buffer and self._buffered + size > self.shard_size:
            self._flush()
        self._buffer[name] = tensor
        self._buffered += size
        self.total_size += size

    def _flush(self) -> None:
        tmp = self.out_dir / f".shard-{len(self._written) + 1}.tmp-{os.getpid()}"
        try:
            write_safetensors(tmp, self._buffer, self.metadata)
        except OSError as exc:
            self.abort()
            tmp.unlink(missing_ok=True)
            raise MergeCliError(
                f"{self.out_dir}: cannot write the output directory ({exc.strerror or exc}); "
                "free some space or choose another output.dir"
            ) from None
        self._written.append((tmp, list(self._buffer)))
        self._buffer, self._buffered = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, then move every shard (and the index) to its final name."""
        if self._buffer or not self._written:
            self._flush()
        count = len(self._written)
        names = [SINGLE_NAME] if count == 1 else [shard_name(i + 1, count) for i in range(count)]
        finals = []
        for (tmp, _), final in zip(self._written, names, strict=True):
            os.replace(tmp, self.out_dir / final)
            finals.append(self.out_dir / final)
        stale = [INDEX_NAME] if count == 1 else [SINGLE_NAME]
        stale += [p.name for p in self.out_dir.glob("model-*-of-*.safetensors") if p not in finals]
        if count > 1:
            index = {
                "metadata": {"total_size": self.total_size, **self.metadata},
                "weight_map": {
                    n: f for (_, ns), f in zip(self._written, names, strict=True) for n in ns
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
        for tmp, _ in self._written:
            tmp.unlink(missing_ok=True)
        self._written, self._buffer = [], {}

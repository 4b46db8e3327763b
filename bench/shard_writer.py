"""The model writer syncing to disk while the merge computes, against syncing all at close.

A producer stands in for a streamed merge: it takes ``--compute-ms`` per tensor (sleeping, so the
comparison holds on any core count) and hands 32 MB tensors to `ShardWriter`, 1 GB in all. The
same writes run with a sync every `_SYNC_EVERY` bytes on a thread of its own and with all of it
left to the close (the writer before 2026-12-01), alternating, and the medians of the whole write
(adds and close) are compared. The gain is the disk's time that now overlaps the computing:
large on a slow disk, none on one that writes faster than the merge produces.
Run: .venv/bin/python bench/shard_writer.py [--dir /tmp/shard-writer] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

import mergecli.io.writer as writer_module
from mergecli.io.writer import ShardWriter

TENSORS, NUMEL = 32, 16 << 20  # float16: 32 MB each


def write_once(folder: Path, compute_s: float, flush_every: int) -> tuple[float, float]:
    """Seconds of the adds and of the close, for one 1 GB write."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tensor = torch.ones(NUMEL, dtype=torch.float16)
    plan = [(f"t{i}", (NUMEL,), torch.float16) for i in range(TENSORS)]
    default, writer_module._SYNC_EVERY = writer_module._SYNC_EVERY, flush_every
    try:
        start = time.perf_counter()
        writer = ShardWriter(folder, plan, {}, shard_size=None)
        for i in range(TENSORS):
            time.sleep(compute_s)
            writer.add(f"t{i}", tensor)
        added = time.perf_counter()
        writer.close()
        return added - start, time.perf_counter() - added
    finally:
        writer_module._SYNC_EVERY = default
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/shard-writer"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compute-ms", type=float, default=100.0, help="per 32 MB tensor")
    args = parser.parse_args()
    variants = {"synced while computing": writer_module._SYNC_EVERY, "all at close": 1 << 62}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        names = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in names:
            runs[name].append(write_once(args.dir, args.compute_ms / 1000, variants[name]))
    print(f"1 GB in {TENSORS} tensors, {args.compute_ms:.0f} ms of computing each, to {args.dir}")
    totals = {}
    for name, measured in runs.items():
        adds = statistics.median(a for a, _ in measured)
        close = statistics.median(c for _, c in measured)
        totals[name] = statistics.median(a + c for a, c in measured)
        print(f"{name:22} adds {adds:6.2f} s  close {close:5.2f} s  total {totals[name]:6.2f} s")
    ratio = totals["synced while computing"] / totals["all at close"]
    print(f"ratio synced-while-computing / all-at-close: {ratio:.2f} (total)")


if __name__ == "__main__":
    main()

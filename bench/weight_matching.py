"""Weight matching: time in the assignment solver (LAP) against everything else, same run.

Everything else = building cost matrices, permuting the other axes, bookkeeping. The goal is
that it costs at most half the LAP time (ratio <= 0.5) on two ResNet-20x4 models.
Run: .venv/bin/python bench/weight_matching.py [--width 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mergecli.align.spec import derive_spec
from mergecli.align.weight_matching import MatchingStats, weight_matching
from mergecli.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = [build_model("resnet20", {"width": args.width}) for _ in range(2)]
    spec = derive_spec(models[0], torch.randn(2, 3, 32, 32))
    a, b = (m.state_dict() for m in models)
    runs = []
    for _ in range(args.repeats):
        stats = MatchingStats()
        start = time.perf_counter()
        weight_matching(spec, a, b, device=args.device, stats=stats)
        total = time.perf_counter() - start
        runs.append((total, stats.lap_seconds, stats.other_seconds, stats.sweeps))
    total, lap, other, sweeps = (statistics.median(r[i] for r in runs) for i in range(4))
    units = sum(g.size for g in spec.groups)
    print(f"resnet20 x{args.width} on {args.device}: {len(spec.groups)} groups, {units} units")
    print(
        f"sweeps {sweeps:.0f}, total {total:.3f} s, LAP {lap:.3f} s, everything else {other:.3f} s"
    )
    verdict = "meets" if other / lap <= 0.5 else "MISSES"
    print(f"everything else / LAP = {other / lap:.2f} ({verdict} the <= 0.5 goal)")


if __name__ == "__main__":
    main()

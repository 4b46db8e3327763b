"""Start-up cost of `mergecli --help` against the bare interpreter, measured in the same run.

Prints the median wall time of each command and the ratios; the goal is that --help stays
far from the cost of importing torch (absolute goal: <= 0.3 s).
Run: .venv/bin/python bench/cli_startup.py [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "mergecli --help": [sys.executable, "-m", "mergecli", "--help"],
    "mergecli --version": [sys.executable, "-m", "mergecli", "--version"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def median_seconds(command: list[str], repeats: int) -> float:
    """Median wall time of running ``command`` to completion."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    repeats = parser.parse_args().repeats
    for command in COMMANDS.values():  # warm the file cache so the first row is not penalised
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    results = {name: median_seconds(cmd, repeats) for name, cmd in COMMANDS.items()}
    baseline = results["python -c pass (baseline)"]
    torch_import = results["python -c 'import torch'"]
    print(f"{'command':32} {'median s':>9} {'x python':>9} {'x import torch':>15}")
    for name, seconds in results.items():
        print(f"{name:32} {seconds:9.3f} {seconds / baseline:9.2f} {seconds / torch_import:15.2f}")
    help_seconds = results["mergecli --help"]
    verdict = "meets" if help_seconds <= 0.3 else "MISSES"
    print(f"mergecli --help: {help_seconds:.3f} s, {verdict} the 0.3 s goal")


if __name__ == "__main__":
    main()

"""One NP Merge fit step against one plain training step of the same model, same run.

Both use the same batch, Adam, and device. The fit step merges two models' parameters from
per-parameter logits (one fused pass), runs the module with torch.func.functional_call, and
updates the logits; the baseline step trains the module's own parameters. Prints the median
times and their ratio (goal <= 1.10), and the memory the fit holds against
(N + 3) x parameters x 4 bytes (+ activations).
Run: .venv/bin/python bench/fit_step.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mergecli.merge.coefficients import FlatParameters, pairwise_merge
from mergecli.merge.fit_loop import CoefficientStep, FitConfig
from mergecli.models import build_model

CASES = {
    "mlp 8x128, batch 128": ("mlp", {"depth": 8, "hidden": 128}, (128, 1, 28, 28)),
    "resnet20x2, batch 128": ("resnet20", {"width": 2}, (128, 3, 32, 32)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_step_seconds(step, device: torch.device, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(arch: str, args: dict, shape: tuple, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(*shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)

    # Baseline: a plain training step of the same module.
    plain = build_model(arch, args).to(device).train()
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)

    def train_step() -> None:
        loss = F.cross_entropy(plain(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # NP Merge: two frozen models, trainable logits, the same module run functionally.
    module = build_model(arch, args).to(device).train()
    models = [build_model(arch, args).state_dict() for _ in range(2)]
    names = [n for n, _ in module.named_parameters()]
    flat = FlatParameters.stack(models, names, device)
    buffers = {n: t.to(device) for n, t in models[0].items() if n not in names}
    config = FitConfig("parameter", "adam", 0.05, 1, None, shape[0], 0.0, 0, 10**9)
    fit = CoefficientStep(
        module, flat, buffers, pairwise_merge, torch.zeros(flat.thetas.shape[1]),
        lambda out, index: F.cross_entropy(out, y), config, device,
    )  # fmt: skip

    def fit_step() -> None:
        fit.update(fit.loss(x, y))

    # Interleave the two measurements so that machine noise hits both alike.
    plain_times, fit_times = [], []
    for _ in range(3):
        plain_times.append(median_step_seconds(train_step, device, repeats))
        fit_times.append(median_step_seconds(fit_step, device, repeats))
    plain_s, fit_s = statistics.median(plain_times), statistics.median(fit_times)
    params = flat.thetas.shape[1]
    held = (flat.thetas.numel() + 3 * params) * 4  # models + logits, grad, Adam's two moments
    return {"plain_s": plain_s, "fit_s": fit_s, "params": params, "held_bytes": held}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"{'case':24} {'plain ms':>9} {'fit ms':>8} {'fit/plain':>10} {'params':>9} "
        f"{'(N+3)P*4 MB':>12}"
    )
    for case, (arch, model_args, shape) in CASES.items():
        r = bench_case(arch, model_args, shape, device, args.repeats)
        print(
            f"{case:24} {1e3 * r['plain_s']:9.2f} {1e3 * r['fit_s']:8.2f} "
            f"{r['fit_s'] / r['plain_s']:10.2f} {r['params']:9,} {r['held_bytes'] / 1e6:12.1f}"
        )
        if device.type == "cuda":
            print(f"  peak CUDA memory {torch.cuda.max_memory_allocated(device) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()

"""One NP Merge fit step against one plain training step of the same model, same run.

Both use the same batch, Adam, and device. The fit step merges two models' parameters from
per-parameter logits (one fused pass), runs the module with torch.func.functional_call, and
updates the logits; the baseline step trains the module's own parameters. Prints the median
times and their ratio (goal <= 1.10), and the memory the fit holds against
(N + 3) x parameters x 4 bytes (+ activations).
Run: .venv/bin/python bench/fit_step.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mergecli.fit.coefficients import FlatParameters, pairwise_merge
from mergecli.fit.loop import CoefficientStep, FitConfig
from mergecli.models import build_model

# name: (arch, args, input shape, share of --repeats: the ResNet step takes ~1 s on 2 cores)
CASES = {
    "mlp 8x128, batch 128": ("mlp", {"depth": 8, "hidden": 128}, (128, 1, 28, 28), 1.0),
    "resnet20x2, batch 128": ("resnet20", {"width": 2}, (128, 3, 32, 32), 0.1),
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

    # Alternate the two steps one by one so that machine noise hits both alike.
    for _ in range(3):
        train_step()
        fit_step()
    plain_times, fit_times = [], []
    for _ in range(repeats):
        plain_times.append(median_step_seconds(train_step, device, 1, warmup=0))
        fit_times.append(median_step_seconds(fit_step, device, 1, warmup=0))
    plain_s, fit_s = statistics.median(plain_times), statistics.median(fit_times)
    params = flat.thetas.shape[1]
    held = (flat.thetas.numel() + 3 * params) * 4  # models + logits, grad, Adam's two moments
    return {"plain_s": plain_s, "fit_s": fit_s, "params": params, "held_bytes": held}


def bench_epoch(device: torch.device) -> tuple[float, float]:
    """A whole epoch on the 8,000 bundled MNIST training images: plain training vs fit_logits."""
    from mergecli.data import TensorData, load_data
    from mergecli.fit.loop import FitProblem, fit_logits
    from mergecli.runtime.log import Log

    data = load_data({"source": "mnist", "split": "train"})
    torch.manual_seed(0)
    plain = build_model("mlp", {"depth": 8, "hidden": 128}).to(device)
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)

    def plain_epoch() -> None:
        generator = torch.Generator().manual_seed(0)
        for x, y in data.batches(128, shuffle=True, generator=generator, device=device):
            loss = F.cross_entropy(plain(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    module = build_model("mlp", {"depth": 8, "hidden": 128}).to(device)
    models = [build_model("mlp", {"depth": 8, "hidden": 128}).state_dict() for _ in range(2)]
    names = [n for n, _ in module.named_parameters()]
    flat = FlatParameters.stack(models, names, device)
    labels = data.y.to(device)
    indexed = TensorData(data.x, torch.arange(len(data)))
    config = FitConfig("parameter", "adam", 0.05, 1, None, 128, 0.0, 0, 10**9)
    quiet = Log("plain")
    quiet.info = lambda *args, **kwargs: None  # keep the bench's output to its table

    problem = FitProblem(
        module, flat, {}, pairwise_merge, torch.zeros(flat.thetas.shape[1]), indexed,
        lambda out, index: F.cross_entropy(out, labels[index]), device,
    )  # fmt: skip

    def fit_epoch() -> None:
        fit_logits(problem, config, quiet)

    plain_s = statistics.median(median_step_seconds(plain_epoch, device, 3, 1) for _ in range(3))
    fit_s = statistics.median(median_step_seconds(fit_epoch, device, 3, 1) for _ in range(3))
    return plain_s, fit_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"{'case':24} {'plain ms':>9} {'fit ms':>8} {'fit/plain':>10} {'params':>9} "
        f"{'(N+3)P*4 MB':>12}"
    )
    for case, (arch, model_args, shape, share) in CASES.items():
        r = bench_case(arch, model_args, shape, device, max(5, round(share * args.repeats)))
        print(
            f"{case:24} {1e3 * r['plain_s']:9.2f} {1e3 * r['fit_s']:8.2f} "
            f"{r['fit_s'] / r['plain_s']:10.2f} {r['params']:9,} {r['held_bytes'] / 1e6:12.1f}"
        )
        if device.type == "cuda":
            print(f"  peak CUDA memory {torch.cuda.max_memory_allocated(device) / 1e6:.1f} MB")
    plain_s, fit_s = bench_epoch(device)
    print(
        f"{'mlp 8x128 whole epoch':24} {1e3 * plain_s:9.1f} {1e3 * fit_s:8.1f} "
        f"{fit_s / plain_s:10.2f}   (8,000 MNIST images, batch 128, data path included)"
    )


if __name__ == "__main__":
    main()

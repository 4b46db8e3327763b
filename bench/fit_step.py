"""One NP Merge fit step against one plain training step of the same model, same run.

Both use the same batch, Adam, and device. The fit step merges two models' parameters from
per-parameter logits (one fused pass), runs the module with torch.func.functional_call, and
updates the logits; the baseline step trains the module's own parameters. Prints the median
times and their ratio (goal <= 1.10), and the memory the fit holds against
(N + 3) x parameters x 4 bytes (+ activations).
Run: .venv/bin/python bench/fit_step.py [--repeats 200]

With --llama: the fit over task vectors (a base and two fine-tunes, from task arithmetic) on a
small Llama-style causal LM (transformers' LlamaForCausalLM from a config: hidden 256, 4 layers,
vocab 8192; batch 8 x 128 random token ids; next-token cross-entropy) at granularity parameter,
row and tensor, and at row through `shard: fsdp`'s parametrized module (one process: nothing is
sharded, so it shows the parametrizations' cost), against a plain fine-tuning step (Adam) of the
same model on the same batch. Times: fit and plain steps alternated in this process, medians.
Memory: each kind of step in a fresh process, its peak resident set during the building of the
step's own state and three steps (VmHWM, reset through /proc/self/clear_refs once the inputs
exist: the checkpoints, module and batch) minus its resident set at that moment (VmRSS); on CUDA
the allocator's peak.
Run: .venv/bin/python bench/fit_step.py --llama [--repeats 10]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
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


LLAMA = {
    "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
}  # fmt: skip
BATCH, SEQ = 8, 128
GRANULARITIES = ("parameter", "row", "tensor")
# The fit at granularity row with `shard: fsdp`'s module (its merged parameters computed from
# per-tensor stacks by parametrizations); in one process there is nothing to shard, so this
# measures what the parametrized module costs against the flat buffer.
SHARDED = "row, sharded"
KINDS = ("plain", *GRANULARITIES, SHARDED)


def llama_inputs(device: torch.device):
    """The module, a base and two fine-tunes (base + 1% noise), the batch, the loss."""
    import transformers

    config = transformers.LlamaConfig(**LLAMA)
    torch.manual_seed(0)
    module = transformers.LlamaForCausalLM(config).to(device).eval()
    base = {n: t.detach().clone() for n, t in module.state_dict().items()}
    tuned = [{n: t + 0.01 * torch.randn_like(t) for n, t in base.items()} for _ in range(2)]
    ids = torch.randint(0, LLAMA["vocab_size"], (BATCH, SEQ), device=device)

    def next_token(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[index][:, 1:].flatten())

    return module, base, tuned, ids, next_token


def llama_step(kind: str, device: torch.device, inputs):
    """A function running one step of ``kind`` (plain, or the fit at that granularity)."""
    from mergecli.fit.coefficients import logits_per_model, task_vector_merge
    from mergecli.fit.start import TaskVectors, start_merge

    module, base, tuned, ids, next_token = inputs
    index = torch.arange(BATCH, device=device)
    if kind == "plain":
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)

        def plain_step() -> None:
            loss = next_token(module(ids).logits, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return plain_step
    names = [n for n, _ in module.named_parameters()]
    start = start_merge("task_arithmetic", {}, base, tuned, torch.ones(2), names)
    stacked = [start.merged, *(TaskVectors(t, base) for t in tuned)]
    granularity = "row" if kind == SHARDED else kind
    config = FitConfig(granularity, "adam", 0.01, 1, None, BATCH, 0.0, 0, 10**9)
    sharded = None
    if kind == SHARDED:
        from mergecli.fit.sharded import ShardedStack
        from mergecli.runtime.distributed import World

        module = transformers_copy(module)
        sharded = ShardedStack(
            module, stacked, names, granularity, task_vector_merge, torch.float32, device,
            World(), {},
        )  # fmt: skip
        flat = FlatParameters.layout(start.merged, names)
    else:
        flat = FlatParameters.stack(stacked, names, device)
    del start, stacked
    initial = torch.zeros(2, logits_per_model(granularity, flat))
    fit = CoefficientStep(
        module, flat, {}, task_vector_merge, initial, next_token, config, device, sharded
    )

    def fit_step() -> None:
        with fit.session():
            fit.update(fit.loss(ids, index))

    return fit_step


def transformers_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A fresh module of the same config (a sharded fit parametrizes its module in place)."""
    import transformers

    return transformers.LlamaForCausalLM(module.config).to(module.device).eval()


def memory_status(key: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def llama_memory(kind: str, device: torch.device) -> None:
    """In a fresh process: the peak memory of ``kind``'s state and three steps (printed)."""
    inputs = llama_inputs(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set starts again from the current one
        before = memory_status("VmRSS")
    step = llama_step(kind, device, inputs)
    for _ in range(3):
        step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = memory_status("VmHWM")
    print(json.dumps({"kind": kind, "bytes": peak - before}))


def bench_llama(device: torch.device, repeats: int) -> None:
    inputs = llama_inputs(device)
    params = sum(t.numel() for t in inputs[0].parameters())
    print(f"LlamaForCausalLM {LLAMA}, {params:,} parameters, batch {BATCH} x {SEQ}")
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    steps = {kind: llama_step(kind, device, inputs) for kind in KINDS}
    for step in steps.values():  # warm up
        step()
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(repeats):  # alternated one by one, so machine noise hits all alike
        for kind, step in steps.items():
            times[kind].append(median_step_seconds(step, device, 1, warmup=0))
    del steps, inputs
    memory = {}
    for kind in KINDS:
        child = subprocess.run(
            [sys.executable, __file__, "--llama-memory", kind, "--device", str(device),
             "--threads", str(torch.get_num_threads())],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        memory[kind] = json.loads(child.stdout.strip().splitlines()[-1])["bytes"]
    plain_s = statistics.median(times["plain"])
    what = "peak CUDA memory" if device.type == "cuda" else "peak RSS increase"
    print(f"{'step':18} {'ms':>9} {'x plain':>8} {what + ' MB':>24} {'x plain':>8}")
    for kind in KINDS:
        seconds = statistics.median(times[kind])
        label = kind if kind == "plain" else f"fit, {kind}"
        print(
            f"{label:18} {1e3 * seconds:9.1f} {seconds / plain_s:8.2f} "
            f"{memory[kind] / 1e6:24.1f} {memory[kind] / memory['plain']:8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llama", action="store_true", help="the task-vector fit on a Llama")
    parser.add_argument("--llama-memory", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        # On a shared machine, fewer threads than busy cores avoids OpenMP's spinning waits.
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.llama_memory:
        llama_memory(args.llama_memory, device)
        return
    if args.llama:
        bench_llama(device, args.repeats or 10)
        return
    args.repeats = args.repeats or 200
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

"""TIES, DELLA, Model Stock and Breadcrumbs merges of three ~1 GB LLaMA-style models: mergecli
against mergekit, same run.

Builds three bf16 checkpoints (hidden 2048, 8 layers, vocab 32000: 1.08 GB each) with a
config.json, runs the same merge of each method with `mergekit-yaml` (mergekit 0.1.5 in its own
venv, created on first use) and with `mergecli run`, each under /usr/bin/time, and prints wall
time and peak RSS with the ratios mergecli / mergekit (goal: both <= 0.5).
DELLA's random masks differ between the tools (as DARE's do), so its outputs are not compared.
`--repeat N` runs each tool N times, alternating which goes first, and compares the medians (a
shared machine's load varies from run to run). Each run starts after a sync, so that neither pays
for writing back the other's output.
Run: .venv/bin/python bench/datafree.py [--workdir /tmp/datafree] [--mergekit-venv .venv-mergekit]
     [--methods ties della model_stock breadcrumbs] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergekit_parity import ensure_mergekit, llama_shapes

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 2048, 5504, 8, 32000
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": 16,
    "num_key_value_heads": 16, "vocab_size": VOCAB, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}  # fmt: skip


def build(folder: Path, seed: int, base: Path | None) -> None:
    """One checkpoint; fine-tunes are the base plus small noise, tensor by tensor."""
    if (folder / "model.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(HIDDEN, INTERMEDIATE, LAYERS, VOCAB)
    if base is None:
        tensors = {
            n: (torch.randn(s, generator=generator) * 0.02).bfloat16() for n, s in shapes.items()
        }
    else:
        from safetensors.torch import load_file

        tensors = load_file(base / "model.safetensors")
        for name, tensor in tensors.items():
            noise = torch.randn(tensor.shape, generator=generator) * 0.002
            tensors[name] = (tensor.float() + noise).bfloat16()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG))


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of a command, from GNU time."""
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%e %M", *command], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{result.stderr[-2000:]}")
    seconds, kilobytes = result.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kilobytes) / 1e6


def agreement(ours: Path, theirs: Path) -> str:
    """How far the two outputs are apart, tensor by tensor (both bf16)."""
    from mergecli.io.lazy import LazyTensors

    a, b = LazyTensors(ours), LazyTensors(theirs)
    if set(a) != set(b):
        return f"outputs hold different tensors: {sorted(set(a) ^ set(b))[:5]}"
    worst, differing, total = 0.0, 0, 0
    for name in a:
        x, y = a[name].float(), b[name].float()
        worst = max(worst, float((x - y).abs().max()))
        differing += int(torch.count_nonzero(x != y))
        total += x.numel()
    share = differing / total
    return f"outputs: max |mergecli - mergekit| {worst:.3g}, {share:.2e} of entries differ"


# Per method: mergekit's global parameters, mergecli's merge step, per-model density or not.
METHODS = {
    "ties": ({}, {"method": "ties", "density": 0.5}, True),
    "della": (
        {"epsilon": 0.1, "lambda": 1.0},
        {"method": "della", "density": 0.5, "epsilon": 0.1},
        True,
    ),
    "model_stock": ({}, {"method": "model_stock"}, False),
    "breadcrumbs": (
        {"gamma": 0.01},
        {"method": "breadcrumbs", "density": 0.5, "gamma": 0.01},
        True,
    ),
}


def recipes(work: Path, method: str) -> tuple[Path, Path]:
    """The same merge as a mergekit config and as a mergecli recipe."""
    params, step, density = METHODS[method]
    base = work / "base"
    models = [
        {
            "model": str(work / n),
            "parameters": {"weight": w, **({"density": 0.5} if density else {})},
        }
        for n, w in (("ft-a", 0.6), ("ft-b", 0.4))
    ]
    mk_recipe = work / f"mergekit-{method}.yaml"
    mk_recipe.write_text(json.dumps({"merge_method": method, "base_model": str(base),
                                     "models": models, "dtype": "bfloat16",
                                     **({"parameters": params} if params else {})}))  # fmt: skip
    mc_recipe = work / f"mergecli-{method}.yaml"
    mc_recipe.write_text(json.dumps({
        "version": 1,
        "checkpoints": [{"path": str(base), "role": "base"},
                        {"path": str(work / "ft-a"), "weight": 0.6},
                        {"path": str(work / "ft-b"), "weight": 0.4}],
        "steps": [{"merge": step}],
        "output": {"dir": str(work / f"out-mergecli-{method}"), "dtype": "bfloat16"},
    }))  # fmt: skip
    return mk_recipe, mc_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergecli-datafree"))
    parser.add_argument("--mergekit-venv", type=Path, default=Path(".venv-mergekit"))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool; medians compared")
    args = parser.parse_args()
    exe = ensure_mergekit(args.mergekit_venv.resolve())
    work = args.workdir
    base = work / "base"
    build(base, 0, None)
    build(work / "ft-a", 1, base)
    build(work / "ft-b", 2, base)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    print(f"three {size:.2f} GB bf16 models, torch threads {torch.get_num_threads()}")
    for method in args.methods:
        mk_recipe, mc_recipe = recipes(work, method)
        commands = {
            "mergekit": [str(exe), str(mk_recipe), str(work / f"out-mergekit-{method}")],
            "mergecli": [sys.executable, "-m", "mergecli", "--log", "plain", "run", str(mc_recipe)],
        }
        runs: dict[str, list[tuple[float, float]]] = {"mergekit": [], "mergecli": []}
        for repeat in range(args.repeat):
            # Alternating which tool goes first: on a VM, a run just after the other tool's
            # big allocations and writes meets colder memory, whichever tool it is.
            order = ["mergekit", "mergecli"] if repeat % 2 == 0 else ["mergecli", "mergekit"]
            for tool in order:
                shutil.rmtree(work / f"out-{tool}-{method}", ignore_errors=True)
                # Each run starts with no writes pending: mergekit leaves its 1 GB output to the
                # kernel to write back after it exits (mergecli syncs its own before renaming),
                # which would otherwise land in the time of the run after it.
                os.sync()
                runs[tool].append(timed(commands[tool]))
        if args.repeat > 1:
            for tool, measured in runs.items():
                listed = ", ".join(f"{s:.1f} s / {gb:.2f} GB" for s, gb in measured)
                print(f"{method}: {tool} runs: {listed}")
        theirs, ours = (
            tuple(statistics.median(x) for x in zip(*runs[t], strict=True)) for t in runs
        )
        print(f"{method}: {'tool':10} {'wall s':>8} {'peak RSS GB':>12}")
        print(f"{method}: {'mergekit':10} {theirs[0]:8.1f} {theirs[1]:12.2f}")
        print(f"{method}: {'mergecli':10} {ours[0]:8.1f} {ours[1]:12.2f}")
        time_ratio, rss_ratio = ours[0] / theirs[0], ours[1] / theirs[1]
        print(
            f"{method}: "
            + agreement(work / f"out-mergecli-{method}", work / f"out-mergekit-{method}")
        )
        print(
            f"{method}: ratio mergecli/mergekit: time {time_ratio:.2f}, peak RSS {rss_ratio:.2f} "
            "(goal <= 0.5)"
        )


if __name__ == "__main__":
    main()

"""Parity with mergekit: the same data-free merges, same inputs, compared tensor by tensor.

Builds three small LLaMA-style checkpoints (a base and two fine-tunes, with config.json), runs
each method with `mergekit-yaml` (mergekit 0.1.5, in its own virtual environment, which this
script creates on first use) and with `mergecli run`, of mergecli's recipe and of the mergekit
config itself, and prints the largest absolute difference per method. Parity means
max |mergecli - mergekit| <= 1e-6 in float32.
Run: .venv/bin/python bench/mergekit_parity.py [--mergekit-venv .venv-mergekit]
     [--methods CASE ...]  (default: every case)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
}

_DENSITY = [{"filter": "mlp", "value": 0.3}, {"filter": "self_attn", "value": [0.2, 0.8]},
            {"value": 0.7}]  # fmt: skip
_LAMBDA = [{"filter": "mlp", "value": 0.5}, {"value": [1.0, 0.8]}]
_DENSITY_GAMMA = [{"filter": "mlp", "value": 0.2}, {"value": [0.0, 0.1]}]
_T = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": 0.2},
      {"value": 0.6}]  # fmt: skip

# method: (mergekit global parameters, mergecli step parameters, uses a base)
METHODS = {
    "linear": ({"normalize": True}, {"method": "linear"}, False),
    "linear_per_tensor_weights": ({"normalize": True}, {"method": "linear"}, False),
    "task_arithmetic": ({"lambda": 0.8}, {"method": "task_arithmetic", "lambda": 0.8}, True),
    "ties": (
        {"density": 0.5, "normalize": True, "lambda": 1.0},
        {"method": "ties", "density": 0.5, "lambda": 1.0},
        True,
    ),
    "dare_linear": ({"density": 1.0}, {"method": "dare_linear", "density": 1.0}, True),
    "dare_ties": ({"density": 1.0}, {"method": "dare_ties", "density": 1.0}, True),
    "slerp": ({"t": 0.3}, {"method": "slerp", "t": 0.3}, False),
    "ties_per_model_density": (
        {"density": 0.5, "normalize": True, "lambda": 1.0},
        {"method": "ties", "density": 0.5, "lambda": 1.0},
        True,
    ),
    "ties_per_tensor_weights": (
        {"density": 0.5, "normalize": True, "lambda": 1.0},
        {"method": "ties", "density": 0.5, "lambda": 1.0},
        True,
    ),
    # Parameters that vary by tensor: filters (the first match wins; a value may be a
    # gradient), gradients over the layers, and the fallback where no filter matches (the
    # model's own setting, then the global one, then the method's default).
    "ties_filters": (
        {"density": _DENSITY, "normalize": True, "lambda": [0.5, 1.0]},
        {"method": "ties", "density": _DENSITY, "lambda": [0.5, 1.0]},
        True,
    ),
    "task_arithmetic_filters": (
        {"lambda": _LAMBDA},
        {"method": "task_arithmetic", "lambda": _LAMBDA},
        True,
    ),
    "slerp_filters": ({"t": _T}, {"method": "slerp", "t": _T}, False),
    "ties_per_model_filters": (
        {"density": {"filter": "self_attn", "value": 0.4}, "normalize": True},
        {"method": "ties", "density": {"filter": "self_attn", "value": 0.4}},
        True,
    ),
    "model_stock": ({}, {"method": "model_stock"}, True),
    "model_stock_filter_wise": (
        {"filter_wise": True},
        {"method": "model_stock", "filter_wise": True},
        True,
    ),
    "breadcrumbs": (
        {"density": 0.5, "gamma": 0.1, "lambda": 0.8},
        {"method": "breadcrumbs", "density": 0.5, "gamma": 0.1, "lambda": 0.8},
        True,
    ),
    "breadcrumbs_ties": (
        {"density": 0.6, "gamma": 0.05, "normalize": True, "rescale": True},
        {
            "method": "breadcrumbs_ties",
            "density": 0.6,
            "gamma": 0.05,
            "normalize": True,
            "rescale": True,
        },
        True,
    ),  # fmt: skip
    "breadcrumbs_per_model": (
        {"density": 0.5, "gamma": _DENSITY_GAMMA},
        {"method": "breadcrumbs", "density": 0.5, "gamma": _DENSITY_GAMMA},
        True,
    ),
    # DELLA's masks are random: compared at density 1, where none is drawn.
    "della": ({"density": 1.0, "lambda": 0.9}, {"method": "della", "lambda": 0.9}, True),
    "della_linear": ({"density": 1.0}, {"method": "della_linear"}, True),
    "sce": ({}, {"method": "sce"}, True),
    "sce_select_topk": (
        {"select_topk": 0.4},
        {"method": "sce", "select_topk": 0.4},
        True,
    ),
    "nuslerp": ({}, {"method": "nuslerp"}, False),
    "nuslerp_base": ({}, {"method": "nuslerp"}, True),
    "nuslerp_rows": (
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        {"method": "nuslerp", "nuslerp_flatten": False, "nuslerp_row_wise": True},
        False,
    ),
    "multislerp": ({}, {"method": "multislerp"}, False),
    "multislerp_base": (
        {"normalize_weights": False},
        {"method": "multislerp", "normalize_weights": False},
        True,
    ),
    "karcher": ({"max_iter": 20}, {"method": "karcher", "max_iter": 20}, False),
    "karcher_base": ({}, {"method": "karcher"}, True),
    "nearswap": ({"t": 0.005}, {"method": "nearswap", "t": 0.005}, True),
    # A frankenmerge: layer ranges of the two fine-tunes stacked (see SLICES).
    "passthrough_slices": ({}, {"method": "passthrough"}, False),
}
# Layer slices (model, start, end excluded) by case: mergekit's `slices: [{sources: [{model,
# layer_range}]}]`, mergecli's `slices: [{model, layers}]`.
SLICES = {"passthrough_slices": [("ft-a", 0, 2), ("ft-b", 1, 3), ("ft-a", 2, 3)]}
# Weights that vary by tensor (mergekit's per-tensor `weight`), where a case sets them.
WEIGHTS: dict[str, dict[str, object]] = {
    "linear_per_tensor_weights": {
        "ft-a": [{"filter": "mlp", "value": 0.2}, {"value": [0.9, 0.3]}],
        "ft-b": [0.1, 0.5, 0.7],
    },
    "ties_per_tensor_weights": {
        "ft-a": [{"filter": "self_attn", "value": 0.3}, {"value": 0.6}],
        "ft-b": 0.4,
    },
}
# Parameters one model sets for itself (mergekit: models[].parameters; mergecli:
# checkpoints[].parameters), by case.
PER_MODEL = {
    "ties_per_model_density": {"ft-a": {"density": 0.3}},
    "ties_per_model_filters": {"ft-a": {"density": [{"filter": "mlp", "value": 0.3}]}},
    "breadcrumbs_per_model": {"ft-a": {"density": 0.3, "gamma": 0.05}},
}
# Cases that merge the base with the first fine-tune alone (methods of exactly two inputs).
FIRST_ONLY = {"nearswap"}


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> dict[str, tuple]:
    """Tensor names and shapes of a LLaMA-style causal LM (untied head)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}  # fmt: skip
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    return shapes


def llama_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = llama_shapes(
        CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_hidden_layers"],
        CONFIG["vocab_size"],
    )  # fmt: skip
    return {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes.items()}


def write_models(root: Path) -> dict[str, Path]:
    generator = torch.Generator().manual_seed(0)
    base = llama_tensors(generator)
    models = {"base": base}
    for name in ("ft-a", "ft-b"):
        models[name] = {
            k: t + 0.01 * torch.randn(t.shape, generator=generator) for k, t in base.items()
        }
    paths = {}
    for name, tensors in models.items():
        folder = root / name
        folder.mkdir(parents=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(CONFIG))
        paths[name] = folder
    return paths


def ensure_mergekit(venv: Path) -> Path:
    """mergekit 0.1.5 in a virtual environment of its own (never a dependency of mergecli)."""
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run([*pip, "mergekit==0.1.5"], check=True)
    return exe


def mergekit_config(paths: dict[str, Path], method: str) -> dict:
    """The mergekit config of a case, as a mergekit user writes it."""
    global_params, step, uses_base = METHODS[method]
    weights = WEIGHTS.get(method, {"ft-a": 0.6, "ft-b": 0.4})
    own = PER_MODEL.get(method, {})
    merge_method = step["method"]
    if method in SLICES:
        pieces = [{"sources": [{"model": str(paths[m]), "layer_range": [s, e]}]}
                  for m, s, e in SLICES[method]]  # fmt: skip
        config = {"merge_method": merge_method, "slices": pieces}
    elif merge_method == "slerp":
        models = [{"model": str(paths["ft-a"])}, {"model": str(paths["ft-b"])}]
        config = {"merge_method": merge_method, "base_model": str(paths["ft-a"]), "models": models}
    else:
        if method in FIRST_ONLY:
            weights = {"ft-a": weights["ft-a"]}
        models = [{"model": str(paths[n]), "parameters": {"weight": w, **own.get(n, {})}}
                  for n, w in weights.items()]  # fmt: skip
        config = {"merge_method": merge_method, "models": models}
        if uses_base:
            config["base_model"] = str(paths["base"])
    config.update({"parameters": global_params, "dtype": "float32"})
    return config


def run_mergekit(
    exe: Path, paths: dict[str, Path], method: str, out: Path
) -> dict[str, torch.Tensor]:
    recipe = out.with_suffix(".yaml")
    recipe.write_text(json.dumps(mergekit_config(paths, method)))
    subprocess.run([str(exe), str(recipe), str(out), "--no-lazy-unpickle"], check=True,
                   capture_output=True, text=True)  # fmt: skip
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def run_mergecli_on_config(paths: dict[str, Path], method: str, out: Path) -> dict:
    """`mergecli run` of the very config mergekit ran, as mergekit-yaml takes it."""
    config = out.with_suffix(".yaml")
    config.write_text(json.dumps(mergekit_config(paths, method)))
    subprocess.run([sys.executable, "-m", "mergecli", "run", str(config), str(out)], check=True,
                   capture_output=True, text=True)  # fmt: skip
    return load_file(out / "model.safetensors")


def mergecli_recipe(paths: dict[str, Path], method: str, out: Path) -> dict:
    """mergecli's own recipe of a case, written by hand from the mergekit config's keys."""
    _, step, uses_base = METHODS[method]
    own = PER_MODEL.get(method, {})
    checkpoints = [
        {"path": str(paths[n]), "weight": w, **({"parameters": own[n]} if n in own else {})}
        for n, w in WEIGHTS.get(method, {"ft-a": 0.6, "ft-b": 0.4}).items()
        if n == "ft-a" or method not in FIRST_ONLY
    ]
    if uses_base:
        checkpoints.insert(0, {"path": str(paths["base"]), "role": "base"})
    if method in SLICES:
        checkpoints = [{"path": str(paths[n]), "name": n} for n in ("ft-a", "ft-b")]
        pieces = [{"model": m, "layers": [s, e]} for m, s, e in SLICES[method]]
        step = {**step, "slices": pieces}
    return {"version": 1, "checkpoints": checkpoints, "steps": [{"merge": step}],
            "output": {"dir": str(out), "dtype": "float32"}}  # fmt: skip


def run_mergecli(paths: dict[str, Path], method: str, out: Path) -> dict[str, torch.Tensor]:
    path = out.with_suffix(".yaml")
    path.write_text(json.dumps(mergecli_recipe(paths, method, out)))
    subprocess.run([sys.executable, "-m", "mergecli", "run", str(path)], check=True,
                   capture_output=True, text=True)  # fmt: skip
    return load_file(out / "model.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mergekit-venv", type=Path, default=Path(".venv-mergekit"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    exe = ensure_mergekit(args.mergekit_venv.resolve())
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_models(root / "models")
        # Each case twice: mergecli's own recipe, and the mergekit config itself run by mergecli.
        print(f"{'case':24} {'tensors':>8} {'max |mergecli - mergekit|':>28} {'(config)':>10}")
        for method in args.methods:
            theirs = run_mergekit(exe, paths, method, root / f"mergekit-{method}")
            ours = run_mergecli(paths, method, root / f"mergecli-{method}")
            direct = run_mergecli_on_config(paths, method, root / f"mergecli-config-{method}")
            diffs = []
            for mine in (ours, direct):
                assert set(theirs) == set(mine), sorted(set(theirs) ^ set(mine))
                diffs.append(
                    max((mine[k].float() - theirs[k].float()).abs().max().item() for k in mine)
                )
            worst = max(worst, *diffs)
            print(f"{method:24} {len(ours):8} {diffs[0]:28.3g} {diffs[1]:10.3g}")
    verdict = "parity" if worst <= 1e-6 else "NO PARITY"
    print(f"largest difference {worst:.3g}: {verdict} (bound 1e-6)")
    sys.exit(0 if worst <= 1e-6 else 1)


if __name__ == "__main__":
    main()

"""Regenerate every figure the README quotes: run the example recipes, read their reports,
write figures/figures.json (with the machine and thread count) and rewrite the README's marked
values (``<!--fig:KEY-->VALUE<!--/fig-->`` and ``<!-- fig-block:KEY -->`` code blocks).

    make figures                          # trains missing checkpoints, then runs this
    python scripts/figures.py [--only KEY ...] [--no-run]   # --no-run: rewrite from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "figures"
RESULTS = ROOT / "figures" / "figures.json"
README = ROOT / "README.md"
EXAMPLES = "configs/examples"


def pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def num(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


PAPERS = "configs/papers"
SPLIT_EVAL = (
    "{all: {source: mnist, split: test},"
    ' digits_0_4: {source: mnist, split: test, partition: {classes: "0-4"}},'
    ' digits_5_9: {source: mnist, split: test, partition: {classes: "5-9"}}}'
)


def mnist_overrides(
    args: str,
    prefix: str,
    suffixes: tuple[str, str] = ("0", "1"),
    evals: str = "{source: mnist, split: test}",
) -> list[str]:
    """--set overrides that run a configs/papers/ recipe on the MNIST pair runs/PREFIX{0,1}:
    the model's arguments, the checkpoints and MNIST as data.fit (2,000 images) and data.eval."""
    return [
        f"model.args={args}",
        *(f"checkpoints.{i}.path=runs/{prefix}{s}.safetensors" for i, s in enumerate(suffixes)),
        "data.fit={source: mnist, split: train, fraction: 0.25}",
        f"data.eval={evals}",
    ]


# One run per key: (recipe, --set overrides). Every recipe writes into out/figures/KEY.
RUNS: dict[str, tuple[str, list[str]]] = {
    "average": (f"{EXAMPLES}/mnist-mlp8-average.yaml", []),
    "weight_matching": (f"{EXAMPLES}/mnist-mlp8-weight-matching.yaml", []),
    "repair": (f"{EXAMPLES}/mnist-mlp8-weight-matching-repair.yaml", []),
    "repair_no_head": (
        f"{EXAMPLES}/mnist-mlp8-weight-matching-repair.yaml",
        ["steps.2.repair.include_head=false"],
    ),
    "activation_matching": (f"{EXAMPLES}/mnist-mlp8-activation-matching.yaml", []),
    "cca": (f"{EXAMPLES}/mnist-mlp8-cca.yaml", []),
    "zipit": (f"{EXAMPLES}/mnist-mlp8-zipit.yaml", []),
    "np_merge": (f"{EXAMPLES}/mnist-mlp8-np-merge.yaml", []),
    "analysis": (f"{EXAMPLES}/mnist-analysis.yaml", []),
    "linear": (f"{EXAMPLES}/mnist-linear-templates.yaml", []),
    "resnet": (f"{EXAMPLES}/mnist-resnet20-reset-bn.yaml", []),
    "resnet_cca_paper": (
        f"{EXAMPLES}/mnist-resnet20-reset-bn.yaml",
        ["steps.0.align={method: cca, batchnorm: paper}"],
    ),
    "resnet_cca_fold": (
        f"{EXAMPLES}/mnist-resnet20-reset-bn.yaml",
        ["steps.0.align={method: cca, batchnorm: fold}"],
    ),
    "resnet_zipit": (
        f"{EXAMPLES}/mnist-resnet20-reset-bn.yaml",
        ["steps.0.align={method: zipit}"],
    ),
    **{
        f"resnet_wm_seed{seed}": (
            f"{EXAMPLES}/mnist-resnet20-reset-bn.yaml",
            [f"seed={seed}", "steps.0.align={method: weight_matching}"],
        )
        for seed in range(5)
    },
    "ties": (f"{EXAMPLES}/mnist-mlp3-ties.yaml", []),
    "task_arithmetic": (
        f"{EXAMPLES}/mnist-mlp3-ties.yaml",
        ["steps.0.merge={method: task_arithmetic}"],
    ),
    "finetune_average": (
        f"{EXAMPLES}/mnist-mlp3-ties.yaml",
        ["steps.0.merge={method: average}"],
    ),
    # Its evaluate step scores the endpoints and every data-free baseline as well.
    "lm": (f"{EXAMPLES}/lm-np-merge.yaml", []),
    "lm_row": (
        f"{EXAMPLES}/lm-np-merge.yaml",
        ["steps.0.fit.granularity=row", "steps.0.fit.lr=0.01", "steps.1.evaluate.baselines=[]"],
    ),
    "lm_ties": (f"{EXAMPLES}/lm-np-merge-ties.yaml", ["steps.1.evaluate.baselines=[]"]),
    # The configs/papers/ recipes on MNIST (no CIFAR, no GPU here): small pairs, the MNIST
    # data; "_avg" replaces the fit by the average, so that reset_bn follows the aligned average.
    **{
        f"{key}{suffix}": (recipe, overrides + extra)
        for key, (recipe, overrides) in (
            (
                "papers_resnet",
                (
                    f"{PAPERS}/cifar10-resnet20x4-np-merge.yaml",
                    mnist_overrides("{width: 1, in_channels: 1}", "resnet20-seed"),
                ),
            ),
            (
                "papers_vgg",
                (
                    f"{PAPERS}/cifar10-vgg16-cca-np-merge.yaml",
                    mnist_overrides(
                        "{variant: 16, batchnorm: true, width: 0.25, in_channels: 1}",
                        "papers-mnist-vgg16-seed",
                    ),
                ),
            ),
            (
                "papers_split",
                (
                    f"{PAPERS}/cifar100-resnet20x8-split-np-merge.yaml",
                    mnist_overrides(
                        "{width: 1, shortcut: conv1x1, in_channels: 1}",
                        "papers-mnist-r20-classes",
                        ("0-4", "5-9"),
                        SPLIT_EVAL,
                    ),
                ),
            ),
        )
        for suffix, extra in (("", []), ("_avg", ["steps.1={merge: {method: average}}"]))
    },
}


# Issue 19's trained transformer pairs (make transformer-pairs): one run per architecture.
TRANSFORMERS = {"bert": "accuracy", "gpt2": "perplexity", "llama": "perplexity", "vit": "accuracy"}
RUNS.update(
    {f"transformers_{arch}": (f"{EXAMPLES}/transformers-{arch}.yaml", []) for arch in TRANSFORMERS}
)

# Issue 20's class-biased pair (make biased-pair): NP Merge beside the ensemble, the averages,
# Fisher merging and RegMean, unaligned and aligned.
BIASED = f"{EXAMPLES}/mnist-biased-np-merge.yaml"
RUNS["biased"] = (BIASED, [])
# ZipIt! on the same pair: the recipe with its align step replaced by zipit (which also matches
# features within a model) and the fit step dropped, so the zipped pair is averaged; and the
# partial zip (the first four hidden layers zipped, one head per model after them), scored as
# the paper scores it, the heads' ensemble, and averaged into one model.
ZIPIT_STEPS = (
    "steps=[{align: {method: zipit}}, {merge: {method: average}}, "
    "{evaluate: {baselines: [endpoints]}}]"
)
PARTIAL_ZIP_STEPS = (
    "steps=[{align: {method: zipit, partial: layers.3}}, {merge: {method: average}}, "
    "{evaluate: {baselines: [aligned_ensemble]}}]"
)
RUNS["biased_zipit"] = (BIASED, [ZIPIT_STEPS])
# ZipIt!'s alpha and beta, which the paper tunes per setting on a held-out split: searched on
# data.fit (the balanced training images), reported on data.eval.
ZIPIT_SEARCH = "{method: zipit, alpha: [0.3, 0.5, 1.0], beta: [0.125, 0.5, 1.0]}"
RUNS["biased_zipit_search"] = (BIASED, [ZIPIT_STEPS.replace("{method: zipit}", ZIPIT_SEARCH)])
RUNS["biased_zipit_partial"] = (BIASED, [PARTIAL_ZIP_STEPS])

# The biased pair's table: (label, run key, evaluate row field, its value) in the order shown.
BIASED_ROWS = [
    ("A: digits 0-4, 10% of 5-9 (seed 0)", "biased", "name", "mlp8-biased0-4"),
    ("B: digits 5-9, 10% of 0-4 (seed 1)", "biased", "name", "mlp8-biased5-9"),
    ("ensemble (mean of the softmax)", "biased", "kind", "ensemble"),
    ("average", "biased", "kind", "average"),
    ("Fisher merging", "biased", "kind", "fisher"),
    ("RegMean", "biased", "kind", "regmean"),
    ("aligned average (weight matching)", "biased", "kind", "aligned_average"),
    ("aligned Fisher merging", "biased", "kind", "aligned_fisher"),
    ("aligned RegMean", "biased", "kind", "aligned_regmean"),
    ("ZipIt! (align: zipit, then average)", "biased_zipit", "kind", "merged"),
    ("ZipIt!, alpha and beta searched on data.fit", "biased_zipit_search", "kind", "merged"),
    (
        "ZipIt!, partial zip to layers.3: the two heads",
        "biased_zipit_partial",
        "kind",
        "aligned_ensemble",
    ),
    ("ZipIt!, partial zip to layers.3, then average", "biased_zipit_partial", "kind", "merged"),
    ("NP Merge (weight matching, then np_merge)", "biased", "kind", "merged"),
]


def biased_table() -> str:
    """The class-biased pair's accuracies and losses on the balanced held-out images."""
    rows = BIASED_ROWS
    width = max(len(r[0]) for r in rows)
    lines = [f"{'model':<{width}}  accuracy    loss"]
    for label, key, field, name in rows:
        found = row(key, name, field)
        lines.append(f"{label:<{width}}  {pct(found['accuracy']):>8}  {found['loss']:.4f}")
    return "\n".join(lines)


def report(key: str) -> dict:
    return json.loads((OUT / key / "report.json").read_text())


def row(key: str, name: str, field: str = "name") -> dict:
    """The evaluate table's row of ``key``'s run whose ``field`` is ``name``."""
    rows = report(key)["evaluate"]["results"]
    found = [r for r in rows if r[field] == name]
    if not found:
        raise KeyError(
            f"{key}: no evaluate row with {field} {name!r} in {[r[field] for r in rows]}"
        )
    return found[0]


def accuracy(key: str, name: str, field: str = "name") -> float:
    return row(key, name, field)["accuracy"]


def merged(key: str) -> float:
    return accuracy(key, "merged", "kind")


def analysis(key: str, kind: str) -> dict:
    return report(key)["analysis"][kind]


def barrier(path: str, split: str) -> float:
    return analysis("analysis", "interpolation")["paths"][path][split]["loss_barrier"]


def soup(kind: str) -> float:
    results = analysis("analysis", "averaging_vs_ensembling")["results"]
    return next(r["accuracy"] for r in results if r["kind"] == kind)


def scaled(subject: str, factor: float, apply_to: str = "all") -> float:
    results = analysis("analysis", "scaling")["results"]
    return next(
        r["accuracy"]
        for r in results
        if r["subject"] == subject and r["factor"] == factor and r["apply_to"] == apply_to
    )


def template_cosine(key: str, model: str) -> float:
    """Mean cosine of a model's template rows to the closest centred class mean."""
    sets = analysis(key, "templates")["sets"]
    return next(s for s in sets if s["name"] == model)["mean_cosine"]


def seconds(key: str) -> float:
    return TIMES[key]


def fit_seconds(key: str) -> float:
    return row(key, "merged", "kind")["fit_seconds"]


def perplexity(key: str, name: str, domain: str | None = None, field: str = "name") -> float:
    """A language-model evaluation row's perplexity on one set, or its mean over the sets."""
    found = row(key, name, field)
    return found["mean_perplexity"] if domain is None else found["sets"][domain]["perplexity"]


def set_accuracy(key: str, name: str, field: str = "name", set_name: str = "all") -> float:
    """Accuracy of the row of ``key``'s run on one named eval set."""
    rows = report(key)["evaluate"]["results"]
    return next(r for r in rows if r[field] == name and r["set"] == set_name)["accuracy"]


def paper_figures(key: str, endpoints: tuple[str, str]) -> dict[str, Callable[[], str]]:
    """One MNIST companion's row: endpoints, ensemble, averages and NP Merge (on the eval set
    `all` when the run has named sets)."""
    named = key == "papers_split"

    def acc(run: str, name: str, field: str = "name") -> Callable[[], str]:
        if named:
            return lambda: pct(set_accuracy(run, name, field))
        return lambda: pct(accuracy(run, name, field))

    return {
        f"{key}_a": acc(key, endpoints[0]),
        f"{key}_b": acc(key, endpoints[1]),
        f"{key}_ensemble": acc(key, "ensemble", "kind"),
        f"{key}_average": acc(key, "average", "kind"),
        f"{key}_aligned_average": acc(key, "aligned_average", "kind"),
        f"{key}_aligned_average_reset": acc(f"{key}_avg", "merged", "kind"),
        f"{key}_np_merge": acc(key, "merged", "kind"),
    }


def wm_resnet_range() -> str:
    values = sorted(merged(f"resnet_wm_seed{s}") for s in range(5))
    return f"{100 * values[0]:.0f}–{100 * values[-1]:.0f}%"


# Every figure the README quotes: key -> how to compute its text from the runs.
def transformer_figures(arch: str) -> dict[str, Callable[[], str]]:
    """One trained pair's row: its endpoints, ensemble, naive and aligned averages and NP
    Merge after weight matching: accuracy for classifiers, mean perplexity for LMs."""
    key = f"transformers_{arch}"

    def value(name: str, field: str = "kind") -> str:
        if TRANSFORMERS[arch] == "accuracy":
            return pct(accuracy(key, name, field))
        return num(perplexity(key, name, field=field), 1)

    return {
        f"{key}_seed0": lambda: value(f"{arch}-seed0", "name"),
        f"{key}_seed1": lambda: value(f"{arch}-seed1", "name"),
        f"{key}_ensemble": lambda: value("ensemble"),
        f"{key}_average": lambda: value("average"),
        f"{key}_aligned_average": lambda: value("aligned_average"),
        f"{key}_np_merge": lambda: value("merged"),
        f"{key}_fit_seconds": lambda: num(fit_seconds(key), 0),
    }


FIGURES: dict[str, Callable[[], str]] = {
    "mlp8_seed0": lambda: pct(accuracy("np_merge", "mlp8-seed0")),
    "mlp8_seed1": lambda: pct(accuracy("np_merge", "mlp8-seed1")),
    "mlp8_ensemble": lambda: pct(accuracy("np_merge", "ensemble", "kind")),
    "mlp8_average": lambda: pct(merged("average")),
    "mlp8_weight_matching": lambda: pct(merged("weight_matching")),
    "mlp8_repair": lambda: pct(merged("repair")),
    "mlp8_repair_no_head": lambda: pct(merged("repair_no_head")),
    "mlp8_activation_matching": lambda: pct(merged("activation_matching")),
    "mlp8_cca": lambda: pct(merged("cca")),
    "mlp8_zipit": lambda: pct(merged("zipit")),
    "mlp8_np_merge": lambda: pct(merged("np_merge")),
    "mlp8_fisher": lambda: pct(accuracy("np_merge", "aligned_fisher", "kind")),
    "mlp8_regmean": lambda: pct(accuracy("np_merge", "aligned_regmean", "kind")),
    "mlp8_np_merge_fit_seconds": lambda: num(fit_seconds("np_merge"), 1),
    "resnet_seed0": lambda: pct(accuracy("resnet", "resnet20-seed0")),
    "resnet_seed1": lambda: pct(accuracy("resnet", "resnet20-seed1")),
    "resnet_ensemble": lambda: pct(accuracy("resnet", "ensemble", "kind")),
    "resnet_average": lambda: pct(accuracy("resnet", "average", "kind")),
    "resnet_aligned_average": lambda: pct(accuracy("resnet", "aligned_average", "kind")),
    "resnet_activation_matching_reset": lambda: pct(merged("resnet")),
    "resnet_cca_paper": lambda: pct(merged("resnet_cca_paper")),
    "resnet_cca_fold": lambda: pct(merged("resnet_cca_fold")),
    "resnet_zipit_reset": lambda: pct(merged("resnet_zipit")),
    "resnet_weight_matching_range": wm_resnet_range,
    "resnet_recipe_seconds": lambda: f"{seconds('resnet'):.0f}",
    "resnet_train_seconds": lambda: f"{TRAIN_SECONDS['resnet20']:.0f}",
    "ties_base": lambda: pct(accuracy("ties", "mlp3-base")),
    "ties_ft_a": lambda: pct(accuracy("ties", "mlp3-ft-digits0-4")),
    "ties_ft_b": lambda: pct(accuracy("ties", "mlp3-ft-digits5-9")),
    "ties": lambda: pct(merged("ties")),
    "task_arithmetic": lambda: pct(merged("task_arithmetic")),
    "finetune_average": lambda: pct(merged("finetune_average")),
    "barrier_naive": lambda: num(barrier("naive", "eval")),
    "barrier_aligned": lambda: num(barrier("aligned", "eval")),
    "greedy_soup": lambda: pct(soup("greedy_soup")),
    "uniform_soup": lambda: pct(soup("uniform_soup")),
    "feature_ensemble_averaged_head": lambda: pct(soup("feature_ensemble_averaged_head")),
    "scaled10_logit_ensemble": lambda: pct(scaled("logit ensemble", 10.0)),
    "logit_ensemble": lambda: pct(soup("logit_ensemble")),
    "scaled10_output_ensemble": lambda: pct(scaled("output ensemble", 10.0)),
    "output_ensemble": lambda: pct(soup("output_ensemble")),
    "template_cosine_seed0": lambda: num(template_cosine("analysis", "mlp8-seed0")),
    "template_cosine_average": lambda: num(template_cosine("analysis", "average")),
    "template_cosine_aligned_average": lambda: num(template_cosine("analysis", "aligned average")),
    "linear_cosine_seed0": lambda: num(template_cosine("linear", "linear-seed0")),
    "linear_cosine_seed1": lambda: num(template_cosine("linear", "linear-seed1")),
    "linear_cosine_average": lambda: num(template_cosine("linear", "average")),
    "lm_np_merge_english": lambda: num(perplexity("lm", "merged", "english", "kind"), 1),
    "lm_np_merge_code": lambda: num(perplexity("lm", "merged", "code", "kind"), 1),
    "lm_np_merge_mean": lambda: num(perplexity("lm", "merged", None, "kind"), 1),
    "lm_average_mean": lambda: num(perplexity("lm", "average"), 1),
    "lm_ft_english": lambda: num(perplexity("lm", "english", "english"), 1),
    "lm_ft_code": lambda: num(perplexity("lm", "code", "code"), 1),
    "lm_np_merge_fit_seconds": lambda: num(fit_seconds("lm"), 0),
    "lm_row_english": lambda: num(perplexity("lm_row", "merged", "english", "kind"), 1),
    "lm_row_code": lambda: num(perplexity("lm_row", "merged", "code", "kind"), 1),
    "lm_ties_start_mean": lambda: num(perplexity("lm_ties", "merged", None, "kind"), 1),
    **paper_figures("papers_resnet", ("resnet20-seed0", "resnet20-seed1")),
    **paper_figures("papers_vgg", ("papers-mnist-vgg16-seed0", "papers-mnist-vgg16-seed1")),
    **paper_figures("papers_split", ("papers-mnist-r20-classes0-4", "papers-mnist-r20-classes5-9")),
    "papers_split_a_own": lambda: pct(
        set_accuracy("papers_split", "papers-mnist-r20-classes0-4", set_name="digits_0_4")
    ),
    "papers_split_b_own": lambda: pct(
        set_accuracy("papers_split", "papers-mnist-r20-classes5-9", set_name="digits_5_9")
    ),
    **{k: v for arch in TRANSFORMERS for k, v in transformer_figures(arch).items()},
    "biased_a": lambda: pct(accuracy("biased", "mlp8-biased0-4")),
    "biased_zipit": lambda: pct(merged("biased_zipit")),
    "biased_zipit_search": lambda: pct(merged("biased_zipit_search")),
    "biased_zipit_search_alpha": lambda: (
        f"{report('biased_zipit_search')['align']['zipit']['alpha']:g}"
    ),
    "biased_zipit_search_beta": lambda: (
        f"{report('biased_zipit_search')['align']['zipit']['beta']:g}"
    ),
    "biased_zipit_heads": lambda: pct(accuracy("biased_zipit_partial", "aligned_ensemble", "kind")),
    "biased_b": lambda: pct(accuracy("biased", "mlp8-biased5-9")),
    "biased_ensemble": lambda: pct(accuracy("biased", "ensemble", "kind")),
    "biased_aligned_average": lambda: pct(accuracy("biased", "aligned_average", "kind")),
    "biased_aligned_regmean": lambda: pct(accuracy("biased", "aligned_regmean", "kind")),
    "biased_np_merge": lambda: pct(merged("biased")),
}

# Code blocks the README shows verbatim: key -> the run whose stdout table it is.
BLOCKS = {"np_merge_table": "np_merge", "lm_table": "lm"}
# Code blocks the script writes itself from the reports: key -> how.
COMPUTED_BLOCKS: dict[str, Callable[[], str]] = {"biased_pair": biased_table}

TIMES: dict[str, float] = {}
TRAIN_SECONDS: dict[str, float] = {}


def machine() -> dict:
    import torch

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        cpu = names[0] if names else cpu
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def run(key: str) -> str:
    recipe, overrides = RUNS[key]
    command = [sys.executable, "-m", "mergecli", "--log", "plain", "run", recipe, "--overwrite"]
    for item in [f"output.dir={OUT / key}", *overrides]:
        command += ["--set", item]
    print(f"figures: {key}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    env = {**os.environ, "COLUMNS": "140"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    TIMES[key] = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"figures: {key} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def train_seconds() -> None:
    """How long `make` took to train each demo checkpoint (recorded in its metadata)."""
    from safetensors import safe_open

    for path in sorted((ROOT / "runs").glob("resnet20-seed*.safetensors")):
        with safe_open(path, "pt") as f:
            value = (f.metadata() or {}).get("mergecli.train_seconds")
        if value is not None:
            TRAIN_SECONDS["resnet20"] = TRAIN_SECONDS.get("resnet20", 0.0) + float(value)


def table(stdout: str) -> str:
    """The evaluation table from a run's stdout (rich draws it with box characters)."""
    lines = stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if "evaluation on" in x)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("└"))
    return "\n".join(x.rstrip() for x in lines[start : end + 1])


def rewrite_readme(values: dict[str, str], blocks: dict[str, str]) -> list[str]:
    """Put the values into the README's markers; returns the keys the README lacks."""
    text = README.read_text()
    used = set()

    def inline(match: re.Match) -> str:
        key = match.group(1)
        if key not in FIGURES:
            sys.exit(f"figures: README marker {key!r} has no figure; add it to FIGURES")
        if key not in values:  # not measured yet (a partial --only run): left as it is
            print(f"figures: {key} not measured yet; README left as it is", file=sys.stderr)
            return match.group(0)
        used.add(key)
        return f"<!--fig:{key}-->{values[key]}<!--/fig-->"

    text = re.sub(r"<!--fig:(\w+)-->.*?<!--/fig-->", inline, text, flags=re.S)

    def block(match: re.Match) -> str:
        key = match.group(1)
        if key not in blocks:  # not measured yet: left as it is
            return match.group(0)
        used.add(key)
        return f"<!-- fig-block:{key} -->\n```\n{blocks[key]}\n```\n<!-- /fig-block -->"

    text = re.sub(
        r"<!-- fig-block:(\w+) -->\n```\n.*?\n```\n<!-- /fig-block -->", block, text, flags=re.S
    )
    README.write_text(text)
    return sorted((set(values) | set(blocks)) - used)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only these keys (others from the JSON)")
    parser.add_argument("--no-run", action="store_true", help="only rewrite the README")
    options = parser.parse_args()
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not options.no_run:
        keys = options.only or list(RUNS)
        info = machine()
        stdouts = {key: run(key) for key in keys}
        train_seconds()
        values = {k: v for k, v in saved.get("figures", {}).items() if k in FIGURES}
        blocks = {
            k: v for k, v in saved.get("blocks", {}).items() if k in BLOCKS or k in COMPUTED_BLOCKS
        }
        for key, compute in FIGURES.items():
            try:
                values[key] = compute()
            except (KeyError, FileNotFoundError, StopIteration) as error:
                if options.only is None:
                    raise
                print(f"figures: {key} kept ({error})", file=sys.stderr)
        for key, source in BLOCKS.items():
            if source in stdouts:
                blocks[key] = table(stdouts[source])
        for key, compute_block in COMPUTED_BLOCKS.items():
            try:
                blocks[key] = compute_block()
            except (KeyError, FileNotFoundError) as error:
                if options.only is None:
                    raise
                print(f"figures: {key} kept ({error})", file=sys.stderr)
        saved = {
            "machine": info,
            # A partial run (--only) keeps the other runs' times.
            "run_seconds": {
                **(saved.get("run_seconds", {}) if options.only else {}),
                **{k: round(v, 1) for k, v in TIMES.items()},
            },
            "figures": values,
            "blocks": blocks,
        }
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(saved, indent=1, ensure_ascii=False) + "\n")
    unused = rewrite_readme(saved["figures"], saved["blocks"])
    if unused:
        print(f"figures: not quoted in the README: {', '.join(unused)}", file=sys.stderr)
    print(f"figures: wrote {RESULTS.relative_to(ROOT)} and README.md", file=sys.stderr)


if __name__ == "__main__":
    main()

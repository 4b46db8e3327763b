"""One figure per analysis kind, drawn from its report entry alone (so `mergecli report` can
redraw them). matplotlib with the Agg backend: no display needed.

Every figure is at most MAX_WIDTH inches wide and saved at DPI, and no text is smaller than
MIN_FONT points: read at its saved size, every label stays legible."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

DPI = 110
MAX_WIDTH = 10.0  # inches
MIN_FONT = 8.0  # points
STYLE = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": 8,
         "ytick.labelsize": 8, "legend.fontsize": 8, "figure.titlesize": 10}  # fmt: skip
SPLIT_NAMES = {"fit": "data.fit", "eval": "data.eval"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams.update(STYLE)
    return plt


def data_name(data: dict[str, Any], split: str) -> str:
    """A split as the reader knows it: "MNIST train (fit)"; reports without names say data.fit."""
    label = data.get("data", {}).get(split) if isinstance(data.get("data"), dict) else None
    return f"{label} ({split})" if label else SPLIT_NAMES.get(split, str(split))


def figure_interpolation(data: dict[str, Any]):
    from mergecli.analyze.interpolation import has_barrier

    plt = _pyplot()
    splits = [s for s in ("fit", "eval") if any(s in p for p in data["paths"].values())]
    fig, axes = plt.subplots(2, len(splits), figsize=(4.6 * len(splits), 6.6), squeeze=False,
                             layout="constrained")  # fmt: skip
    lambdas = data["lambdas"]
    for name, curve in data["paths"].items():
        label = f"{name}: {curve['from']} → {curve['to']}"
        if has_barrier(name):
            label += "; loss barrier " + ", ".join(
                f"{curve[s]['loss_barrier']:.3f} on {data_name(data, s)}" for s in splits
            )
        for column, split in enumerate(splits):
            # One legend entry per path: only the first panel's line is labelled.
            axes[0][column].plot(lambdas, curve[split]["loss"], marker=".",
                                 label=label if column == 0 else "_")  # fmt: skip
            axes[1][column].plot(lambdas, [100 * a for a in curve[split]["accuracy"]], marker=".")
    for column, split in enumerate(splits):
        axes[0][column].set_title(data_name(data, split))
        axes[0][column].set_ylabel("cross-entropy loss")
        axes[1][column].set_ylabel("accuracy (%)")
        for ax in axes[:, column]:
            ax.set_xlabel("λ (0: start of the path, 1: its end)")
            ax.grid(alpha=0.3)
    # Below the axes, where it hides no curve (the aligned path peaks mid-plot).
    fig.legend(loc="outside lower center", ncol=1)
    note = ", BatchNorm statistics recomputed at every point" if data.get("bn_reset") else ""
    naive = data["paths"].get("naive")
    ends = f" from {naive['from']} to {naive['to']}" if naive else ""
    fig.suptitle(f"Loss and accuracy along straight lines in weight space{ends}{note}")
    return fig


def figure_averaging(data: dict[str, Any]):
    plt = _pyplot()
    rows = data["results"]
    names = []
    for r in rows:
        ingredients = r.get("ingredients") or []
        if r["kind"] == "greedy_soup" and len(ingredients) == 1:
            names.append(f"greedy soup = one model: {ingredients[0]}")
        elif r["kind"] == "greedy_soup":
            names.append(f"greedy soup of {len(ingredients)} models")
        else:
            names.append(r["name"])
    values = [100 * r["accuracy"] for r in rows]
    kinds = {"model": ("single model", "#7f7f7f", "o"),
             "soup": ("weights averaged", "#1f77b4", "s"),
             "merge": ("weights merged (baseline)", "#2ca02c", "^"),
             "ensemble": ("outputs ensembled", "#ff7f0e", "D")}  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 2.0), layout="constrained")
    for kind, (label, color, marker) in kinds.items():
        chosen = [i for i, r in enumerate(rows) if _group(r["kind"]) == kind]
        if not chosen:
            continue  # no legend entry for what is not drawn (merge baselines are optional)
        ax.scatter([values[i] for i in chosen], chosen, color=color, marker=marker, s=45,
                   label=label, zorder=3)  # fmt: skip
        for i in chosen:
            ax.annotate(f"{values[i]:.2f}%", (values[i], i), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=8)  # fmt: skip
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    # Dots, not bars: a bar's length would claim a zero the axis does not show.
    low = max(0.0, 5 * math.floor((min(values) - 3) / 5))
    ax.set_xlim(low, 100.0)
    start = f"; the axis starts at {low:g}%, not 0" if low > 0 else ""
    ax.set_xlabel(f"accuracy on {data_name(data, data['split'])} (%){start}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left")
    aligned = "aligned" if data.get("aligned") else "unaligned"
    selected = data.get("selected_on") or next(
        (r.get("selected_on") for r in rows if r.get("selected_on")), None
    )
    title = f"Weight averaging against ensembling ({aligned} weights)"
    if selected:
        title += f"\ngreedy soup ingredients chosen on {data_name(data, selected)}"
    ax.set_title(title)
    return fig


def _group(kind: str) -> str:
    if kind in ("model", "merge"):
        return kind
    return "soup" if "soup" in kind else "ensemble"


def figure_scaling(data: dict[str, Any]):
    plt = _pyplot()
    rows = data["results"]
    targets = list(dict.fromkeys(r["apply_to"] for r in rows))
    subjects = list(dict.fromkeys(r["subject"] for r in rows))
    # One colour and marker per model across the panels, so a line keeps its look.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "os^vDPX*"
    looks = {s: {"color": palette[i % len(palette)], "marker": markers[i % len(markers)]}
             for i, s in enumerate(subjects)}  # fmt: skip
    width = min(MAX_WIDTH, 3.2 * len(targets) + 0.4)
    fig, axes = plt.subplots(2, len(targets), figsize=(width, 6.8), squeeze=False,
                             sharey="row", layout="constrained")  # fmt: skip
    models = data.get("models") or []
    for column, target in enumerate(targets):
        for subject in subjects:
            points = [r for r in rows if r["apply_to"] == target and r["subject"] == subject]
            if not points:
                continue
            factors = [r["factor"] for r in points]
            style = {"label": subject, "markersize": 5, "lw": 1.2, **looks[subject]}
            axes[0][column].plot(factors, [100 * r["accuracy"] for r in points], **style)
            axes[1][column].plot(factors, [100 * r["agreement"] for r in points], **style)
        axes[0][column].set_title(f"scaled: {_scaled_names(target, models)}")
        for ax in axes[:, column]:
            ax.set_xscale("log")
            ax.set_xlabel("scale factor c")
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"accuracy on {data_name(data, data['split'])} (%)")
    axes[1][0].set_ylabel("agreement with the unscaled\npredictions (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    for ax in axes[0][1:]:
        seen |= dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend([seen[s] for s in subjects if s in seen], [s for s in subjects if s in seen],
               loc="outside lower center", ncol=3)  # fmt: skip
    rule = data["rule"].replace(" x c^2", " × c²").replace(" x c", " × c")
    fig.suptitle(f"Scaling the weights by c: single models, their average and their ensembles\n"
                 f"({rule}; a tie between k classes counts 1/k)", fontsize=9)  # fmt: skip
    return fig


def _scaled_names(target: str, models: list[str]) -> str:
    from mergecli.analyze.scaling import scaled_models

    words = target.replace("_", " ")
    if target == "all":
        return "all models"
    if not models or target not in ("first", "last", "all_but_first", "all_but_last"):
        return words
    names = [models[i] for i in scaled_models(target, len(models))]  # type: ignore[arg-type]
    return f"{words} ({', '.join(names)})"


def figure_templates(data: dict[str, Any]):
    plt = _pyplot()
    from matplotlib.colors import Normalize

    shape = data["image_shape"]
    if len(shape) != 2:
        shape = [1, math.prod(shape)]
    sets = data["sets"]
    per_class = data.get("per_class", False)
    means = data["class_means"]
    columns = max(len(data["units"]), len(means))
    size = (1.4 + 0.66 * columns + 0.9, 1.05 * (1 + len(sets)) + 0.9)
    fig, axes = plt.subplots(1 + len(sets), columns, figsize=size, squeeze=False,
                             layout="constrained")  # fmt: skip
    # One scale for every weight image (clipped at the 99th percentile of |w|, so one noisy row
    # does not wash the others out), another for the class means, which are pixels.
    weights = sorted(abs(v) for s in sets for image in s["images"] for v in image)
    bound = weights[int(0.99 * (len(weights) - 1))] or 1.0
    mean_bound = max(abs(v) for image in means for v in image) or 1.0
    weight_norm, mean_norm = Normalize(-bound, bound), Normalize(-mean_bound, mean_bound)
    for c, image in enumerate(means):
        ax = axes[0][c]
        shown = ax.imshow(_reshape(image, shape), cmap="RdBu_r", norm=mean_norm)
        ax.set_title(f"class {data['classes'][c]}", fontsize=8)
    means_image = shown
    for r, template_set in enumerate(sets, start=1):
        for c, image in enumerate(template_set["images"]):
            ax = axes[r][c]
            shown = ax.imshow(_reshape(image, shape), cmap="RdBu_r", norm=weight_norm)
            match = template_set["match"][c]
            ax.set_xlabel(
                f"cos {match['cosine']:.2f}" if per_class else
                f"~{match['class']} ({match['cosine']:.2f})", fontsize=8, labelpad=1)  # fmt: skip
            if r == 1 and not per_class:
                ax.set_title(f"row {data['units'][c]}", fontsize=8)
        axes[r][0].set_ylabel(f"{template_set['name']}\nmean cos {template_set['mean_cosine']:.2f}",
                              rotation=0, ha="right", va="center", fontsize=8)  # fmt: skip
    axes[0][0].set_ylabel(f"centred class\nmeans ({data.get('data') or data['split']})",
                          rotation=0, ha="right", va="center", fontsize=8)  # fmt: skip
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    fig.colorbar(means_image, ax=axes[0, :], shrink=0.9, aspect=8, label="pixel − mean")
    fig.colorbar(shown, ax=axes[1:, :], extend="both", shrink=0.6, aspect=25,
                 label="weight (one scale for all rows)")  # fmt: skip
    what = "its cosine to its class" if per_class else "the closest class (cosine)"
    pair = data.get("pair")
    models = f"{data['model']} and {pair['other']}, averaged" if pair else data["model"]
    # Two lines: one would run past the figure's edges with long layer and model names.
    title = (f"Rows of {data['layer']} as images ({models})\n"
             f"beside the centred class means; below each, {what}")  # fmt: skip
    if pair:
        title += f"\nmean cosine of matching rows: {pair['mean_cosine_before']:.2f}"
        if "mean_cosine_after" in pair:
            title += f" before alignment, {pair['mean_cosine_after']:.2f} after"
    fig.suptitle(title, fontsize=9)
    return fig


def figure_coefficients(data: dict[str, Any]):
    plt = _pyplot()
    layers = data["layers"]
    edges = data["bin_edges"]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(layers) + 2.2), layout="constrained")
    # Each tensor's histogram as one row, as shares of its parameters (tensors differ in size).
    shares = [[count / max(1, sum(layer["histogram"])) for count in layer["histogram"]]
              for layer in layers]  # fmt: skip
    image = ax.imshow(shares, aspect="auto", cmap="Blues", interpolation="nearest",
                      extent=(edges[0], edges[-1], len(layers) - 0.5, -0.5))  # fmt: skip
    ax.scatter([layer["mean"] for layer in layers], range(len(layers)), color="#d62728",
               marker="|", s=120, linewidths=2, label="mean", zorder=3)  # fmt: skip
    over_task_vectors = data.get("multi") == "task_vectors"
    even = "average" if over_task_vectors else "even mix"
    ax.axvline(data["even"], color="black", lw=0.8, ls="--", label=f"{even} ({data['even']:.2f})")
    ax.set_yticks(range(len(layers)), [layer["tensor"] for layer in layers])
    if over_task_vectors:
        ax.set_xlabel("coefficient of the model's task vector (base + sum_i c_i tau_i)")
    else:
        ax.set_xlabel(f"weight of {data['reference']} in the merged parameter")
    fig.legend(loc="outside lower center", ncol=2)
    fig.colorbar(image, ax=ax, label="share of the tensor's parameters")
    if over_task_vectors:
        fig.suptitle("Learned coefficients over task vectors, per tensor and fine-tune: "
                     "histogram of c_i", fontsize=9)  # fmt: skip
    else:
        fig.suptitle(f"Learned merge coefficients ({data.get('multi') or 'fit'}), per tensor: "
                     f"histogram of the weight of {data['reference']}", fontsize=9)  # fmt: skip
    return fig


def _reshape(flat: list[float], shape: list[int]) -> list[list[float]]:
    height, width = shape
    return [flat[i * width : (i + 1) * width] for i in range(height)]


def _save(fig, path: Path) -> None:
    from mergecli.io.atomic import atomic_target

    plt = _pyplot()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)


FIGURES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "interpolation": figure_interpolation,
    "averaging_vs_ensembling": figure_averaging,
    "scaling": figure_scaling,
    "templates": figure_templates,
    "coefficients": figure_coefficients,
}


def _plot(kind: str) -> Callable[[dict[str, Any], Path], None]:
    def plot(data: dict[str, Any], path: Path) -> None:
        _save(FIGURES[kind](data), path)

    return plot


PLOTS: dict[str, Callable[[dict[str, Any], Path], None]] = {kind: _plot(kind) for kind in FIGURES}

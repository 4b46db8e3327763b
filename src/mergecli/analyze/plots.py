"""One figure per analysis kind, drawn from its report entry alone (so `mergecli report` can
redraw them). matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_interpolation(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    splits = [s for s in ("fit", "eval") if any(s in p for p in data["paths"].values())]
    fig, axes = plt.subplots(2, len(splits), figsize=(5.5 * len(splits), 7), squeeze=False)
    lambdas = data["lambdas"]
    for column, split in enumerate(splits):
        for name, curve in data["paths"].items():
            ends = f"{curve['from']} → {curve['to']}"
            label = f"{name}: {ends} (barrier {curve[split]['loss_barrier']:.3f})"
            axes[0][column].plot(lambdas, curve[split]["loss"], marker=".", label=label)
            axes[1][column].plot(
                lambdas, [100 * a for a in curve[split]["accuracy"]], marker=".", label=label
            )
        axes[0][column].set_title(f"data.{split}")
        axes[0][column].set_ylabel("cross-entropy loss")
        axes[1][column].set_ylabel("accuracy (%)")
        for ax in axes[:, column]:
            ax.set_xlabel("λ (0: start of the path, 1: its end; see legend)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Interpolation between models")
    _save(fig, path, plt)


def plot_averaging(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = data["results"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    names = [r["name"] for r in rows]
    values = [100 * r["accuracy"] for r in rows]
    colors = ["#8c8c8c" if r["kind"] == "model" else "#1f77b4" if "soup" in r["kind"]
              else "#ff7f0e" for r in rows]  # fmt: skip
    bars = ax.barh(names, values, color=colors)
    ax.invert_yaxis()
    ax.bar_label(bars, labels=[f"{v:.2f}%" for v in values], padding=3, fontsize=8)
    low = min(values)
    ax.set_xlim(max(0.0, low - 10), min(100.0, max(values) + 5))
    ax.set_xlabel(f"accuracy on data.{data['split']} (%)")
    ax.set_title("Weight averaging (blue) against ensembling (orange); single models grey")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path, plt)


def plot_scaling(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = data["results"]
    targets = list(dict.fromkeys(r["apply_to"] for r in rows))
    # One colour per model across the panels, so a line keeps its colour.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {s: palette[i % len(palette)]
              for i, s in enumerate(dict.fromkeys(r["subject"] for r in rows))}  # fmt: skip
    fig, axes = plt.subplots(2, len(targets), figsize=(5 * len(targets), 7), squeeze=False)
    for column, target in enumerate(targets):
        subjects = list(dict.fromkeys(r["subject"] for r in rows if r["apply_to"] == target))
        for subject in subjects:
            points = [r for r in rows if r["apply_to"] == target and r["subject"] == subject]
            factors = [r["factor"] for r in points]
            style = {"marker": "o", "label": subject, "color": colors[subject]}
            axes[0][column].plot(factors, [100 * r["accuracy"] for r in points], **style)
            axes[1][column].plot(factors, [100 * r["agreement"] for r in points], **style)
        axes[0][column].set_title(f"scaled: {target.replace('_', ' ')}")
        axes[0][column].set_ylabel(f"accuracy on data.{data['split']} (%)")
        axes[1][column].set_ylabel("agreement with unscaled (%)")
        for ax in axes[:, column]:
            ax.set_xscale("log")
            ax.set_xlabel("scale factor c")
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"Scaling the weights by c ({data['rule']})", fontsize=9)
    _save(fig, path, plt)


def plot_templates(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    shape = data["image_shape"]
    if len(shape) != 2:
        shape = [1, math.prod(shape)]
    rows = [("class mean", data["class_means"], [f"class {c}" for c in data["classes"]])]
    captions = [f"unit {r['unit']}: ~{r['class']} ({r['cosine']:.2f})" for r in data["rows"]]
    rows.append((data["model"], data["templates"], captions))
    pair = data.get("pair")
    if pair:
        before = f"{pair['other']} (cos {pair['mean_cosine_before']:.2f})"
        rows.append((before, pair["other_templates"], None))
        if "aligned_templates" in pair:
            after = f"{pair['other']} aligned (cos {pair['mean_cosine_after']:.2f})"
            rows.append((after, pair["aligned_templates"], None))
    width = max(len(images) for _, images, _ in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(1.3 * width, 1.55 * len(rows)),
                             squeeze=False)  # fmt: skip
    for r, (label, images, titles) in enumerate(rows):
        for c in range(width):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            image = _reshape(images[c], shape)
            bound = max(abs(v) for line in image for v in line) or 1.0
            ax.imshow(image, cmap="RdBu_r", vmin=-bound, vmax=bound)
            if titles:
                ax.set_title(titles[c], fontsize=6)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(f"Rows of {data['layer']} as images (red +, blue −) beside the class means")
    _save(fig, path, plt)


def plot_coefficients(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    layers = data["layers"]
    edges = data["bin_edges"]
    columns = min(4, len(layers))
    grid_rows = math.ceil(len(layers) / columns) + 1
    fig = plt.figure(figsize=(3.6 * columns, 2.4 * grid_rows))
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(grid_rows, columns, i + 1)
        ax.stairs(layer["histogram"], edges, fill=True, alpha=0.7)
        ax.axvline(data["even"], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{layer['tensor']} (mean {layer['mean']:.2f})", fontsize=7)
        ax.set_xlabel(f"weight of {data['reference']}", fontsize=7)
        ax.set_ylabel("parameters", fontsize=7)
        ax.tick_params(labelsize=6)
    ax = fig.add_subplot(grid_rows, 1, grid_rows)
    ax.bar(range(len(layers)), [layer["mean"] for layer in layers])
    ax.axhline(data["even"], color="grey", lw=0.8, ls="--", label="even mix")
    ax.set_xticks(range(len(layers)), [layer["tensor"] for layer in layers], rotation=45,
                  ha="right", fontsize=6)  # fmt: skip
    ax.set_ylabel(f"mean weight of {data['reference']}", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.suptitle("Learned merge coefficients per tensor")
    _save(fig, path, plt)


def _reshape(flat: list[float], shape: list[int]) -> list[list[float]]:
    height, width = shape
    return [flat[i * width : (i + 1) * width] for i in range(height)]


def _save(fig, path: Path, plt) -> None:
    from mergecli.io.atomic import atomic_target

    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


PLOTS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "interpolation": plot_interpolation,
    "averaging_vs_ensembling": plot_averaging,
    "scaling": plot_scaling,
    "templates": plot_templates,
    "coefficients": plot_coefficients,
}

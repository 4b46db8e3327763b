"""report.md and the analysis files, rendered from report.json alone (`mergecli report DIR`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergecli.analyze.plots import data_name
from mergecli.errors import MergeCliError
from mergecli.io.atomic import write_text_atomic


def read_report(path: Path) -> dict[str, Any]:
    """report.json of an output dir, checked to be one the renderer can draw (else one line)."""
    from mergecli.report_shape import check_report

    if not path.is_file():
        raise MergeCliError(f"{path}: not found; give the output dir of a finished `mergecli run`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MergeCliError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise MergeCliError(f"{path}: cannot read it ({exc}); re-run the recipe") from None
    check_report(data, str(path))
    return data


def render_report(out_dir: Path, report: dict[str, Any]) -> list[Path]:
    """Write analysis/KIND.json and analysis/KIND.png for each analysis, then report.md."""
    from mergecli.analyze.plots import PLOTS

    written: list[Path] = []
    analyses = report.get("analysis", {})
    if analyses:
        (out_dir / "analysis").mkdir(parents=True, exist_ok=True)
        for kind, data in analyses.items():
            json_path = _inside(out_dir, f"analysis/{kind}.json")
            write_text_atomic(json_path, json.dumps(data, indent=1) + "\n")
            written.append(json_path)
            if kind in PLOTS:
                png_path = _inside(out_dir, f"analysis/{kind}.png")
                PLOTS[kind](data, png_path)
                written.append(png_path)
    path = _inside(out_dir, "report.md")
    write_text_atomic(path, markdown(report))
    written.append(path)
    return written


def _inside(out_dir: Path, relative: str) -> Path:
    """``out_dir / relative``, refused unless it resolves inside out_dir: the names come from
    report.json, and a report must never write elsewhere (checked once more, here)."""
    path = out_dir / relative
    if not path.resolve().is_relative_to(out_dir.resolve()):
        raise MergeCliError(
            f"{out_dir}: refusing to write {json.dumps(relative)}, which resolves outside the "
            "output dir; remove that entry (or the link it goes through) and run again"
        )
    return path


def markdown(report: dict[str, Any]) -> str:
    """The report as GitHub-readable Markdown: tables, and the analysis plots as images."""
    lines = [f"# mergecli report: {report.get('name') or 'merge'}", ""]
    lines += [f"mergecli {report.get('mergecli_version', '?')}, recipe sha256 "
              f"`{str(report.get('recipe_sha256', '?'))[:16]}`", ""]  # fmt: skip
    inputs = report.get("inputs", [])
    if inputs:
        lines += _table(["checkpoint", "role", "path", "sha256"],
                        [[i["name"], i.get("role") or "", f"`{i['path']}`", f"`{i['sha256'][:12]}`"]
                         for i in inputs])  # fmt: skip
    if "align" in report:
        align = report["align"]
        how = (
            f"Transforms from `{align['from']}` (an earlier run's, not recomputed)"
            if align.get("from")
            else f"Method `{align['method']}`"
        )
        lines += ["## Alignment", "", f"{how}, reference `{align['reference']}`, "
                  f"{len(align['groups'])} groups.", ""]  # fmt: skip
        lines += _table(["model", "weight distance before", "after"],
                        [[n, f"{d['before']:.3f}", f"{d['after']:.3f}"]
                         for n, d in align.get("weight_distance", {}).items()])  # fmt: skip
        matching = align.get("matching", {})
        if matching:
            lines += [
                "Weight matching objective: the sum over the permuted weights of "
                "⟨A, P(B)⟩ (larger is closer); the restart with the largest is kept.",
                "",
            ]
            lines += _table(["model", "objective", "restart kept", "sweeps", "every restart"],
                            [[n, f"{m['objective']:.6g}",
                              f"{m['best_restart'] + 1} of {len(m['restart_objectives'])}",
                              str(m["sweeps"]),
                              ", ".join(f"{x:.6g}" for x in m["restart_objectives"])]
                             for n, m in matching.items()])  # fmt: skip
    if "fit" in report:
        fit = report["fit"]
        last = fit["stages"][-1]["history"][-1] if fit["stages"][-1]["history"] else {}
        accuracy = f", last validation accuracy {100 * last['val_accuracy']:.2f}%" if (
            "val_accuracy" in last) else ""  # fmt: skip
        perplexities = {k: v for k, v in last.items()
                        if k.startswith("val_") and k.endswith("perplexity")}  # fmt: skip
        if perplexities:
            accuracy += ", last validation perplexity " + ", ".join(
                f"{k[4 : -len('perplexity')].rstrip('_') or 'data.eval'} {v:.2f}"
                for k, v in perplexities.items()
            )
        lines += ["## Fit", "", f"`{fit['method']}` ({fit['granularity']}, {fit['multi']}), "
                  f"{sum(s['steps'] for s in fit['stages'])} steps in {fit['seconds']:.1f} s on "
                  f"{fit['examples']} examples{accuracy}.", ""]  # fmt: skip
        if "fit_loss" in fit:
            losses, start = fit["fit_loss"], fit["start"]["method"]
            lines[-1:-1] = [f"Over task vectors from `{start}`: fit loss {losses['start']:.4f} at "
                            f"the start, {losses['end']:.4f} at the end; the output is "
                            + ("the fit's." if fit["kept"] == "fit" else f"the start (`{start}`)."),
                            ""]  # fmt: skip
    if "repair" in report:
        lines += _repair(report["repair"])
    if "evaluate" in report:
        lines += evaluation_section(report["evaluate"])
    analyses = report.get("analysis", {})
    for kind, data in analyses.items():
        lines += [f"## Analysis: {kind.replace('_', ' ')}", ""]
        lines += SECTIONS.get(kind, lambda _d: [])(data)
        lines += [f"![{kind}](analysis/{kind}.png)", ""]
    return "\n".join(lines).rstrip() + "\n"


def _repair(repair: dict[str, Any]) -> list[str]:
    text = f"Method `{repair.get('method', '?')}`"
    if "layers" in repair and "batches" in repair:
        what = "BatchNorm layers recomputed" if repair.get("method") == "reset_bn" else "layers"
        text += f": {repair['layers']} {what} over {repair['batches']} batches of data.fit"
    if repair.get("head") is not None and "head_corrected" in repair:
        text += (
            f"; the output layer `{repair['head']}` corrected too (as in the REPAIR notebooks)"
            if repair["head_corrected"]
            else f"; the output layer `{repair['head']}` left as merged"
        )
    return ["## Repair", "", text + ".", ""]


def evaluation_section(evaluation: dict[str, Any]) -> list[str]:
    """The evaluate step's table (and per-class accuracies) as Markdown lines."""
    if evaluation.get("method") == "language_model":
        return _language_model_section(evaluation)
    rows = evaluation["results"]
    sets = evaluation.get("sets")
    on = (
        ", ".join(f"{name} ({count} examples)" for name, count in sets.items())
        if sets
        else f"{evaluation['examples']} examples"
    )
    lines = ["## Evaluation", "", f"On data.{evaluation['split']}: {on}." if sets else
             f"On data.{evaluation['split']} ({on}).", ""]  # fmt: skip
    first = ["set"] if sets else []
    lines += _table(
        [*first, "model", "kind", "accuracy", "loss", "ECE", "Δ vs best endpoint (pts)",
         "Δ vs ensemble (pts)"],
        [[*([r.get("set", "")] if sets else []), r["name"], r["kind"],
          f"{100 * r['accuracy']:.2f}%", f"{r['loss']:.4f}",
          f"{r['ece']:.3f}" if "ece" in r else "", _points(r.get("delta_vs_best_endpoint")),
          _points(r.get("delta_vs_ensemble"))] for r in rows],
    )  # fmt: skip
    classes = sorted({c for r in rows for c in r.get("per_class_accuracy", {})}, key=int)
    if classes:
        lines += ["Accuracy per class (%):", ""]
        lines += _table([*first, "model", *[str(c) for c in classes]],
                        [[*([r.get("set", "")] if sets else []), r["name"],
                          *[f"{100 * r['per_class_accuracy'][c]:.1f}"
                                       if c in r["per_class_accuracy"] else "" for c in classes]]
                         for r in rows])  # fmt: skip
    return lines


def _language_model_section(evaluation: dict[str, Any]) -> list[str]:
    """The language-model evaluation: cross-entropy and perplexity per set, per model."""
    sets = evaluation["sets"]
    on = ", ".join(f"{name} ({s['tokens']} tokens)" for name, s in sets.items())
    lines = ["## Evaluation", "", f"Next-token cross-entropy (CE) and perplexity on data.eval: "
             f"{on}.", ""]  # fmt: skip
    headers = ["model", "kind"]
    headers += [h for name in sets for h in (f"{name} CE", f"{name} ppl")]
    rows = [
        [r["name"], r["kind"]]
        + [v for name in sets for v in (f"{r['sets'][name]['loss']:.4f}",
                                         f"{r['sets'][name]['perplexity']:.2f}")]
        + [f"{r['mean_perplexity']:.2f}"]
        for r in evaluation["results"]
    ]  # fmt: skip
    return lines + _table([*headers, "mean ppl"], rows)


def _interpolation(data: dict[str, Any]) -> list[str]:
    from mergecli.analyze.interpolation import has_barrier

    rows = []
    for name, path in data["paths"].items():
        for split in ("fit", "eval"):
            if split in path:
                c = path[split]
                numbers = [f"{c['loss_barrier']:.4f}", f"{c['loss_barrier_midpoint']:.4f}",
                           f"{100 * c['accuracy_barrier']:.2f}"]  # fmt: skip
                rows.append([name, f"{path['from']} → {path['to']}", data_name(data, split),
                             *(numbers if has_barrier(name) else ["—"] * 3)])  # fmt: skip
    note = " BatchNorm statistics were recomputed at every point." if data.get("bn_reset") else ""
    fit = (" The `fit` path starts at an untrained average, so it has no barrier (—)."
           if "fit" in data["paths"] else "")  # fmt: skip
    return [f"{len(data['lambdas'])} points per path.{note}{fit}", "", *_table(
        ["path", "between", "data", "loss barrier", "loss barrier at λ=½", "accuracy drop (pts)"],
        rows)]  # fmt: skip


def _averaging(data: dict[str, Any]) -> list[str]:
    rows = [[r["name"], f"{100 * r['accuracy']:.2f}%", f"{r['loss']:.4f}",
             ", ".join(r.get("ingredients", []))] for r in data["results"]]  # fmt: skip
    aligned = "aligned" if data.get("aligned") else "unaligned"
    lines = [f"On {data_name(data, data['split'])}, {aligned} weights."]
    if data.get("selected_on"):
        lines[0] += (f" The greedy soup chose its ingredients on "
                     f"{data_name(data, data['selected_on'])}.")  # fmt: skip
    return [*lines, "", *_table(["model", "accuracy", "loss", "greedy soup ingredients"], rows)]


def _scaling(data: dict[str, Any]) -> list[str]:
    rows = [[f"{r['factor']:g}", r["apply_to"], r["subject"], f"{100 * r['accuracy']:.2f}%",
             f"{100 * r['agreement']:.1f}%"] for r in data["results"]]  # fmt: skip
    columns = ["c", "scaled", "model", "accuracy", "agreement with unscaled"]
    return [f"Rule: {data['rule']}. On {data_name(data, data['split'])}; a tie between k classes "
            "counts 1/k.", "", *_table(columns, rows)]  # fmt: skip


def _templates(data: dict[str, Any]) -> list[str]:
    lines = [f"Rows of `{data['layer']}` as {data['image_shape']} images, matched with the "
             f"centred class means of {data.get('data') or 'data.' + str(data['split'])} "
             "(each class mean minus the mean of all examples)."]  # fmt: skip
    pair = data.get("pair")
    if pair:
        lines[0] += (f" Mean cosine of matching rows of {data['model']} and {pair['other']}: "
                     f"{pair['mean_cosine_before']:.3f} before alignment")  # fmt: skip
        if "mean_cosine_after" in pair:
            lines[0] += f", {pair['mean_cosine_after']:.3f} after"
        lines[0] += "."
    what = "its class" if data.get("per_class") else "closest class (cosine)"
    sets = data["sets"]
    rows = [[unit, *(f"{s['match'][i]['class']} ({s['match'][i]['cosine']:.3f})" for s in sets)]
            for i, unit in enumerate(data["units"])]  # fmt: skip
    rows.append(["mean cosine", *(f"{s['mean_cosine']:.3f}" for s in sets)])
    return [*lines, "", *_table(["row", *(f"{s['name']}: {what}" for s in sets)], rows)]


def _coefficients(data: dict[str, Any]) -> list[str]:
    rows = [[r["tensor"], r["count"], f"{r['mean']:.3f}", f"{r['std']:.3f}"]
            for r in data["layers"]]  # fmt: skip
    return [f"Weight of {data['reference']} in each merged parameter ({data['multi']}); an "
            f"even mix is {data['even']:.2f}.", "",
            *_table(["tensor", "parameters", "mean", "std"], rows)]  # fmt: skip


SECTIONS = {
    "interpolation": _interpolation,
    "averaging_vs_ensembling": _averaging,
    "scaling": _scaling,
    "templates": _templates,
    "coefficients": _coefficients,
}


def _points(delta: float | None) -> str:
    return "" if delta is None else f"{100 * delta:+.2f}"


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]

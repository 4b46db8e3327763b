"""A merged Hugging Face model directory gets a model card (README.md) as mergekit writes one,
and its safetensors carry the merge's provenance. The directories are built by hand (a
config.json beside model.safetensors), so transformers is not needed."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import run_cli
from mergecli.io import checkpoint_sha256
from mergecli.io.output_dir import MANIFEST


def hf_directory(folder: Path, tensors: dict, name_or_path: str | None) -> Path:
    """What save_pretrained leaves: config.json (with the Hub id it came from) and weights."""
    folder.mkdir(parents=True)
    config = {"architectures": ["TinyMLP"], "model_type": "tiny-mlp"}
    if name_or_path is not None:
        config["_name_or_path"] = name_or_path
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    return folder


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:200]
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_merged_model_directory_has_a_card_and_provenance(tmp_path: Path, trained_pair) -> None:
    a = hf_directory(tmp_path / "a", load_file(trained_pair[0]), "org/tiny-mlp-a")
    # A local path is not a Hub id: no base_model entry for it.
    b = hf_directory(tmp_path / "b", load_file(trained_pair[1]), str(tmp_path / "b"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "version: 1\nname: tiny-merge\n"
        "model: {arch: mlp, args: {depth: 3, hidden: 32}}\n"
        f"checkpoints: [{{path: {a}}}, {{path: {b}, weight: 3}}]\n"
        "data: {eval: {source: mnist, split: '9000:9300'}}\n"
        "steps: [{merge: {method: linear}}, {evaluate: {baselines: [endpoints]}}]\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    run_cli("run", str(recipe), check=True)
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    assert front_matter(card) == {
        "base_model": ["org/tiny-mlp-a"],
        "library_name": "transformers",
        "tags": ["merge", "mergecli"],
    }
    report = json.loads((out / "report.json").read_text())
    # The inputs with their full sha256, the method and its parameters, the evaluation table.
    for path in (a, b):
        assert f"`{path}` | `{checkpoint_sha256(path)}` |" in card
    assert "| b |  | 3 |" in card
    assert "(method: linear)" in card
    assert (
        '0. `merge`: `linear` (compute_dtype: "float32", missing: "error", normalize: true)' in card
    )
    assert "## Evaluation" in card
    merged_row = next(r for r in report["evaluate"]["results"] if r["kind"] == "merged")
    assert f"| {100 * merged_row['accuracy']:.2f}% |" in card
    # The recipe, resolved, as YAML that reads back to the same recipe.
    recipe_block = card.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(recipe_block)["name"] == "tiny-merge"
    # Part of the output set: listed in the manifest and the report.
    assert "README.md" in json.loads((out / MANIFEST).read_text())["files"]
    assert "README.md" in report["output"]["files"]
    assert (out / "config.json").read_bytes() == (a / "config.json").read_bytes()
    # Provenance in the weights' metadata: recipe hash, version, inputs, method.
    meta = metadata(out / "model.safetensors")
    assert meta["mergecli.recipe_sha256"] == report["recipe_sha256"]
    assert meta["mergecli.version"] == report["mergecli_version"]
    assert meta["mergecli.method"] == "linear"
    assert json.loads(meta["mergecli.inputs"]) == {
        str(a): checkpoint_sha256(a),
        str(b): checkpoint_sha256(b),
    }
    assert meta["format"] == "pt"


def test_data_free_merge_of_model_directories_has_a_card(tmp_path: Path, trained_pair) -> None:
    tensors = load_file(trained_pair[0])
    base = hf_directory(tmp_path / "base", tensors, "org/base")
    tuned = [
        hf_directory(tmp_path / f"ft{i}", load_file(path), f"org/ft{i}")
        for i, path in enumerate(trained_pair)
    ]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {base}, role: base}}, {{path: {tuned[0]}}}, "
        f"{{path: {tuned[1]}}}]\nsteps: [{{merge: {{method: ties, density: 0.5}}}}]\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    run_cli("run", str(recipe), check=True)
    card = (tmp_path / "out" / "README.md").read_text()
    # The base model of a task-vector merge is its base_model, as on the Hub.
    assert front_matter(card)["base_model"] == ["org/base"]
    assert "## Evaluation" not in card, "no evaluate step, no table"
    assert "| base | base |" in card and "0. `merge`: `ties` (" in card
    assert metadata(tmp_path / "out" / "model.safetensors")["mergecli.method"] == "ties"


def test_a_single_file_output_has_no_card(tmp_path: Path, trained_pair) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {trained_pair[0]}}}, {{path: {trained_pair[1]}}}]\n"
        f"steps: [{{merge: {{method: linear}}}}]\noutput: {{dir: {tmp_path / 'out'}}}\n"
    )
    run_cli("run", str(recipe), check=True)
    assert not (tmp_path / "out" / "README.md").exists()
    assert metadata(tmp_path / "out" / "model.safetensors")["mergecli.method"] == "linear"

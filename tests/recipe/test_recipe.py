"""Recipe loading: line-numbered errors, suggestions, overrides and the resolved recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import ROOT, mlp_checkpoint, run_cli
from mergecli.errors import RecipeError
from mergecli.recipe import load_recipe

GOOD = """\
version: 1
name: demo
model:
  arch: mlp
  args: {depth: 3}
checkpoints:
  - path: a.safetensors
  - path: b.safetensors
    weight: 2
data:
  eval: {source: mnist, split: test}
steps:
  - merge: {method: average}
  - evaluate: {}
output:
  dir: out/demo
  shard_size: 5GB
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), overrides)
    return info.value.problems


def test_good_recipe_resolves_defaults(tmp_path: Path) -> None:
    loaded = load_recipe(write(tmp_path, GOOD))
    resolved = loaded.resolved()
    assert resolved["seed"] == 0 and resolved["device"] == "auto"
    assert resolved["output"] == {"dir": "out/demo", "dtype": "auto", "shard_size": 5_000_000_000}
    assert resolved["steps"][0] == {
        "merge": {
            "method": "average",
            "compute_dtype": "float32",
            "missing": "error",
            "normalize": True,
        }
    }
    assert resolved["steps"][1]["evaluate"]["method"] == "classification"
    assert resolved["steps"][1]["evaluate"]["baselines"] == ["endpoints", "ensemble", "average"]
    assert resolved["checkpoints"][1]["weight"] == 2.0
    # The resolved recipe is itself a valid recipe that resolves to the same thing.
    again = load_recipe(write(tmp_path, loaded.resolved_yaml()))
    assert again.resolved() == resolved
    assert again.sha256() == loaded.sha256()


def test_name_defaults_to_file_stem_and_output_dir_to_name(tmp_path: Path) -> None:
    path = tmp_path / "my-merge.yaml"
    path.write_text("version: 1\ncheckpoints: [{path: a.safetensors}]\nsteps: [merge: average]\n")
    loaded = load_recipe(path)
    assert loaded.recipe.name == "my-merge"
    assert loaded.output_dir == Path("out/my-merge")


def test_unknown_key_names_line_and_suggests(tmp_path: Path) -> None:
    text = GOOD.replace("  eval: {source", "  evl: {source")
    [problem] = problems(tmp_path, text)
    assert problem.startswith(f"{tmp_path / 'recipe.yaml'}:11: data.evl: unknown key 'evl'")
    assert "did you mean 'eval'?" in problem


def test_unknown_top_level_key_and_step_param(tmp_path: Path) -> None:
    text = GOOD.replace("name: demo", "nmae: demo").replace(
        "{method: average}", "{method: average, normalise: false}"
    )
    found = problems(tmp_path, text)
    assert any(":2: nmae: unknown key 'nmae'; did you mean 'name'?" in p for p in found)
    # Step parameters are validated against the method's own schema.
    text = GOOD.replace("{method: average}", "{method: average, normalise: false}")
    [problem] = problems(tmp_path, text)
    assert ":13: steps.0.merge.normalise: unknown key 'normalise'; did you mean 'normalize'?" in (
        problem
    )


def test_wrong_type_and_range_name_the_line(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, GOOD.replace("weight: 2", "weight: heavy"))
    assert ":9: checkpoints.1.weight: " in problem and "'heavy'" in problem
    text = GOOD.replace("{source: mnist, split: test}", "{source: mnist, batch_size: -1}")
    [problem] = problems(tmp_path, text)
    assert ":11: data.eval.batch_size: input should be greater than 0 (got -1)" in problem


def test_unknown_step_kind_and_method(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, GOOD.replace("- merge: {method: average}", "- merg: {}"))
    assert ":13: steps.0.merg: unknown step kind 'merg'; did you mean 'merge'?" in problem
    [problem] = problems(tmp_path, GOOD.replace("{method: average}", "{method: averag}"))
    assert ":13: steps.0.merge.method: unknown merge method 'averag'; did you mean 'average'?" in (
        problem
    )


def test_a_method_name_alone_is_short_for_its_mapping(tmp_path: Path) -> None:
    loaded = load_recipe(write(tmp_path, GOOD.replace("{method: average}", "slerp")), [])
    assert (loaded.steps[0].kind, loaded.steps[0].method) == ("merge", "slerp")
    [problem] = problems(tmp_path, GOOD.replace("{method: average}", "averag"))
    assert ":13: steps.0.merge.method: unknown merge method 'averag'; did you mean" in problem
    [problem] = problems(tmp_path, GOOD.replace("{method: average}", "[average]"))
    assert ":13: steps.0.merge: must be a mapping of parameters" in problem
    # Overrides reach inside the short form, and both forms are the same recipe.
    short = write(tmp_path, GOOD.replace("{method: average}", "ties"))
    loaded = load_recipe(short, ["steps.0.merge.method=slerp", "steps.0.merge.t=0.3"])
    full = tmp_path / "full.yaml"
    full.write_text(GOOD.replace("{method: average}", "{method: slerp, t: 0.3}"))
    assert loaded.sha256() == load_recipe(full, []).sha256()


def test_step_needs_are_checked(tmp_path: Path) -> None:
    text = GOOD.replace("data:\n  eval: {source: mnist, split: test}\n", "")
    [problem] = problems(tmp_path, text)
    assert ":12: steps.1.evaluate: classification needs data.eval" in problem


def test_missing_required_key(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, "version: 1\nname: x\n")
    assert problem.endswith("checkpoints: required key is missing")
    [problem] = problems(tmp_path, GOOD.replace("  - path: a.safetensors\n", "  - weight: 1\n"))
    assert ":7: checkpoints.0.path: required key is missing" in problem


def test_invalid_yaml_and_duplicate_keys(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, GOOD.replace("  arch: mlp", "  arch: [mlp"))
    assert ": invalid YAML:" in problem and problem.startswith(str(tmp_path / "recipe.yaml") + ":")
    [problem] = problems(tmp_path, GOOD + "name: again\n")
    assert problem.endswith(":18: name: duplicate key")


def test_bad_values(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        GOOD.replace("version: 1", "version: 2")
        .replace("shard_size: 5GB", "shard_size: 5 parsecs")
        .replace("name: demo", "name: demo\ndevice: gpu"),
    )
    text = "\n".join(found)
    assert ":1: version:" in text
    assert ":3: device: must be auto, cpu, cuda, cuda:N or mps" in text
    assert "output.shard_size:" in text
    bad_pin = GOOD.replace("  - path: a.safetensors", "  - path: a.safetensors\n    sha256: abc")
    [problem] = problems(tmp_path, bad_pin)
    assert "checkpoints.0.sha256: must be 64 hexadecimal characters" in problem


def test_data_source_keys_are_checked(tmp_path: Path) -> None:
    [problem] = problems(
        tmp_path, GOOD.replace("{source: mnist, split: test}", "{source: tensors}")
    )
    assert ":11: data.eval: source 'tensors' needs `path`" in problem
    text = GOOD.replace("{source: mnist, split: test}", "{source: mnist, factory: 'a:b'}")
    [problem] = problems(tmp_path, text)
    assert "source 'mnist' takes no factory" in problem


def test_overrides_apply_and_are_blamed(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    loaded = load_recipe(path, ["steps.0.merge.normalize=false", "seed=7", "output.dtype=bfloat16"])
    resolved = loaded.resolved()
    assert resolved["steps"][0]["merge"]["normalize"] is False
    assert resolved["seed"] == 7 and resolved["output"]["dtype"] == "bfloat16"
    # New keys can be created, and an override's error points at --set, not a line.
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["data.eval.batch_size=0"])
    assert info.value.problems[0].startswith("--set data.eval.batch_size: data.eval.batch_size:")
    with pytest.raises(RecipeError, match=r"--set steps.9.merge.normalize: there is no item 9"):
        load_recipe(path, ["steps.9.merge.normalize=true"])
    with pytest.raises(RecipeError, match="expected dotted.key=value"):
        load_recipe(path, ["seed"])


@pytest.mark.parametrize("override", ["steps.0.merge=slerp", "steps.0={merge: slerp}"])
def test_an_override_may_use_the_short_form(tmp_path: Path, override: str) -> None:
    """`- merge: slerp` is short for `- merge: {method: slerp}` in an override as in the file."""
    loaded = load_recipe(write(tmp_path, GOOD), [override])
    assert loaded.resolved()["steps"][0]["merge"]["method"] == "slerp"


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_example_recipes_validate() -> None:
    for path in sorted(ROOT.glob("configs/examples/*.yaml")):
        loaded = load_recipe(path)
        assert loaded.steps, path
        assert yaml.safe_load(loaded.resolved_yaml())["version"] == 1


def test_slurm_section_says_how_to_run_not_what_to_compute(tmp_path: Path) -> None:
    plain = load_recipe(write(tmp_path, GOOD))
    assert plain.recipe.slurm is None and "slurm" not in plain.resolved()
    requeued = load_recipe(write(tmp_path, GOOD), ["slurm.requeue=true"])
    assert requeued.recipe.slurm.requeue is True
    assert requeued.resolved()["slurm"] == {"requeue": True}
    # The same computation: the output's recipe hash and the fit-state fingerprint agree.
    assert requeued.sha256() == plain.sha256()
    [problem] = problems(tmp_path, GOOD + "slurm: {requeu: true}\n")
    assert problem.endswith(
        "recipe.yaml:18: slurm.requeu: unknown key 'requeu'; did you mean 'requeue'? "
        "(allowed: requeue)"
    )


ANALYSIS = GOOD.replace("  - evaluate: {}\n", "  - evaluate: {}\n  - analyze: {method: scaling}\n")


def test_an_analysis_is_named_by_method_like_any_step(tmp_path: Path) -> None:
    loaded = load_recipe(write(tmp_path, ANALYSIS))
    assert (loaded.steps[2].kind, loaded.steps[2].method) == ("analyze", "scaling")
    assert loaded.warnings == []
    assert loaded.resolved()["steps"][2]["analyze"]["method"] == "scaling"
    assert "kind" not in loaded.resolved()["steps"][2]["analyze"]
    # The short form expands to `method:`, and overrides reach it there.
    short = load_recipe(write(tmp_path, ANALYSIS.replace("{method: scaling}", "interpolation")))
    assert short.warnings == [] and short.steps[2].method == "interpolation"
    overridden = load_recipe(write(tmp_path, ANALYSIS), ["steps.2.analyze.method=interpolation"])
    assert overridden.sha256() == short.sha256()


def test_analysis_kind_is_a_deprecated_name_of_method(tmp_path: Path) -> None:
    old = write(tmp_path, ANALYSIS.replace("{method: scaling}", "{kind: scaling}"))
    loaded = load_recipe(old)
    [warning] = loaded.warnings
    assert warning.endswith(
        "recipe.yaml:15: steps.2.analyze.kind: deprecated; write `method:` instead"
    )
    new = tmp_path / "new.yaml"
    new.write_text(ANALYSIS)
    assert loaded.resolved() == load_recipe(new).resolved()
    for seed, name in enumerate(("a", "b")):  # validate checks the files the recipe names
        mlp_checkpoint(tmp_path / f"{name}.safetensors", seed, depth=3)
    result = run_cli("validate", str(old), cwd=tmp_path)
    assert result.returncode == 0
    assert "warning: " in result.stderr
    assert "recipe.yaml:15: steps.2.analyze.kind: deprecated" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "method: scaling" in result.stdout and "kind:" not in result.stdout


def test_analysis_kind_and_method_together_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path, ANALYSIS.replace("{method: scaling}", "{kind: scaling, method: scaling}")
    )
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert f"{path}:15: steps.2.analyze.kind: give `method:` alone" in result.stderr
    assert "Traceback" not in result.stderr


def test_named_eval_sets_and_text_keys_are_checked(tmp_path: Path) -> None:
    named = "\n    low: {source: mnist, split: '0:10'}\n    high: {source: mnist, splt: '10:20'}"
    [problem] = problems(tmp_path, GOOD.replace(" {source: mnist, split: test}", named))
    assert ":13: data.eval.high.splt: unknown key 'splt'; did you mean 'split'?" in problem
    bad_name = "\n    2nd: {source: mnist}"
    [problem] = problems(tmp_path, GOOD.replace(" {source: mnist, split: test}", bad_name))
    assert "data.eval: set name '2nd' is not a plain identifier" in problem
    text = GOOD.replace("{source: mnist, split: test}", "{source: text, path: a.txt, classes: [1]}")
    [problem] = problems(tmp_path, text)
    assert "source 'text' has no classes" in problem
    text = GOOD.replace("{source: mnist, split: test}", "{source: mnist, seq_len: 8}")
    [problem] = problems(tmp_path, text)
    assert "source 'mnist' takes no seq_len" in problem
    loaded = load_recipe(
        write(tmp_path, GOOD.replace(" {source: mnist, split: test}", named[:-36]))
    )
    assert list(loaded.recipe.data.eval_specs()) == ["low"]


def test_language_model_baselines_are_checked(tmp_path: Path) -> None:
    evaluate = "  - evaluate: {method: language_model, baselines: [endpoints, %s]}"
    for baseline, message in [
        ("nope", "unknown baseline 'nope'; use endpoints, ensemble, aligned_average or a merge"),
        ("{ensemble: {k: 2}}", "steps.1.evaluate.baselines.1: ensemble takes no parameters"),
        ("task_arithmetic", "baselines.1: task_arithmetic needs a base model; mark one"),
        ("{ties: {density: 2}}", "baselines.1: ties: density: Input should be less than or equal"),
        ("{ties: {}, average: {}}", "baselines.1: a baseline with parameters is one method"),
    ]:
        [problem] = problems(tmp_path, GOOD.replace("  - evaluate: {}", evaluate % baseline))
        assert message in problem, problem
    text = GOOD.replace("  - evaluate: {}", evaluate % "{average: {normalize: false}}")
    loaded = load_recipe(write(tmp_path, text))
    assert loaded.steps[1].params.baselines == ["endpoints", {"average": {"normalize": False}}]

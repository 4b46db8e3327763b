"""mergekit configs translated into recipes: every test config converts to the recipe written
out here by hand from the README's key-by-key mapping and validates; what mergecli cannot
express is refused, one line per key, at the config's line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import TESTS, write_tiny_llamas
from mergecli.errors import RecipeError
from mergecli.recipe.load import read_recipe, validate_recipe
from mergecli.recipe.mergekit import is_mergekit_config, mergekit_to_recipe

CONFIGS = TESTS / "fixtures" / "mergekit"
BASE = {"path": "base", "role": "base"}


@pytest.fixture
def models_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The models the test configs name (base, ft-a, ft-b), in the working directory."""
    write_tiny_llamas(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def convert(name: str) -> dict:
    path = CONFIGS / f"{name}.yml"
    return mergekit_to_recipe(yaml.safe_load(path.read_text()), path, out="out")


# The checkpoints and the merge step each test config must become (output: dir out).
EXPECTED = {
    "linear": (
        [{"path": "ft-a", "weight": 0.6}, {"path": "ft-b", "weight": 0.4}],
        {"method": "average", "normalize": True, "compute_dtype": "float32"},
    ),
    "ties": (
        [
            BASE,
            {"path": "ft-a", "parameters": {"density": [1, 0.6, 0.2]}, "weight": 1.0},
            {
                "path": "ft-b",
                "weight": 0.5,
                "parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.3}]},
            },
        ],
        {"method": "ties", "normalize": True, "compute_dtype": "float32"},  # int8_mask: gone
    ),  # fmt: skip
    # The base listed among the models is the one `role: base` checkpoint.
    "dare_ties": (
        [
            BASE,
            {"path": "ft-a", "parameters": {"density": 0.53}, "weight": 0.4},
            {"path": "ft-b", "parameters": {"density": 0.53}, "weight": 0.3},
        ],
        {"method": "dare_ties", "compute_dtype": "bfloat16"},
    ),  # fmt: skip
    # slerp: the base is the first checkpoint (t = 0), no role; one slice of all the layers.
    "slerp": (
        [{"path": "ft-a"}, {"path": "ft-b"}],
        {
            "method": "slerp",
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ],
            "compute_dtype": "float32",
        },
    ),  # fmt: skip
    "task_arithmetic": (
        [BASE, {"path": "ft-a", "weight": 0.7}, {"path": "ft-b", "weight": 0.3}],
        {
            "method": "task_arithmetic",
            "lambda": 0.9,
            "normalize": False,
            "compute_dtype": "float32",
        },
    ),  # fmt: skip
    "passthrough": (
        [{"path": "ft-a", "name": "ft-a"}, {"path": "ft-b", "name": "ft-b"}],
        {
            "method": "passthrough",
            "slices": [{"model": "ft-a", "layers": [0, 2]}, {"model": "ft-b", "layers": [1, 3]}],
        },
    ),  # fmt: skip
    "model_stock": (
        [BASE, {"path": "ft-a"}, {"path": "ft-b"}],
        {"method": "model_stock", "compute_dtype": "float32"},
    ),
    "della": (
        [
            BASE,
            {"path": "ft-a", "weight": 0.5, "parameters": {"density": 0.6, "epsilon": 0.1}},
            {"path": "ft-b", "weight": 0.5, "parameters": {"density": 0.4}},
        ],
        {"method": "della", "lambda": 1.0, "normalize": True, "compute_dtype": "float32"},
    ),  # fmt: skip
    "breadcrumbs_ties": (
        [
            BASE,
            {"path": "ft-a", "weight": 1.0, "parameters": {"density": 0.9, "gamma": 0.01}},
            {"path": "ft-b", "weight": 0.8},
        ],
        {
            "method": "breadcrumbs_ties",
            "density": 0.8,
            "gamma": 0.02,
            "normalize": True,
            "compute_dtype": "float32",
        },
    ),  # fmt: skip
    # SCE's coefficients come from the task vectors; int8_mask only saves memory: gone.
    "sce": (
        [BASE, {"path": "ft-a"}, {"path": "ft-b"}],
        {"method": "sce", "select_topk": 0.6, "compute_dtype": "float32"},
    ),
    "nuslerp": (
        [BASE, {"path": "ft-a", "weight": 0.3}, {"path": "ft-b", "weight": 0.7}],
        {"method": "nuslerp", "compute_dtype": "float32"},
    ),
    "karcher": (
        [{"path": "ft-a"}, {"path": "ft-b"}],
        {"method": "karcher", "max_iter": 20, "compute_dtype": "float32"},
    ),
}
# Written in out_dtype, else in dtype, as mergekit writes.
OUT_DTYPE = {name: "float32" for name in EXPECTED}


def test_every_test_config_is_covered() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_converts_to_the_recipe_by_hand_and_validates(name: str, models_here: Path) -> None:
    recipe = convert(name)
    checkpoints, step = EXPECTED[name]
    assert recipe == {
        "version": 1,
        "name": name,
        "checkpoints": checkpoints,
        "steps": [{"merge": step}],
        "output": {"dir": "out", "dtype": OUT_DTYPE[name]},
    }
    data, where = read_recipe(CONFIGS / f"{name}.yml", out="out")
    assert data == recipe
    loaded = validate_recipe(data, where, default_name=name)
    assert loaded.steps[0].method == step["method"]


def test_detected_by_merge_method_alone() -> None:
    assert is_mergekit_config({"merge_method": "ties", "models": []})
    assert not is_mergekit_config({"version": 1, "steps": [{"merge": "ties"}]})


def test_default_output_dir_is_beside_the_config(models_here: Path) -> None:
    path = models_here / "configs" / "mine.yml"
    path.parent.mkdir()
    config = {"merge_method": "linear", "models": [{"model": "ft-a"}, {"model": "ft-b"}]}
    recipe = mergekit_to_recipe(config, path)
    assert recipe["output"] == {"dir": str(models_here / "configs" / "mine-merged")}
    assert "compute_dtype" not in recipe["steps"][0]["merge"]  # float32, mergecli's default


def test_global_weight_and_rescale(models_here: Path) -> None:
    config = {
        "merge_method": "dare_linear", "base_model": "base",
        "models": [{"model": "ft-a", "parameters": {"weight": 0.2}}, {"model": "ft-b"}],
        "parameters": {"weight": 0.5, "rescale": True, "density": 0.7},
    }  # fmt: skip
    recipe = mergekit_to_recipe(config, models_here / "c.yml")
    # A global weight is every model's that sets none (mergekit reads it there too).
    assert recipe["checkpoints"] == [BASE, {"path": "ft-a", "weight": 0.2},
                                     {"path": "ft-b", "weight": 0.5}]  # fmt: skip
    assert recipe["steps"][0]["merge"] == {"method": "dare_linear", "density": 0.7}


def test_per_tensor_weights_and_the_global_weight_after_a_models_filters(models_here: Path) -> None:
    filters = [{"filter": "mlp", "value": 0.2}]
    config = {
        "merge_method": "linear",
        "models": [
            {"model": "ft-a", "parameters": {"weight": filters}},
            {"model": "ft-b", "parameters": {"weight": [0.1, 0.9]}},
            {"model": "ft-c", "parameters": {"weight": [*filters, {"value": 0.3}]}},
        ],
        "parameters": {"weight": [0.5, 1.0]},
    }
    recipe = mergekit_to_recipe(config, models_here / "c.yml")
    # mergekit reads a model's filters, then the global weight where none matches: the global
    # one ends the first model's list; a gradient, or filters with a catch-all, stay as written.
    assert [c["weight"] for c in recipe["checkpoints"]] == [
        [*filters, {"value": [0.5, 1.0]}],
        [0.1, 0.9],
        [*filters, {"value": 0.3}],
    ]


def problems(text: str, folder: Path) -> list[str]:
    path = folder / "mk.yml"
    path.write_text(text)
    with pytest.raises(RecipeError) as caught:
        data, where = read_recipe(path)
        validate_recipe(data, where, default_name="mk")
    return [str(p).replace(str(path), "mk.yml") for p in caught.value.problems]


MODELS = "models:\n  - model: ft-a\n  - model: ft-b\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{MODELS}merge_method: linear\nchat_template: chatml\n",
         "mk.yml:5: chat_template: not supported"),
        (f"{MODELS}merge_method: linear\ntokenizer_source: union\n",
         "mk.yml:5: tokenizer_source: only `base` is supported"),
        (f"{MODELS}merge_method: linear\nmodules: {{}}\n", "mk.yml:5: modules: per-module"),
        (f"{MODELS}merge_method: linear\ntokenizer: {{source: base}}\n", "mk.yml:5: tokenizer: "),
        (f"{MODELS}merge_method: linear\nlora: x\n", "mk.yml:5: lora: not a mergekit 0.1.5 key"),
        ("models:\n  - model: ft-a+my-lora\n  - model: ft-b\nmerge_method: linear\n",
         "mk.yml:2: models.0.model: a LoRA reference (model+lora) is not supported"),
        (f"{MODELS}merge_method: arcee_fusion\n",
         "mk.yml:4: merge_method: 'arcee_fusion' is not supported"),
        (f"{MODELS}merge_method: ties\n", "mk.yml:4: merge_method: ties needs a base_model"),
        (f"{MODELS}merge_method: linear\ndtype: int8\n", "mk.yml:5: dtype: must be one of"),
        ("slices:\n  - sources:\n      - model: ft-a\n        layer_range: [0, 2]\n"
         "      - model: ft-b\n        layer_range: [0, 3]\nmerge_method: linear\n",
         "mk.yml:4: slices.0.sources.0.layer_range: the model has 3 layers"),
        ("slices:\n  - sources:\n      - model: ft-a\n        layer_range: [0, 2]\n"
         "        parameters: {scale: 0.5}\nmerge_method: passthrough\n",
         "mk.yml:5: slices.0.sources.0.parameters: per-slice parameters"),
        (f"{MODELS}merge_method: ties\nbase_model: base\nparameters:\n  rescale: true\n",
         "mk.yml:7: parameters.rescale: mergecli's ties always has rescale: false"),
        # Keys mergecli's own validation refuses are reported at the config's line and key.
        ("models:\n  - model: ft-a\n    parameters:\n      densty: 0.5\n  - model: ft-b\n"
         "merge_method: ties\nbase_model: base\n",
         "mk.yml:4: models.0.parameters.densty: not a per-model parameter of ties"),
        (f"{MODELS}merge_method: task_arithmetic\nbase_model: base\nparameters:\n"
         "  lambda: fast\n", "mk.yml:7: parameters.lambda: input should be a valid number"),
    ],
)  # fmt: skip
def test_what_mergecli_cannot_express_is_one_line_at_its_key(
    text: str, expected: str, models_here: Path
) -> None:
    found = problems(text, models_here)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]

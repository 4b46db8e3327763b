"""Passthrough through `mergecli run` on tiny Llama directories: a frankenmerge against the
tensors picked here by hand, its config.json's layer count, loading in transformers; one-line
errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import error_line, run_cli, run_cli_in_process

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def tiny_llama(folder: Path, seed: int, layers: int, hidden: int = 16) -> dict[str, torch.Tensor]:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return load_file(folder / "model.safetensors")


def slices(*pieces: tuple[str, int, int]) -> str:
    """The merge step ``passthrough`` with ``slices`` of (model, start, end)."""
    listed = ", ".join(f"{{model: {m}, layers: [{s}, {e}]}}" for m, s, e in pieces)
    return f"{{method: passthrough, slices: [{listed}]}}"


def recipe(folder: Path, checkpoints: str, step: str) -> Path:
    file = folder / "recipe.yaml"
    file.write_text(
        f"version: 1\ncheckpoints: {checkpoints}\nsteps: [{{merge: {step}}}]\n"
        f"output: {{dir: {folder / 'out'}}}\n"
    )
    return file


def test_frankenmerge_is_the_hand_picked_layers_and_loads(tmp_path: Path) -> None:
    a = tiny_llama(tmp_path / "a", 1, layers=2)
    b = tiny_llama(tmp_path / "b", 2, layers=4)
    file = recipe(
        tmp_path,
        f"[{{path: {tmp_path / 'a'}}}, {{path: {tmp_path / 'b'}, name: second}}]",
        slices(("a", 0, 2), ("second", 1, 4)),
    )
    run_cli("run", str(file), check=True)
    out = tmp_path / "out"
    merged = load_file(out / "model.safetensors")
    # By hand: layers 0, 1 of a, then 1, 2, 3 of b as 2, 3, 4; embeddings from a (first
    # slice), final norm and head from b (last slice), as mergekit plans them.
    expected = {"model.embed_tokens.weight": a["model.embed_tokens.weight"],
                "model.norm.weight": b["model.norm.weight"],
                "lm_head.weight": b["lm_head.weight"]}  # fmt: skip
    for new, (model, old) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2), (b, 3)]):
        for name, tensor in model.items():
            if name.startswith(f"model.layers.{old}."):
                expected[name.replace(f".{old}.", f".{new}.", 1)] = tensor
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 5
    assert torch.equal(
        model.model.layers[3].mlp.up_proj.weight, b["model.layers.2.mlp.up_proj.weight"]
    )
    assert model(torch.randint(0, 64, (1, 8))).logits.shape == (1, 8, 64)


def test_passthrough_of_one_model_copies_it(tmp_path: Path) -> None:
    a = tiny_llama(tmp_path / "a", 1, layers=2)
    run_cli(
        "run", str(recipe(tmp_path, f"[{{path: {tmp_path / 'a'}}}]", "passthrough")), check=True
    )
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged.keys() == a.keys() and all(torch.equal(merged[n], a[n]) for n in a)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (slices(("nope", 0, 1)), "no checkpoint named 'nope'"),
        (slices(("a", 1, 3)), "reach past checkpoint 'a', which has 2 layers"),
        (slices(("a", 1, 1)), "0 <= start < end"),
        (slices(("a", 0, 1), ("wide", 0, 1)), "differ outside the layers"),
        ("passthrough", "passthrough without `slices` copies one checkpoint, the recipe has 2"),
    ],
)  # fmt: skip
def test_bad_slices_are_one_line_recipe_errors(tmp_path: Path, step: str, message: str) -> None:
    tiny_llama(tmp_path / "a", 1, layers=2)
    tiny_llama(tmp_path / "wide", 2, layers=2, hidden=32)
    checkpoints = f"[{{path: {tmp_path / 'a'}}}, {{path: {tmp_path / 'wide'}}}]"
    result = run_cli_in_process("run", str(recipe(tmp_path, checkpoints, step)))
    line = error_line(result, 2)
    assert message in line and "recipe.yaml:" in line


def test_slices_of_a_model_without_numbered_layers_fail_in_one_line(tmp_path: Path) -> None:
    save_file({"weight": torch.ones(2, 2)}, tmp_path / "flat.safetensors")
    step = slices(("flat", 0, 1))
    result = run_cli(
        "run", str(recipe(tmp_path, f"[{{path: {tmp_path / 'flat.safetensors'}}}]", step))
    )
    assert "checkpoint 'flat' has no numbered layers" in error_line(result, 2)
    assert not (tmp_path / "out" / "model.safetensors").exists()

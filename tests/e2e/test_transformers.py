"""A merged Hugging Face directory loads in transformers (skipped where it is not installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import run_cli

transformers = pytest.importorskip("transformers")


def tiny_llama(folder: Path, seed: int, base: Path | None = None) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    if base is not None:
        model.load_state_dict(transformers.LlamaForCausalLM.from_pretrained(base).state_dict())
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.slow
def test_ties_of_llama_directories_loads_in_transformers(tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "base", 0)
    a, b = tiny_llama(tmp_path / "a", 1, base), tiny_llama(tmp_path / "b", 2, base)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {base}, role: base}}, {{path: {a}}}, {{path: {b}}}]\n"
        "steps: [{merge: {method: ties, density: 0.5}}]\n"
        f"output: {{dir: {tmp_path / 'out'}, shard_size: 20KB}}\n"
    )
    run_cli("run", str(recipe), check=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(merged, transformers.LlamaForCausalLM)
    originals = transformers.LlamaForCausalLM.from_pretrained(base).state_dict()
    for name, tensor in merged.state_dict().items():
        assert tensor.shape == originals[name].shape
        assert torch.isfinite(tensor).all()
    tokens = torch.randint(0, 64, (1, 8))
    assert merged(tokens).logits.shape == (1, 8, 64)

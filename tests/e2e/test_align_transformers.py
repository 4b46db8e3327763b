"""Aligning Hugging Face directories from the command line: heads shown, recovered, checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import error_line, run_cli, run_cli_in_process
from mergecli.align.permute import apply_permutations, random_permutations
from mergecli.align.spec import derive_spec
from mergecli.io import load_state_dict, save_state_dict

transformers = pytest.importorskip("transformers")


def llama_and_permuted_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A small Llama (grouped-query heads, RoPE) and the same function with every group,
    heads included, permuted at random."""
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "a", safe_serialization=True)
    spec = derive_spec(model, torch.randint(0, 64, (2, 8)))
    perms = random_permutations(spec, torch.Generator().manual_seed(1))
    model.load_state_dict(apply_permutations(model.state_dict(), spec, perms))
    model.save_pretrained(tmp_path / "b", safe_serialization=True)
    return tmp_path / "a", tmp_path / "b"


def recipe(tmp_path: Path, align: str, out: str = "out") -> Path:
    path = tmp_path / f"{out}.yaml"
    path.write_text(
        "version: 1\nmodel: {arch: hf}\n"
        f"checkpoints: [{{path: {tmp_path / 'a'}}}, {{path: {tmp_path / 'b'}}}]\n"
        f"steps: [{{align: {align}}}, {{merge: {{method: average}}}}]\n"
        f"output: {{dir: {tmp_path / out}}}\n"
    )
    return path


@pytest.mark.slow
def test_weight_matching_recovers_a_permuted_llama_and_align_spec_shows_heads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # the tables unwrapped
    a, b = llama_and_permuted_copy(tmp_path)
    path = recipe(tmp_path, "{method: weight_matching, save_aligned: true}")
    shown = run_cli_in_process("align-spec", str(path))
    assert shown.returncode == 0, shown.stderr
    out = " ".join(shown.stdout.split())
    assert "torch.export graph, self-check passed" in out
    assert "│ 32 │ 4x8 │" in out and "│ 16 │ 2x8 │" in out  # query, key/value heads x dims
    assert "model.layers.1.self_attn │ 4 │ 2 │ 8 (fixed: rotary) │ 8" in out

    run_cli("run", str(path), check=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())["align"]
    assert report["graph"] == "torch.export"
    assert [(a["heads"], a["kv_heads"], a["qk_dims_fixed"]) for a in report["attention"]] == [
        (4, 2, True)
    ] * 2
    original = load_state_dict(a / "model.safetensors")
    aligned = load_state_dict(tmp_path / "out" / "aligned" / "b.safetensors")
    merged = load_state_dict(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(aligned[k], original[k]) for k in original)
    assert all(torch.equal(merged[k], original[k]) for k in original)
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged_model(torch.randint(0, 64, (1, 8))).logits.shape == (1, 8, 64)

    # Saved head permutations are reused; altered ones that split a head are refused.
    saved = tmp_path / "saved.safetensors"
    (tmp_path / "out" / "alignment.safetensors").rename(saved)
    again = run_cli_in_process("run", str(recipe(tmp_path, f"{{from: {saved}}}", "again")))
    assert again.returncode == 0, again.stderr
    assert torch.equal(
        load_state_dict(tmp_path / "again" / "model.safetensors")["lm_head.weight"],
        merged["lm_head.weight"],
    )
    transforms = load_state_dict(saved)
    key = "b/model.layers.0.self_attn.q_proj"
    transforms[key] = transforms[key][torch.tensor([1, 0, *range(2, 32)])]
    broken = tmp_path / "broken.safetensors"
    save_state_dict(transforms, broken)
    result = run_cli_in_process("run", str(recipe(tmp_path, f"{{from: {broken}}}", "broken")))
    line = error_line(result, 1)
    assert "are not one permutation of the heads of model.layers.0.self_attn" in line
    assert not (tmp_path / "broken").exists()

"""scripts/transformer_pairs.py at tiny sizes: the pairs' directories load with transformers'
Auto classes, the two seeds differ, the BERT windows read back as the recipes read them, and
the example recipes configs/examples/transformers-*.yaml run on the pairs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("datasets")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from helpers import cli_env, run_cli  # noqa: E402
from mergecli.data import load_data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
AUTO = {
    "bert": ("AutoModelForSequenceClassification", "BertForSequenceClassification"),
    "gpt2": ("AutoModelForCausalLM", "GPT2LMHeadModel"),
    "llama": ("AutoModelForCausalLM", "LlamaForCausalLM"),
    "vit": ("AutoModelForImageClassification", "ViTForImageClassification"),
}


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    script = ROOT / "scripts" / "transformer_pairs.py"
    subprocess.run([sys.executable, str(script), "--tiny", "--out", str(out)], check=True)
    return out


@pytest.mark.slow
def test_directories_load_with_the_auto_classes(tiny_pairs: Path) -> None:
    for arch, (auto, expected) in AUTO.items():
        models = []
        for seed in (0, 1):
            path = tiny_pairs / f"{arch}-seed{seed}"
            model = getattr(transformers, auto).from_pretrained(path)
            assert type(model).__name__ == expected, arch
            # Saved under the module's own names (what `arch: hf` reads), each tensor once.
            saved = load_file(str(path / "model.safetensors"))
            assert set(saved) <= set(model.state_dict()), arch
            models.append(model.state_dict())
            if arch != "vit":
                tokenizer = transformers.AutoTokenizer.from_pretrained(path)
                assert len(tokenizer) == model.config.vocab_size, arch
            meta = json.loads((path / "training.json").read_text())
            assert meta["seed"] == seed and meta["arch"] == arch
        # Different seeds, different initialisations: no trained matrix is the same.
        for name, tensor in models[0].items():
            if tensor.is_floating_point() and tensor.dim() == 2:
                assert not torch.equal(tensor, models[1][name]), (arch, name)
        pair = json.loads((tiny_pairs / f"{arch}.json").read_text())
        assert list(pair) == ["seed0", "seed1"], arch
    config = transformers.AutoConfig.from_pretrained(tiny_pairs / "llama-seed0")
    assert config.num_key_value_heads < config.num_attention_heads
    gpt2 = transformers.AutoModelForCausalLM.from_pretrained(tiny_pairs / "gpt2-seed0")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # GPT-2's tied output layer
    vit = transformers.AutoConfig.from_pretrained(tiny_pairs / "vit-seed0")
    assert (vit.image_size, vit.patch_size, vit.num_channels) == (28, 7, 1)


@pytest.mark.slow
def test_bert_windows_read_as_the_recipe_reads_them(tiny_pairs: Path) -> None:
    model_dir = tiny_pairs / "bert-seed0"
    windows = tiny_pairs / "data" / "bert-windows"
    spec = {"source": "hf_dataset", "path": str(windows / "eval.parquet"), "text": "text",
            "tokenizer": str(model_dir), "seq_len": 20}  # fmt: skip
    data = load_data(spec)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    # [CLS] window [SEP], then padding under a zero mask; both domains, as many of each.
    assert (data.x[:, 0] == tokenizer.cls_token_id).all()
    last = data.mask.sum(1) - 1
    assert (data.x[torch.arange(len(data)), last] == tokenizer.sep_token_id).all()
    assert (data.x[data.mask == 0] == tokenizer.pad_token_id).all()
    assert data.y.tolist().count(0) == data.y.tolist().count(1) > 0
    # The label column is a ClassLabel: its names select classes.
    assert set(load_data({**spec, "classes": ["code"]}).y.tolist()) == {1}
    # The accuracy the script recorded is the saved model's on these windows.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        predicted = model(input_ids=data.x, attention_mask=data.mask).logits.argmax(-1)
    recorded = json.loads((model_dir / "training.json").read_text())["accuracy"]
    assert recorded == pytest.approx(float((predicted == data.y).float().mean()), abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(AUTO))
def test_example_recipe_runs_on_the_pair(tiny_pairs: Path, tmp_path: Path, arch: str) -> None:
    """The recipe as shipped (align, NP Merge, every baseline), pointed at the tiny pair."""
    sets = [f"checkpoints.{k}.path={tiny_pairs / f'{arch}-seed{k}'}" for k in (0, 1)]
    sets += [f"output.dir={tmp_path / 'out'}", "steps.1.fit.steps=2"]
    if arch == "bert":
        windows = tiny_pairs / "data" / "bert-windows"
        sets += [f"data.fit.path={windows / 'train.parquet'}", "data.fit.fraction=0.05",
                 f"data.eval.path={windows / 'eval.parquet'}"]  # fmt: skip
    if arch == "vit":
        sets += ["data.fit.split=0:256", "data.eval.split=8000:8256"]
    args = [a for s in sets for a in ("--set", s)]
    recipe = ROOT / "configs" / "examples" / f"transformers-{arch}.yaml"
    env = cli_env(OMP_NUM_THREADS="1", MERGECLI_CACHE=str(tmp_path / "cache"))
    result = run_cli("run", str(recipe), *args, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    kinds = [row["kind"] for row in report["evaluate"]["results"]]
    assert kinds == ["endpoint", "endpoint", "ensemble", "average", "aligned_average", "merged"]

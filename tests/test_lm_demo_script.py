"""scripts/lm_demo.py at tiny sizes: the three model directories it writes load with
transformers' Auto classes and generate, and the fine-tunes start from the base."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

from mergecli.data import load_data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("base", "ft-english", "ft-code")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lm")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lm_demo.py"), "--tiny", "--out", str(out)],
        check=True,
    )
    return out


@pytest.mark.slow
def test_directories_load_and_generate(tiny_runs: Path) -> None:
    text = "def f(x):\n    return x  # Ünïcode too\n"
    for name in NAMES:
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_runs / name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_runs / name)
        assert isinstance(model, transformers.LlamaForCausalLM), name
        assert (tiny_runs / name / "model.safetensors").exists(), name
        assert tokenizer.eos_token_id == model.generation_config.eos_token_id
        # Byte-level BPE: every text encodes, and decodes back to itself.
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        prompt = tokenizer("The ", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert out.shape == (1, prompt["input_ids"].shape[1] + 5)


@pytest.mark.slow
def test_fine_tunes_start_from_the_base_and_move(tiny_runs: Path) -> None:
    load = transformers.AutoModelForCausalLM.from_pretrained
    base = load(tiny_runs / "base").state_dict()
    for domain in ("english", "code"):
        ft = load(tiny_runs / f"ft-{domain}").state_dict()
        assert ft.keys() == base.keys()
        moved = [n for n in base if not torch.equal(base[n], ft[n])]
        assert moved, domain  # every trained weight moves under Adam; a few steps suffice
        meta = json.loads((tiny_runs / f"ft-{domain}" / "training.json").read_text())
        assert meta["init"] == "base" and meta["trained_on"] == [domain]
    table = json.loads((tiny_runs / "perplexity.json").read_text())
    assert set(table) == set(NAMES)
    for row in table.values():
        assert set(row) == {"english", "code"}
        assert all(math.isfinite(v) and v > 1 for v in row.values())


@pytest.mark.slow
def test_printed_perplexity_is_the_models_own_loss(tiny_runs: Path) -> None:
    """The script's perplexity against exp(transformers' mean next-token loss) over the blocks
    mergecli's text source makes of eval.txt (--tiny: blocks of 32 tokens): the script scores
    the token stream the merges are scored on."""
    table = json.loads((tiny_runs / "perplexity.json").read_text())
    spec = {
        "source": "text",
        "path": str(ROOT / "data" / "text" / "code" / "eval.txt"),
        "tokenizer": str(tiny_runs / "ft-code"),
        "seq_len": 32,
        "cache": False,
    }
    blocks = load_data(spec).x
    for name in NAMES:
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_runs / name)
        with torch.no_grad():
            loss = model(input_ids=blocks, labels=blocks).loss  # every block has 31 targets
        assert table[name]["code"] == pytest.approx(math.exp(loss.item()), rel=1e-4), name

"""`model: {arch: hf}` end to end: Hugging Face model directories fitted with NP Merge and
evaluated by the CLI, the merged directory loaded back with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixtures.hf_models import (
    SEQ_LEN,
    VOCAB,
    bert_config,
    llama_config,
    lm_tokens_file,
    rule_data,
    save,
    train_classifier,
    train_lm,
)
from helpers import cli_env, run_cli

transformers = pytest.importorskip("transformers")


def one_thread() -> dict[str, str]:
    """The CLI's environment with one thread: these models are tiny, so one thread is as fast
    as two, and far faster on a busy machine."""
    return cli_env(OMP_NUM_THREADS="1")


def _fine_tunes(tmp_path: Path, build, train, dtype=None) -> tuple[Path, Path]:
    """Two fine-tunes of one seeded initialisation, on different seeds."""
    torch.manual_seed(0)
    start = build().state_dict()
    folders = []
    for seed in (1, 2):
        model = build()
        model.load_state_dict(start)
        train(model, seed)
        folders.append(save(model, tmp_path / f"ft{seed}", transformers, dtype=dtype))
    return folders[0], folders[1]


def _written_dtypes(folder: Path) -> set[str]:
    return {str(t.dtype) for t in load_file(str(folder / "model.safetensors")).values()}


@pytest.mark.slow
def test_bert_classifiers_fit_and_evaluate(tmp_path: Path) -> None:
    """The issue's case: two BERT classifiers of token ids with an attention mask."""
    a, b = _fine_tunes(
        tmp_path,
        lambda: transformers.BertForSequenceClassification(bert_config(transformers)),
        lambda model, seed: train_classifier(model, 25, seed),
    )
    ids, labels, mask = rule_data(384, seed=7)
    data = tmp_path / "rule.safetensors"
    save_file({"input_ids": ids, "labels": labels, "attention_mask": mask}, str(data))
    source = f"source: tensors, path: {data}, x: input_ids, y: labels, mask: attention_mask"
    recipe = tmp_path / "bert.yaml"
    recipe.write_text(
        f"""\
version: 1
model: {{arch: hf}}
checkpoints: [{{path: {a}}}, {{path: {b}}}]
data:
  fit: {{{source}, split: "0:256", batch_size: 64}}
  eval: {{{source}, split: "256:384"}}
steps:
  - fit: {{method: np_merge, loss: cross_entropy, steps: 6, lr: 0.05}}
  - evaluate: {{method: classification, baselines: [endpoints, average]}}
output: {{dir: {tmp_path / "out"}}}
"""
    )
    result = run_cli("run", str(recipe), env=one_thread())
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {row["name"]: row for row in report["evaluate"]["results"]}
    assert set(rows) == {"ft1", "ft2", "average", "merged (np_merge)"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0
    # Both fine-tunes learnt the rule (half the examples are each class).
    assert rows["ft1"]["accuracy"] > 0.8 and rows["ft2"]["accuracy"] > 0.8
    # A merge of two fine-tunes of one start, fitted on the task, keeps it.
    assert rows["merged (np_merge)"]["accuracy"] > 0.8
    out = tmp_path / "out"
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert {f"torch.{config['dtype']}"} == _written_dtypes(out)
    # The merged directory predicts as the run's evaluation says, from transformers.
    eval_ids, eval_labels, eval_mask = ids[256:], labels[256:], mask[256:]
    with torch.no_grad():
        predicted = merged(eval_ids, attention_mask=eval_mask).logits.argmax(-1)
    accuracy = (predicted == eval_labels).float().mean().item()
    assert accuracy == pytest.approx(rows["merged (np_merge)"]["accuracy"], abs=1 / 128)


@pytest.mark.slow
def test_llamas_fit_with_causal_lm_loss_and_generate(tmp_path: Path) -> None:
    """Two tiny Llamas (tied embeddings, saved in bfloat16) fitted on next-token prediction:
    the merged directory loads with AutoModelForCausalLM and generates."""
    a, b = _fine_tunes(
        tmp_path,
        lambda: transformers.LlamaForCausalLM(llama_config(transformers)),
        lambda model, seed: train_lm(model, 15, seed),
        dtype=torch.bfloat16,
    )
    data = lm_tokens_file(tmp_path / "tokens.safetensors")
    recipe = tmp_path / "llama.yaml"
    recipe.write_text(
        f"""\
version: 1
model: {{arch: hf}}
checkpoints: [{{path: {a}}}, {{path: {b}}}]
data:
  fit: {{source: tensors, path: {data}, batch_size: 32}}
steps:
  - fit: {{method: np_merge, loss: causal_lm, steps: 4, lr: 0.05}}
output: {{dir: {tmp_path / "out"}}}
"""
    )
    result = run_cli("run", str(recipe), env=one_thread())
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert {f"torch.{config['dtype']}"} == _written_dtypes(out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 - tied, as in the inputs
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("t2 t3 t4", return_tensors="pt")
    generated = merged.generate(
        **prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 4)
    assert int(generated.max()) < VOCAB and generated.shape[1] <= SEQ_LEN + 4


def _bert_pair(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config(transformers))
    return save(model, tmp_path / "a", transformers), save(model, tmp_path / "b", transformers)


def _validate(tmp_path: Path, a: Path, b: Path, args: str = "{}", env=None):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {{arch: hf, args: {args}}}\n"
        f"checkpoints: [{{path: {a}}}, {{path: {b}}}]\n"
        "steps: [{merge: {method: average}}]\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    result = run_cli("validate", str(recipe), env=env or one_thread())
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{recipe}:2: model"), lines[0]
    return lines[0]


@pytest.mark.slow
def test_bad_hf_models_are_one_line_each(tmp_path: Path) -> None:
    """As `validate` shows them, at the recipe's model key (the other bad model directories
    are tested in tests/models/test_hf.py, without a process each)."""
    a, b = _bert_pair(tmp_path)
    (a / "config.json").rename(tmp_path / "config.json")
    assert "has no config.json" in _validate(tmp_path, a, b)
    config = json.loads((tmp_path / "config.json").read_text())
    custom = {**config, "model_type": "bert-custom", "auto_map": {"AutoConfig": "c.Config"}}
    (a / "config.json").write_text(json.dumps(custom))
    assert "trust_remote_code: true" in _validate(tmp_path, a, b)


def test_without_transformers_the_recipe_says_what_to_install(tmp_path: Path) -> None:
    a, b = _bert_pair(tmp_path)
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['transformers'] = None\n")
    env = cli_env()
    env["PYTHONPATH"] = f"{hide}:{env['PYTHONPATH']}"
    line = _validate(tmp_path, a, b, env=env)
    assert line.endswith("model: {arch: hf} needs transformers: pip install 'mergecli[hf]'")


def test_the_copied_config_names_the_dtype_written(tmp_path: Path) -> None:
    """transformers loads weights in the dtype config.json names: the copy names the output's
    (4.x spells the key torch_dtype, 5.x dtype); a config naming none is copied as it is."""
    from mergecli.pipeline import _write_config

    source, target = tmp_path / "config.json", tmp_path / "out.json"
    for key in ("dtype", "torch_dtype"):
        source.write_text(json.dumps({"model_type": "llama", key: "bfloat16"}))
        _write_config(source, target, torch.float32)
        assert json.loads(target.read_text()) == {"model_type": "llama", key: "float32"}
        _write_config(source, target, torch.bfloat16)
        assert target.read_bytes() == source.read_bytes()
    source.write_text('{"model_type": "llama"}')
    _write_config(source, target, torch.float16)
    assert target.read_bytes() == source.read_bytes()

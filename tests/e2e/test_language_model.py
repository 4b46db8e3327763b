"""Language models end to end, as a user runs them: text tokenized by the model directory's
tokenizer, NP Merge fitted with `loss: causal_lm`, `evaluate: language_model` on two named sets
(its cross-entropies checked against transformers' own loss), and bad text input as one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import cli_env, run_cli, stdlib_text, train_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SEQ_LEN = 32
ARCH = "fixtures.tiny_llama:build"


def write_domains(folder: Path) -> dict[str, Path]:
    """Two small domains of real text: a stdlib module's prose-heavy source and another's."""
    domains = {}
    for name, module in (("english", "textwrap"), ("code", "json.decoder")):
        text = stdlib_text(8000, module)
        (folder / name).mkdir(parents=True)
        (folder / name / "fit.txt").write_text(text[:6000])
        (folder / name / "eval.txt").write_text(text[6000:])
        domains[name] = folder / name
    return domains


def trained_llama(folder: Path, seed: int, blocks: torch.Tensor, tokenizer: Path) -> Path:
    """A tiny Llama trained for a few steps on ``blocks``, saved as a model directory with
    the tokenizer beside it (where the text source looks by default)."""
    from fixtures.tiny_llama import build

    torch.manual_seed(seed)
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(15):
        batch = blocks[(step * 8) % len(blocks) :][:8]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from mergecli.data import load_data

    root = tmp_path_factory.mktemp("lm")
    domains = write_domains(root / "text")
    corpus = "".join((d / "fit.txt").read_text() for d in domains.values())
    tokenizer = train_tokenizer(root / "tokenizer", corpus, vocab_size=128)
    cache = root / "cache"
    models = {}
    for seed, (name, domain) in enumerate(domains.items()):
        spec = {"source": "text", "path": str(domain / "fit.txt"), "tokenizer": str(tokenizer),
                "seq_len": SEQ_LEN, "cache": False}  # fmt: skip
        models[name] = trained_llama(root / f"ft-{name}", seed, load_data(spec).x, tokenizer)
    return {"root": root, "domains": domains, "models": models, "cache": cache}


def recipe(setup: dict, steps: str, extra_data: str = "", name: str = "lm") -> Path:
    domains, models = setup["domains"], setup["models"]
    path = setup["root"] / f"{name}.yaml"
    path.write_text(
        f"""\
version: 1
name: {name}
model: {{arch: "{ARCH}"}}
checkpoints:
  - {{path: {models["english"]}, name: english-ft}}
  - {{path: {models["code"]}, name: code-ft}}
data:
  fit: {{source: text, path: {setup["root"] / "text"}, seq_len: {SEQ_LEN}, batch_size: 8,
        max_tokens: 1600}}
  eval:
    english: {{source: text, path: {domains["english"] / "eval.txt"}, seq_len: {SEQ_LEN}}}
    code: {{source: text, path: {domains["code"] / "eval.txt"}, seq_len: {SEQ_LEN}, batch_size: 4}}
{extra_data}steps:
{steps}
output: {{dir: {setup["root"] / ("out-" + name)}}}
"""
    )
    return path


def run(setup: dict, *args: str):
    # One thread: a model this small gains nothing from more, and on a busy machine the
    # threads' spinning made a run several times slower.
    env = cli_env(MERGECLI_CACHE=str(setup["cache"]), OMP_NUM_THREADS="1")
    return run_cli(*args, env=env)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This process's torch on one thread while it trains and scores the tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def transformers_loss(model_dir: Path, blocks: torch.Tensor) -> float:
    """The mean next-token loss transformers itself computes, block by block (every block
    predicts SEQ_LEN - 1 tokens, so the mean of the blocks' means is the mean over tokens)."""
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        losses = [model(b[None], labels=b[None]).loss.double() for b in blocks]
    return float(torch.stack(losses).mean())


@pytest.mark.slow
def test_causal_lm_fit_and_language_model_evaluation(lm_setup: dict) -> None:
    from mergecli.data import load_data

    steps = (
        "  - fit: {method: np_merge, loss: causal_lm, steps: 6, lr: 0.1}\n"
        "  - evaluate: {method: language_model}\n"
    )
    result = run(lm_setup, "--log", "plain", "run", str(recipe(lm_setup, steps)))
    assert result.returncode == 0, result.stderr
    out = lm_setup["root"] / "out-lm"
    report = json.loads((out / "report.json").read_text())
    evaluation = report["evaluate"]
    assert evaluation["method"] == "language_model"
    assert list(evaluation["sets"]) == ["english", "code"]
    rows = {row["name"]: row for row in evaluation["results"]}
    assert [r["kind"] for r in evaluation["results"]] == [
        "endpoint",
        "endpoint",
        "average",
        "merged",
    ]
    # The endpoints' cross-entropies are transformers' own loss on the same blocks.
    for set_name, domain in lm_setup["domains"].items():
        spec = {"source": "text", "path": str(domain / "eval.txt"), "seq_len": SEQ_LEN,
                "tokenizer": str(lm_setup["models"]["english"]), "cache": False}  # fmt: skip
        blocks = load_data(spec).x
        assert evaluation["sets"][set_name]["tokens"] == len(blocks) * (SEQ_LEN - 1)
        for name, model_dir in (("english-ft", lm_setup["models"]["english"]),
                                ("code-ft", lm_setup["models"]["code"])):  # fmt: skip
            measured = rows[name]["sets"][set_name]
            assert measured["loss"] == pytest.approx(transformers_loss(model_dir, blocks), abs=1e-5)
            assert measured["perplexity"] == pytest.approx(math.exp(measured["loss"]), rel=1e-9)
    for row in rows.values():
        mean = sum(s["perplexity"] for s in row["sets"].values()) / 2
        assert row["mean_perplexity"] == pytest.approx(mean, rel=1e-12)
    # The fit's validation reads per-token losses of each named set.
    history = report["fit"]["stages"][0]["history"][-1]
    assert {"val_english_loss", "val_english_perplexity", "val_code_loss"} <= history.keys()
    assert report["fit"]["loss"] == "causal_lm"
    # One table with a CE and a perplexity column per set.
    for header in ("english CE", "english ppl", "code CE", "code ppl", "mean ppl"):
        assert header in result.stdout, result.stdout
    # report.md is drawn again from report.json alone
    assert run(lm_setup, "report", str(out)).returncode == 0
    markdown = (out / "report.md").read_text()
    assert "| model | kind | english CE | english ppl | code CE | code ppl | mean ppl |" in markdown
    # The token cache was written once (fit and two eval sets) and the rerun reads it.
    assert len(list((lm_setup["cache"] / "text").glob("*.safetensors"))) == 3


@pytest.mark.slow
def test_task_arithmetic_and_ties_baselines_with_a_base(lm_setup: dict, tmp_path: Path) -> None:
    """With `role: base`, the default baselines add task arithmetic and TIES, made by the merge
    engine exactly as a `merge` step makes them."""
    base = lm_setup["models"]["english"]
    baselines = "[endpoints, task_arithmetic, {ties: {density: 0.5}}]"
    steps = f"  - evaluate: {{method: language_model, baselines: {baselines}}}\n"
    text = recipe(lm_setup, steps, name="lm-base")
    source = text.read_text().replace(
        f"  - {{path: {base}, name: english-ft}}\n",
        f"  - {{path: {base}, name: english-ft, role: base}}\n"
        f"  - {{path: {base}, name: english-again}}\n",
    )
    text.write_text(source)
    result = run(lm_setup, "run", str(text))
    assert result.returncode == 0, result.stderr
    report = json.loads((lm_setup["root"] / "out-lm-base" / "report.json").read_text())
    rows = {row["name"]: row for row in report["evaluate"]["results"]}
    assert [row["kind"] for row in report["evaluate"]["results"]] == [
        "base", "endpoint", "endpoint", "task_arithmetic", "ties"]  # fmt: skip
    assert "ties (density=0.5)" in rows
    # Task arithmetic of the base's copy and the code fine-tune adds only the code task vector:
    # base + (code - base) = the code fine-tune, so its losses are the fine-tune's.
    for set_name in ("english", "code"):
        ta = rows["task_arithmetic"]["sets"][set_name]["loss"]
        assert ta == pytest.approx(rows["code-ft"]["sets"][set_name]["loss"], abs=1e-5)


@pytest.mark.slow
def test_bad_text_inputs_are_one_line(lm_setup: dict, tmp_path: Path) -> None:
    steps = "  - evaluate: {method: language_model}\n"

    def one_line(path: Path, command: str, code: int) -> str:
        result = run(lm_setup, command, str(path))
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == code, result.stderr
        lines = [line for line in result.stderr.strip().splitlines() if not line[:4].isdigit()]
        assert len(lines) == 1, result.stderr
        return lines[0]

    # validate finds, before any work, every problem at once (exit 2, a line each): no
    # tokenizer where the default looks (a checkpoint directory without one) for data.fit and
    # the english set; the code set's own tokenizer, but seq_len beyond the model's positions
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((lm_setup["models"]["english"] / name).read_bytes())
    path = recipe(lm_setup, steps, name="validate")
    source = path.read_text().replace(str(lm_setup["models"]["english"]), str(bare))
    tokenizer = lm_setup["models"]["code"]
    path.write_text(source.replace(f"seq_len: {SEQ_LEN}, batch_size: 4",
                                   f"seq_len: 65, tokenizer: {tokenizer}"))  # fmt: skip
    result = run(lm_setup, "validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    for line, key in zip(lines, ("data.fit", "data.eval.english"), strict=False):
        assert f"{key}.tokenizer: no tokenizer found: looked for {bare / 'tokenizer.json'}" in line
    assert "data.eval.code: " in lines[2] and "max_position_embeddings 64" in lines[2], lines[2]

    # an empty text file among the eval set's: found when it is read (exit 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text(lm_setup["domains"]["code"].joinpath("eval.txt").read_text())
    (empty / "b.txt").write_text("\n\n")
    path = recipe(lm_setup, steps, name="empty")
    path.write_text(
        path.read_text().replace(str(lm_setup["domains"]["code"] / "eval.txt"), str(empty))
    )
    line = one_line(path, "run", 1)
    assert f"{empty / 'b.txt'} holds no text" in line, line

    # a jsonl line without the field (exit 1, file:line)
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text('{"text": "def f(x):\\n    return x"}\n{"body": "no text"}\n')
    path = recipe(lm_setup, steps, name="jsonl")
    path.write_text(
        path.read_text().replace(str(lm_setup["domains"]["code"] / "eval.txt"), str(jsonl))
    )
    line = one_line(path, "run", 1)
    assert f"{jsonl}:2: no field 'text'" in line, line


@pytest.mark.slow
def test_ensemble_baseline_through_a_recipe(lm_setup: dict) -> None:
    """`ensemble` scores, per token, the log of the mean of the endpoints' probabilities;
    checked against the two fine-tunes loaded by transformers, probabilities averaged by hand."""
    from mergecli.data import load_data

    steps = "  - evaluate: {method: language_model, baselines: [ensemble, endpoints, average]}\n"
    result = run(lm_setup, "run", str(recipe(lm_setup, steps, name="lm-ensemble")))
    assert result.returncode == 0, result.stderr
    report = json.loads((lm_setup["root"] / "out-lm-ensemble" / "report.json").read_text())
    results = report["evaluate"]["results"]
    assert [r["kind"] for r in results] == ["ensemble", "endpoint", "endpoint", "average"]
    models = [
        transformers.LlamaForCausalLM.from_pretrained(lm_setup["models"][d]).eval()
        for d in ("english", "code")
    ]
    for set_name, domain in lm_setup["domains"].items():
        spec = {"source": "text", "path": str(domain / "eval.txt"), "seq_len": SEQ_LEN,
                "tokenizer": str(lm_setup["models"]["english"]), "cache": False}  # fmt: skip
        blocks = load_data(spec).x
        with torch.no_grad():
            probs = [m(blocks).logits.double().softmax(-1) for m in models]
        mean = sum(probs) / len(probs)
        expected = -mean[:, :-1].gather(-1, blocks[:, 1:, None]).log().mean()
        ensemble = results[0]["sets"][set_name]
        assert ensemble["loss"] == pytest.approx(float(expected), abs=1e-6)
        assert ensemble["perplexity"] == pytest.approx(math.exp(ensemble["loss"]), rel=1e-9)
        # Jensen: never worse than the endpoints' mean cross-entropy.
        endpoints = [r["sets"][set_name]["loss"] for r in results[1:3]]
        assert ensemble["loss"] <= sum(endpoints) / 2
    assert "ensemble" in result.stdout, result.stdout

    # aligned_average without an align step: one line, before anything is scored
    steps = "  - evaluate: {method: language_model, baselines: [endpoints, aligned_average]}\n"
    result = run(lm_setup, "run", str(recipe(lm_setup, steps, name="lm-unaligned")))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "aligned_average needs an `align` step" in result.stderr, result.stderr

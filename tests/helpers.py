"""Plain helpers the tests share (the fixtures are in conftest.py, the model files in fixtures/):
running the CLI as a user does, the recipes the signal, multi-process and SLURM tests share, and
small fits and permuted models that more than one test file builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mergecli.align.groups import PermutationSpec
from mergecli.align.permute import StateDict, apply_permutations, random_permutations
from mergecli.align.spec import derive_spec
from mergecli.data import TensorData, load_data
from mergecli.fit.coefficients import FlatParameters, logits_per_model, pairwise_merge
from mergecli.fit.loop import FitConfig, FitProblem, fit_logits
from mergecli.models import build_model
from mergecli.runtime.log import Log

SMALL_MLP = ["--arch", "mlp", "--arg", "depth=3", "--arg", "hidden=32"]
TESTS = Path(__file__).parent
ROOT = TESTS.parent


# Set by SLURM and torchrun: a test run inside a job (or under torchrun) must not hand them
# to the runs it starts, which would join that job's ranks or requeue it.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a mergecli subprocess: this one without launcher or SLURM variables,
    with tests/ importable (for the test models in fixtures/, such as fixtures.gated_mlp) and
    ``extra`` set."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    own = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")
    }
    return {**own, "COLUMNS": "200", "PYTHONPATH": path, **extra}


def run_cli(
    *args: str, cwd: Path | None = None, check: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m mergecli ARGS` as a user would, capturing its output."""
    result = subprocess.run(
        [sys.executable, "-m", "mergecli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mergecli {' '.join(args)} failed:\n{result.stderr}")
    return result


def run_cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`mergecli ARGS` called in this process through Typer's CliRunner, with the exit code,
    stdout and stderr apart as run_cli gives them: for the many variants of one mistake, where
    each new process would spend seconds importing torch. Each behaviour keeps one run_cli
    test (the real process, its exit status and streams); --log json goes through main(),
    which this does not call, so use run_cli for it. An exception that escapes the CLI (which
    the real process would turn into exit 70 or a traceback) is raised here."""
    from typer.testing import CliRunner

    from mergecli.cli import app

    assert "json" not in args, "--log json is main()'s: use run_cli"
    result = CliRunner().invoke(app, list(args), prog_name="mergecli", env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(
        ["mergecli", *args], result.exit_code, result.stdout, result.stderr
    )


def run_cli_side_by_side(*commands: list[str], cwd: Path | None = None) -> None:
    """Run independent `python -m mergecli` commands (trainings of a pair) at the same time, one
    thread each, and fail with the stderr of any that fails: on the 2 cores CI has, two
    one-thread trainings of small models take about half the time of one after the other."""
    env = cli_env(OMP_NUM_THREADS="1")
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "mergecli", *args],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for args in commands
    ]
    failed = []
    for args, process in zip(commands, processes, strict=True):
        try:
            _, stderr = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        if process.returncode != 0:
            failed.append(f"mergecli {' '.join(args)} failed:\n{stderr}")
    if failed:
        raise AssertionError("\n".join(failed))


def mlp_checkpoint(path: Path, seed: int, **args: int) -> Path:
    """A seeded untrained MLP written as `mergecli train` writes it: enough where only the
    names and shapes matter (what `validate` checks), in milliseconds."""
    from mergecli.train import save_trained

    torch.manual_seed(seed)
    save_trained(build_model("mlp", args), path, "mlp", args, {})
    return path


def saved_fit_state(path: Path) -> dict:
    """The plain values of a fit state (step, finished...), read as any safetensors reader would."""
    from safetensors import safe_open

    from mergecli.fit.loop import PLAIN_KEY

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[PLAIN_KEY])


def write_recipe(directory: Path, a: Path, b: Path) -> Path:
    """A small average-and-evaluate recipe over checkpoints ``a`` and ``b``."""
    path = directory / "recipe.yaml"
    path.write_text(
        f"""\
version: 1
name: test-merge
model:
  arch: mlp
  args: {{depth: 3, hidden: 32}}
checkpoints:
  - path: {a}
  - path: {b}
data:
  eval: {{source: mnist, split: "9000:"}}
steps:
  - merge: {{method: average}}
  - evaluate: {{baselines: [endpoints, ensemble, average]}}
output:
  dir: {directory / "out"}
"""
    )
    return path


def data_parallel_recipe(a: Path, b: Path, arch: str = "mlp") -> str:
    """A recipe exercising every all-reduce of a multi-process run: activation statistics
    (activation matching), the fit's gradients (a global batch of 50 over 999 examples, so the
    last batch splits unevenly), its l2 term and validation, and the evaluation. On the CPU
    (gloo) on any machine, so that a GPU machine's nccl is not asked to share one GPU between
    two processes. The output dir is relative: run it from different directories."""
    return f"""\
version: 1
name: data-parallel
device: cpu
model: {{arch: "{arch}", args: {{depth: 3, hidden: 32}}}}
checkpoints:
  - path: {a}
  - path: {b}
data:
  fit: {{source: mnist, split: "3000:3999", batch_size: 50}}
  eval: {{source: mnist, split: "9000:9999"}}
steps:
  - align: {{method: activation_matching}}
  - fit: {{steps: 30, lr: 0.01, l2: 0.01}}
  - evaluate: {{baselines: [endpoints, ensemble]}}
output: {{dir: out}}
"""


def assert_same_fit(one: Path, several: Path) -> None:
    """What several processes computed equals what one did: the same alignment, coefficients
    within 1e-4, the same evaluation up to float rounding (counts all-reduced or gathered)."""
    assert (
        load_file(several / "alignment.safetensors").keys()
        == load_file(one / "alignment.safetensors").keys()
    )
    for name, tensor in load_file(one / "alignment.safetensors").items():
        assert torch.equal(load_file(several / "alignment.safetensors")[name], tensor), name
    expected, got = (
        load_file(one / "coefficients.safetensors"),
        load_file(several / "coefficients.safetensors"),
    )
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst <= 1e-4, f"coefficients differ by up to {worst:.3g}"
    assert any(float((expected[k] - 0.5).abs().max()) > 1e-3 for k in expected), "nothing fit"
    reports = [json.loads((d / "report.json").read_text()) for d in (one, several)]
    rows = [{r["name"]: r for r in rep["evaluate"]["results"]} for rep in reports]
    assert rows[0].keys() == rows[1].keys()
    # The coefficients differ by float rounding, so an example whose two top logits are within
    # it may change its argmax: one example (1e-3 would allow none of 999).
    one_example = 1 / reports[0]["evaluate"]["examples"]
    for name, row in rows[0].items():
        assert abs(rows[1][name]["accuracy"] - row["accuracy"]) <= 1.5 * one_example, name
        assert abs(rows[1][name]["loss"] - row["loss"]) <= 1e-4, name
    histories = [rep["fit"]["stages"][0]["history"] for rep in reports]
    for first, second in zip(*histories, strict=True):
        assert abs(first["val_loss"] - second["val_loss"]) <= 1e-4
        assert abs(first["train_loss"] - second["train_loss"]) <= 1e-4


GATED_OUTPUTS = ("model.safetensors", "coefficients.safetensors", "alignment.safetensors")
GATED_STEPS = 40


def gated_recipe(a: Path, b: Path) -> str:
    """A small NP Merge recipe on the gated MLP; the output dir is relative, so the same recipe
    run from different directories has the same resolved text (and output bytes)."""
    return f"""\
version: 1
name: gated
model: {{arch: "fixtures.gated_mlp:build", args: {{depth: 3, hidden: 32}}}}
checkpoints:
  - path: {a}
  - path: {b}
data:
  fit: {{source: mnist, split: "3000:4000", batch_size: 64}}
  eval: {{source: mnist, split: "9000:"}}
steps:
  - align: {{method: weight_matching}}
  - fit: {{steps: {GATED_STEPS}, lr: 0.01, checkpoint_every: 1000}}
  - evaluate: {{baselines: [endpoints]}}
output: {{dir: out}}
"""


def two_models(seed: int = 0) -> tuple[torch.nn.Module, list[dict], list[str]]:
    """A seeded 3-layer MLP module, the weights of two more, and its parameter names."""
    torch.manual_seed(seed)
    module = build_model("mlp", {"depth": 3, "hidden": 16})
    models = [build_model("mlp", {"depth": 3, "hidden": 16}).state_dict() for _ in range(2)]
    return module, models, [n for n, _ in module.named_parameters()]


def fit_setup():
    """What `fit_logits` takes for the two models of `two_models`: the module, their flat
    parameters, no buffers, 600 MNIST images indexed by position, and a cross-entropy loss."""
    module, models, names = two_models()
    flat = FlatParameters.stack(models, names, torch.device("cpu"))
    buffers = {}
    data = load_data({"source": "mnist", "split": "0:600"})
    indexed = TensorData(data.x, torch.arange(len(data)))

    def loss_fn(outputs, index):
        return F.cross_entropy(outputs, data.y[index])

    return module, flat, buffers, indexed, loss_fn


def fit_config(**overrides) -> FitConfig:
    """A small Adam fit (2 epochs of 64-image batches), with ``overrides`` set."""
    values = dict(
        granularity="parameter", optimizer="adam", lr=0.05, epochs=2, steps=None,
        batch_size=64, l2=0.0, seed=0, checkpoint_every=3,
    )  # fmt: skip
    values.update(overrides)
    return FitConfig(**values)


def small_fit(checkpoint=None, should_stop=None, loss=None, **overrides):
    """`fit_logits` on the two models of `two_models`, from zero logits, on the CPU."""
    module, flat, buffers, data, loss_fn = fit_setup()
    config = fit_config(**overrides)
    initial = torch.zeros(logits_per_model(config.granularity, flat))
    problem = FitProblem(
        module, flat, buffers, pairwise_merge, initial, data, loss or loss_fn, torch.device("cpu")
    )
    return fit_logits(problem, config, Log("plain"), checkpoint, should_stop)


def permuted_copy(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], samples: int = 4, seed: int = 1
) -> tuple[nn.Module, torch.Tensor, PermutationSpec, StateDict, StateDict]:
    """A seeded model in eval mode, ``samples`` random inputs, the model's spec, its weights,
    and those weights with every group permuted at random (the same function)."""
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(samples, *shape)
    spec = derive_spec(model, x[:2])
    state = model.state_dict()
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    return model, x, spec, state, apply_permutations(state, spec, perms)


def stdlib_text(chars: int = 6000, module: str = "textwrap") -> str:
    """Real text nobody here wrote, on every machine: the start of a CPython stdlib module."""
    import importlib

    return Path(importlib.import_module(module).__file__).read_text(encoding="utf-8")[:chars]


def train_tokenizer(folder: Path, text: str, vocab_size: int = 120) -> Path:
    """A small BPE tokenizer trained on ``text`` with `tokenizers`, saved as a model directory
    saves it: tokenizer.json and tokenizer_config.json (EOS ``</s>``). Returns ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>"])
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return folder


def error_line(result: subprocess.CompletedProcess, code: int | None = None) -> str:
    """The one line a failed command printed besides its progress lines (which start with a
    timestamp): no traceback, no internal error; exit ``code`` when given."""
    if code is not None:
        assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line[:4].isdigit()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_tiny_llamas(root: Path, layers: int = 3) -> dict[str, Path]:
    """A base and two fine-tunes (`ft-a`, `ft-b`) of a tiny Llama-style causal LM as model
    directories (model.safetensors and config.json, no tokenizer), written without transformers:
    the inputs mergekit configs name, for translation and merge tests."""
    hidden, inner, vocab = 8, 16, 32
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}  # fmt: skip
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes |= {f"{p}self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"}
        shapes |= {f"{p}mlp.{n}_proj.weight": (inner, hidden) for n in ("gate", "up")}
        shapes |= {f"{p}mlp.down_proj.weight": (hidden, inner),
                   f"{p}input_layernorm.weight": (hidden,),
                   f"{p}post_attention_layernorm.weight": (hidden,)}  # fmt: skip
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": hidden, "intermediate_size": inner, "num_hidden_layers": layers,
              "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": vocab}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    folders = {}
    for name in ("base", "ft-a", "ft-b"):
        tensors = base if name == "base" else {
            k: t + 0.1 * torch.randn(t.shape, generator=generator) for k, t in base.items()
        }  # fmt: skip
        folder = root / name
        folder.mkdir(parents=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
        folders[name] = folder
    return folders

"""`mergecli train` as a user runs it: fine-tuning from a checkpoint takes its architecture from
the checkpoint, and a stop signal keeps the training, which the same command resumes to the
bytes of an uninterrupted run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import cli_env, error_line, run_cli

# 512 examples in batches of 16: 32 batches an epoch, a few seconds for three epochs.
SMALL = ["--arg", "depth=3", "--arg", "hidden=16", "--data", "mnist:0:512",
         "--eval-data", "mnist:9000:9200", "--epochs", "3", "--batch-size", "16"]  # fmt: skip


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_init_takes_the_architecture_from_the_checkpoint(tmp_path: Path, trained_pair) -> None:
    base = trained_pair[0]  # an mlp with depth 3, hidden 32: not the train defaults
    quick = ["--data", "mnist:0:64", "--eval-data", "none", "--epochs", "1"]
    out = tmp_path / "ft.safetensors"
    run_cli("train", "--init", str(base), *quick, "--lr", "0", "--out", str(out), check=True)
    # lr 0: the fine-tune is its start, and it names the same model for recipes.
    start, tuned = load_file(base), load_file(out)
    assert start.keys() == tuned.keys()
    assert all((start[k] == tuned[k]).all() for k in start), "lr 0 leaves the weights as loaded"
    assert metadata(out)["mergecli.arch"] == "mlp"
    assert json.loads(metadata(out)["mergecli.args"]) == {"depth": 3, "hidden": 32}
    # Repeating what the metadata says is fine; contradicting it is a usage error in CLI words.
    again = ["--arch", "mlp", "--arg", "hidden=32"]
    run_cli("train", "--init", str(base), *again, *quick, "--out", str(out), check=True)
    x = str(tmp_path / "x.safetensors")
    line = error_line(run_cli("train", "--init", str(base), "--arg", "hidden=64", *quick,
                              "--out", x), code=2)  # fmt: skip
    assert line == (
        f"--arg hidden=64: the --init checkpoint {base} has hidden=32 (its metadata); "
        "leave --arg hidden out"
    )
    line = error_line(run_cli("train", "--init", str(base), "--arch", "vgg", *quick, "--out", x),
                      code=2)  # fmt: skip
    assert line == (
        f'--arch vgg: the --init checkpoint {base} is a "mlp" model (its metadata); '
        "leave --arch out to fine-tune it as that"
    )
    # An argument the metadata does not set may be added; if it changes the model, the message
    # says which option to drop, not the recipe's model.args.
    line = error_line(run_cli("train", "--init", str(base), "--arg", "batchnorm=true", *quick,
                              "--out", x), code=1)  # fmt: skip
    assert line.startswith(f"error: --init {base}: does not fit the model: missing 'norms.0.")
    assert line.endswith(
        "; --arg batchnorm=true changes the model its metadata names; leave it out"
    )
    assert "model.arg" not in line
    # A checkpoint without metadata: --arch and --arg say what it is.
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(base), str(bare))
    line = error_line(run_cli("train", "--init", str(bare), *quick, "--out", x), code=1)
    assert line.endswith(
        "; its metadata names no architecture: give the --arch and --arg it was trained with"
    )
    run_cli("train", "--init", str(bare), "--arg", "depth=3", "--arg", "hidden=32", *quick,
            "--out", x, check=True)  # fmt: skip
    assert not (tmp_path / "x.state.safetensors").exists(), "a finished training keeps no state"


def test_init_whose_metadata_names_user_code_imports_nothing(tmp_path: Path, trained_pair) -> None:
    (tmp_path / "mymodels.py").write_text("open('imported', 'w').close()\n")
    planted = tmp_path / "planted.safetensors"
    save_file(load_file(trained_pair[0]), str(planted),
              {"mergecli.arch": "mymodels:tiny", "mergecli.args": '{"width": 8}'})  # fmt: skip
    result = run_cli("train", "--init", "planted.safetensors", "--out", "x.safetensors",
                     cwd=tmp_path)  # fmt: skip
    line = error_line(result, code=2)
    assert line == (
        '--init planted.safetensors: its metadata names user code ("mymodels:tiny"), which only '
        "--arch may import; if you trust that code, add --arch mymodels:tiny (its arguments "
        '{"width": 8} are read from the checkpoint)'
    )
    assert not (tmp_path / "imported").exists(), "a file's metadata imported code"


def test_model_errors_use_the_train_options(tmp_path: Path) -> None:
    out = str(tmp_path / "x.safetensors")
    line = error_line(run_cli("train", "--arg", "hidden=0", "--out", out), code=1)
    assert line.startswith("error: --arg hidden: mlp needs an integer >= 1, got 0")
    line = error_line(run_cli("train", "--arch", "mpl", "--out", out), code=1)
    assert line.startswith("error: --arch: unknown architecture 'mpl'; did you mean 'mlp'?")


def start_training(folder: Path, out: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mergecli", "--log", "plain", "train", *SMALL, "--out", out],
        cwd=folder,
        env=cli_env(),
        stderr=subprocess.PIPE,
        text=True,
    )


def saved_training(path: Path) -> tuple[bytes, dict[str, str]]:
    """A trained checkpoint's tensors (as bytes) and metadata, less how long training took."""
    with safe_open(str(path), "pt") as f:
        data = b"".join(f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys()))
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "mergecli.train_seconds"}
    return data, meta


@pytest.mark.slow
def test_sigint_saves_the_training_and_the_same_command_resumes_it_bit_identical(
    tmp_path: Path,
) -> None:
    # Bit-identity is what is tested: the same machine, threads and process count each time.
    run_cli("--log", "plain", "train", *SMALL, "--out", "full.safetensors", cwd=tmp_path,
            check=True)  # fmt: skip
    expected = saved_training(tmp_path / "full.safetensors")

    process = start_training(tmp_path, "part.safetensors")
    lines = []
    for line in process.stderr:
        lines.append(line)
        if " epoch 1/3 " in line:
            process.send_signal(signal.SIGINT)
            break
    lines += process.stderr.readlines()
    assert process.wait(timeout=120) == 130, "".join(lines)
    stderr = "".join(lines)
    assert "Traceback" not in stderr
    [stop] = [line for line in lines if "stopped by" in line]
    assert re.search(
        r"stopped by SIGINT after (batch \d+/32 of epoch 2/3|epoch 1/3); training state saved "
        r"in part\.state\.safetensors; run the same command to resume; exit 130$",
        stop.rstrip(),
    ), stop
    assert not (tmp_path / "part.safetensors").exists(), "no checkpoint before training ends"
    state = tmp_path / "part.state.safetensors"
    assert set(metadata(state)) >= {"mergecli.train_state", "mergecli.train_fingerprint"}
    saved = state.read_bytes()

    # Other options are another training: its state is refused, not mixed in.
    other = run_cli("train", *SMALL, "--lr", "0.01", "--out", "part.safetensors", cwd=tmp_path)
    assert error_line(other, code=1) == (
        "error: part.state.safetensors: saved training state belongs to a training with other "
        "options or another --init; run with --resume never to start over (or delete it)"
    )

    resumed = run_cli("--log", "plain", "train", *SMALL, "--out", "part.safetensors",
                      cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"train: resuming from part\.state\.safetensors epoch=2 batch=\d+",
                     resumed.stderr), resumed.stderr  # fmt: skip
    # Every epoch line after the stop is the uninterrupted run's line.
    assert "epoch 1/3" not in resumed.stderr and "epoch 3/3" in resumed.stderr
    assert saved_training(tmp_path / "part.safetensors") == expected
    assert not state.exists(), "a finished training removes its state"

    # --resume never starts over from a stopped training's state (and ends the same).
    state.write_bytes(saved)
    never = run_cli("--log", "plain", "train", *SMALL, "--out", "part.safetensors",
                    "--resume", "never", cwd=tmp_path)  # fmt: skip
    assert never.returncode == 0 and "resuming" not in never.stderr, never.stderr
    assert saved_training(tmp_path / "part.safetensors") == expected
    assert not state.exists()


def test_a_class_split_pair_trained_with_sgd_and_cosine(tmp_path: Path) -> None:
    import torch

    from mergecli.data import load_data
    from mergecli.models import build_model

    common = ["--log", "plain", "train", "--arg", "depth=2", "--arg", "hidden=32",
              "--data", "mnist:0:2000", "--eval-data", "mnist:9000:10000", "--epochs", "3",
              "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05", "--schedule", "cosine",
              "--warmup", "0.5", "--weight-decay", "5e-4"]  # fmt: skip
    held_out = load_data({"source": "mnist", "split": "9000:10000"})
    train = load_data({"source": "mnist", "split": "0:2000"})
    for seed, (name, split, own) in enumerate(
        (("low", "classes:0-4", range(5)), ("high", "classes:5-9", range(5, 10)))
    ):
        out = tmp_path / f"{name}.safetensors"
        result = run_cli(*common, "--split", split, "--seed", str(seed), "--out", str(out))
        assert result.returncode == 0, result.stderr
        # The cosine schedule in the epoch lines: the last step's lr, falling to ~0.
        lrs = [float(v) for v in re.findall(r" lr=(\S+)", result.stderr)]
        assert len(lrs) == 3 and lrs[0] > lrs[1] > lrs[2] and lrs[2] < 1e-3, result.stderr
        # The share, counted from the data itself: its five labels with their counts.
        counts = [f"{y}:{int((train.y == y).sum())}" for y in own]
        total = sum(int((train.y == y).sum()) for y in own)
        assert (
            f"train: --data partition {split} keeps {total} examples (label:count "
            f"{' '.join(counts)})" in result.stderr
        ), result.stderr
        meta = metadata(out)
        assert meta["mergecli.split"] == split
        partition = {"classes": split.removeprefix("classes:")}
        assert json.loads(meta["mergecli.data"])["partition"] == partition
        assert json.loads(meta["mergecli.eval_data"])["partition"] == partition  # scored on them
        assert json.loads(meta["mergecli.training"]) == {
            "epochs": 3, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
            "nesterov": True, "weight_decay": 0.0005, "schedule": "cosine", "warmup": 0.5,
            "label_smoothing": 0.0, "precision": "fp32",
        }  # fmt: skip
        # Independently of the run's own figures: the model knows its five classes (labels as
        # they are, 10 outputs) and predicts none of the others.
        model = build_model("mlp", json.loads(meta["mergecli.args"])).eval()
        model.load_state_dict(load_file(out))
        with torch.no_grad():
            predicted = model(held_out.x).argmax(1)
        mine = torch.isin(held_out.y, torch.tensor(list(own)))
        assert (predicted[mine] == held_out.y[mine]).double().mean() > 0.85
        assert torch.isin(predicted, torch.tensor(list(own))).double().mean() > 0.99
        assert float(meta["mergecli.eval_accuracy"]) > 0.85


def test_split_mistakes_are_one_line_usage_errors(tmp_path: Path) -> None:
    out = str(tmp_path / "x.safetensors")
    line = error_line(run_cli("train", "--split", "dirichlet:alpha=0.5:part=2/2", "--out", out),
                      code=2)  # fmt: skip
    assert line == (
        "--split dirichlet:alpha=0.5:part=2/2: part: 2 is not one of the 2 parts; parts are "
        "numbered 0..1"
    )
    data = "{source: mnist, split: train, partition: {classes: 0-4}}"
    line = error_line(run_cli("train", "--data", data, "--split", "classes:5-9", "--out", out),
                      code=2)  # fmt: skip
    assert line == (
        "--split classes:5-9: --data has a partition already; give the split in one of them"
    )
    assert not Path(out).exists()


def test_train_on_a_class_biased_share(tmp_path: Path) -> None:
    """--data with class_fractions: the log line counts what it kept per label (from the data
    itself), and the checkpoint's metadata records the share."""
    from helpers import run_cli_in_process
    from mergecli.data import load_data

    spec = "{source: mnist, split: ':1000', class_fractions: {5-9: 0.1}}"
    out = tmp_path / "biased.safetensors"
    result = run_cli_in_process(
        "--log", "plain", "train", "--arg", "depth=1", "--data", spec, "--epochs", "1",
        "--seed", "0", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    y = load_data({"source": "mnist", "split": ":1000"}).y
    kept = [
        int((y == c).sum()) if c < 5 else int(0.1 * int((y == c).sum()) + 0.5) for c in range(10)
    ]
    counts = " ".join(f"{c}:{k}" for c, k in enumerate(kept))
    assert (
        f"train: --data class_fractions 5-9=0.1 keeps {sum(kept)} examples (label:count {counts})"
        in result.stderr + result.stdout
    )
    assert json.loads(metadata(out)["mergecli.data"])["class_fractions"] == {"5-9": 0.1}

"""`model: {arch: hf}`: Hugging Face models built from a directory's config.json, and tied
weights (an output layer saved only as the embeddings it shares)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fixtures.hf_models import bert_config, llama_config, save
from helpers import cli_env
from mergecli.errors import MergeCliError
from mergecli.io import load_state_dict
from mergecli.models import build_model, check_fits, load_into_model
from mergecli.models.loading import allow_tied_absent, tied_names
from mergecli.models.metadata import model_from_metadata, model_metadata


class Tied(nn.Module):
    """An embedding and an output layer that share one weight, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight


# --- tied weights (no transformers needed) ------------------------------------------------


def test_tied_names_groups_the_names_of_one_parameter() -> None:
    assert tied_names(Tied()) == {"embed.weight": ["embed.weight", "out.weight"],
                                  "out.weight": ["embed.weight", "out.weight"]}  # fmt: skip
    assert tied_names(nn.Linear(2, 2)) == {}


def test_a_tied_parameter_saved_under_one_name_loads_strictly() -> None:
    module = allow_tied_absent(Tied())
    weight = torch.arange(15.0).reshape(5, 3)
    module.load_state_dict({"embed.weight": weight}, strict=True)
    assert torch.equal(module.out.weight, weight)
    load_into_model(Tied(), {"out.weight": weight}, "x.safetensors")  # either name will do


def test_a_tied_parameter_missing_under_every_name_is_still_missing() -> None:
    module = allow_tied_absent(Tied())
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict({}, strict=True)
    with pytest.raises(MergeCliError, match="missing 'embed.weight'; missing 'out.weight'"):
        load_into_model(Tied(), {}, "x.safetensors")
    expected = {"embed.weight": (5, 3), "out.weight": (5, 3)}
    tied = tied_names(Tied())
    check_fits(expected, {"embed.weight": (5, 3)}, "x", tied=tied)
    with pytest.raises(MergeCliError, match="missing 'out.weight'"):
        check_fits(expected, {"embed.weight": (5, 3)}, "x")  # untied: both are needed


def test_a_tied_tensor_written_under_both_names_is_kept_under_one() -> None:
    """A model calls both names with one tensor; a checkpoint that writes both (equal) keeps
    the first, and one whose copies differ does not fit a model that ties them."""
    from mergecli.pipeline import _one_name_per_tied_tensor
    from mergecli.recipe.schema import CheckpointSpec
    from mergecli.state import Checkpoint

    weight = torch.randn(5, 3)
    tensors = {"out.weight": weight.clone(), "embed.weight": weight}
    checkpoint = Checkpoint(CheckpointSpec(path="m.safetensors"), "m", "", tensors, {})
    tied = tied_names(Tied())
    assert _one_name_per_tied_tensor(tied, checkpoint) == {"out.weight"}
    assert list(checkpoint.tensors) == ["embed.weight"]
    assert _one_name_per_tied_tensor({}, checkpoint) == set()
    checkpoint.tensors["out.weight"] = weight + 1
    with pytest.raises(MergeCliError, match="'embed.weight' and 'out.weight' with different"):
        _one_name_per_tied_tensor(tied, checkpoint)


# --- hf --------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _bert_dir(folder: Path, **overrides) -> Path:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config(transformers, **overrides))
    return save(model, folder, transformers)


def test_the_head_comes_from_config_architectures(tmp_path: Path) -> None:
    bert = _bert_dir(tmp_path / "bert", hidden_dropout_prob=0.3)
    torch.manual_seed(0)
    llama = save(transformers.LlamaForCausalLM(llama_config(transformers)), tmp_path / "llama",
                 transformers, dtype=torch.bfloat16)  # fmt: skip
    model = build_model("hf", {}, model_dir=bert)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not model.training
    # Dropout zeroed, so a step that puts the module in train mode (for BatchNorm) stays exact.
    assert model.config.hidden_dropout_prob == 0.0
    load_into_model(model, load_state_dict(bert), str(bert))
    ids = torch.randint(0, 32, (3, 8))
    assert model(ids).logits.shape == (3, 2)
    # config.json says bfloat16; the module computes in float32 and takes the bf16 weights.
    lm = build_model("hf", {}, model_dir=llama)
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in lm.parameters()} == {torch.float32}
    saved = load_state_dict(llama)
    assert "lm_head.weight" not in saved  # tied: save_pretrained leaves it out
    load_into_model(lm, saved, str(llama))
    assert torch.equal(lm.lm_head.weight, saved["model.embed_tokens.weight"].float())
    assert lm(ids).logits.shape == (3, 8, 32)
    # `config` names the directory (or its config.json) instead of the checkpoint's directory.
    other = build_model("hf", {"config": str(llama / "config.json")}, model_dir=bert)
    assert type(other).__name__ == "LlamaForCausalLM"


def test_head_overrides_the_architecture(tmp_path: Path) -> None:
    bert = _bert_dir(tmp_path / "bert")
    model = build_model("hf", {"head": "base"}, model_dir=bert)
    assert type(model).__name__ == "BertModel"


def test_builds_on_the_meta_device(tmp_path: Path) -> None:
    bert = _bert_dir(tmp_path / "bert")
    with torch.device("meta"):
        model = build_model("hf", {}, model_dir=bert)
    assert {p.device.type for p in model.parameters()} == {"meta"}


def _problem(folder: Path, args: dict | None = None) -> str:
    with pytest.raises(MergeCliError) as info:
        build_model("hf", args or {}, model_dir=folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_bad_model_directories_are_one_line_each(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in _problem(empty)
    assert "no such directory" in _problem(tmp_path / "absent")
    bert = _bert_dir(tmp_path / "bert")
    _edit_config(bert, model_type="bort")
    assert "model_type 'bort' is not one transformers" in _problem(bert)
    _edit_config(bert, auto_map={"AutoConfig": "bort.BortConfig"})
    message = _problem(bert)
    assert "auto_map" in message and "trust_remote_code: true" in message
    bert = _bert_dir(tmp_path / "bert2")
    _edit_config(bert, architectures=["BertForPreTraining"])
    assert "is not a model with a head mergecli builds" in _problem(bert)
    _edit_config(bert, architectures=["BertForCausalLM"])  # no such class in transformers
    assert "'BertForCausalLM' is not a model with a head" in _problem(bert)
    _edit_config(bert, architectures=None)
    assert "names no architectures" in _problem(bert)
    assert "unknown head 'lm'" in _problem(bert, {"head": "lm"})
    assert "needs true or false" in _problem(bert, {"trust_remote_code": "yes"})
    assert "no image_classification head for model_type 'bert'" in _problem(
        bert, {"head": "image_classification"}
    )
    assert "model.args.config" in _problem(None)  # no checkpoint directory, no config


def test_auto_map_code_runs_only_when_trusted(tmp_path: Path) -> None:
    """A directory whose config.json names its own code: refused, then run when trusted."""
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "tiny_code.py").write_text(
        "import torch\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class TinyConfig(PretrainedConfig):\n"
        "    model_type = 'tiny-custom'\n"
        "class TinyForSequenceClassification(PreTrainedModel):\n"
        "    config_class = TinyConfig\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        self.score = torch.nn.Linear(4, 2)\n"
        "        self.post_init()\n"
        "    def forward(self, x):\n"
        "        return self.score(x)\n"
    )
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tiny-custom", "architectures": ["TinyForSequenceClassification"],
        "auto_map": {"AutoConfig": "tiny_code.TinyConfig",
                     "AutoModelForSequenceClassification":
                         "tiny_code.TinyForSequenceClassification"},
    }))  # fmt: skip
    assert "trust_remote_code: true" in _problem(folder)
    model = build_model("hf", {"trust_remote_code": True}, model_dir=folder)
    assert type(model).__name__ == "TinyForSequenceClassification"


def test_metadata_never_turns_on_trust_remote_code(tmp_path: Path) -> None:
    assert model_from_metadata(model_metadata("hf", {}), "m", needed=True) == ("hf", {})
    trusting = model_metadata("hf", {"trust_remote_code": True})
    assert model_from_metadata(trusting, "m", needed=False) is None
    with pytest.raises(MergeCliError, match="model directory's own code.*only a recipe"):
        model_from_metadata(trusting, "m", needed=True)


def test_without_transformers_one_line_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['transformers'] = None  # as if it were not installed\n"
    )
    bert = _bert_dir(tmp_path / "bert")
    env = cli_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    code = (
        "from mergecli.models import build_model\n"
        "from mergecli.errors import MergeCliError\n"
        "try:\n"
        f"    build_model('hf', {{}}, model_dir={str(bert)!r})\n"
        "except MergeCliError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.strip() == (
        "model: {arch: hf} needs transformers: pip install 'mergecli[hf]'"
    ), result.stderr

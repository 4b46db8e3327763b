"""Training on an image source with augmentation and a Dirichlet partition, stopped mid-epoch
by a signal and resumed: the same bits as uninterrupted (on one machine), and augmentation
changes what is learnt."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
import yaml

from fixtures.images import write_cifar
from mergecli.data import load_data
from mergecli.models.forward import model_logits
from mergecli.runtime.log import Log
from mergecli.runtime.signals import STOP, Stopped
from mergecli.train import train_model
from mergecli.train_regime import Regime
from mergecli.train_state import TrainCheckpoint

TRANSFORM = "[{random_crop: 32, padding: 4}, {hflip: 0.5}, {normalize: cifar10}]"


@pytest.mark.slow
def test_augmented_partitioned_cifar_training_resumes_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 74 images in part 0: five batches of 16 an epoch, the last one partial.
    write_cifar(tmp_path / "data", "cifar10", "binary", per_file=30)
    spec = {
        "source": "cifar10", "root": str(tmp_path / "data"),
        "transform": yaml.safe_load(TRANSFORM), "augment": True,
        "partition": {"dirichlet": 0.5, "parts": 2, "part": 0},
    }  # fmt: skip
    regime = Regime(
        optimizer="sgd", lr=0.05, weight_decay=5e-4, schedule="onecycle", label_smoothing=0.1
    )
    common = dict(
        arch="resnet20", args={"width": 0.25, "shortcut": "conv1x1"}, train_spec=spec,
        eval_spec=None, seed=1, epochs=2, batch_size=16, regime=regime,
        device=torch.device("cpu"), log=Log("plain"),
    )  # fmt: skip

    def stopping_at(call: int | None):
        """The model's forward, with a stop signal arriving at its ``call``-th call."""
        calls = []

        def forward(module, x):
            calls.append(1)
            if len(calls) == call:
                STOP.received = signal.SIGINT
            return model_logits(module, x)

        return forward

    def run(checkpoint, call, settings=common):
        monkeypatch.setattr("mergecli.train.model_logits", stopping_at(call))
        with STOP.installed():
            return train_model(**settings, checkpoint=checkpoint)[0].state_dict()

    expected = run(None, None)
    state = TrainCheckpoint(tmp_path / "s.state.safetensors", "fingerprint")
    per_epoch = -(-len(load_data(spec)) // 16)
    assert per_epoch == 5 and len(load_data(spec)) % 16  # as said above
    with pytest.raises(Stopped):
        run(state, per_epoch + 3)
    saved = state.load()
    assert (saved["epoch"], saved["position"]) == (1, 3)
    resumed = run(state, None)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    plain = run(None, None, {**common, "train_spec": {**spec, "augment": False}})
    assert not torch.equal(plain["head.weight"], expected["head.weight"])

"""`mergecli train`'s resumable state: model, optimizer, fp16 loss scaler, random generators and
the position in the data (which is also the learning-rate schedule's), beside ``--out`` until
the checkpoint is written.

One safetensors file with the plain values as JSON in its metadata, never a pickle: loading a
pickle runs its code. The fingerprint (what was asked for: the options and the --init file's
hash) is read from the header before any tensor, so another training's state is refused unread.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from mergecli.io.saved_state import StateFormat, join_optimizer, split_optimizer

FINGERPRINT_KEY = "mergecli.train_fingerprint"
PLAIN_KEY = "mergecli.train_state"
RESUME_HINT = "run with --resume never to start over (or delete it)"
TRAIN_STATE = StateFormat(
    FINGERPRINT_KEY,
    PLAIN_KEY,
    "training state",
    "a training with other options or another --init",
    RESUME_HINT,
)
# The payload's tensors besides the model's and the optimizer's (``cuda_rng`` only on CUDA).
RNG_TENSORS = ("shuffle_rng", "torch_rng", "cuda_rng")
# What a resumed training reads besides the tensors.
PLAIN_REQUIRED = ("epoch", "position", "total", "correct", "loss_sum")


def state_path(out: Path) -> Path:
    """Where the state of a training writing ``out`` is kept: ``NAME.state.safetensors``
    beside it, not a name that a recipe would take for a checkpoint of the same run."""
    stem = out.name.removesuffix(".safetensors")
    return out.with_name(f"{stem}.state.safetensors")


def fingerprint(options: dict[str, Any]) -> str:
    """sha256 of what decides the result: a state resumes only the training that wrote it."""
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class TrainCheckpoint:
    path: Path
    fingerprint: str

    def load(self) -> dict[str, Any] | None:
        """The saved payload, or None when there is none; a one-line error when it is another
        training's or unreadable."""
        return TRAIN_STATE.read(self.path, self.fingerprint, _from_saved)

    def save(self, payload: dict[str, Any]) -> None:
        # Beside --out, whose folder the finished checkpoint creates if need be: so does this.
        TRAIN_STATE.write(self.path, self.fingerprint, *_to_saved(payload))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _to_saved(payload: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors (``model.<name>``, the optimizer's, the generators') and the plain rest."""
    tensors = {f"model.{name}": t for name, t in payload["model"].items()}
    tensors |= {name: payload[name] for name in RNG_TENSORS if payload.get(name) is not None}
    optimizer_tensors, optimizer_plain = split_optimizer(payload["optimizer"])
    plain = {k: v for k, v in payload.items() if k not in ("model", "optimizer", *RNG_TENSORS)}
    plain["optimizer"] = optimizer_plain
    return tensors | optimizer_tensors, plain


def _from_saved(plain: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    lacking = [key for key in (*PLAIN_REQUIRED, "optimizer") if key not in plain]
    if lacking:
        raise ValueError(f"it lacks {', '.join(lacking)}")
    saved = {k: v for k, v in plain.items() if k != "optimizer"}
    saved["model"] = {k[len("model.") :]: t for k, t in tensors.items() if k.startswith("model.")}
    saved |= {name: tensors.get(name) for name in RNG_TENSORS}
    saved["optimizer"] = join_optimizer(plain["optimizer"], tensors)
    return saved

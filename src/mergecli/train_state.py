"""`mergecli train`'s resumable state: model, optimizer, random generators and the position in
the data, beside ``--out`` until the checkpoint is written.

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

from safetensors.torch import load_file
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.io.atomic import atomic_target
from mergecli.io.safetensors_format import (
    BadSafetensors,
    header_metadata,
    read_header,
    write_safetensors,
)
from mergecli.io.saved_state import join_optimizer, split_optimizer

FINGERPRINT_KEY = "mergecli.train_fingerprint"
PLAIN_KEY = "mergecli.train_state"
RESUME_HINT = "run with --resume never to start over (or delete it)"
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
        if not self.path.exists():
            return None
        try:
            header, _ = read_header(self.path)
            metadata = header_metadata(header)
        except (BadSafetensors, OSError) as exc:
            raise self._unreadable(exc) from None
        if PLAIN_KEY not in metadata:
            raise MergeCliError(f"{self.path}: not a mergecli training state; {RESUME_HINT}")
        if metadata.get(FINGERPRINT_KEY) != self.fingerprint:
            raise MergeCliError(
                f"{self.path}: saved training state belongs to a training with other options "
                f"or another --init; {RESUME_HINT}"
            )
        try:
            return _from_saved(json.loads(metadata[PLAIN_KEY]), load_file(self.path))
        except MemoryError:
            raise
        except Exception as exc:  # a broken file, whatever part of it: one line, not exit 70
            raise self._unreadable(exc) from None

    def save(self, payload: dict[str, Any]) -> None:
        tensors, plain = _to_saved(payload)
        metadata = {FINGERPRINT_KEY: self.fingerprint, PLAIN_KEY: json.dumps(plain)}
        # Beside --out, whose folder the finished checkpoint creates if need be: so may this.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(self.path) as tmp:
            write_safetensors(tmp, tensors, metadata)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _unreadable(self, exc: BaseException) -> MergeCliError:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return MergeCliError(
            f"{self.path}: not a readable training state ({reason}); {RESUME_HINT}"
        )


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

"""`mergecli train`: make real checkpoints to merge (a plain supervised loop, kept small)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from mergecli import __version__
from mergecli.errors import MergeCliError
from mergecli.io.atomic import atomic_target
from mergecli.io.safetensors_format import write_safetensors
from mergecli.runtime.log import Log

if TYPE_CHECKING:
    from mergecli.data import TensorData


def train_model(
    arch: str,
    args: dict[str, Any],
    train_spec: dict[str, Any],
    eval_spec: dict[str, Any] | None,
    *,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    optimizer: Literal["adam", "sgd"],
    device: torch.device,
    log: Log,
    init: Path | None = None,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train ``arch(**args)`` with cross-entropy; return the module and its final accuracies.

    With ``init``, training starts from that checkpoint's weights: a fine-tune, the kind of
    model that task arithmetic, TIES and DARE merge.
    """
    from mergecli.evaluate.metrics import accuracy
    from mergecli.io import load_state_dict
    from mergecli.models import build_model, load_into_model

    torch.manual_seed(seed)
    module = build_model(arch, args)
    if init is not None:
        load_into_model(module, load_state_dict(init), f"--init {init}")
    module = module.to(device)
    train = _load_for(module, arch, train_spec, seed, "--data")
    held_out = _load_for(module, arch, eval_spec, seed, "--eval-data") if eval_spec else None
    if optimizer == "adam":
        opt = torch.optim.Adam(module.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, nesterov=True)
    shuffle = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        module.train()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in train.batches(batch_size, shuffle=True, generator=shuffle, device=device):
            logits = module(x)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise MergeCliError(
                    f"train: the loss became {loss.item()} in epoch {epoch + 1}; lower --lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += len(y)
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * len(y)
        fields = {"loss": round(loss_sum / total, 4), "train_acc": round(correct / total, 4)}
        if held_out is not None:
            fields["eval_acc"] = round(_accuracy(module, held_out, batch_size, device, accuracy), 4)
        log.info(f"epoch {epoch + 1}/{epochs}", **fields)
    metrics = {"train_accuracy": _accuracy(module, train, batch_size, device, accuracy)}
    if held_out is not None:
        metrics["eval_accuracy"] = _accuracy(module, held_out, batch_size, device, accuracy)
    return module, metrics


def _load_for(
    module: torch.nn.Module, arch: str, spec: dict[str, Any], seed: int, where: str
) -> TensorData:
    """A data option loaded and checked against the model, before any training step."""
    from mergecli.data import load_data
    from mergecli.data.model_check import DataUse, check_against_model
    from mergecli.data.sources import describe_source
    from mergecli.models import argument_names

    data = load_data(spec, seed=seed, where=where)
    use = DataUse(
        where, describe_source(spec), arch, None, argument_names(arch), "--arg {name}={value}"
    )
    check_against_model(data, module, use)
    return data


@torch.no_grad()
def _accuracy(module, data, batch_size, device, accuracy) -> float:
    module.eval()
    logits = torch.cat([module(x).cpu() for x, _ in data.batches(batch_size, device=device)])
    return accuracy(logits, data.y)


def save_trained(
    module: torch.nn.Module,
    path: Path,
    arch: str,
    args: dict[str, Any],
    metadata: dict[str, Any],
) -> None:
    """Write the checkpoint atomically with what `mergecli run` needs to rebuild the model
    (``arch`` and ``args``) and how it was trained (``metadata``, each key under ``mergecli.``)."""
    from mergecli.models.metadata import model_metadata

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    text_metadata = {"format": "pt", "mergecli.version": __version__, **model_metadata(arch, args)}
    for key, value in metadata.items():
        text_metadata[f"mergecli.{key}"] = value if isinstance(value, str) else json.dumps(value)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(path) as tmp:
            write_safetensors(tmp, tensors, text_metadata)
    except OSError as exc:
        raise MergeCliError(
            f"{path}: cannot write the checkpoint ({exc.strerror or exc}); choose another --out"
        ) from None

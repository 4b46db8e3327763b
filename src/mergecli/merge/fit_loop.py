"""The coefficient-fitting loop: frozen models, trainable logits, resumable state."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mergecli.data import TensorData
from mergecli.errors import MergeCliError
from mergecli.io.atomic import atomic_target
from mergecli.merge.coefficients import FlatParameters, Granularity, expand
from mergecli.runtime.log import Log

MergeFn = Callable[[Tensor, Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]  # (model outputs, example indices) -> loss


@dataclass
class FitConfig:
    granularity: Granularity
    optimizer: Literal["adam", "sgd"]
    lr: float
    epochs: int | None
    steps: int | None
    batch_size: int
    l2: float
    seed: int
    checkpoint_every: int
    autocast: torch.dtype | None = None


@dataclass
class FitOutcome:
    logits: Tensor
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False


@dataclass
class FitCheckpoint:
    """The fit's state on disk (``output.dir/.state/``), written atomically, tied to its inputs."""

    path: Path
    fingerprint: str

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") != self.fingerprint:
            raise MergeCliError(
                f"{self.path}: saved fit state belongs to a different recipe or different inputs; "
                "run with --resume never to start over (or delete the .state directory)"
            )
        return saved

    def save(self, payload: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(self.path) as tmp:
            torch.save({**payload, "fingerprint": self.fingerprint}, tmp)


class CoefficientStep:
    """One optimisation step of the logits: merge (one fused pass), forward, loss, update."""

    def __init__(
        self,
        module: nn.Module,
        flat: FlatParameters,
        buffers: dict[str, Tensor],
        merge: MergeFn,
        initial: Tensor,
        loss_fn: LossFn,
        config: FitConfig,
        device: torch.device,
    ) -> None:
        self.module, self.flat, self.buffers, self.merge = module, flat, buffers, merge
        self.loss_fn, self.config, self.device = loss_fn, config, device
        self.logits = initial.clone().to(device).requires_grad_(True)
        self.anchor = initial.to(device)
        self.optimizer = _optimizer(config, self.logits)
        self.tensor_index = flat.tensor_index() if config.granularity == "tensor" else None

    def loss(self, x: Tensor, index: Tensor) -> Tensor:
        merged = self.merge(
            self.flat.thetas, expand(self.logits, self.config.granularity, self.tensor_index)
        )
        autocast = self.config.autocast
        with torch.autocast(self.device.type, autocast or torch.float32, enabled=bool(autocast)):
            weights = {**self.flat.views(merged), **self.buffers}
            outputs = torch.func.functional_call(self.module, weights, (x,))
        loss = self.loss_fn(outputs.float(), index)
        if self.config.l2:
            loss = loss + self.config.l2 * (self.logits - self.anchor).pow(2).mean()
        return loss

    def update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def _optimizer(config: FitConfig, logits: Tensor) -> torch.optim.Optimizer:
    """Adam or SGD over the one logits tensor, fused (one kernel) where this torch supports it."""
    make = torch.optim.Adam if config.optimizer == "adam" else torch.optim.SGD
    options = (
        {"lr": config.lr} if config.optimizer == "adam" else {"lr": config.lr, "momentum": 0.9}
    )
    try:
        return make([logits], fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return make([logits], **options)


def fit_logits(
    module: nn.Module,
    flat: FlatParameters,
    buffers: dict[str, Tensor],
    merge: MergeFn,
    initial: Tensor,
    data: TensorData,
    loss_fn: LossFn,
    config: FitConfig,
    device: torch.device,
    log: Log,
    validate: Callable[[Tensor], dict[str, float]] | None = None,
    checkpoint: FitCheckpoint | None = None,
    should_stop: Callable[[int], bool] | None = None,
) -> FitOutcome:
    """Minimise ``loss_fn`` over the logits only; ``data.y`` holds example indices."""
    step_fn = CoefficientStep(module, flat, buffers, merge, initial, loss_fn, config, device)
    logits, optimizer = step_fn.logits, step_fn.optimizer

    per_epoch = math.ceil(len(data) / config.batch_size)
    epochs = config.epochs if config.epochs is not None else math.ceil(config.steps / per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    step, epoch, position, history, elapsed = 0, 0, 0, [], 0.0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        with torch.no_grad():
            logits.copy_(saved["logits"].to(device))
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["epoch_generator"])
        step, epoch, position = saved["step"], saved["epoch"], saved["position"]
        history, elapsed = saved["history"], saved["seconds"]
        log.info(f"fit: resuming from {checkpoint.path}", step=step, epoch=epoch + 1)

    def snapshot(epoch_generator: Tensor) -> dict[str, Any]:
        return {
            "logits": logits.detach().cpu().clone(),
            "optimizer": optimizer.state_dict(),
            "epoch_generator": epoch_generator,
            "step": step,
            "epoch": epoch,
            "position": position,
            "history": history,
            "seconds": elapsed + time.perf_counter() - started,
        }

    started = time.perf_counter()
    while epoch < epochs and (config.steps is None or step < config.steps):
        # The shuffle of an epoch is drawn from this state, so a resumed run replays it exactly.
        epoch_generator = generator.get_state()
        batches = data.batches(config.batch_size, shuffle=True, generator=generator, device=device)
        loss_sum, seen = 0.0, 0
        for i, (x, index) in enumerate(log.progress(batches, per_epoch, f"fit epoch {epoch + 1}")):
            if i < position:
                continue
            loss = step_fn.loss(x, index)
            if not torch.isfinite(loss):
                where = f"step {step + 1} (epoch {epoch + 1})"
                if checkpoint is not None:
                    checkpoint.save(snapshot(epoch_generator))
                    where += f"; the last good state is in {checkpoint.path}"
                raise MergeCliError(f"fit: the loss became {loss.item()} at {where}; lower fit.lr")
            step_fn.update(loss)
            step, position = step + 1, i + 1
            loss_sum, seen = loss_sum + loss.item() * len(index), seen + len(index)
            if checkpoint is not None and step % config.checkpoint_every == 0:
                checkpoint.save(snapshot(epoch_generator))
            if should_stop is not None and should_stop(step):
                if checkpoint is not None:
                    checkpoint.save(snapshot(epoch_generator))
                seconds = elapsed + time.perf_counter() - started
                return FitOutcome(logits.detach(), step, seconds, history, stopped=True)
            if config.steps is not None and step >= config.steps:
                break
        epoch, position = epoch + 1, 0
        record: dict[str, Any] = {"epoch": epoch, "step": step}
        if seen:
            record["train_loss"] = loss_sum / seen
        if validate is not None:
            record.update(validate(logits.detach()))
        history.append(record)
        log.info(f"fit epoch {epoch}/{epochs}", **{k: round(v, 4) for k, v in record.items()})
    seconds = elapsed + time.perf_counter() - started
    return FitOutcome(logits.detach(), step, seconds, history)

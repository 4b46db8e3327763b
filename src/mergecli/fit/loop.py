"""The coefficient-fitting loop: frozen models, trainable logits, resumable state."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mergecli.data import TensorData
from mergecli.errors import MergeCliError
from mergecli.fit.checkpointing import bind, enable_checkpointing
from mergecli.fit.coefficients import FlatParameters, Granularity, merged_weights
from mergecli.fit.sharded import ShardedStack
from mergecli.io.saved_state import StateFormat, join_optimizer, split_optimizer
from mergecli.models.forward import functional_logits, model_logits
from mergecli.runtime.distributed import World
from mergecli.runtime.distributed import current as current_world
from mergecli.runtime.log import Log
from mergecli.runtime.signals import STOP_SIGNALS

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
    checkpointing: bool = False  # recompute activations in the backward pass, layer by layer


@dataclass
class FitProblem:
    """What a fit optimises: logits that ``merge`` the frozen models' flat parameters, the merged
    module run on ``data`` and scored by ``loss_fn``. ``data.y`` holds example indices, so that
    a loss may look up labels or a teacher's predictions by example."""

    module: nn.Module
    flat: FlatParameters
    buffers: dict[str, Tensor]  # the module's tensors that are not merged (BatchNorm statistics)
    merge: MergeFn
    initial: Tensor  # the logits the fit starts from
    data: TensorData
    loss_fn: LossFn
    device: torch.device
    validate: Callable[[Tensor], dict[str, float]] | None = None  # after each epoch
    # The models held sharded over the ranks inside ``module`` (fit/sharded.py; ``flat`` is
    # then their layout alone).
    sharded: ShardedStack | None = None


@dataclass
class FitOutcome:
    logits: Tensor
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    stopped_by: int | None = None  # the signal that stopped the fit early, if one did
    epoch: int = 0  # epochs completed


# The fit state's ``__metadata__`` keys: its fingerprint, and its plain values as JSON.
FINGERPRINT_KEY = "mergecli.fit_fingerprint"
PLAIN_KEY = "mergecli.fit_state"
RESUME_HINT = "run with --resume never to start over (or delete the .state directory)"
FIT_STATE = StateFormat(
    FINGERPRINT_KEY, PLAIN_KEY, "fit state", "a different recipe or different inputs", RESUME_HINT
)


@dataclass
class FitCheckpoint:
    """The fit's state on disk (``output.dir/.state/``), written atomically, tied to its inputs.

    Safetensors (the tensors) with the plain values as JSON in its metadata, never a pickle:
    the output directory may be writable by others, and loading a pickle runs its code. The
    fingerprint is read from the header before any tensor, so another fit's state is refused
    unread.
    """

    path: Path
    fingerprint: str
    legacy: Path | None = None  # where earlier versions kept it, as a pickle: never loaded now

    def load(self) -> dict[str, Any] | None:
        return FIT_STATE.read(self.path, self.fingerprint, _from_saved)

    def save(self, payload: dict[str, Any]) -> None:
        FIT_STATE.write(self.path, self.fingerprint, *_to_saved(payload))


# The payload's tensors outside the optimizer; everything else in it is plain (JSON).
PAYLOAD_TENSORS = ("logits", "epoch_generator")


def _to_saved(payload: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a payload into tensors and JSON (the optimizer's tensors as ``split_optimizer``
    names them)."""
    tensors = {name: payload[name] for name in PAYLOAD_TENSORS}
    plain = {k: v for k, v in payload.items() if k not in PAYLOAD_TENSORS and k != "optimizer"}
    optimizer_tensors, plain["optimizer"] = split_optimizer(payload["optimizer"])
    return {**tensors, **optimizer_tensors}, plain


# What a resumed fit reads besides the tensors and the optimizer.
PLAIN_REQUIRED = ("step", "epoch", "position", "history", "seconds")


def _from_saved(plain: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """The payload ``_to_saved`` split, whole again."""
    lacking = [key for key in PLAIN_REQUIRED if key not in plain]
    if lacking:
        raise ValueError(f"it lacks {', '.join(lacking)}")
    saved = {**plain, **{name: tensors[name] for name in PAYLOAD_TENSORS}}
    saved["optimizer"] = join_optimizer(plain["optimizer"], tensors)
    return saved


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
        sharded: ShardedStack | None = None,
    ) -> None:
        self.module, self.flat, self.buffers, self.merge = module, flat, buffers, merge
        self.sharded = sharded
        self.loss_fn, self.config, self.device = loss_fn, config, device
        self.logits = initial.clone().to(device).requires_grad_(True)
        # The l2 pull's centre, kept only when there is a pull (it is one more coefficient-sized
        # buffer on the device).
        self.anchor = initial.to(device) if config.l2 else None
        self.optimizer = _optimizer(config, self.logits)
        self.group_index = flat.group_index(config.granularity)
        if sharded is not None:  # its parameters are computed from these logits at every call
            sharded.logits = self.logits
        if config.checkpointing:
            enable_checkpointing(module)
        self._bound: ExitStack | None = None

    @contextmanager
    def session(self) -> Iterator[None]:
        """Where one step's forward and backward run. With checkpointing the merged weights
        stay bound to the module until the backward is done: it recomputes each layer from the
        module's attributes, which outside ``functional_call`` would be the module's own."""
        with ExitStack() as stack:
            self._bound = stack
            try:
                yield
            finally:
                self._bound = None

    def loss(
        self, x: Tensor, index: Tensor, weight: float = 1.0, regularise: bool = True
    ) -> Tensor:
        """The loss of the batch ``x``; ``weight`` scales the task loss (a rank's share of the
        global batch), ``regularise`` adds the l2 pull (once per step, not once per rank)."""
        if self.sharded is not None:
            return self._with_l2(self._sharded_loss(x, index), weight, regularise)
        merged = merged_weights(
            self.flat, self.merge, self.logits, self.config.granularity, self.group_index
        )
        autocast = self.config.autocast
        with torch.autocast(self.device.type, autocast or torch.float32, enabled=bool(autocast)):
            weights = {**merged, **self.buffers}
            if self.config.checkpointing:
                if self._bound is None:
                    raise RuntimeError("a checkpointed step runs inside CoefficientStep.session()")
                self._bound.enter_context(bind(self.module, weights))
                outputs = model_logits(self.module, x)
            else:
                outputs = functional_logits(self.module, weights, x)
        return self._with_l2(self.loss_fn(outputs.float(), index), weight, regularise)

    def _sharded_loss(self, x: Tensor, index: Tensor) -> Tensor:
        """The task loss through the sharded module, which merges its parameters block by
        block as FSDP gathers each block's stacks."""
        autocast = self.config.autocast
        with torch.autocast(self.device.type, autocast or torch.float32, enabled=bool(autocast)):
            if not len(index):  # this rank's share is empty, but FSDP needs it in every call
                return self.sharded.idle_loss()
            outputs = model_logits(self.module, x)
        return self.loss_fn(outputs.float(), index)

    def _with_l2(self, loss: Tensor, weight: float, regularise: bool) -> Tensor:
        if weight != 1.0:
            loss = loss * weight
        if self.config.l2 and regularise:
            loss = loss + self.config.l2 * (self.logits - self.anchor).pow(2).mean()
        return loss

    def update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def parallel_step(
        self,
        x: Tensor,
        index: Tensor,
        examples: int,
        world: World,
        ask_stop: Callable[[], int | None],
    ) -> tuple[float, int | None]:
        """One data-parallel step over a global batch of ``examples``, of which ``x`` is this
        rank's share. Returns the global mean loss and the signal to stop for after this step.

        Each rank's loss is (sum over its examples) / examples, so the sum of the ranks'
        gradients, all-reduced as DDP does, is the gradient of the mean over the whole batch:
        the same step as one process taking the whole batch, whatever the world size. Ranks
        decide to stop together (a signal may reach only some of them), at the loss exchange;
        a single process asks after its update, so a signal stops it after the step it is in.
        """
        with self.session():
            return self._parallel_step(x, index, examples, world, ask_stop)

    def _parallel_step(
        self,
        x: Tensor,
        index: Tensor,
        examples: int,
        world: World,
        ask_stop: Callable[[], int | None],
    ) -> tuple[float, int | None]:
        if not world.distributed:
            loss = self.loss(x, index)
            total = loss.item()
            if not math.isfinite(total):
                return total, None
            self.update(loss)
            return total, ask_stop() or None
        self.optimizer.zero_grad(set_to_none=True)
        if len(index) or self.sharded is not None:
            loss = self.loss(x, index, weight=len(index) / examples, regularise=world.is_main)
        else:  # fewer examples than ranks: this rank adds nothing but must still take part
            loss = torch.zeros((), device=self.device)
        # One small exchange: the loss, and which stop signals reached which ranks.
        stats = torch.zeros(1 + len(STOP_SIGNALS), dtype=torch.float64, device=self.device)
        stats[0] = loss.detach()
        stop = ask_stop()
        if stop is not None:
            stats[1 + STOP_SIGNALS.index(stop)] = 1
        stats = world.all_reduce_(stats).cpu()
        total = float(stats[0])
        if not math.isfinite(total):  # every rank sees it: all stop with the same error
            return total, None
        if loss.requires_grad:
            loss.backward()
        if self.logits.grad is None:
            self.logits.grad = torch.zeros_like(self.logits)
        world.all_reduce_(self.logits.grad)
        self.optimizer.step()
        # The same choice on every rank: the first of the signals any rank received.
        signalled = [s for s, n in zip(STOP_SIGNALS, stats[1:].tolist(), strict=True) if n]
        return total, (signalled[0] if signalled else None)


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


def _load(checkpoint: FitCheckpoint, log: Log) -> dict[str, Any] | None:
    if checkpoint.legacy is not None and checkpoint.legacy.exists():
        # Not refused: it cannot be read safely whatever the user does, so a refusal would only
        # add a rerun with --resume never (and fail every requeue of a SLURM job).
        log.warn(
            f"fit: ignoring {checkpoint.legacy}, a fit state from an older mergecli (a pickle, "
            "which could run code if loaded); the fit starts over"
        )
    return checkpoint.load()


def _restore(
    checkpoint: FitCheckpoint,
    saved: dict[str, Any],
    logits: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """Put the saved logits, optimizer and shuffle state back; a state that does not fit this
    fit (edited, or from a mergecli that saved something else) is a user error, not exit 70."""
    try:
        with torch.no_grad():
            logits.copy_(saved["logits"].to(logits.device))
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["epoch_generator"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise MergeCliError(
            f"{checkpoint.path}: the saved fit state does not fit this fit "
            f"({' '.join(str(exc).split())}); {RESUME_HINT}"
        ) from None


def fit_logits(
    problem: FitProblem,
    config: FitConfig,
    log: Log,
    checkpoint: FitCheckpoint | None = None,
    should_stop: Callable[[int], int | None] | None = None,
    world: World | None = None,
    name: str = "fit",
) -> FitOutcome:
    """Minimise the problem's loss over the logits only.

    ``name`` starts the fit's log lines: ``fit stage 2/3`` for a stage of a chain.

    ``should_stop(step)`` is asked after every step and returns the signal number to stop for
    (None: go on); the fit then saves its state and returns early. With several ranks every
    rank draws the same shuffle and takes its share of each batch; rank 0 alone saves.
    """
    world = world or current_world()
    data, device, validate = problem.data, problem.device, problem.validate
    step_fn = CoefficientStep(
        problem.module, problem.flat, problem.buffers, problem.merge, problem.initial,
        problem.loss_fn, config, device, problem.sharded,
    )  # fmt: skip
    logits, optimizer = step_fn.logits, step_fn.optimizer

    per_epoch = math.ceil(len(data) / config.batch_size)
    epochs = config.epochs if config.epochs is not None else math.ceil(config.steps / per_epoch)
    total_steps = config.steps if config.steps is not None else epochs * per_epoch
    part = (world.rank, world.size) if world.distributed else None
    generator = torch.Generator().manual_seed(config.seed)
    step, epoch, position, history, elapsed = 0, 0, 0, [], 0.0
    loss_sum, seen = 0.0, 0
    saved = _load(checkpoint, log) if checkpoint is not None else None
    if saved is not None:
        _restore(checkpoint, saved, logits, optimizer, generator)
        step, epoch, position = saved["step"], saved["epoch"], saved["position"]
        history, elapsed = saved["history"], saved["seconds"]
        loss_sum, seen = saved.get("loss_sum", 0.0), saved.get("seen", 0)
        if saved.get("finished"):
            log.info(f"{name}: already finished in an earlier run ({checkpoint.path})", steps=step)
        else:
            log.info(f"{name}: resuming from {checkpoint.path}", step=step, epoch=epoch + 1)

    def save(epoch_generator: Tensor, finished: bool = False) -> None:
        if checkpoint is None or not world.is_main:
            return
        checkpoint.save(
            {
                "logits": logits.detach().cpu().clone(),
                "optimizer": optimizer.state_dict(),
                "epoch_generator": epoch_generator,
                "step": step,
                "epoch": epoch,
                "position": position,
                "history": history,
                "loss_sum": loss_sum,
                "seen": seen,
                "seconds": elapsed + time.perf_counter() - started,
                "finished": finished,
            }
        )

    def outcome(stopped_by: int | None = None) -> FitOutcome:
        seconds = elapsed + time.perf_counter() - started
        return FitOutcome(
            logits.detach(), step, seconds, history, stopped_by is not None, stopped_by, epoch
        )

    started = time.perf_counter()
    epoch_generator = generator.get_state()
    with log.meter(total_steps, epochs, name) as meter:
        while epoch < epochs and (config.steps is None or step < config.steps):
            # An epoch's shuffle is drawn from this state, so a resumed run replays it exactly.
            epoch_generator = generator.get_state()
            batches = data.batches(
                config.batch_size, shuffle=True, generator=generator, device=device, part=part
            )
            for i, (x, index) in enumerate(batches):
                if i < position:
                    continue
                examples = min(config.batch_size, len(data) - i * config.batch_size)

                def ask(done: int = step + 1) -> int | None:
                    return should_stop(done) if should_stop is not None else None

                loss, stop = step_fn.parallel_step(x, index, examples, world, ask)
                if not math.isfinite(loss):
                    where = f"step {step + 1} (epoch {epoch + 1})"
                    if checkpoint is not None:
                        save(epoch_generator)
                        where += f"; the last good state is in {checkpoint.path}"
                    raise MergeCliError(f"fit: the loss became {loss} at {where}; lower fit.lr")
                step, position = step + 1, i + 1
                loss_sum, seen = loss_sum + loss * examples, seen + examples
                meter.update(step, epoch + 1, loss, examples)
                if stop is not None:
                    save(epoch_generator)
                    return outcome(stop)
                if checkpoint is not None and step % config.checkpoint_every == 0:
                    save(epoch_generator)
                if config.steps is not None and step >= config.steps:
                    break
            epoch, position = epoch + 1, 0
            record: dict[str, Any] = {"epoch": epoch, "step": step}
            if seen:
                record["train_loss"] = loss_sum / seen
            loss_sum, seen = 0.0, 0
            if validate is not None:
                record.update(validate(logits.detach()))
            history.append(record)
            rounded = {k: round(v, 4) for k, v in record.items()}
            log.info(f"{name} epoch {epoch}/{epochs}", **rounded)
    if saved is None or not saved.get("finished"):
        # A run stopped in a later step resumes after the fit instead of redoing its tail.
        save(epoch_generator, finished=True)
    return outcome()

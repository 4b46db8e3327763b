"""`mergecli train`: make real checkpoints to merge (a plain supervised loop, kept small)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergecli import __version__
from mergecli.errors import MergeCliError, RecipeError
from mergecli.io.atomic import atomic_target
from mergecli.io.safetensors_format import write_safetensors
from mergecli.models.forward import model_logits
from mergecli.runtime.log import Log
from mergecli.runtime.signals import STOP
from mergecli.train_regime import (
    Regime,
    autocast_dtype,
    cpu_notice,
    lr_at,
    make_optimizer,
    training_loss,
    warmup_steps,
)
from mergecli.train_state import RESUME_HINT, TrainCheckpoint

if TYPE_CHECKING:
    from mergecli.data import TensorData


DEFAULT_ARCH = "mlp"
INIT_FIX = "its metadata names no architecture: give the --arch and --arg it was trained with"


def model_for_init(
    init: Path, arch: str | None, args: dict[str, Any]
) -> tuple[str, dict[str, Any], str]:
    """The architecture a fine-tune starts from: the one the --init checkpoint's metadata names,
    and what to change if its tensors do not fit that model after all.

    --arch and --arg may repeat it or add arguments it does not set, never contradict it (a
    usage error). Metadata that names user code is taken only when --arch names the same code:
    a file never chooses what to import.
    """
    from mergecli.io import read_metadata
    from mergecli.models.metadata import ARCH_KEY, metadata_args

    metadata = read_metadata(init)
    named = metadata.get(ARCH_KEY)
    if named is None:
        return arch or DEFAULT_ARCH, args, INIT_FIX
    if arch is None and ":" in named:
        saved = json.dumps(metadata_args(metadata, f"--init {init}", named))
        raise RecipeError(
            [
                f"--init {init}: its metadata names user code ({json.dumps(named)}), which only "
                f"--arch may import; if you trust that code, add --arch {named} (its arguments "
                f"{saved if len(saved) <= 200 else '{...}'} are read from the checkpoint)"
            ]
        )
    if arch is not None and arch.strip() != named:
        raise RecipeError(
            [
                f"--arch {arch}: the --init checkpoint {init} is a {json.dumps(named)} model "
                f"(its metadata); leave --arch out to fine-tune it as that"
            ]
        )
    saved = metadata_args(metadata, f"--init {init}", named)
    for key, value in args.items():
        if key in saved and saved[key] != value:
            raise RecipeError(
                [
                    f"--arg {key}={_shown(value)}: the --init checkpoint {init} has "
                    f"{key}={_shown(saved[key])} (its metadata); leave --arg {key} out"
                ]
            )
    added = [f"--arg {key}={_shown(value)}" for key, value in args.items() if key not in saved]
    fix = (
        f"{', '.join(added)} change{'s' if len(added) == 1 else ''} the model its metadata "
        f"names; leave {'it' if len(added) == 1 else 'them'} out"
        if added
        else "its metadata does not describe its tensors; re-export it, or start from another"
    )
    return named, {**saved, **args}, fix


def _shown(value: Any) -> str:
    """A value as it would be typed after --arg key= (YAML/JSON scalars)."""
    return json.dumps(value) if not isinstance(value, str) else value


def cli_terms(exc: MergeCliError) -> MergeCliError:
    """A model-building error in the words of the train command: the recipe's ``model.arch``
    and ``model.args.KEY`` are ``--arch`` and ``--arg KEY`` there."""
    text = re.sub(r"model\.args\.(\w+)", r"--arg \1", str(exc))
    text = text.replace("model.args", "--arg").replace("model.arch", "--arch")
    exc.args = (text,)
    return exc


@dataclass
class Progress:
    """Where a training is: epochs done, batches done in the current one, and that epoch's
    running sums (for its log line)."""

    epoch: int = 0
    position: int = 0
    total: int = 0
    correct: int = 0
    loss_sum: float = 0.0


def train_model(
    arch: str,
    args: dict[str, Any],
    train_spec: dict[str, Any],
    eval_spec: dict[str, Any] | None,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    regime: Regime,
    device: torch.device,
    log: Log,
    init: Path | None = None,
    init_fix: str = INIT_FIX,
    checkpoint: TrainCheckpoint | None = None,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train ``arch(**args)`` with cross-entropy (label-smoothed by ``regime``); return the
    module and its final accuracies.

    With ``init``, training starts from that checkpoint's weights: a fine-tune, the kind of
    model that task arithmetic, TIES and DARE merge (``init_fix``: what to change if it does
    not fit). With ``checkpoint``, a state saved there is resumed, the state is saved after
    every epoch, and a stop signal (polled after every batch) saves it and raises ``Stopped``;
    the result is the same, bit for bit on one machine, as without the stop. Augmentation, where
    the data asks for it, is drawn in ``batches`` from the shuffle's generator, which the state
    saves as the epoch started: a resumed epoch redraws it.
    """
    from mergecli.evaluate.metrics import accuracy
    from mergecli.io import load_state_dict
    from mergecli.models import build_model, load_into_model

    torch.manual_seed(seed)
    try:
        module = build_model(arch, args)
    except MergeCliError as exc:
        raise cli_terms(exc) from None
    if init is not None:
        load_into_model(module, load_state_dict(init), f"--init {init}", fix=init_fix)
    module = module.to(device)
    train = _load_for(module, arch, train_spec, seed, "--data")
    held_out = _load_for(module, arch, eval_spec, seed, "--eval-data") if eval_spec else None
    if train_spec.get("partition") is not None or train_spec.get("class_fractions") is not None:
        log.info(_share_line(train_spec, train.y))
    # Page-locked, so each batch's copy to the GPU overlaps the step before (no-op on the CPU).
    train = train.pin_memory() if device.type == "cuda" else train
    opt = make_optimizer(module, regime)
    amp = autocast_dtype(regime.precision, device)
    notice = cpu_notice(regime.precision, device)
    if notice:
        log.info(notice)
    # fp16 needs its loss scaled so small gradients do not flush to zero; bf16 does not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    per_epoch = math.ceil(len(train) / batch_size)
    total_steps, warmup = epochs * per_epoch, warmup_steps(regime, epochs, per_epoch)
    shuffle = torch.Generator().manual_seed(seed)
    at = Progress()
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        at = _restore(checkpoint, saved, module, opt, scaler, shuffle, device)
        log.info(f"train: resuming from {checkpoint.path}", epoch=at.epoch + 1, batch=at.position)
    epoch_start = shuffle.get_state()

    def save() -> Path | None:
        """The state now; mid-epoch, the shuffle as the epoch drew it, so a resume redraws it."""
        if checkpoint is None:
            return None
        checkpoint.save(
            {
                "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
                "optimizer": opt.state_dict(),
                "shuffle_rng": epoch_start if at.position else shuffle.get_state(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                **asdict(at),
            }
        )
        return checkpoint.path

    def stop_if_signalled(where: str) -> None:
        signum = STOP.pending()
        if signum is not None:
            raise STOP.stopping(signum, where, save())

    # A signal stops training between batches, after the state is saved, never inside a step.
    with STOP.deferred():
        while at.epoch < epochs:
            epoch_start = shuffle.get_state()
            module.train()
            batches = train.batches(batch_size, shuffle=True, generator=shuffle, device=device)
            for i, (x, y) in enumerate(batches):
                if i < at.position:
                    continue  # done before the resume: the same shuffle, skipped
                lr = lr_at(regime, at.epoch * per_epoch + i, total_steps, warmup)
                for group in opt.param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, amp or torch.float32, enabled=amp is not None):
                    logits = model_logits(module, x)
                loss = training_loss(logits, y, regime.label_smoothing)
                if not torch.isfinite(loss):
                    raise MergeCliError(
                        f"train: the loss became {loss.item()} in epoch {at.epoch + 1}; lower --lr"
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                at.position = i + 1
                at.total += len(y)
                at.correct += (logits.argmax(1) == y).sum().item()
                at.loss_sum += loss.item() * len(y)
                stop_if_signalled(
                    f"after batch {at.position}/{per_epoch} of epoch {at.epoch + 1}/{epochs}"
                )
            fields = {
                "loss": round(at.loss_sum / at.total, 4),
                "train_acc": round(at.correct / at.total, 4),
            }
            if held_out is not None:
                fields["eval_acc"] = round(
                    _accuracy(module, held_out, batch_size, device, accuracy), 4
                )
            if regime.schedule != "constant" or warmup:
                fields["lr"] = float(f"{opt.param_groups[0]['lr']:.4g}")  # its last step's
            log.info(f"epoch {at.epoch + 1}/{epochs}", **fields)
            at = Progress(epoch=at.epoch + 1)
            stop_if_signalled(f"after epoch {at.epoch}/{epochs}")
            if at.epoch < epochs:
                save()  # a killed run (no signal) resumes from the last finished epoch
        metrics = {"train_accuracy": _accuracy(module, train, batch_size, device, accuracy)}
        if held_out is not None:
            metrics["eval_accuracy"] = _accuracy(module, held_out, batch_size, device, accuracy)
    return module, metrics


def _share_line(spec: dict[str, Any], labels: torch.Tensor) -> str:
    """What a partition or class_fractions kept: its examples per label (a Dirichlet part's or
    a class-biased set's skew at a glance)."""
    from mergecli.data.partition import describe_partition

    present, counts = torch.unique(labels, return_counts=True)
    per_label = " ".join(f"{int(c)}:{int(n)}" for c, n in zip(present, counts, strict=True))
    shares = []
    if spec.get("partition") is not None:
        shares.append(f"partition {describe_partition(spec['partition'])}")
    if spec.get("class_fractions") is not None:
        fractions = ",".join(f"{k}={v:g}" for k, v in spec["class_fractions"].items())
        shares.append(f"class_fractions {fractions}")
    return (
        f"train: --data {' and '.join(shares)} keeps {len(labels)} examples "
        f"(label:count {per_label})"
    )


def _restore(
    checkpoint: TrainCheckpoint,
    saved: dict[str, Any],
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    shuffle: torch.Generator,
    device: torch.device,
) -> Progress:
    """Model, optimizer, loss scaler, generators and position as saved; a state that does not
    fit this training (edited, or written by another version) is a user error, not exit 70."""
    try:
        module.load_state_dict(saved["model"], strict=True)
        opt.load_state_dict(saved["optimizer"])
        if scaler.is_enabled():
            scaler.load_state_dict(saved["scaler"])
        shuffle.set_state(saved["shuffle_rng"])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        return Progress(
            **{k: saved[k] for k in ("epoch", "position", "total", "correct", "loss_sum")}
        )
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise MergeCliError(
            f"{checkpoint.path}: the saved training state does not fit this training "
            f"({' '.join(str(exc).split())}); {RESUME_HINT}"
        ) from None


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
    logits = torch.cat(
        [model_logits(module, x).cpu() for x, _ in data.batches(batch_size, device=device)]
    )
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

"""Image transforms written with torch ops (no torchvision): ``transform:`` steps, parsed and
checked, split into those run once at load (resize, center_crop: deterministic, on the stored
uint8 pixels, so their result is what stays in memory) and those run per batch (random_crop,
hflip, normalize, after the bytes become floats in [0, 1]).

The random steps run only in training passes of data with ``augment: true``; otherwise
random_crop (which keeps the image size) is the identity and hflip does nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mergecli.errors import MergeCliError

# Per-channel means and standard deviations of the training sets, of pixels in [0, 1].
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
}
AT_LOAD = ("resize", "center_crop")
RANDOM = ("random_crop", "hflip")
STEPS = (*AT_LOAD, *RANDOM, "normalize")
EXAMPLE = "[{resize: 36}, {center_crop: 32}, {normalize: cifar10}]"


@dataclass(frozen=True)
class Step:
    """One transform step: its name and checked arguments."""

    name: str
    size: tuple[int, int] | int | None = None  # resize: an int is the shorter side
    padding: int = 0  # random_crop
    p: float = 0.5  # hflip
    mean: tuple[float, ...] = ()  # normalize
    std: tuple[float, ...] = ()


def parse_transform(value: Any, where: str = "transform") -> tuple[Step, ...]:
    """The steps of a ``transform:`` list, checked: resize and center_crop first (they run at
    load), then random_crop, hflip and normalize in the order given (they run per batch)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise MergeCliError(f"{where}: expected a list of steps such as {EXAMPLE}, got {value!r}")
    steps = tuple(_step(item, f"{where}[{i}]") for i, item in enumerate(value))
    seen_batch_step = None
    for i, step in enumerate(steps):
        if step.name in AT_LOAD and seen_batch_step is not None:
            raise MergeCliError(
                f"{where}[{i}]: {step.name} after {seen_batch_step}; resize and center_crop come "
                "first (they run once, at load), then random_crop, hflip and normalize"
            )
        if step.name not in AT_LOAD:
            seen_batch_step = step.name
    if sum(step.name == "normalize" for step in steps) > 1:
        raise MergeCliError(f"{where}: more than one normalize step; keep one")
    return steps


def _step(item: Any, where: str) -> Step:
    """One ``{name: argument, ...}`` step."""
    if not isinstance(item, Mapping) or not item:
        raise MergeCliError(f"{where}: expected a step such as {{resize: 32}}, got {item!r}")
    names = [key for key in item if key in STEPS]
    if len(names) != 1:
        raise MergeCliError(
            f"{where}: {dict(item)!r} names {len(names)} steps; give one of "
            f"{', '.join(STEPS)} per list item"
        )
    name = names[0]
    extra = sorted(set(item) - {name, "padding"} if name == "random_crop" else set(item) - {name})
    if extra:
        raise MergeCliError(f"{where}: {name} takes no {', '.join(map(str, extra))}")
    arg = item[name]
    if name == "resize":
        return Step(name, size=_size(arg, f"{where}.resize", allow_int=True))
    if name in ("center_crop", "random_crop"):
        padding = item.get("padding", 0)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise MergeCliError(f"{where}.padding: expected a whole number >= 0, got {padding!r}")
        return Step(
            name, size=_pair(_size(arg, f"{where}.{name}", allow_int=True)), padding=padding
        )
    if name == "hflip":
        if isinstance(arg, bool) or not isinstance(arg, (int, float)) or not 0 <= arg <= 1:
            raise MergeCliError(f"{where}.hflip: expected a probability in [0, 1], got {arg!r}")
        return Step(name, p=float(arg))
    return _normalize(arg, f"{where}.normalize")


def _size(value: Any, where: str, allow_int: bool) -> tuple[int, int] | int:
    """A size: a positive int, or [height, width]."""
    if allow_int and isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise MergeCliError(f"{where}: expected a positive size or [height, width], got {value!r}")


def _pair(size: tuple[int, int] | int) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def _normalize(arg: Any, where: str) -> Step:
    """``normalize: cifar10`` (a preset) or ``normalize: {mean: [...], std: [...]}``."""
    if isinstance(arg, str):
        if arg not in PRESETS:
            raise MergeCliError(
                f"{where}: unknown preset {arg!r}; use one of {', '.join(PRESETS)} or "
                "{mean: [...], std: [...]}"
            )
        mean, std = PRESETS[arg]
        return Step("normalize", mean=mean, std=std)
    if not isinstance(arg, Mapping) or set(arg) != {"mean", "std"}:
        raise MergeCliError(
            f"{where}: expected a preset ({', '.join(PRESETS)}) or {{mean: [...], std: [...]}}, "
            f"got {arg!r}"
        )
    values = []
    for key in ("mean", "std"):
        seq = arg[key]
        if (
            not isinstance(seq, (list, tuple))
            or not seq
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seq)
        ):
            raise MergeCliError(f"{where}.{key}: expected a list of numbers, got {seq!r}")
        values.append(tuple(float(v) for v in seq))
    mean, std = values
    if len(mean) != len(std):
        raise MergeCliError(f"{where}: mean has {len(mean)} values, std {len(std)}; give one each")
    if any(not s > 0 for s in std):
        raise MergeCliError(f"{where}.std: every std must be positive, got {list(std)}")
    return Step("normalize", mean=mean, std=std)


def has_random_step(steps: Sequence[Step]) -> bool:
    return any(step.name in RANDOM for step in steps)


def load_steps(steps: Sequence[Step]) -> tuple[Step, ...]:
    """The steps run once at load."""
    return tuple(step for step in steps if step.name in AT_LOAD)


def batch_steps(steps: Sequence[Step]) -> tuple[Step, ...]:
    """The steps run on every batch."""
    return tuple(step for step in steps if step.name not in AT_LOAD)


def output_size(steps: Sequence[Step], height: int, width: int) -> tuple[int, int]:
    """The (height, width) that the load-time steps make of an image of that size."""
    for step in load_steps(steps):
        if step.name == "resize":
            height, width = resized_size(step.size, height, width)
        else:
            height, width = _pair(step.size)
    return height, width


def resized_size(size: Any, height: int, width: int) -> tuple[int, int]:
    """Torchvision's rule: an int is the shorter side (the longer scaled, rounded down)."""
    if not isinstance(size, int):
        return size
    if height <= width:
        return size, max(1, int(size * width / height))
    return max(1, int(size * height / width)), size


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with antialiasing (as PIL's and torchvision's) of (N, C, H, W) images;
    uint8 in, uint8 out (rounded), float in, float out."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    # Contiguous: on a permuted (channels-last) tensor interpolate is many times slower.
    out = F.interpolate(
        x.float().contiguous(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    if x.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out


def center_crop(x: Tensor, size: tuple[int, int], what: str, where: str) -> Tensor:
    """The centre (height, width) of (N, C, H, W) images (torchvision's rounding)."""
    height, width = x.shape[-2:]
    th, tw = size
    if th > height or tw > width:
        raise MergeCliError(
            f"{where}: center_crop {th}x{tw} is larger than {what} ({height}x{width}); resize "
            "first or crop less"
        )
    top, left = round((height - th) / 2), round((width - tw) / 2)
    return x[..., top : top + th, left : left + tw]


def apply_at_load(x: Tensor, steps: Sequence[Step], what: str, where: str) -> Tensor:
    """The load-time steps on images (N, C, H, W) of one size."""
    for step in load_steps(steps):
        if step.name == "resize":
            x = resize(x, resized_size(step.size, *x.shape[-2:]))
        else:
            x = center_crop(x, _pair(step.size), what, where)
    return x.contiguous()


def check_batch_steps(steps: Sequence[Step], channels: int, height: int, width: int, where: str):
    """Refuse per-batch steps that cannot apply to images of that shape: a random crop must keep
    the size (so unaugmented data has the shape the model takes), normalize needs one mean and
    std per channel."""
    for i, step in enumerate(steps):
        if step.name == "random_crop" and tuple(step.size) != (height, width):
            raise MergeCliError(
                f"{where}: random_crop {step.size[0]}x{step.size[1]} on images of {height}x"
                f"{width}; a random crop keeps the size (it shifts within `padding`): use "
                f"random_crop: {height if height == width else [height, width]}, with resize or "
                "center_crop before it to change the size"
            )
        if step.name == "normalize" and len(step.mean) != channels:
            raise MergeCliError(
                f"{where}: normalize has {len(step.mean)} means for images of {channels} "
                f"channel(s); give one mean and std per channel (step {i})"
            )


@dataclass(frozen=True)
class BatchTransform:
    """What turns stored pixels into a batch of model inputs: uint8 to float in [0, 1], then the
    per-batch steps in order; the random ones only in training passes of augmented data,
    drawn from the pass's generator (so a seeded run draws the same augmentations)."""

    steps: tuple[Step, ...]
    augment: bool = False

    def __call__(
        self,
        x: Tensor,
        train: bool = False,
        generator: torch.Generator | None = None,
        within: tuple[int, int] | None = None,
    ) -> Tensor:
        """``x`` as model inputs; ``within=(offset, size)``: x is rows offset.. of a batch of
        ``size``, whose augmentations are drawn whole (one rank's share of a batch)."""
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        randomize = train and self.augment
        rows = slice(within[0], within[0] + len(x)) if within else slice(None)
        drawn = within[1] if within else len(x)
        for step in self.steps:
            if step.name == "normalize":
                x = normalize(x, step.mean, step.std)
            elif randomize and step.name == "random_crop" and step.padding:
                offsets = torch.randint(0, 2 * step.padding + 1, (2, drawn), generator=generator)
                x = random_crop(x, step.padding, offsets[:, rows])
            elif randomize and step.name == "hflip":
                x = hflip(x, (torch.rand(drawn, generator=generator) < step.p)[rows])
        return x


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel of (N, C, H, W)."""
    shape = (1, len(mean), 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s


def random_crop(x: Tensor, padding: int, offsets: Tensor) -> Tensor:
    """Each image zero-padded by ``padding`` on every side and cropped back to its size at its
    (top, left) offset in 0..2·padding (``offsets``, (2, N)), in one gather."""
    n, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top, left = offsets.to(x.device)
    rows = (top[:, None] + torch.arange(height, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (left[:, None] + torch.arange(width, device=x.device))[:, None, :]  # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def hflip(x: Tensor, flip: Tensor) -> Tensor:
    """The images whose ``flip`` (N,) is true mirrored left-right."""
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)

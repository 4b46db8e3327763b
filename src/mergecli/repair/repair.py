"""REPAIR (Jordan et al., 2022): set every layer's per-channel output mean and std of the merged
network to the interpolation of the endpoints' and fold the correction into its weights."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mergecli.errors import MergeCliError
from mergecli.models.forward import call_model

StateDict = dict[str, Tensor]

# Layers whose output channels REPAIR rescales: the channel is dim -1 for Linear, 1 for conv.
REPAIRABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ChannelStats:
    """Per-channel running sums of a layer's outputs, reduced to mean and (population) std."""

    count: int = 0
    total: Tensor | None = None
    squares: Tensor | None = None

    def add(self, channels: Tensor) -> None:
        """Accumulate a (samples, channels) block; float64 so E[x^2] - E[x]^2 stays accurate."""
        channels = channels.detach().to(torch.float64)
        total, squares = channels.sum(0), channels.square().sum(0)
        if self.total is None:
            self.total, self.squares = total, squares
        else:
            self.total += total
            self.squares += squares
        self.count += channels.shape[0]

    def mean_std(self) -> tuple[Tensor, Tensor]:
        assert self.total is not None and self.squares is not None
        mean = self.total / self.count
        var = (self.squares / self.count - mean.square()).clamp_min(0)
        return mean, var.sqrt()


def channels_of(layer: nn.Module, output: Tensor) -> Tensor:
    """A layer's output as (samples, channels): conv over batch and positions, Linear over all
    leading dims (tokens too)."""
    if isinstance(layer, nn.Linear):
        return output.reshape(-1, output.shape[-1])
    return output.transpose(0, 1).reshape(output.shape[1], -1).T


def repairable_layers(module: nn.Module, include_head: bool = True) -> list[tuple[str, nn.Module]]:
    """The Linear/Conv layers REPAIR corrects: all of them, or all but the head.

    The head is the last one in ``named_modules()`` order: it produces the model's output (the
    classifier in every built-in and in the usual user model). The REPAIR notebooks correct it
    too (the logits' per-class mean and std are set to the endpoints' mix like any layer's);
    ``include_head=False`` leaves it as merged. Taking registration order rather than matching
    output sizes keeps the rule simple and robust when a hidden width happens to equal the
    number of classes.
    """
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, REPAIRABLE)]
    return layers if include_head else layers[:-1]


def head_layer(module: nn.Module) -> str | None:
    """The name of the layer `repairable_layers` takes for the head (None: there is none)."""
    layers = repairable_layers(module)
    return layers[-1][0] if layers else None


class _StopForward(Exception):
    """Raised from a hook once the measured layer has run: the rest of the forward is waste."""


@torch.no_grad()
def collect_stats(
    module: nn.Module,
    layers: dict[str, nn.Module],
    inputs: Iterable[Tensor],
    stop_after: str | None = None,
) -> tuple[dict[str, ChannelStats], dict[str, float]]:
    """Per-channel output statistics of ``layers`` over ``inputs``, and how often each ran per
    forward (keys in the order the layers first ran).

    ``stop_after`` ends each forward as soon as that layer has produced its output.
    """
    stats = {name: ChannelStats() for name in layers}
    calls: dict[str, int] = {}

    def hook_for(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(layer: nn.Module, _args: tuple, output: Tensor) -> None:
            stats[name].add(channels_of(layer, output))
            calls[name] = calls.get(name, 0) + 1
            if name == stop_after:
                raise _StopForward

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    module.eval()
    batches = 0
    try:
        for x in inputs:
            batches += 1
            with contextlib.suppress(_StopForward):
                call_model(module, x)
    finally:
        for handle in handles:
            handle.remove()
    return stats, {name: count / max(batches, 1) for name, count in calls.items()}


@torch.no_grad()
def fold_correction(
    layer: nn.Module, mean: Tensor, std: Tensor, target_mean: Tensor, target_std: Tensor, eps: float
) -> bool:
    """Fold ``y -> scale * (y - mean) + target_mean`` into the layer's weight and bias.

    scale = (target_std + eps) / (std + eps): the eps on both sides (as the paper's sqrt(var +
    eps) on both sides) makes the correction exactly the identity when the statistics already
    match, and keeps a channel that is dead in both the merged model and the target dead.
    Returns False when the layer has no bias, where only the scale can be folded.
    """
    weight = layer.weight
    scale = ((target_std + eps) / (std + eps)).to(weight.dtype)
    weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))
    if layer.bias is None:
        return False
    bias = layer.bias
    bias.copy_(scale * (bias - mean.to(bias.dtype)) + target_mean.to(bias.dtype))
    return True


@dataclass
class RepairResult:
    """What REPAIR changed: the corrected state dict and which layers it touched, and how."""

    state_dict: StateDict
    repaired: list[str] = field(default_factory=list)
    scale_only: list[str] = field(default_factory=list)  # bias-free layers: std fixed, mean not
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why
    targets: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # (mean*, std*)


def interpolate_stats(
    endpoint_stats: list[dict[str, ChannelStats]], weights: Tensor, name: str
) -> tuple[Tensor, Tensor]:
    """The paper's target: mean* = sum_k w_k mean_k and std* = sum_k w_k std_k."""
    means, stds = zip(*(stats[name].mean_std() for stats in endpoint_stats), strict=True)
    w = weights.to(torch.float64).cpu()
    return (
        torch.einsum("k,kc->c", w, torch.stack(means).cpu()),
        torch.einsum("k,kc->c", w, torch.stack(stds).cpu()),
    )


def repair(
    module: nn.Module,
    merged: StateDict,
    endpoints: list[StateDict],
    weights: Tensor,
    inputs: Callable[[], Iterable[Tensor]],
    eps: float = 1e-5,
    include_head: bool = True,
) -> RepairResult:
    """REPAIR (Jordan et al., 2022) of ``merged``, a merge of ``endpoints`` with ``weights``.

    ``endpoints`` must be in the merged model's basis (aligned), so that channel i means the
    same unit in every model. ``weights`` are normalised to sum 1. ``inputs()`` yields the same
    input batches each time it is called. Layers are corrected in the order they run and each
    one is measured after the corrections upstream of it, so every corrected layer ends with exactly
    the target statistics on these inputs. ``include_head``: correct the output layer too, as
    the paper's notebooks do (see `repairable_layers`).
    """
    from mergecli.models import load_into_model

    if (weights < 0).any() or weights.sum() <= 0:
        raise MergeCliError(
            "repair: REPAIR interpolates the endpoints' statistics, so the checkpoint weights "
            f"must be >= 0 with a positive sum (got {weights.tolist()})"
        )
    weights = weights / weights.sum()
    candidates = dict(repairable_layers(module, include_head))
    result = RepairResult(state_dict=dict(merged))

    # The endpoints' statistics do not depend on the correction: one pass each, all layers.
    endpoint_stats = []
    calls: dict[str, float] = {}
    for index, tensors in enumerate(endpoints):
        load_into_model(module, tensors, f"repair: endpoint {index}")
        stats, calls = collect_stats(module, candidates, inputs())
        endpoint_stats.append(stats)
    # Correct in execution order (not registration order), so that every upstream correction
    # is in effect when a layer is measured.
    order = list(calls) + [name for name in candidates if name not in calls]
    layers = {}
    for name in order:
        # A layer not called through forward (its weight used functionally) has no output to
        # hook; one called several times per forward sees several distributions that a single
        # per-channel affine correction cannot match at once.
        if calls.get(name, 0) != 1:
            result.skipped[name] = f"called {calls.get(name, 0):g} times per forward, not once"
        elif f"{name}.weight" not in merged:
            result.skipped[name] = "its weight is not a state-dict entry of its own"
        else:
            layers[name] = candidates[name]

    load_into_model(module, merged, "repair: merged model")
    for name, layer in layers.items():
        target_mean, target_std = interpolate_stats(endpoint_stats, weights, name)
        stats, _ = collect_stats(module, {name: layer}, inputs(), stop_after=name)
        mean, std = stats[name].mean_std()
        device = layer.weight.device
        has_bias = fold_correction(
            layer, mean.to(device), std.to(device), target_mean.to(device),
            target_std.to(device), eps,
        )  # fmt: skip
        result.targets[name] = (target_mean, target_std)
        (result.repaired if has_bias else result.scale_only).append(name)
        for param in ("weight", "bias") if has_bias else ("weight",):
            key = f"{name}.{param}"
            original = merged[key]
            # copy=True: on the CPU `.to` would hand out the live parameter, which the next
            # load into this module would overwrite.
            value = getattr(layer, param).detach().to("cpu", original.dtype, copy=True)
            result.state_dict[key] = value
    return result

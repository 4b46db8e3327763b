"""Classification metrics computed from logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergecli.data import TensorData
from mergecli.runtime.distributed import current as current_world
from mergecli.state import StateDict


@torch.no_grad()
def collect_logits(
    module: nn.Module, state_dict: StateDict, data, batch_size: int, device: torch.device
) -> Tensor:
    """Logits of ``module`` with ``state_dict`` loaded, for all of ``data``, on the CPU.

    With several ranks each runs its contiguous share of ``data`` and the shares are gathered
    in order, so every rank gets all the logits and counts the same results."""
    module.load_state_dict(state_dict, strict=True)
    module.eval()
    world = current_world()
    start, end = world.part(len(data))
    shard = data if not world.distributed else TensorData(data.x[start:end], data.y[start:end])
    outputs = [module(x).float().cpu() for x, _ in shard.batches(batch_size, device=device)]
    if not outputs:  # fewer examples than ranks: an empty batch still gives the logits' width
        outputs = [module(data.x[:0].to(device)).float().cpu()]
    return world.gather_rows(torch.cat(outputs))


def accuracy(probabilities_or_logits: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose highest score is the label."""
    return (probabilities_or_logits.argmax(dim=1) == labels).float().mean().item()


def cross_entropy(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits)."""
    return F.cross_entropy(logits, labels).item()


def ensemble_logits(logits: list[Tensor]) -> Tensor:
    """Output ensemble: the log of the mean of the members' softmax distributions."""
    probabilities = torch.stack([F.softmax(z, dim=1) for z in logits]).mean(dim=0)
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()

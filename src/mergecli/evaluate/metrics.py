"""Classification metrics computed from logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergecli.state import StateDict


@torch.no_grad()
def collect_logits(
    module: nn.Module, state_dict: StateDict, data, batch_size: int, device: torch.device
) -> Tensor:
    """Logits of ``module`` with ``state_dict`` loaded, for all of ``data``, on the CPU."""
    module.load_state_dict(state_dict, strict=True)
    module.eval()
    outputs = [module(x).float().cpu() for x, _ in data.batches(batch_size, device=device)]
    return torch.cat(outputs)


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

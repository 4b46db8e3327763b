"""Classification metrics computed from logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergecli.models.forward import model_logits
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
    shard = data if not world.distributed else data.take(slice(start, end))
    outputs = [
        model_logits(module, x).float().cpu() for x, _ in shard.batches(batch_size, device=device)
    ]
    if not outputs:  # fewer examples than ranks: an empty batch still gives the logits' width
        outputs = [model_logits(module, data.inputs(slice(0, 0)).to(device)).float().cpu()]
    return world.gather_rows(torch.cat(outputs))


def accuracy(probabilities_or_logits: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose highest score is the label."""
    return (probabilities_or_logits.argmax(dim=1) == labels).float().mean().item()


def expected_accuracy(scores: Tensor, labels: Tensor) -> float:
    """Accuracy with ties broken at random, in expectation: an example whose highest score k
    classes share counts 1/k if the label is one of them (argmax would always pick the first;
    saturated softmax ensembles tie exactly)."""
    top = scores == scores.max(dim=1, keepdim=True).values
    hits = top.gather(1, labels.long().unsqueeze(1)).squeeze(1).float()
    return (hits / top.sum(dim=1)).mean().item()


def cross_entropy(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits)."""
    return F.cross_entropy(logits, labels).item()


def ensemble_logits(logits: list[Tensor]) -> Tensor:
    """Output ensemble: the log of the mean of the members' softmax distributions."""
    probabilities = torch.stack([F.softmax(z, dim=1) for z in logits]).mean(dim=0)
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()


def logit_ensemble(logits: list[Tensor]) -> Tensor:
    """Logit ensemble: the mean of the members' logits."""
    return torch.stack(logits).mean(dim=0)


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE (Guo et al., 2017): sum over confidence bins of |accuracy - confidence| x bin share."""
    confidence, predicted = F.softmax(logits.float(), dim=1).max(dim=1)
    correct = (predicted == labels).float()
    # Bins (i/B, (i+1)/B]; a confidence of exactly 0 cannot occur with softmax.
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    # Per bin, n_b/N x |acc_b - conf_b| = |sum over the bin of (correct - confidence)| / N.
    gap = torch.zeros(bins).index_add_(0, index, correct - confidence).abs()
    return float(gap.sum() / max(1, len(labels)))


def per_class_accuracy(logits: Tensor, labels: Tensor) -> dict[int, float]:
    """Accuracy on the examples of each class present in ``labels``."""
    correct = logits.argmax(dim=1) == labels
    return {
        int(c): float(correct[labels == c].float().mean()) for c in torch.unique(labels).tolist()
    }


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, object]:
    """The evaluate step's numbers for one model's logits."""
    return {
        "accuracy": accuracy(logits, labels),
        "loss": cross_entropy(logits, labels),
        "ece": expected_calibration_error(logits, labels),
        "per_class_accuracy": per_class_accuracy(logits, labels),
    }

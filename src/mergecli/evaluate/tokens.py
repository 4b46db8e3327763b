"""Next-token cross-entropy of causal language models, for the fit's loss and the evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def next_token_losses(
    logits: Tensor, ids: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The summed cross-entropy of predicting ``ids[:, t + 1]`` from ``logits[:, t]`` (N, L, V),
    and how many tokens were predicted. With a ``mask`` (1: a real token, 0: padding) a padded
    target is not predicted, as transformers does with labels of -100 where the mask is 0."""
    predicted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = ids[:, 1:].reshape(-1)
    losses = F.cross_entropy(predicted, targets, reduction="none")
    if mask is None:
        return losses.sum(), torch.tensor(targets.numel(), device=losses.device)
    keep = mask[:, 1:].reshape(-1).to(losses.dtype)
    return (losses * keep).sum(), keep.sum()


def causal_lm_loss(logits: Tensor, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy over the predicted tokens (a batch without any: 0)."""
    total, count = next_token_losses(logits, ids, mask)
    return total / count.clamp_min(1)

"""Output, logit and feature ensembles as Wang et al. (2024, arXiv 2411.09263) compare them.

Output ensemble: the mean of the members' softmax distributions. Logit ensemble: the mean of
their logits. Feature ensemble: the mean of their penultimate features (the input of the last
Linear layer, the head) through the first model's head, or through the mean of the heads (the
paper's code does both; with one head it is that model's classifier).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergecli.evaluate.metrics import ensemble_logits, logit_ensemble
from mergecli.state import StateDict

Head = tuple[Tensor, Tensor | None]

# Display names, in the order plots and tables list them.
OUTPUT, LOGIT = "output ensemble", "logit ensemble"
FEATURE_FIRST, FEATURE_AVERAGED = (
    "feature ensemble (first head)",
    "feature ensemble (averaged head)",
)
# Their `kind` in report rows.
KINDS = {OUTPUT: "output_ensemble", LOGIT: "logit_ensemble",
         FEATURE_FIRST: "feature_ensemble_first_head",
         FEATURE_AVERAGED: "feature_ensemble_averaged_head"}  # fmt: skip


def head_of(state_dict: StateDict, head_name: str) -> Head:
    """The head's weight and bias (None without one) in ``state_dict``."""
    prefix = f"{head_name}." if head_name else ""
    return state_dict[prefix + "weight"], state_dict.get(prefix + "bias")


def feature_ensemble(features: list[Tensor], heads: list[Head]) -> Tensor:
    """Mean features through the mean head: (mean_m f_m) (mean_h W_h)^T + mean_h b_h."""
    mean_features = torch.stack([f.float() for f in features]).mean(0)
    weight = torch.stack([w.float() for w, _ in heads]).mean(0)
    out = mean_features @ weight.T
    biases = [b for _, b in heads]
    if biases[0] is not None:
        out = out + torch.stack([b.float() for b in biases]).mean(0)
    return out


def ensembles(logits: list[Tensor], features: list[Tensor], heads: list[Head]) -> dict[str, Tensor]:
    """The four ensembles of the members' outputs, by display name."""
    return {
        OUTPUT: ensemble_logits(logits),
        LOGIT: logit_ensemble(logits),
        FEATURE_FIRST: feature_ensemble(features, heads[:1]),
        FEATURE_AVERAGED: feature_ensemble(features, heads),
    }

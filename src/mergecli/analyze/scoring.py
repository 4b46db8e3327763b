"""Running the recipe's model with given weights on the recipe's data: what analyses measure."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from mergecli.errors import MergeCliError
from mergecli.evaluate.metrics import accuracy, collect_logits, cross_entropy
from mergecli.models.batchnorm import batch_norms, batchnorm_buffers, reset_batchnorm_stats
from mergecli.state import MergeState, StateDict

Split = Literal["fit", "eval"]


@dataclass
class Scorer:
    """Logits, loss and accuracy of state dicts on the recipe's data splits, one module reused."""

    state: MergeState
    reset_bn: bool = False  # recompute BatchNorm statistics on data.fit before scoring
    bn_batches: int | None = 10
    module: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.module = self.state.build_module()
        has_bn = bool(batch_norms(self.module))
        self.reset_bn = self.reset_bn and has_bn and self.state.loaded.recipe.data.fit is not None

    @property
    def splits(self) -> list[Split]:
        return available_splits(self.state)

    def default_split(self, preferred: Split = "eval") -> Split:
        if preferred in self.splits:
            return preferred
        if not self.splits:
            raise MergeCliError(f"{self.state.loaded.source}: this analysis needs a `data:` split")
        return self.splits[0]

    @torch.no_grad()
    def logits(self, state_dict: StateDict, split: Split) -> Tensor:
        if self.reset_bn:
            # Interpolated weights carry no meaningful BN statistics of their own.
            self.module.load_state_dict(state_dict, strict=True)
            data = self.state.data("fit")
            batches = data.batches(self.state.batch_size("fit"), device=self.state.device)
            inputs = itertools.islice((x for x, _ in batches), self.bn_batches)
            reset_batchnorm_stats(self.module, inputs)
            state_dict = {**state_dict, **batchnorm_buffers(self.module)}
        data = self.state.data(split)
        batch_size = self.state.batch_size(split)
        return collect_logits(self.module, state_dict, data, batch_size, self.state.device)

    def labels(self, split: Split) -> Tensor:
        return self.state.data(split).y

    def score(self, state_dict: StateDict, split: Split) -> dict[str, float]:
        logits = self.logits(state_dict, split)
        labels = self.labels(split)
        return {"loss": cross_entropy(logits, labels), "accuracy": accuracy(logits, labels)}


def available_splits(state: MergeState) -> list[Split]:
    """The data splits the recipe has, fit first."""
    data = state.loaded.recipe.data
    return [s for s in ("fit", "eval") if getattr(data, s) is not None]


def interpolate(a: StateDict, b: StateDict, weight_b: float) -> StateDict:
    """(1 - w) a + w b for floating tensors; integer tensors (BN counters) from ``a``."""
    return {
        name: torch.lerp(t.float(), b[name].float(), weight_b).to(t.dtype)
        if t.is_floating_point()
        else t
        for name, t in a.items()
    }


def need_models(state: MergeState, kind: str, minimum: int = 2) -> None:
    """Analyses of merges need at least two models (the base does not count)."""
    if len(state.models) < minimum:
        raise MergeCliError(
            f"{state.loaded.source}: analyze {kind} needs at least {minimum} checkpoints to "
            f"merge, the recipe has {len(state.models)}"
        )

"""Running the recipe's model with given weights on the recipe's data: what analyses measure."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from mergecli.errors import MergeCliError
from mergecli.evaluate.metrics import collect_logits, cross_entropy, expected_accuracy
from mergecli.models.batchnorm import batch_norms, batchnorm_buffers, reset_batchnorm_stats
from mergecli.recipe.schema import DataSpec
from mergecli.runtime.distributed import current as current_world
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
        return self._run(state_dict, split)

    @torch.no_grad()
    def outputs(self, state_dict: StateDict, split: Split) -> tuple[Tensor, Tensor]:
        """The logits and the penultimate features (the input of the head, the last Linear)."""
        _, head = model_head(self.module)
        captured: list[Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].float()))
        try:
            logits = self._run(state_dict, split, hooked=captured)
        finally:
            hook.remove()
        return logits, current_world().gather_rows(torch.cat(captured).cpu())

    def _run(self, state_dict: StateDict, split: Split, hooked: list[Tensor] | None = None):
        if self.reset_bn:
            # Interpolated weights carry no meaningful BN statistics of their own.
            self.module.load_state_dict(state_dict, strict=True)
            data = self.state.data("fit")
            batches = data.batches(self.state.batch_size("fit"), device=self.state.device)
            inputs = itertools.islice((x for x, _ in batches), self.bn_batches)
            reset_batchnorm_stats(self.module, inputs)
            state_dict = {**state_dict, **batchnorm_buffers(self.module)}
            if hooked is not None:
                hooked.clear()  # the statistics pass ran the head too; keep the scored pass
        data = self.state.data(split)
        batch_size = self.state.batch_size(split)
        return collect_logits(self.module, state_dict, data, batch_size, self.state.device)

    def labels(self, split: Split) -> Tensor:
        return self.state.data(split).y

    def score(self, state_dict: StateDict, split: Split) -> dict[str, float]:
        logits = self.logits(state_dict, split)
        labels = self.labels(split)
        return {
            "loss": cross_entropy(logits, labels),
            "accuracy": expected_accuracy(logits, labels),
        }


def data_labels(state: MergeState) -> dict[str, str]:
    """What each of the recipe's data splits is, in a few words for plots ("MNIST train")."""
    data = state.loaded.recipe.data
    return {split: describe_data(getattr(data, split)) for split in available_splits(state)}


def describe_data(spec: DataSpec) -> str:
    """A data spec named as a reader knows it: the source and its split, then any subset."""
    if spec.source == "mnist":
        words = f"MNIST {spec.split or 'train'}"
    elif spec.source == "tensors":
        words = f"{Path(spec.path or '').name} {spec.split or ''}".strip()
    elif spec.source == "python":
        words = str(spec.factory)
    else:  # a directory or file of text, images or a saved dataset, by its name
        words = f"{Path(spec.root or spec.path or '').name} {spec.split or ''}".strip()
    if spec.classes is not None:
        words += f", classes {','.join(map(str, spec.classes))}"
    if spec.partition is not None:
        from mergecli.data.partition import describe_partition

        words += f", {describe_partition(spec.partition)}"
    if spec.fraction is not None:
        words += f", {spec.fraction:g} of it"
    return words


def model_head(module: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head: the module's last nn.Linear, with its name."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MergeCliError(
            f"this analysis needs a final nn.Linear layer (the head), and {type(module).__name__} "
            "has none"
        )
    return linears[-1]


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

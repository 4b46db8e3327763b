"""RegMean: every linear layer merged in closed form from its input Gram matrices (Jin et al.,
2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For a linear layer y = x W^T of each model i, with X_i the layer's inputs in model i over
data.fit, the merge minimises sum_i ||X_i W^T - X_i W_i^T||^2:

    W^T = (sum_i G_i)^{-1} sum_i G_i W_i^T,    G_i = X_i^T X_i,

with G_i's off-diagonal entries scaled by ``alpha`` (the paper's regularisation towards plain
averaging: alpha 0 is a per-input-weighted average, alpha 1 the exact least-squares solution).
Checkpoint weights lambda_i scale the G_i (all 1 is the paper). Only ``nn.Linear`` layers are
merged this way (convolutions are not); their biases and every other tensor are averaged, as in
the paper. Padded token positions (mask 0) are left out of the Gram matrices.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from pydantic import Field
from torch import Tensor, nn

from mergecli.data.batches import TokenBatch
from mergecli.errors import MergeCliError
from mergecli.merge.fisher import first_examples
from mergecli.models.forward import functional_logits
from mergecli.recipe.schema import StepParams
from mergecli.registry import step_method
from mergecli.state import MergeState, StateDict


class RegMeanParams(StepParams):
    # Scale of the Gram matrices' off-diagonal entries (the paper's alpha).
    alpha: float = Field(default=0.9, ge=0, le=1)
    # How many examples of data.fit (the first ones) give the Gram matrices.
    examples: int | None = Field(default=256, ge=1)
    batch_size: int | None = Field(default=None, ge=1)


@step_method("merge", "regmean", RegMeanParams, needs=("model", "data.fit"))
def regmean_step(state: MergeState, params: RegMeanParams) -> None:
    """RegMean (Jin et al., 2023): linear layers from input Gram matrices, the rest averaged."""
    module = state.build_module()
    data = first_examples(state, params.examples)
    batch_size = params.batch_size or state.batch_size("fit")
    models = [m.aligned_or_original for m in state.models]
    grams = [
        input_grams(module, weights, data.batches(batch_size, shuffle=False, device=state.device))
        for weights in models
    ]
    lambdas = state.model_weights("regmean")
    state.merged = regmean_merge(models, grams, lambdas, params.alpha)
    state.log.info(
        f"merge regmean: {len(grams[0])} linear layers from {len(data)} examples, "
        f"alpha {params.alpha}; the other tensors averaged"
    )
    state.report["merge"] = {
        "method": "regmean", "examples": len(data), "alpha": params.alpha,
        "linear_layers": len(grams[0]),
    }  # fmt: skip


@torch.no_grad()
def input_grams(
    module: nn.Module, weights: StateDict, batches: Iterable[tuple[Tensor | TokenBatch, Tensor]]
) -> dict[str, Tensor]:
    """X^T X / n (float64) of every ``nn.Linear``'s inputs with ``weights`` loaded, by the
    layer's weight name; rows are examples, or token positions that the mask keeps."""
    module.eval()
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    state = {n: t.to(next(module.parameters()).device) for n, t in weights.items()}
    for x, _ in batches:
        mask = x.mask if isinstance(x, TokenBatch) else None
        with _inputs_of(linears) as captured:
            functional_logits(module, state, x)
        for name, inputs in captured.items():
            rows = _rows(inputs, mask).double()
            key = f"{name}.weight"
            sums[key] = sums.get(key, 0) + rows.T @ rows
            counts[key] = counts.get(key, 0) + rows.shape[0]
    return {key: total / counts[key] for key, total in sums.items()}


def _rows(inputs: Tensor, mask: Tensor | None) -> Tensor:
    """A layer's inputs as (rows, features), without padded token positions."""
    if mask is not None and inputs.dim() >= 3 and inputs.shape[:2] == mask.shape:
        inputs = inputs[mask.bool()]
    return inputs.reshape(-1, inputs.shape[-1])


@contextmanager
def _inputs_of(linears: dict[str, nn.Module]):
    """Forward pre-hooks that keep each layer's input while the block runs (a layer called
    twice keeps both, one after the other)."""
    captured: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            old = captured.get(name)
            captured[name] = x if old is None else torch.cat([old.reshape(-1, x.shape[-1]), x])

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def regmean_weight(
    weights: Sequence[Tensor], grams: Sequence[Tensor], lambdas: Sequence[float], alpha: float
) -> Tensor:
    """W with W^T = (sum_i lambda_i G~_i)^{-1} sum_i lambda_i G~_i W_i^T, G~ = G with its
    off-diagonal entries times ``alpha``; solved in float64, not inverted."""
    a = torch.zeros_like(grams[0], dtype=torch.float64)
    b = torch.zeros(weights[0].shape[::-1], dtype=torch.float64, device=grams[0].device)
    for w, g, lam in zip(weights, grams, lambdas, strict=True):
        g = g.double()
        g = alpha * g + (1 - alpha) * torch.diag(g.diagonal())
        a += lam * g
        b += lam * g @ w.double().to(g.device).T
    # An input that is 0 on every example (a dead unit) leaves its row of A zero: any weight
    # fits the data there, so it takes the plain weighted average of the models'.
    dead = a.diagonal() <= 0
    if dead.any():
        total = sum(lambdas)
        mean = sum(lam * w.double().to(a.device) for lam, w in zip(lambdas, weights, strict=True))
        a[dead] = 0
        a[:, dead] = 0
        a[dead, dead] = 1
        b[dead] = (mean / total).T[dead]
    try:
        solution = torch.linalg.solve(a, b)
    except torch.linalg.LinAlgError:
        solution = torch.linalg.lstsq(a.cpu(), b.cpu()).solution.to(a.device)
    return solution.T


def regmean_merge(
    models: Sequence[StateDict],
    grams: Sequence[dict[str, Tensor]],
    lambdas: Sequence[float],
    alpha: float,
) -> StateDict:
    """Linear layers' weights by `regmean_weight`; every other floating tensor (biases too)
    averaged with the lambdas; integer tensors from the first model."""
    total = sum(lambdas)
    if total == 0:
        raise MergeCliError("merge regmean: checkpoint weights sum to 0")
    merged: StateDict = {}
    for name, first in models[0].items():
        if not first.is_floating_point():
            merged[name] = first
            continue
        tensors = [m[name] for m in models]
        if name in grams[0]:
            value = regmean_weight(tensors, [g[name] for g in grams], lambdas, alpha)
        else:
            value = sum(lam * t.double() for lam, t in zip(lambdas, tensors, strict=True)) / total
        merged[name] = value.to(first.dtype).cpu()
    return merged

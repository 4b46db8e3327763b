"""Fisher merging: each parameter averaged with the models' diagonal Fisher information as
weights (Matena & Raffel, 2022).

theta = sum_i lambda_i F_i theta_i / sum_i lambda_i F_i, per entry, where F_i is model i's
diagonal Fisher over examples x of data.fit:

    F_i = mean_x E_{y ~ p_i(y|x)} [ (d log p_i(y|x) / d theta)^2 ]

The paper computes the expectation over y exactly for classifiers (a sum over the classes,
weighted by the model's own probabilities); ``fisher: sampled`` draws one y per example from
p_i(y|x) instead, and ``fisher: empirical`` uses the dataset's label (the "empirical Fisher"
the paper contrasts with). Squared gradients are per example (torch.func.vmap), not of a batch.
Entries' Fisher is floored at ``fisher_floor`` (as the paper's code does), so an entry no model
is sensitive to is a plain weighted average; tensors without a gradient (BatchNorm buffers)
are averaged with the checkpoints' weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from mergecli.data.batches import TokenBatch
from mergecli.errors import MergeCliError
from mergecli.models.forward import functional_logits
from mergecli.recipe.schema import StepParams
from mergecli.registry import step_method
from mergecli.state import MergeState, StateDict

FisherKind = Literal["exact", "sampled", "empirical"]


class FisherParams(StepParams):
    # How many examples of data.fit (the first ones) estimate each model's Fisher.
    examples: int | None = Field(default=256, ge=1)
    fisher: FisherKind = "exact"
    # Lower bound of every Fisher entry: the weights of an entry no model is sensitive to.
    fisher_floor: float = Field(default=1e-6, gt=0)
    # Divide each model's Fisher by its L2 norm over all parameters (FusionBench's
    # normalize_fisher_weight), so no model dominates by scale alone; off in the paper.
    normalize: bool = False
    batch_size: int | None = Field(default=None, ge=1)


@step_method("merge", "fisher", FisherParams, needs=("model", "data.fit"))
def fisher_step(state: MergeState, params: FisherParams) -> None:
    """Fisher-weighted averaging (Matena & Raffel, 2022): per-entry weights from diagonal Fisher."""
    module = state.build_module()
    data = first_examples(state, params.examples)
    batch_size = params.batch_size or state.batch_size("fit")
    generator = torch.Generator(device="cpu").manual_seed(state.loaded.recipe.seed)
    models = [m.aligned_or_original for m in state.models]
    fishers = []
    for checkpoint, weights in zip(state.models, models, strict=True):
        batches = data.batches(batch_size, shuffle=False, device=state.device)
        fishers.append(
            diagonal_fisher(module, weights, batches, params.fisher, generator, checkpoint.name)
        )
    if params.normalize:
        fishers = [normalized(f) for f in fishers]
    lambdas = state.model_weights("fisher")
    state.merged = fisher_merge(models, fishers, lambdas, params.fisher_floor)
    state.log.info(
        f"merge fisher: {params.fisher} Fisher of {len(models)} models over {len(data)} examples"
    )
    state.report["merge"] = {"method": "fisher", "examples": len(data), "fisher": params.fisher}


def first_examples(state: MergeState, examples: int | None):
    """The first ``examples`` examples of data.fit (all when None or fewer)."""
    data = state.data("fit")
    if examples is None or examples >= len(data):
        return data
    return data.take(torch.arange(examples))


def diagonal_fisher(
    module: nn.Module,
    weights: StateDict,
    batches: Iterable[tuple[Tensor | TokenBatch, Tensor]],
    kind: FisherKind = "exact",
    generator: torch.Generator | None = None,
    name: str = "model",
) -> dict[str, Tensor]:
    """Mean over the examples of the squared per-example gradient of log p(y|x), per
    parameter of ``module`` (float32, on the module's device), with ``weights`` loaded."""
    module.eval()  # BatchNorm's running statistics, no dropout: the model as it predicts
    device = next(module.parameters()).device
    names = [n for n, _ in module.named_parameters()]
    missing = [n for n in names if n not in weights]
    if missing:
        raise MergeCliError(f"merge fisher: {name} has no tensor '{missing[0]}' of the model")
    params = {n: weights[n].to(device, torch.float32) for n in names}
    buffers = {n: b.to(device) for n, b in weights.items() if n not in params}

    def log_prob(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_logits(module, {**buffers, **p}, x.unsqueeze(0))
        # gather, not [0, y]: indexing by a batched tensor is data-dependent under vmap
        return logits.float().log_softmax(-1)[0].gather(0, y.reshape(1)).squeeze(0)

    # Per-example gradients, in chunks so a batch's gradients never sit whole in memory.
    per_example = torch.func.vmap(torch.func.grad(log_prob), in_dims=(None, 0, 0), chunk_size=16)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x, y in batches:
        if isinstance(x, TokenBatch):
            raise MergeCliError(
                "merge fisher: token (language-model) data is not supported; Fisher merging "
                "here is for classifiers"
            )
        with torch.no_grad():
            logits = functional_logits(module, {**buffers, **params}, x).float()
        if logits.dim() != 2:
            raise MergeCliError(
                f"merge fisher: the model's logits have shape {tuple(logits.shape)}; Fisher "
                "merging needs a classifier's (batch, classes)"
            )
        probs = logits.softmax(-1)
        if kind == "exact":
            for c in range(probs.shape[1]):
                labels = torch.full_like(y, c, device=x.device)
                grads = per_example(params, x, labels)
                for n, g in grads.items():  # sum_n p(c|x_n) g_n^2
                    total[n] += torch.einsum("b,b...->...", probs[:, c], g.square())
        else:
            if kind == "sampled":
                drawn = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
                labels = drawn.to(x.device)
            else:
                labels = y.to(x.device)
            for n, g in per_example(params, x, labels).items():
                total[n] += g.square().sum(0)
        count += x.shape[0]
    if count == 0:
        raise MergeCliError("merge fisher: data.fit has no examples")
    return {n: t / count for n, t in total.items()}


def normalized(fisher: dict[str, Tensor]) -> dict[str, Tensor]:
    """``fisher`` divided by its L2 norm over every parameter (FusionBench's normalisation)."""
    norm = torch.sqrt(sum(f.double().square().sum() for f in fisher.values()))
    if norm == 0:
        return fisher
    return {n: f / norm.to(f.dtype) for n, f in fisher.items()}


def fisher_merge(
    models: Sequence[StateDict],
    fishers: Sequence[dict[str, Tensor]],
    lambdas: Sequence[float],
    floor: float = 1e-6,
) -> StateDict:
    """theta = sum_i lambda_i F_i theta_i / sum_i lambda_i F_i per entry, F floored at
    ``floor``; tensors without Fisher averaged with the lambdas, integer tensors from the first
    model."""
    total = sum(lambdas)
    if total == 0:
        raise MergeCliError("merge fisher: checkpoint weights sum to 0")
    merged: StateDict = {}
    for name, first in models[0].items():
        if not first.is_floating_point():
            merged[name] = first
            continue
        thetas = [m[name].float().cpu() for m in models]
        if name in fishers[0]:
            scaled = [
                lam * f[name].cpu().clamp_min(floor)
                for lam, f in zip(lambdas, fishers, strict=True)
            ]
            value = sum(s * t for s, t in zip(scaled, thetas, strict=True)) / sum(scaled)
        else:
            value = sum(lam * t for lam, t in zip(lambdas, thetas, strict=True)) / total
        merged[name] = value.to(first.dtype)
    return merged

"""BatchNorm running statistics: find the layers, recompute their statistics, copy them out.

Shared by the `repair` step (reset_bn), the fit (which scores with reset statistics) and the
analyses (which reset them before scoring interpolated weights)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mergecli.errors import MergeCliError
from mergecli.models.forward import call_model

StateDict = dict[str, Tensor]

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batch_norms(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers of ``module`` that keep running statistics, in registration order."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def reset_batchnorm_stats(module: nn.Module, inputs: Iterable[Tensor]) -> tuple[int, int]:
    """Recompute every BatchNorm's running mean/var as the cumulative average over ``inputs``.

    With ``momentum=None`` PyTorch keeps the plain average of the per-batch statistics (mean
    and unbiased variance), so the result does not depend on a momentum schedule. Only the
    BatchNorm layers go to train mode: dropout and the like stay off so that the statistics
    are those the model sees at inference. Returns (BN layers, batches used).
    """
    norms = batch_norms(module)
    if not norms:
        return 0, 0
    module.eval()
    for _, norm in norms:
        norm.momentum = None
        norm.reset_running_stats()
        norm.train()
    used = 0
    for x in inputs:
        # A one-example batch has no variance (BatchNorm1d refuses it); it can only be the
        # ragged last batch, so dropping it loses nothing.
        if len(x) < 2:
            continue
        call_model(module, x)
        used += 1
    module.eval()
    if used == 0:
        raise MergeCliError(
            "repair reset_bn: data.fit gave no batch of 2 or more examples; BatchNorm "
            "statistics need more data"
        )
    return len(norms), used


def batchnorm_buffers(module: nn.Module) -> StateDict:
    """The running-statistics buffers of every BatchNorm, by state-dict key, on the CPU."""
    buffers: StateDict = {}
    for name, norm in batch_norms(module):
        prefix = f"{name}." if name else ""
        for buffer in BN_BUFFERS:
            value = getattr(norm, buffer, None)
            if value is not None:
                # A copy, not the live buffer, so later use of the module cannot change it.
                buffers[prefix + buffer] = value.detach().to("cpu", copy=True)
    return buffers

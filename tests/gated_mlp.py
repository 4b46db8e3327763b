"""A model for tests that signal a real `mergecli run` at a known moment.

`arch: "gated_mlp:build"` is the built-in MLP (same tensors, so any MLP checkpoint loads) whose
forward can stop and wait: with MERGECLI_TEST_GATE=fit:K it waits in the K-th fit step, with
MERGECLI_TEST_GATE=evaluate in the evaluate step's first batch. It writes its process id to
``$MERGECLI_TEST_GATE_DIR/reached[-RANK]`` and waits until ``release`` appears there, so the
test can signal the run (or one rank of it) exactly there. Once ``reached`` exists the gate
stays open: the rerun (or the requeued SLURM job) runs freely.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from mergecli.models.mlp import mlp


def build(**args) -> nn.Module:
    module = mlp(**args)
    rule = os.environ.get("MERGECLI_TEST_GATE")
    if rule:
        module.register_forward_pre_hook(_Gate(rule, Path(os.environ["MERGECLI_TEST_GATE_DIR"])))
    return module


class _Gate:
    def __init__(self, rule: str, folder: Path) -> None:
        where, _, count = rule.partition(":")
        self.where, self.count, self.folder, self.calls = where, int(count or 1), folder, 0
        env = os.environ
        several = int(env.get("WORLD_SIZE", env.get("SLURM_STEP_NUM_TASKS", "1"))) > 1
        rank = env.get("RANK", env.get("SLURM_PROCID"))
        self.reached = folder / (f"reached-{rank}" if several else "reached")

    def __call__(self, module: nn.Module, args: tuple) -> None:
        real_weights = isinstance(module.head.weight, nn.Parameter)
        if self.where == "fit":
            # The fit runs float32 batches through merged (non-Parameter) weights with autograd
            # on; the spec self-check runs in float64, evaluation without autograd.
            hit = torch.is_grad_enabled() and not real_weights and args[0].dtype == torch.float32
        else:
            # Two rows are the data check's probe (data/model_check.py), not an evaluation.
            hit = not torch.is_grad_enabled() and real_weights and args[0].shape[0] > 2
        if not hit:
            return
        self.calls += 1
        if self.calls != self.count or self.reached.exists():
            return
        partial = self.reached.with_suffix(".tmp")
        partial.write_text(str(os.getpid()))
        partial.rename(self.reached)  # whole or absent: the test reads the pid at once
        deadline = time.monotonic() + 120
        while not (self.folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

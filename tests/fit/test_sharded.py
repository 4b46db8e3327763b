"""`shard: fsdp`: the merged model computed from per-tensor stacks inside the module (what FSDP
shards) is the merged model of the flat buffer, with the same gradients; a fit over it saves
the same state as an unsharded fit, and each resumes the other. (Two real processes:
tests/e2e/test_fsdp.py.)"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from helpers import fit_config, fit_setup, small_fit, two_models
from mergecli.data import TensorData
from mergecli.fit.coefficients import (
    FlatParameters,
    joint_merge,
    logits_per_model,
    merged_weights,
    pairwise_merge,
    task_vector_merge,
)
from mergecli.fit.loop import FitCheckpoint, FitProblem, fit_logits
from mergecli.fit.sharded import ShardedStack, lockstep_shares
from mergecli.models import build_model
from mergecli.models.forward import functional_logits, model_logits
from mergecli.runtime.distributed import World
from mergecli.runtime.log import Log

CPU = torch.device("cpu")
MERGES = {
    "pairwise": (pairwise_merge, 2),
    "joint": (joint_merge, 3),
    "task_vectors": (task_vector_merge, 3),
}


def _mlp() -> torch.nn.Module:
    return build_model("mlp", {"depth": 3, "hidden": 16}).eval()


def _flat_and_sharded_outputs(module_of, sources, names, merge, granularity, logits, x):
    """Outputs and logits' gradients of the flat buffer's merge and of the sharded module's."""
    flat = FlatParameters.stack(sources, names, CPU)
    own_buffers = {n for n, _ in module_of().named_buffers()}
    buffers = {n: t for n, t in sources[0].items() if n in own_buffers}
    first = logits.clone().requires_grad_(True)
    weights = merged_weights(flat, merge, first, granularity, flat.group_index(granularity))
    expected = functional_logits(module_of(), {**weights, **buffers}, x)
    expected.float().square().mean().backward()
    sharded = ShardedStack(
        module_of(), sources, names, granularity, merge, torch.float32, CPU, World(), buffers
    )
    second = logits.clone().requires_grad_(True)
    with sharded.using(second):
        got = model_logits(sharded.module, x)
    got.float().square().mean().backward()
    return (expected, first.grad), (got, second.grad), sharded


@pytest.mark.parametrize("granularity", ["parameter", "row", "tensor", "model"])
@pytest.mark.parametrize("kind", list(MERGES))
def test_the_sharded_module_is_the_flat_merge_and_gradient(kind: str, granularity: str) -> None:
    merge, count = MERGES[kind]
    torch.manual_seed(0)
    sources = [_mlp().state_dict() for _ in range(count)]
    names = [n for n, _ in _mlp().named_parameters()]
    flat = FlatParameters.stack(sources, names, CPU)
    lead = () if kind == "pairwise" else (count - (kind == "task_vectors"),)
    logits = 0.3 * torch.randn(*lead, logits_per_model(granularity, flat))
    x = torch.randn(5, 1, 28, 28)
    (expected, expected_grad), (got, grad), _ = _flat_and_sharded_outputs(
        _mlp, sources, names, merge, granularity, logits, x
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-7)


def test_a_tied_llama_shares_one_stack_and_holds_nothing_else() -> None:
    """A Llama whose output layer is its embedding: one stack serves both, and the module
    keeps no copy of its own weights beside the stacks (what sharding would not divide)."""
    transformers = pytest.importorskip("transformers")
    from fixtures.hf_models import llama_config

    def llama():
        return transformers.LlamaForCausalLM(llama_config(transformers)).eval()

    torch.manual_seed(0)
    sources = [llama().state_dict() for _ in range(3)]
    names = [n for n, _ in llama().named_parameters()]
    flat = FlatParameters.stack(sources, names, CPU)
    deltas = 0.3 * torch.randn(2, logits_per_model("row", flat))
    ids = torch.randint(0, 32, (3, 8))
    (expected, expected_grad), (got, grad), sharded = _flat_and_sharded_outputs(
        llama, sources, names, task_vector_merge, "row", deltas, ids
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    module = sharded.module
    embedding = module.model.embed_tokens.parametrizations.weight[0]
    assert module.lm_head.parametrizations.weight[0] is embedding
    assert sum(p.numel() for p in module.parameters()) == 3 * sum(flat.sizes)
    assert all(b.numel() == 0 for n, b in module.named_buffers() if n.endswith(".original"))


def test_every_rank_takes_every_batch_and_the_shares_cover_it_once() -> None:
    """10 examples in batches of 4 over 3 ranks: the last batch (2 examples) leaves rank 2
    one rank idle, yet each rank counts 3 batches (a sharded forward needs every rank)."""
    data = TensorData(torch.arange(10.0)[:, None], torch.arange(10))
    seen, counts = [], []
    for rank in range(3):
        shares = list(lockstep_shares(data, 4, World(rank=rank, size=3), CPU))
        counts.append(len(shares))
        seen += [int(i) for share in shares if share is not None for i in share[1]]
    assert counts == [3, 3, 3] and sorted(seen) == list(range(10))
    lasts = [list(lockstep_shares(data, 4, World(rank=r, size=3), CPU))[-1] for r in range(3)]
    assert sum(last is None for last in lasts) == 1


def _sharded_fit(checkpoint=None, should_stop=None):
    """`small_fit`'s fit, over the sharded module."""
    _, _, _, data, loss_fn = fit_setup()
    module, models, names = two_models()
    config = fit_config()
    sharded = ShardedStack(
        module, models, names, config.granularity, pairwise_merge, torch.float32, CPU, World(), {}
    )
    sharded.idle_on(data, CPU)
    flat = FlatParameters.layout(models[0], names)
    initial = torch.zeros(logits_per_model(config.granularity, flat))
    problem = FitProblem(
        module, flat, {}, pairwise_merge, initial, data, loss_fn, CPU, None, sharded
    )
    return fit_logits(problem, config, Log("plain"), checkpoint, should_stop)


def test_a_sharded_fit_saves_the_state_an_unsharded_one_resumes(tmp_path: Path) -> None:
    uninterrupted = small_fit()
    sharded = _sharded_fit()
    torch.testing.assert_close(sharded.logits, uninterrupted.logits, rtol=0, atol=1e-5)
    # Stopped sharded, resumed unsharded, and the other way round.
    first = FitCheckpoint(tmp_path / "a.safetensors", "fingerprint")
    assert _sharded_fit(first, lambda step: signal.SIGTERM if step == 7 else None).steps == 7
    resumed = small_fit(checkpoint=first)
    second = FitCheckpoint(tmp_path / "b.safetensors", "fingerprint")
    assert small_fit(checkpoint=second, should_stop=lambda s: signal.SIGTERM if s == 7 else None)
    resumed_sharded = _sharded_fit(second)
    for outcome in (resumed, resumed_sharded):
        assert outcome.steps == uninterrupted.steps
        torch.testing.assert_close(outcome.logits, uninterrupted.logits, rtol=0, atol=1e-5)

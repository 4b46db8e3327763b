"""Hugging Face transformers aligned through their exported graphs, attention heads as units.

Each architecture is built small from its config, its groups permuted at random (heads,
query/key and value dimensions, grouped-query heads, the residual stream, MLP units), and
weight matching must recover the original weights exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergecli.align.activation_matching import match_activations
from mergecli.align.activations import pair_statistics
from mergecli.align.groups import AttentionSpec
from mergecli.align.heads import compose, is_head_permutation, match_heads, random_heads
from mergecli.align.permute import apply_permutations, check_spec, random_permutations
from mergecli.align.spec import derive_spec
from mergecli.align.weight_matching import weight_matching
from mergecli.data.batches import TokenBatch
from mergecli.models.forward import logits_from

transformers = pytest.importorskip("transformers")


def bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)  # output layer tied to the token embeddings


def llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def vit() -> torch.nn.Module:
    config = transformers.ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_labels=10,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


ARCHITECTURES = {
    # name: (factory, example input, attention layers, query heads, kv heads, q/k dims fixed)
    "bert": (bert, lambda: torch.randint(0, 64, (2, 8)), 2, 4, 4, False),
    "gpt2": (gpt2, lambda: torch.randint(0, 64, (2, 8)), 2, 4, 4, False),
    "llama": (llama, lambda: torch.randint(0, 64, (2, 8)), 2, 4, 2, True),
    "vit": (vit, lambda: torch.randn(2, 1, 28, 28), 2, 4, 4, False),
}


def _built(name: str):
    factory, example, *_ = ARCHITECTURES[name]
    torch.manual_seed(0)
    return factory().eval(), example()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_heads_are_units_and_weight_matching_recovers_a_random_permutation(name: str) -> None:
    model, x = _built(name)
    _, _, layers, heads, kv_heads, fixed = ARCHITECTURES[name]
    spec = derive_spec(model, x)
    assert spec.traced_with == "torch.export"
    assert spec.warnings == ()
    assert len(spec.attention) == layers
    for attention in spec.attention:
        assert (attention.heads, attention.kv_heads, attention.qk_dims_fixed) == (
            heads, kv_heads, fixed
        )  # fmt: skip
    check_spec(model, spec, x)
    # As save_pretrained writes it: a tied output layer under the embeddings' name only.
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or name != "gpt2"}
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    for attention in spec.attention:
        assert is_head_permutation(attention, perms)
        assert not torch.equal(perms[attention.query], torch.arange(len(perms[attention.query])))
    shuffled = apply_permutations(state, spec, perms)
    assert any(not torch.equal(shuffled[k], state[k]) for k in state)
    # The shuffled copy computes the same function (float32 here: 1e-5).
    with torch.no_grad():
        expected = logits_from(model(x))
        got = logits_from(torch.func.functional_call(model, shuffled, (x,)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    found = weight_matching(spec, state, shuffled)
    aligned = apply_permutations(shuffled, spec, found)
    assert all(torch.equal(aligned[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_eager_attention_is_followed_like_the_fused_one(name: str) -> None:
    """q @ k^T, scale, mask, softmax, @ v in plain ops (attn_implementation 'eager')."""
    factory, example, layers, heads, kv_heads, fixed = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = factory()
    model.config._attn_implementation = "eager"
    model.eval()
    x = example()
    spec = derive_spec(model, x)
    assert spec.warnings == ()
    assert [(a.heads, a.kv_heads, a.qk_dims_fixed) for a in spec.attention] == [
        (heads, kv_heads, fixed)
    ] * layers
    check_spec(model, spec, x)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or name != "gpt2"}
    shuffled = apply_permutations(state, spec, random_permutations(spec, torch.Generator()))
    aligned = apply_permutations(shuffled, spec, weight_matching(spec, state, shuffled))
    assert all(torch.equal(aligned[k], state[k]) for k in state)


def test_tied_output_layer_is_permuted_under_either_name() -> None:
    model, x = _built("gpt2")
    spec = derive_spec(model, x)
    stream = next(g for g in spec.groups if any(m.tensor == "lm_head.weight" for m in g.members))
    names = {m.tensor for m in stream.members if m.axis == 1}
    assert {"lm_head.weight", "transformer.wte.weight"} <= names
    # A checkpoint saved by save_pretrained holds the embeddings only.
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    shuffled = apply_permutations(state, spec, random_permutations(spec, torch.Generator()))
    assert "lm_head.weight" not in shuffled
    aligned = apply_permutations(shuffled, spec, weight_matching(spec, state, shuffled))
    assert all(torch.equal(aligned[k], state[k]) for k in state)


def test_activation_matching_over_unpadded_positions_recovers_heads() -> None:
    model, x = _built("llama")
    spec = derive_spec(model, x)
    state = model.state_dict()
    shuffled = apply_permutations(
        state, spec, random_permutations(spec, torch.Generator().manual_seed(5))
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[::2, 9:] = 0  # padded tails: no sample there
    batches = [TokenBatch(ids[:8], mask[:8]), TokenBatch(ids[8:], mask[8:])]
    stats = pair_statistics(model, spec, state, shuffled, batches)
    group = spec.attention[0].query
    assert stats[group].count == int(mask.sum())
    found = match_activations(stats, spec=spec)
    aligned = apply_permutations(shuffled, spec, found)
    assert all(torch.allclose(aligned[k], state[k]) for k in state)


def test_head_matching_against_brute_force() -> None:
    """match_heads is the best head permutation: checked against every permutation of heads
    with the best dimension matchings, on random costs (no grouped-query heads)."""
    from itertools import permutations

    from scipy.optimize import linear_sum_assignment

    attention = AttentionSpec("a", "q", "k", "v", "o", 3, 3, 2, 2)
    rng = np.random.default_rng(0)
    costs = {n: rng.normal(size=(6, 6)) for n in attention.groups}
    found = match_heads(attention, costs)
    value = sum(costs[n][np.arange(6), found[n].numpy()].sum() for n in attention.groups)

    def pair(x: int, y: int) -> float:
        total = 0.0
        for first, second in (("q", "k"), ("v", "o")):
            block = sum(costs[n][2 * x : 2 * x + 2, 2 * y : 2 * y + 2] for n in (first, second))
            rows, cols = linear_sum_assignment(block, maximize=True)
            total += block[rows, cols].sum()
        return total

    best = max(sum(pair(x, p[x]) for x in range(3)) for p in permutations(range(3)))
    assert value == pytest.approx(best, rel=1e-12)


def test_compose_keeps_the_attention_function() -> None:
    """Any composed permutation leaves scaled dot-product attention with grouped heads as it
    was: an independent computation of the layer in numpy-free torch ops."""
    attention = AttentionSpec("a", "q", "k", "v", "o", 6, 2, 4, 3)
    generator = torch.Generator().manual_seed(0)
    d, t = 8, 5
    weights = {
        "q": torch.randn(6 * 4, d, generator=generator, dtype=torch.float64),
        "k": torch.randn(2 * 4, d, generator=generator, dtype=torch.float64),
        "v": torch.randn(2 * 3, d, generator=generator, dtype=torch.float64),
        "o": torch.randn(d, 6 * 3, generator=generator, dtype=torch.float64),
    }
    x = torch.randn(t, d, generator=generator, dtype=torch.float64)

    def layer(w: dict[str, torch.Tensor]) -> torch.Tensor:
        q = (x @ w["q"].T).reshape(t, 6, 4).transpose(0, 1)
        k = (x @ w["k"].T).reshape(t, 2, 4).transpose(0, 1).repeat_interleave(3, 0)
        v = (x @ w["v"].T).reshape(t, 2, 3).transpose(0, 1).repeat_interleave(3, 0)
        attended = torch.softmax(q @ k.transpose(1, 2), -1) @ v
        return attended.transpose(0, 1).reshape(t, 18) @ w["o"].T

    perms = random_heads(attention, generator)
    moved = {
        "q": weights["q"][perms["q"]],
        "k": weights["k"][perms["k"]],
        "v": weights["v"][perms["v"]],
        "o": weights["o"][:, perms["o"]],
    }
    torch.testing.assert_close(layer(moved), layer(weights), rtol=1e-12, atol=1e-12)
    identity = compose(
        attention, torch.arange(2), torch.arange(3).repeat(2, 1), torch.arange(4).repeat(2, 1),
        torch.arange(3).repeat(2, 1),
    )  # fmt: skip
    assert all(torch.equal(identity[n], torch.arange(len(identity[n]))) for n in "qkvo")


@torch.library.custom_op("mergecli_test::roll_units", mutates_args=())
def roll_units(x: torch.Tensor) -> torch.Tensor:
    """A custom operation that mixes units in order: nothing may permute through it."""
    return torch.roll(x, 1, dims=-1)


@roll_units.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_a_custom_op_warns_for_its_groups_and_the_rest_is_aligned() -> None:
    class Rolled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(roll_units(x))  # the MLP's input units meet the op

    torch.manual_seed(0)
    model = llama().eval()
    model.model.layers[1].mlp = Rolled(model.model.layers[1].mlp)
    x = torch.randint(0, 64, (2, 8))
    spec = derive_spec(model, x)
    assert spec.traced_with == "torch.export"
    assert len(spec.warnings) == 1
    assert "left unpermuted" in spec.warnings[0] and "roll_units" in spec.warnings[0]
    # The residual stream reaches the op, so it stays; heads and MLP units are still groups.
    assert len(spec.attention) == 2
    assert not any(g.name == "model.embed_tokens" for g in spec.groups)
    check_spec(model, spec, x)
    state = model.state_dict()
    shuffled = apply_permutations(state, spec, random_permutations(spec, torch.Generator()))
    aligned = apply_permutations(shuffled, spec, weight_matching(spec, state, shuffled))
    assert all(torch.equal(aligned[k], state[k]) for k in state)

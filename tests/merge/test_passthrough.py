"""Passthrough's slice plan: which model and layer each output tensor comes from, renumbered."""

from __future__ import annotations

import pytest

from mergecli.errors import MergeCliError
from mergecli.merge.passthrough import layer_split, renumbered, slice_plan


def llama_shapes(layers: int, width: int = 4) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (10, width)}
    for i in range(layers):
        shapes[f"model.layers.{i}.mlp.weight"] = (width, width)
        shapes[f"model.layers.{i}.norm.weight"] = (width,)
    shapes["model.norm.weight"] = (width,)
    shapes["lm_head.weight"] = (10, width)
    return shapes


def test_renumbered_replaces_the_layer_index_only() -> None:
    assert (
        renumbered("model.layers.13.mlp.up_proj.weight", 0) == "model.layers.0.mlp.up_proj.weight"
    )
    assert (
        renumbered("transformer.h.2.attn.c_attn.weight", 7) == "transformer.h.7.attn.c_attn.weight"
    )
    assert (
        renumbered("encoder.layer.10.output.dense.bias", 3) == "encoder.layer.3.output.dense.bias"
    )
    with pytest.raises(ValueError):
        renumbered("model.norm.weight", 1)


def test_layer_split_groups_by_index_and_refuses_two_stacks() -> None:
    prefix, layers, outside = layer_split(list(llama_shapes(2)))
    assert prefix == "model.layers."
    assert layers == {0: ["model.layers.0.mlp.weight", "model.layers.0.norm.weight"],
                      1: ["model.layers.1.mlp.weight", "model.layers.1.norm.weight"]}  # fmt: skip
    assert outside == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    with pytest.raises(MergeCliError, match="several prefixes"):
        layer_split(["vision.layers.0.w", "model.layers.0.w"])


def test_plan_stacks_ranges_renumbers_and_takes_embeddings_first_head_last() -> None:
    layouts = {"a": llama_shapes(2), "b": llama_shapes(4)}
    plan = slice_plan(layouts, [("a", 0, 2), ("b", 1, 4), ("a", 1, 2)])
    # Written out by hand: layers a0 a1 b1 b2 b3 a1 as 0..5, embeddings from a, the rest from
    # the last slice's model (a again here).
    expected = [("model.embed_tokens.weight", "a", "model.embed_tokens.weight")]
    for out, (model, layer) in enumerate(
        [("a", 0), ("a", 1), ("b", 1), ("b", 2), ("b", 3), ("a", 1)]
    ):
        for part in ("mlp.weight", "norm.weight"):
            expected.append((f"model.layers.{out}.{part}", model, f"model.layers.{layer}.{part}"))
    expected += [
        ("model.norm.weight", "a", "model.norm.weight"),
        ("lm_head.weight", "a", "lm_head.weight"),
    ]
    assert plan == expected


def test_plan_takes_the_final_norm_and_head_from_the_last_slice_as_mergekit() -> None:
    plan = slice_plan({"a": llama_shapes(2), "b": llama_shapes(2)}, [("a", 0, 1), ("b", 1, 2)])
    source = {out: (model, name) for out, model, name in plan}
    assert source["model.embed_tokens.weight"] == ("a", "model.embed_tokens.weight")
    assert source["model.layers.1.mlp.weight"] == ("b", "model.layers.1.mlp.weight")
    assert source["model.norm.weight"] == ("b", "model.norm.weight")
    assert source["lm_head.weight"] == ("b", "lm_head.weight")
    assert len(plan) == 1 + 2 * 2 + 2


def test_plan_errors_name_the_problem() -> None:
    with pytest.raises(
        MergeCliError, match=r"layers \[1, 4\] reach past checkpoint 'a', which has 2"
    ):
        slice_plan({"a": llama_shapes(2)}, [("a", 1, 4)])
    with pytest.raises(MergeCliError, match="'flat' has no numbered layers"):
        slice_plan({"flat": {"w": (2, 2)}}, [("flat", 0, 1)])
    wide = {"a": llama_shapes(2), "b": llama_shapes(2, width=8)}
    with pytest.raises(MergeCliError, match="differ outside the layers"):
        slice_plan(wide, [("a", 0, 1), ("b", 0, 1)])
    with pytest.raises(MergeCliError, match="layer 0 of checkpoint 'b' does not match"):
        slice_plan(wide, [("a", 0, 1), ("b", 0, 1), ("a", 1, 2)])

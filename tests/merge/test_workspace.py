"""Buffers the merge engine reuses from tensor to tensor, and what it hands out of them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mergecli.merge.step import merge_tensors
from mergecli.merge.workspace import Workspace
from mergecli.pipeline import prepare_state
from mergecli.recipe import load_recipe
from mergecli.runtime.log import Log


def test_a_role_reuses_its_buffer_and_grows_it() -> None:
    workspace = Workspace()
    big = workspace.take("stack", (4, 8), torch.float32)
    small = workspace.take("stack", (3,), torch.float64)
    assert small.data_ptr() == big.data_ptr() and small.shape == (3,)
    other = workspace.take("base", (4, 8), torch.float32)
    assert other.data_ptr() != big.data_ptr()
    grown = workspace.take("stack", (100,), torch.float32)
    assert grown.shape == (100,)
    assert workspace.holds(grown[5:]) and workspace.holds(other)
    assert not workspace.holds(torch.zeros(3)) and not workspace.holds(torch.zeros(0))


def _pair(tmp_path: Path, dtype: torch.dtype) -> Path:
    """Two checkpoints of three tensors of different sizes, and a data-free recipe."""
    paths = []
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        tensors = {
            f"t{i}": torch.randn(size, generator=generator).to(dtype)
            for i, size in enumerate((64, 16, 40))
        }
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_file(tensors, paths[-1])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {paths[0]}}}, {{path: {paths[1]}}}]\n"
        "steps: [{merge: {method: average}}]\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    return recipe


def test_merged_tensors_never_share_the_reused_buffers(tmp_path: Path) -> None:
    """A method may return a view of its stack; the next tensor overwrites the stack while the
    writer still holds this one, so the engine hands out a copy. In float32 (read straight
    into the stack, no conversion) and bfloat16 (read into a buffer, converted)."""
    for dtype in (torch.float32, torch.bfloat16):
        folder = tmp_path / str(dtype)
        folder.mkdir()
        state = prepare_state(load_recipe(_pair(folder, dtype)), Log("plain"))
        assert state.streaming

        def first_model(models: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            return models[0]

        merged = dict(merge_tensors(state, first_model, {}, needs_base=False))
        for name, tensor in merged.items():
            assert torch.equal(tensor, state.models[0].tensors[name]), (dtype, name)


def test_a_streamed_merge_leaves_one_core_to_its_threads_for_the_whole_merge(
    tmp_path: Path,
) -> None:
    """One intra-op thread fewer from the first tensor to the last, whatever the hashing
    thread is doing (a parallel reduction may depend on the thread count: a count that
    followed the hashing would make results depend on timing), and the count back after."""
    threads = torch.get_num_threads()
    state = prepare_state(load_recipe(_pair(tmp_path, torch.float32)), Log("plain"))
    seen = []

    def counting(models: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return models.mean(dim=0)

    list(merge_tensors(state, counting, {}, needs_base=False))
    assert seen == [max(1, threads - 1)] * 3
    assert torch.get_num_threads() == threads


def test_a_streamed_form_runs_its_pieces_on_threads_of_one_intra_op_thread(
    tmp_path: Path,
) -> None:
    """A streamed form gets as many piece workers as the intra-op threads `one_core_spared`
    would leave, and runs them on one intra-op thread each: no operation's result then depends
    on the thread count."""
    threads = torch.get_num_threads()
    state = prepare_state(load_recipe(_pair(tmp_path, torch.float32)), Log("plain"))
    seen = []

    def stack_form(models: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the streamed form declined nothing")

    def streamed(models, weights, base, out, compute_dtype, workers):
        seen.append((torch.get_num_threads(), workers))
        return out.copy_(models[0])

    stack_form.streamed = streamed
    merged = dict(merge_tensors(state, stack_form, {}, needs_base=False))
    assert seen == [(1, max(1, threads - 1))] * 3
    for name, tensor in merged.items():
        assert torch.equal(tensor, state.models[0].tensors[name])
    assert torch.get_num_threads() == threads


def test_a_broken_input_of_a_streamed_form_is_blamed_on_its_file(tmp_path: Path) -> None:
    """The streamed form's inputs are checked only when its output is not finite: a NaN or inf
    in a fine-tune or the base must still name that file and tensor, in the streamed form and
    in the stack form it declines to (filter_wise)."""
    import pytest

    from mergecli.errors import MergeCliError
    from mergecli.merge.model_stock import model_stock

    generator = torch.Generator().manual_seed(0)
    base = {f"t{i}": torch.randn(6, 5, generator=generator) for i in range(3)}
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, paths["base"])
    for tune in ("a", "b"):
        paths[tune] = tmp_path / f"{tune}.safetensors"
        save_file({n: t + 0.1 * torch.randn(t.shape, generator=generator) for n, t in base.items()},
                  paths[tune])  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {paths['base']}, role: base}}, "
        f"{{path: {paths['a']}}}, {{path: {paths['b']}}}]\n"
        f"steps: [{{merge: {{method: model_stock}}}}]\noutput: {{dir: {tmp_path / 'out'}}}\n"
    )
    for broken, bad in (("b", float("nan")), ("base", float("inf"))):
        tensors = dict(base) if broken == "base" else {n: t.clone() for n, t in base.items()}
        tensors["t1"] = tensors["t1"].clone()
        tensors["t1"][2, 3] = bad
        save_file(tensors, paths[broken])
        for filter_wise in (False, True):
            state = prepare_state(load_recipe(recipe), Log("plain"))
            options = {"filter_wise": filter_wise}
            with pytest.raises(MergeCliError, match="contains NaN or inf") as caught:
                list(merge_tensors(state, model_stock, options, needs_base=True))
            assert str(paths[broken]) in str(caught.value) and "'t1'" in str(caught.value)
        save_file(base if broken == "base" else tensors | {"t1": base["t1"]}, paths[broken])

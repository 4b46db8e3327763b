"""Buffers the merge engine reuses from tensor to tensor, and what it hands out of them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mergecli.merge.step import merge_tensors
from mergecli.merge.workspace import Workspace
from mergecli.pipeline import prepare_state
from mergecli.recipe import load_recipe
from mergecli.runtime.device import SpareCore
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


def test_one_core_is_left_to_the_hashing_while_it_runs() -> None:
    threads = torch.get_num_threads()
    busy = [True]
    cores = SpareCore(lambda: busy[0])
    try:
        cores.update()
        assert torch.get_num_threads() == max(1, threads - 1)
        busy[0] = False
        cores.update()
        assert torch.get_num_threads() == threads
        busy[0] = True
        cores.update()
    finally:
        cores.restore()
    assert torch.get_num_threads() == threads

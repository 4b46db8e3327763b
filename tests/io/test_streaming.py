"""Out-of-core data-free merges: lazy inputs, shards written as they fill, model directories."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mergecli.io.writer as writer_module
from helpers import run_cli
from mergecli.errors import MergeCliError
from mergecli.io import load_state_dict
from mergecli.io.lazy import LazyTensors
from mergecli.io.writer import ShardWriter


def llama_dir(folder: Path, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        f"model.layers.{i}.mlp.weight": torch.randn(16, 16, generator=generator) for i in range(4)
    }
    tensors["model.embed_tokens.weight"] = torch.randn(32, 16, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_lazy_tensors_read_headers_first(tmp_path: Path) -> None:
    folder = llama_dir(tmp_path / "m", 0)
    lazy = LazyTensors(folder)
    eager = load_state_dict(folder)
    assert set(lazy) == set(eager) and len(lazy) == len(eager)
    assert lazy.shape("model.embed_tokens.weight") == (32, 16)
    assert torch.equal(lazy["model.layers.2.mlp.weight"], eager["model.layers.2.mlp.weight"])


def test_shard_writer_flushes_and_names_shards(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(20, 20) for i in range(5)}
    plan = [(name, (20, 20), torch.bfloat16) for name in tensors]
    writer = ShardWriter(tmp_path, plan, {"k": "v"}, shard_size=2500)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    assert not list(tmp_path.glob("model*")), "nothing under a final name before close"
    paths = writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    # bfloat16 tensors of 800 bytes: three fit in a 2,500-byte shard, so two shards + index.
    assert [p.name for p in paths][-1] == "model.safetensors.index.json" and len(paths) == 3
    assert index["metadata"]["total_size"] == 5 * 400 * 2
    loaded = load_state_dict(tmp_path)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == torch.bfloat16
        torch.testing.assert_close(loaded[name], tensor.to(torch.bfloat16))


def test_shards_reach_the_disk_as_they_grow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Synced while the caller computes, not all at close, on a thread that is neither the
    caller's nor the writing worker's; the output is the same bytes."""
    synced: list[tuple[int, str]] = []

    def datasync(fd: int) -> None:
        synced.append((os.fstat(fd).st_size, threading.current_thread().name))
        os.fsync(fd)

    monkeypatch.setattr(writer_module, "_datasync", datasync)
    monkeypatch.setattr(writer_module, "_SYNC_EVERY", 3000)  # every second 1,600-byte tensor
    tensors = {f"t{i}": torch.randn(20, 20) for i in range(6)}
    plan = [(name, (20, 20), torch.float32) for name in tensors]
    writer = ShardWriter(tmp_path, plan, {}, shard_size=None)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer._stop_worker()  # every tensor written, close not yet called
    writer._wait_for_sync()
    header = len(writer._headers[0])
    # A request while a sync still runs is left to the next one: at least the first happens.
    assert synced and synced[0][0] >= header + 2 * 1600
    assert {thread for _, thread in synced} == {"shard-sync"}
    writer.close()
    loaded = load_state_dict(tmp_path)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_a_failed_background_sync_fails_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def datasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(writer_module, "_datasync", datasync)
    monkeypatch.setattr(writer_module, "_SYNC_EVERY", 1000)
    plan = [(f"t{i}", (20, 20), torch.float32) for i in range(4)]
    writer = ShardWriter(tmp_path, plan, {}, shard_size=None)
    with pytest.raises(MergeCliError, match="Input/output error"):
        for i in range(4):
            writer.add(f"t{i}", torch.zeros(20, 20))
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_disk_full_mid_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = open
    written = {"bytes": 0}

    class FillingFile:
        """A file on a disk that fills after 4,000 bytes."""

        def __init__(self, path, mode):
            self.inner = real_open(path, mode)

        def write(self, data):
            written["bytes"] += len(data)
            if written["bytes"] > 4000:
                raise OSError(28, "No space left on device")
            return self.inner.write(data)

        def flush(self):
            self.inner.flush()

        def fileno(self):
            return self.inner.fileno()

        def close(self):
            self.inner.close()

    monkeypatch.setattr(writer_module, "open", FillingFile, raising=False)
    plan = [(f"t{i}", (20, 20), torch.float32) for i in range(6)]
    writer = ShardWriter(tmp_path, plan, {}, shard_size=1600)
    with pytest.raises(MergeCliError, match="No space left on device"):
        for i in range(6):
            writer.add(f"t{i}", torch.zeros(20, 20))
        writer.close()
    assert list(tmp_path.iterdir()) == []
    # Tensors must arrive in the planned order.
    writer = ShardWriter(tmp_path, plan, {}, shard_size=None)
    with pytest.raises(RuntimeError, match="expected t0"):
        writer.add("t1", torch.zeros(20, 20))


@pytest.mark.slow
def test_streamed_merge_of_model_directories(tmp_path: Path) -> None:
    base, a, b = (llama_dir(tmp_path / n, s) for n, s in (("base", 0), ("a", 1), ("b", 2)))
    recipe = tmp_path / "ta.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {base}, role: base}}, {{path: {a}}}, {{path: {b}}}]\n"
        "steps: [{merge: {method: task_arithmetic, lambda: 0.5}}]\n"
        f"output: {{dir: {tmp_path / 'out'}, shard_size: 3KB, dtype: bfloat16}}\n"
    )
    result = run_cli("--log", "plain", "run", str(recipe), check=True)
    out = tmp_path / "out"
    assert (out / "config.json").read_text() == (base / "config.json").read_text()
    assert (out / "tokenizer.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    merged = load_state_dict(out)
    tb, ta, tt = (
        load_file(base / "model.safetensors"),
        load_file(a / "model.safetensors"),
        load_file(b / "model.safetensors"),
    )
    for name in tb:
        expected = tb[name] + 0.5 * ((ta[name] - tb[name]) + (tt[name] - tb[name]))
        torch.testing.assert_close(merged[name], expected.to(torch.bfloat16))
    assert "model.safetensors.index.json" in result.stderr


@pytest.mark.slow
def test_streamed_merge_errors_name_the_tensor(tmp_path: Path) -> None:
    base, a = llama_dir(tmp_path / "base", 0), llama_dir(tmp_path / "a", 1)
    state = load_file(a / "model.safetensors")
    state["model.layers.1.mlp.weight"] = torch.zeros(16, 8)
    save_file(state, a / "model.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {base}, role: base}}, {{path: {a}}}]\n"
        f"steps: [{{merge: {{method: ties, density: 0.5}}}}]\noutput: {{dir: {tmp_path / 'out'}}}\n"
    )
    result = run_cli("run", str(recipe))
    assert result.returncode == 2  # found by the checks before any work
    assert "tensor 'model.layers.1.mlp.weight' has shape (16, 8)" in result.stderr
    assert "(16, 16)" in result.stderr
    del state["model.layers.1.mlp.weight"]
    save_file(state, a / "model.safetensors")
    result = run_cli("run", str(recipe))
    assert "lacks 'model.layers.1.mlp.weight'" in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_missing_tensors_copied_from_the_base(tmp_path: Path) -> None:
    base, a, b = (llama_dir(tmp_path / n, s) for n, s in (("base", 0), ("a", 1), ("b", 2)))
    state = load_file(a / "model.safetensors")
    del state["model.layers.3.mlp.weight"]  # e.g. a fine-tune saved without its frozen layer
    save_file(state, a / "model.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {base}, role: base}}, {{path: {a}}}, {{path: {b}}}]\n"
        "steps: [{merge: {method: task_arithmetic, missing: copy_from_base}}]\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    result = run_cli("--log", "plain", "run", str(recipe), check=True)
    assert "1 tensor(s) missing from some models are copied from the base" in result.stderr
    merged, tb = load_state_dict(tmp_path / "out"), load_file(base / "model.safetensors")
    tb_b = load_file(b / "model.safetensors")
    assert list(merged) == list(LazyTensors(base))
    assert torch.equal(merged["model.layers.3.mlp.weight"], tb["model.layers.3.mlp.weight"])
    name = "model.layers.0.mlp.weight"
    expected = tb[name] + (state[name] - tb[name]) + (tb_b[name] - tb[name])
    torch.testing.assert_close(merged[name], expected)
    # A tensor the base lacks cannot be copied from it.
    state["extra.weight"] = torch.ones(2)
    save_file(state, a / "model.safetensors")
    result = run_cli("run", str(recipe))
    assert result.returncode == 2  # found by the checks before any work
    assert "has 'extra.weight', which the base" in result.stderr
    # Without a base there is nothing to copy from.
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {a}}}, {{path: {b}}}]\n"
        "steps: [{merge: {method: average, missing: copy_from_base}}]\n"
    )
    result = run_cli("run", str(recipe))
    assert result.returncode == 2 and "needs a checkpoint with `role: base`" in result.stderr


@pytest.mark.parametrize("compute_dtype", ["float64", "bfloat16"])
def test_compute_dtype(tmp_path: Path, compute_dtype: str) -> None:
    a, b = llama_dir(tmp_path / "a", 1), llama_dir(tmp_path / "b", 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {a}, weight: 0.3}}, {{path: {b}, weight: 0.7}}]\n"
        f"steps: [{{merge: {{method: linear, compute_dtype: {compute_dtype}}}}}]\n"
        f"output: {{dir: {tmp_path / 'out'}, dtype: float32}}\n"
    )
    run_cli("run", str(recipe), check=True)
    merged = load_state_dict(tmp_path / "out")
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32, "written in output.dtype"
        expected = 0.3 * ta[name].double() + 0.7 * tb[name].double()
        if compute_dtype == "float64":  # one rounding, at the end
            # Within half a float32 ulp of the float64 value (a float32 computation misses
            # this bound on ~40% of entries). Not bit-equal to `expected.float()`: the float64
            # sum's last bits depend on the CPU's vector path (FMA, order), which can tip the
            # final rounding either way. Those bits are at most 8 float64 roundings (weights
            # normalised, products, sum; here and in `expected`) of the terms' magnitudes.
            magnitude = tensor.abs()
            half_ulp = (torch.nextafter(magnitude, torch.tensor(math.inf)) - magnitude) / 2
            terms = 0.3 * ta[name].double().abs() + 0.7 * tb[name].double().abs()
            bound = half_ulp.double() + 8 * torch.finfo(torch.float64).eps * terms
            assert ((tensor.double() - expected).abs() <= bound).all(), name
        else:  # bfloat16 keeps 8 bits of mantissa
            error = (tensor.double() - expected).abs().max() / expected.abs().max()
            assert 1e-4 < error < 1e-2


def _ties_by_hand(base, models, weights, densities):
    """TIES written out with a full sort: trim, elect the sign, average the agreeing entries."""
    trimmed = []
    for model, density in zip(models, densities, strict=True):
        delta = (model - base).reshape(-1)
        k = int(density * delta.numel())
        keep = torch.zeros_like(delta, dtype=torch.bool)
        keep[delta.abs().argsort(descending=True)[:k]] = True
        trimmed.append((delta * keep).reshape(base.shape))
    weighted = torch.stack([w * t for w, t in zip(weights, trimmed, strict=True)])
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (weighted * sign) > 0
    total = (weighted * agree).sum(0)
    divisor = (agree * torch.tensor(weights).reshape(-1, *[1] * base.dim())).sum(0)
    return base + total / divisor.clamp_min(1e-12).where(divisor > 0, torch.ones(()))


def test_per_model_density(tmp_path: Path) -> None:
    base, a, b = (llama_dir(tmp_path / n, s) for n, s in (("base", 0), ("a", 1), ("b", 2)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints:\n  - {{path: {base}, role: base}}\n"
        f"  - {{path: {a}, weight: 0.6, parameters: {{density: 0.2}}}}\n"
        f"  - {{path: {b}, weight: 0.4}}\n"
        "steps: [{merge: {method: ties, density: 0.7}}]\n"
        f"output: {{dir: {tmp_path / 'out'}, dtype: float32}}\n"
    )
    run_cli("run", str(recipe), check=True)
    merged = load_state_dict(tmp_path / "out")
    tb, ta, tt = (load_file(p / "model.safetensors") for p in (base, a, b))
    for name in tb:
        expected = _ties_by_hand(tb[name], [ta[name], tt[name]], [0.6, 0.4], [0.2, 0.7])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    # A key that is not a per-model parameter, and a density out of range, name their line.
    wrong = "parameters: {lambda: 2, density: 1.5}"
    recipe.write_text(recipe.read_text().replace("parameters: {density: 0.2}", wrong))
    result = run_cli("validate", str(recipe))
    assert result.returncode == 2
    assert ":4: checkpoints.1.parameters.lambda: not a per-model parameter of ties" in result.stderr
    assert (
        "checkpoints.1.parameters.density: input should be less than or equal to 1 (got 1.5)"
        in (result.stderr)
    )


def test_membership_reads_no_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lazy = LazyTensors(llama_dir(tmp_path / "m", 0))

    def refuse(self, name, buffer):
        raise AssertionError(f"read {name} to answer `in`")

    monkeypatch.setattr(LazyTensors, "read", refuse)
    assert "model.embed_tokens.weight" in lazy and "model.nothing" not in lazy


def test_a_tensor_arrives_over_several_short_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read(2) returns at most about 2 GiB on Linux: bigger tensors take several, and a
    file that ends early is still an error."""
    import mergecli.io.lazy as lazy_module

    folder = llama_dir(tmp_path / "m", 0)
    real_open = open

    class ShortReads:
        """A file whose reads return at most 100 bytes, as a huge read does at 2 GiB."""

        def __init__(self, path, mode, buffering=-1):
            self.inner = real_open(path, mode, buffering=buffering)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def seek(self, offset):
            return self.inner.seek(offset)

        def readinto(self, view):
            return self.inner.readinto(view[:100])

    monkeypatch.setattr(lazy_module, "open", ShortReads, raising=False)
    lazy, eager = LazyTensors(folder), load_state_dict(folder)
    for name in eager:  # 1 KB and 2 KB tensors: 11 and 21 reads each
        assert torch.equal(lazy[name], eager[name])

    class EndsEarly(ShortReads):
        """The file ends (a read returns nothing) after 300 bytes of the tensor."""

        calls = 0

        def readinto(self, view):
            EndsEarly.calls += 1
            return 0 if EndsEarly.calls > 3 else super().readinto(view)

    monkeypatch.setattr(lazy_module, "open", EndsEarly, raising=False)
    with pytest.raises(MergeCliError, match="cut short"):
        lazy["model.embed_tokens.weight"]


def test_a_mapped_tensor_is_the_stored_one_and_unmapped_when_dropped(tmp_path: Path) -> None:
    folder = llama_dir(tmp_path / "m", 0)
    lazy, eager = LazyTensors(folder), load_state_dict(folder)
    file = str(folder / "model.safetensors")

    def mappings() -> int:
        return Path("/proc/self/maps").read_text().count(file)

    before = mappings() if sys.platform.startswith("linux") else 0
    tensors = {name: lazy.mapped(name) for name in lazy}
    assert all(torch.equal(t, eager[n]) and t.dtype == eager[n].dtype for n, t in tensors.items())
    view = tensors["model.embed_tokens.weight"][3:]
    view.add_(1)  # a private mapping: the file keeps its bytes
    assert torch.equal(
        LazyTensors(folder)["model.embed_tokens.weight"], eager["model.embed_tokens.weight"]
    )
    if sys.platform.startswith("linux"):
        assert mappings() == before + len(tensors)
        del tensors
        assert mappings() == before + 1, "only the one a view still holds"
        del view
        assert mappings() == before


def test_a_mapped_tensor_past_the_end_of_its_file_is_an_error(tmp_path: Path) -> None:
    folder = llama_dir(tmp_path / "m", 0)
    lazy = LazyTensors(folder)
    file = folder / "model.safetensors"
    with file.open("r+b") as handle:
        handle.truncate(file.stat().st_size - 10)
    with pytest.raises(MergeCliError, match="cut short; the file is truncated"):
        lazy.mapped(list(lazy)[-1] if lazy.shape(list(lazy)[-1]) else list(lazy)[0])


def test_a_buffered_read_fills_the_given_buffer(tmp_path: Path) -> None:
    lazy = LazyTensors(llama_dir(tmp_path / "m", 0))
    name = "model.embed_tokens.weight"
    buffer = torch.empty(lazy.nbytes(name), dtype=torch.uint8)
    tensor = lazy.read(name, buffer)
    assert tensor.data_ptr() == buffer.data_ptr() and torch.equal(tensor, lazy[name])
    with pytest.raises(ValueError, match="bytes"):
        lazy.read(name, torch.empty(3, dtype=torch.uint8))


def test_late_metadata_goes_into_every_shard_and_the_index(tmp_path: Path) -> None:
    """Digests still being computed when the headers are written are filled in at close."""
    tensors = {f"t{i}": torch.randn(20, 20) for i in range(5)}
    plan = [(name, (20, 20), torch.float32) for name in tensors]
    writer = ShardWriter(tmp_path, plan, {"inputs": "0" * 64}, shard_size=3300)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    paths = writer.close({"inputs": "a" * 64})
    shards = [p for p in paths if p.suffix == ".safetensors"]
    assert len(shards) == 3
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            assert handle.metadata() == {"inputs": "a" * 64}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["inputs"] == "a" * 64
    loaded = load_state_dict(tmp_path)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    # A header that would change length cannot be patched in place: our bug, nothing left.
    out = tmp_path / "again"
    out.mkdir()
    writer = ShardWriter(out, plan, {"inputs": "0" * 64}, shard_size=None)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    with pytest.raises(RuntimeError, match="final header"):
        writer.close({"inputs": "short"})
    assert list(out.iterdir()) == []


def test_digests_hashed_during_the_merge_reach_the_header_and_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inputs are hashed on a thread while the merge runs; digests not known when the
    headers are written (held back here until the last tensor) are filled in at close."""
    from concurrent.futures import Future

    import mergecli.pipeline as pipeline_module
    from helpers import run_cli_in_process
    from mergecli.io import checkpoint_sha256

    held: list[tuple[Future, Path]] = []

    def held_back(paths):
        futures = [Future() for _ in paths]
        held.extend(zip(futures, paths, strict=True))
        return futures

    real_add = ShardWriter.add

    def hashed_by_the_last_tensor(self, name, tensor):
        real_add(self, name, tensor)
        if self._next == len(self._order):  # every header is written by now
            assert all(not f.done() for f, _ in held), "the digests were to be pending"
            for future, path in held:
                future.set_result(checkpoint_sha256(path))

    monkeypatch.setattr(pipeline_module, "sha256_in_background", held_back)
    monkeypatch.setattr(ShardWriter, "add", hashed_by_the_last_tensor)
    monkeypatch.setattr(pipeline_module, "output_metadata", _closing_metadata(pipeline_module))
    a, b = llama_dir(tmp_path / "a", 1), llama_dir(tmp_path / "b", 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {a}}}, {{path: {b}}}]\n"
        "steps: [{merge: {method: average}}]\n"
        f"output: {{dir: {tmp_path / 'out'}, shard_size: 3KB}}\n"
    )
    result = run_cli_in_process("run", str(recipe))
    assert result.returncode == 0, result.stderr
    expected = {str(a): checkpoint_sha256(a), str(b): checkpoint_sha256(b)}
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            assert json.loads(handle.metadata()["mergecli.inputs"]) == expected
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {i["path"]: i["sha256"] for i in report["inputs"]} == expected


def _closing_metadata(pipeline_module):
    """output_metadata, checked to be asked without waiting while the digests are pending."""
    real = pipeline_module.output_metadata

    def output_metadata(state, wait=True):
        metadata = real(state, wait)
        if not wait:
            assert set(json.loads(metadata["mergecli.inputs"]).values()) == {"0" * 64}
        return metadata

    return output_metadata

"""Checkpoint digests computed on a thread, and hashing started before the run asks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergecli.io import save_state_dict
from mergecli.io.digest import (
    _PREFETCHED,
    checkpoint_sha256,
    prefetch_sha256,
    sha256_in_background,
)


def _checkpoint(path: Path, seed: int) -> Path:
    save_file({"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))}, path)
    return path


def test_background_digests_are_the_checkpoints_sha256(tmp_path: Path) -> None:
    single = _checkpoint(tmp_path / "a.safetensors", 0)
    sharded = tmp_path / "sharded"
    save_state_dict({f"t{i}": torch.randn(40, 40) for i in range(4)}, sharded, shard_size=8000)
    futures = sha256_in_background([single, sharded])
    assert [f.result(timeout=60) for f in futures] == [
        checkpoint_sha256(single),
        checkpoint_sha256(sharded),
    ]


def test_a_prefetched_digest_is_taken_over_while_its_files_are_unchanged(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "a.safetensors", 0)
    prefetch_sha256([path, tmp_path / "missing.safetensors"])  # a missing path: left to the run
    prefetched = next(f for key, f in _PREFETCHED.items() if key[0] == str(path.absolute()))
    (taken,) = sha256_in_background([path])
    assert taken is prefetched and taken.result(timeout=60) == checkpoint_sha256(path)
    assert all(key[0] != str(path.absolute()) for key in _PREFETCHED)  # taken once


def test_a_file_changed_after_the_prefetch_is_hashed_again(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "a.safetensors", 0)
    prefetch_sha256([path])
    prefetched = next(f for key, f in _PREFETCHED.items() if key[0] == str(path.absolute()))
    prefetched.result(timeout=60)
    _checkpoint(path, 1)  # the same size, new bytes (and a new ctime)
    (digest,) = sha256_in_background([path])
    assert digest is not prefetched
    assert digest.result(timeout=60) == checkpoint_sha256(path) != prefetched.result()


def test_the_digest_modules_load_without_torch() -> None:
    """`mergecli run` hashes its inputs while torch loads, so these must not import it."""
    code = (
        "import sys; import mergecli.io.digest, mergecli.io.layout, mergecli.recipe.load; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr

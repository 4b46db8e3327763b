"""Work in pieces on several threads: every piece once, each worker its own index, failures
raised to the caller."""

from __future__ import annotations

import threading

import pytest

from mergecli.merge.pieces import in_pieces


@pytest.mark.parametrize(("count", "workers"), [(0, 3), (1, 3), (7, 1), (7, 3), (2, 8)])
def test_every_piece_once_on_its_workers(count: int, workers: int) -> None:
    done: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def work(piece: int, worker: int) -> None:
        with lock:
            done.append((piece, worker, threading.current_thread().name))

    in_pieces(count, work, workers)
    assert sorted(p for p, _, _ in done) == list(range(count))
    assert all(0 <= w < max(1, min(workers, count)) for _, w, _ in done)
    # Worker 0 is the caller's thread; the others are the pool's.
    assert all((w == 0) == (name == threading.current_thread().name) for _, w, name in done)


@pytest.mark.parametrize("failing", [0, 5])
def test_a_failed_piece_is_raised_and_stops_the_rest(failing: int) -> None:
    seen: list[int] = []

    def work(piece: int, worker: int) -> None:
        if piece == failing:
            raise ValueError(f"piece {piece}")
        seen.append(piece)

    with pytest.raises(ValueError, match=f"piece {failing}"):
        in_pieces(1000, work, 2)
    assert len(seen) < 999  # the others stop taking pieces

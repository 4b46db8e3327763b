"""Work split into pieces that threads take in turn, with results that do not depend on how many
threads there are."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def in_pieces(count: int, work: Callable[[int, int], None], workers: int) -> None:
    """``work(piece, worker)`` for every piece in ``range(count)``, on ``workers`` threads (this
    one and ``workers - 1`` more) that each take the next piece when done with one.

    A piece's result must depend on the piece alone: each worker owns its scratch (``worker``
    says which), and torch runs on one intra-op thread meanwhile (`runtime.device.one_thread`),
    so that no operation's result depends on the thread count. Threads rather than intra-op
    parallelism because the work is many small operations that release the GIL, each of which
    would otherwise wait at a barrier for the slowest thread; on a machine whose other cores
    are busy (hashing, writing) the threads simply share them.
    """
    if workers <= 1 or count <= 1:
        for piece in range(count):
            work(piece, 0)
        return
    pieces = iter(range(count))  # next() on a range iterator is atomic under the GIL
    failed: list[BaseException] = []

    def take(worker: int) -> None:
        try:
            for piece in pieces:
                if failed:
                    return
                work(piece, worker)
        except BaseException as exc:
            failed.append(exc)
            raise

    threads = min(workers, count)
    with ThreadPoolExecutor(threads - 1, thread_name_prefix="piece") as pool:
        helpers = [pool.submit(take, worker) for worker in range(1, threads)]
        take(0)
        for helper in helpers:
            helper.result()

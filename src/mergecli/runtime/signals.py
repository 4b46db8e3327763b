"""Stopping on SIGTERM, SIGUSR1 and SIGINT the way batch jobs need it.

SLURM sends SIGTERM when it preempts a job or the time limit is reached (then SIGKILL after
``KillWait``), and ``--signal=USR1@N`` sends SIGUSR1 N seconds early. A run must then stop
without losing work: the fit finishes the step it is in and saves its state; any other step
stops at once, since it is cheap to redo and writes nothing under a final name until the end.

While a ``deferred()`` block runs (the fit, the final writes), a signal is only recorded and
the code polls ``pending()``; anywhere else the handler raises ``Stopped`` straight away.
``Stopped`` derives from BaseException, like KeyboardInterrupt, so no ``except Exception``
swallows it on the way out.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """128 + the signal number, as shells report a process killed by it (TERM 143, USR1 138,
    INT 130), so job scripts and schedulers read the cause the usual way."""
    return 128 + signum


class Stopped(BaseException):
    """The run stopped because of a signal; ``saved`` is the fit state written, if any."""

    def __init__(self, signum: int, detail: str = "", saved: Path | None = None) -> None:
        self.signum, self.detail, self.saved = signum, detail, saved
        super().__init__(f"stopped by {signal_name(signum)}")

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


class StopSignals:
    """Handlers for the stop signals of one run; install with ``installed()``."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._depth = 0  # nesting of deferred() blocks
        self._raised = False
        self._previous: dict[int, object] = {}

    def pending(self) -> int | None:
        """The first stop signal received, or None."""
        return self.received

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle the stop signals inside the block; the previous handlers come back after."""
        self.received, self._depth, self._raised = None, 0, False
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)  # type: ignore[arg-type]
            self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside the block a signal is recorded, not raised: the code polls ``pending()``."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def stopping(self, signum: int, detail: str = "", saved: Path | None = None) -> Stopped:
        """The exception to raise for a stop the code decided on (after polling): from now on
        signals are only recorded, so nothing interrupts the way out."""
        self._raised = True
        if self.received is None:
            self.received = signum  # another rank received it
        return Stopped(signum, detail, saved)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        # Repeats (srun forwarding, the SIGTERM that `scontrol requeue` sends) change nothing:
        # the first signal decides, and a run already on its way out is not interrupted again.
        if self._depth == 0 and not self._raised:
            self._raised = True
            raise Stopped(self.received)


# The run's handlers: installed by `mergecli run`, polled by the fit loop.
STOP = StopSignals()

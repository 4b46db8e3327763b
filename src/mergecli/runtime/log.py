"""Logging for people and batch jobs: rich on a terminal, timestamped lines or JSON otherwise."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

LogMode = Literal["auto", "rich", "plain", "json"]
T = TypeVar("T")

# Plain mode reports progress at most this often, so SLURM logs stay readable.
PLAIN_PROGRESS_SECONDS = 10.0

# Without a terminal (and without COLUMNS) tables are this wide: a batch log has no width.
BATCH_TABLE_WIDTH = 120


@dataclass(frozen=True)
class Column:
    """A table column: its header for people, its key in JSON (snake_case, with the unit where
    the value has one), and how a value reads for people. Cells hold plain values (numbers,
    text, lists, None), so ``--log json`` tables carry numbers, not the text people see."""

    header: str
    key: str | None = None
    show: Callable[[Any], str] | None = None
    missing: str = ""
    # A name column: never broken inside a word, so a name reads whole at 80 columns.
    name: bool = False

    def text(self, value: Any) -> str:
        if value is None:
            return self.missing
        return self.show(value) if self.show is not None else _fmt(value)


def percent(fraction: float) -> str:
    """A fraction as people read it: 0.9235 -> 92.35%."""
    return f"{100 * fraction:.2f}%"


def points(fraction: float) -> str:
    """A difference of fractions in percentage points: 0.0035 -> +0.35."""
    return f"{100 * fraction:+.2f}"


def fixed(digits: int) -> Callable[[float], str]:
    return lambda value: f"{value:.{digits}f}"


class Log:
    """Messages, progress and tables, rendered for the chosen mode; messages go to stderr.

    With several processes (``world`` > 1) every line names its rank; rank 0 prints the
    messages, progress and tables, the other ranks only warnings and what concerns them alone
    (``every_rank=True``), so a job's log does not repeat each line once per GPU.
    """

    def __init__(
        self,
        mode: LogMode = "auto",
        rank: int = 0,
        world: int = 1,
        every: float = PLAIN_PROGRESS_SECONDS,
    ) -> None:
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "plain"
        self.mode = mode
        self.rank, self.world, self.every = rank, world, every
        self._console = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def console(self):  # noqa: ANN201 - rich is imported lazily to keep start-up fast
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)
        return self._console

    def info(self, message: str, every_rank: bool = False, **fields: Any) -> None:
        if self.main or every_rank:
            self._emit("info", message, fields)

    def warn(self, message: str, **fields: Any) -> None:
        self._emit("warning", message, fields)

    def _emit(self, level: str, message: str, fields: dict[str, Any]) -> None:
        prefix = "warning: " if level == "warning" else ""
        if self.mode == "json":
            json_line(level, message, self.rank, self.world, **fields)
            return
        tag = f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""
        extra = "".join(f" {k}={_fmt(v)}" for k, v in fields.items())
        if self.mode == "rich":
            from rich.markup import escape

            style = "yellow" if level == "warning" else "dim"
            # "[rank 1/2]" would read as a style tag.
            self.console.print(f"[{style}]{escape(tag)}{prefix}[/]{message}{extra}", markup=True)
        else:
            _write_line(f"{_now()} {tag}{prefix}{message}{extra}")

    def progress(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        """Iterate, showing a progress bar on a terminal and periodic lines otherwise."""
        if not self.main:
            yield from items
            return
        if self.mode == "rich":
            from rich.progress import Progress

            with Progress(console=self.console, transient=True) as bar:
                task = bar.add_task(description, total=total)
                for item in items:
                    yield item
                    bar.advance(task)
            return
        start = last = time.monotonic()
        for done, item in enumerate(items, start=1):
            yield item
            now = time.monotonic()
            if now - last >= self.every:
                last = now
                self.info(f"{description}: {done}/{total or '?'}", elapsed_s=round(now - start, 1))

    def table(
        self, title: str, columns: Sequence[str | Column], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Print a table to stdout (a JSON object per table in json mode); rank 0 only.

        Cells are values; a column given as text is its own header and JSON key. People see
        every name whole (name columns break only between words, the first column is one)
        and the rest wrapped to the terminal's width; numbers right-aligned, text left."""
        if not self.main:
            return
        specs = [
            c if isinstance(c, Column) else Column(c, name=i == 0) for i, c in enumerate(columns)
        ]
        if self.mode == "json":
            keys = [c.key or c.header for c in specs]
            records = [dict(zip(keys, row, strict=True)) for row in rows]
            print(json.dumps({"table": title, "rows": records}, default=str), flush=True)
            return
        from rich import box
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from mergecli.runtime.tables import layout

        # People do not need a column with nothing in it (JSON keeps its nulls).
        shown = [i for i, c in enumerate(specs) if c.missing or any(r[i] is not None for r in rows)]
        cells = [[specs[i].text(row[i]) for row in rows] for i in shown]
        numeric = [
            any(row[i] is not None for row in rows)
            and all(_is_number(row[i]) for row in rows if row[i] is not None)
            for i in shown
        ]
        console = Console(highlight=False)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = max(console.width, BATCH_TABLE_WIDTH)
        headers = [specs[i].header for i in shown]
        names = [specs[i].name for i in shown]
        plan = layout(headers, cells, names, numeric, console.width)
        console.width = max(console.width, plan.width)
        # Cells such as "w[axis]" are text, not rich markup.
        table = Table(
            title=escape(title),
            title_justify="left",
            **({} if plan.boxed else {"box": box.SIMPLE_HEAD, "show_edge": False, "padding": 0}),
        )
        for k, header in enumerate(headers):
            table.add_column(
                escape(header),
                justify="right" if numeric[k] else "left",
                width=None if plan.widths is None else plan.widths[k],
                overflow="fold",
            )
        for r in range(len(rows)):
            table.add_row(*(escape(column[r]) for column in cells))
        console.print(table)

    def meter(self, total_steps: int, epochs: int, description: str = "fit") -> StepMeter:
        """Progress of a training loop: a live bar on a terminal, periodic lines otherwise."""
        return StepMeter(self, total_steps, epochs, description)


class StepMeter:
    """Training progress for people and batch logs.

    Plain and json modes print, every ``log.every`` seconds, one line with the time, rank,
    step, epoch, mean loss since the previous line and throughput (examples and steps per
    second); rich mode shows a bar. Use as a context manager around the loop.
    """

    def __init__(self, log: Log, total_steps: int, epochs: int, description: str) -> None:
        self.log, self.total, self.epochs, self.description = log, total_steps, epochs, description
        self._bar = None
        self._task = None

    def __enter__(self) -> StepMeter:
        self._last = time.monotonic()
        self._loss_sum, self._examples, self._steps = 0.0, 0, 0
        if self.log.mode == "rich" and self.log.main:
            from rich.progress import Progress

            self._bar = Progress(console=self.log.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, epoch: int, loss: float, examples: int) -> None:
        """Record one finished step: its (global) mean loss over ``examples`` examples."""
        self._loss_sum += loss * examples
        self._examples += examples
        self._steps += 1
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=step,
                description=f"{self.description} epoch {epoch}/{self.epochs} loss {loss:.4g}",
            )
            return
        now = time.monotonic()
        if not self.log.main or now - self._last < self.log.every:
            return
        seconds = max(now - self._last, 1e-9)
        fields = {
            "rank": self.log.rank,
            "step": step,
            "steps": self.total,
            "epoch": epoch,
            "epochs": self.epochs,
            "loss": round(self._loss_sum / max(self._examples, 1), 6),
            "examples_per_s": round(self._examples / seconds, 1),
            "steps_per_s": round(self._steps / seconds, 2),
        }
        if self.log.mode == "json":
            self.log.info(f"{self.description} progress", **fields)
        else:
            self.log.info(
                f"{self.description} rank={fields['rank']} step={step}/{self.total} "
                f"epoch={epoch}/{self.epochs} loss={fields['loss']:.4f} "
                f"examples/s={fields['examples_per_s']:.1f} steps/s={fields['steps_per_s']:.2f}"
            )
        self._last, self._loss_sum, self._examples, self._steps = now, 0.0, 0, 0


def json_line(level: str, message: str, rank: int = 0, world: int = 1, /, **fields: Any) -> None:
    """One JSON object on one line of stderr: time, level, (rank and world), message, fields."""
    ranks = {"rank": rank, "world": world} if world > 1 else {}
    record = {"time": _now(), "level": level, **ranks, "message": message, **fields}
    _write_line(json.dumps(record, default=str))


def capture_warnings(log: Log) -> None:
    """In json mode, Python's warnings (from torch and the like) become JSON lines too, so
    every line of stderr parses; they say where they were raised."""
    if log.mode != "json":
        return

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        log.warn(str(message), category=category.__name__, file=filename, line=lineno)

    warnings.showwarning = show


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _write_line(line: str) -> None:
    """One write per line, flushed at once: the ranks of a job share its log file, and print()
    writes the text and its newline apart, so unbuffered lines of two ranks could interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

"""Logging for people and batch jobs: rich on a terminal, timestamped lines or JSON otherwise."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

LogMode = Literal["auto", "rich", "plain", "json"]
T = TypeVar("T")

# Plain mode reports progress at most this often, so SLURM logs stay readable.
PLAIN_PROGRESS_SECONDS = 10.0


class Log:
    """Messages, progress and tables, rendered for the chosen mode; messages go to stderr."""

    def __init__(self, mode: LogMode = "auto") -> None:
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "plain"
        self.mode = mode
        self._console = None

    @property
    def console(self):  # noqa: ANN201 - rich is imported lazily to keep start-up fast
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)
        return self._console

    def info(self, message: str, **fields: Any) -> None:
        self._emit("info", message, fields)

    def warn(self, message: str, **fields: Any) -> None:
        self._emit("warning", message, fields)

    def _emit(self, level: str, message: str, fields: dict[str, Any]) -> None:
        if self.mode == "json":
            record = {"time": _now(), "level": level, "msg": message, **fields}
            print(json.dumps(record, default=str), file=sys.stderr, flush=True)
        elif self.mode == "rich":
            style = "yellow" if level == "warning" else "dim"
            prefix = "warning: " if level == "warning" else ""
            extra = "".join(f" {k}={_fmt(v)}" for k, v in fields.items())
            self.console.print(f"[{style}]{prefix}[/]{message}{extra}", markup=True)
        else:
            prefix = "warning: " if level == "warning" else ""
            extra = "".join(f" {k}={_fmt(v)}" for k, v in fields.items())
            print(f"{_now()} {prefix}{message}{extra}", file=sys.stderr, flush=True)

    def progress(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        """Iterate, showing a progress bar on a terminal and periodic lines otherwise."""
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
            if now - last >= PLAIN_PROGRESS_SECONDS:
                last = now
                self.info(f"{description}: {done}/{total or '?'}", elapsed_s=round(now - start, 1))

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Print a table to stdout (a JSON object per table in json mode)."""
        if self.mode == "json":
            records = [dict(zip(columns, row, strict=True)) for row in rows]
            print(json.dumps({"table": title, "rows": records}, default=str), flush=True)
            return
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        # Cells such as "w[axis]" are text, not rich markup.
        table = Table(title=escape(title))
        for i, column in enumerate(columns):
            table.add_column(escape(column), justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*(escape(_fmt(v)) for v in row))
        # Batch logs have no terminal width; keep tables on one line each there.
        console = Console(highlight=False)
        if not console.is_terminal:
            console.width = max(console.width, 120)
        console.print(table)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

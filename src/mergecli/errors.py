"""The one exception type that means "the user must change something"."""

from __future__ import annotations


class MergeCliError(Exception):
    """A user-facing failure: the message is one line saying what, where, and what to do.

    The CLI prints it without a traceback (``--debug`` shows one) and exits non-zero.
    """

    exit_code = 1
    # The recipe key the problem is about (e.g. ("checkpoints", 1, "path")), where one is:
    # the recipe checks report the file and line of that key.
    key: tuple[str | int, ...] | None = None

    def at(self, key: tuple[str | int, ...]) -> MergeCliError:
        """This error, about the recipe key ``key``."""
        self.key = key
        return self

    def within(self, where: str) -> MergeCliError:
        """This error with ``where`` (e.g. ``steps.2 (fit np_merge)``) before its message."""
        self.args = (f"{where}: {self}",)
        return self


class Problem(str):
    """One recipe problem: its line for people (``file:line: key: message``) and, for logs a
    machine reads (``--log json``), its parts: ``file``, ``line``, ``key`` and ``message``."""

    file: str | None
    line: int | None
    key: str | None
    message: str

    def __new__(
        cls,
        message: str,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
        text: str | None = None,
    ) -> Problem:
        """``text`` is the line for people; by default ``file:line: key: message``."""
        if text is None:
            where = f"{file}:{line}" if file is not None and line is not None else file
            text = ": ".join(part for part in (where, key, message) if part is not None)
        problem = super().__new__(cls, text)
        problem.file, problem.line, problem.key, problem.message = file, line, key, message
        return problem

    def within(self, where: str) -> Problem:
        return Problem(f"{where}: {self.message}", self.file, self.line, self.key,
                       text=f"{where}: {self}")  # fmt: skip

    def fields(self) -> dict[str, str | int]:
        """The parts that are known, for a JSON log record."""
        parts = {"message": self.message, "file": self.file, "line": self.line, "key": self.key}
        return {name: value for name, value in parts.items() if value is not None}


class RecipeError(MergeCliError):
    """One or more problems in a recipe, each already formatted as ``file:line: key: message``
    (a Problem where its parts are known)."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))

    def within(self, where: str) -> RecipeError:
        self.problems = [
            p.within(where) if isinstance(p, Problem) else f"{where}: {p}" for p in self.problems
        ]
        self.args = ("\n".join(self.problems),)
        return self


def one_line(exc: BaseException) -> str:
    """An exception's message with newlines collapsed, since errors are printed as one line."""
    return " ".join(str(exc).split())


def describe(exc: BaseException, limit: int = 300) -> str:
    """An exception as ``Type: message`` on one short line (the message cut at ``limit``)."""
    text = one_line(exc)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

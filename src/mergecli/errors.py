"""The one exception type that means "the user must change something"."""


class MergeCliError(Exception):
    """A user-facing failure: the message is one line saying what, where, and what to do.

    The CLI prints it without a traceback (``--debug`` shows one) and exits non-zero.
    """

    exit_code = 1


class RecipeError(MergeCliError):
    """One or more problems in a recipe, each already formatted as ``file:line: key: message``."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))

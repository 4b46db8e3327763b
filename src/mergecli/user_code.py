"""Importing the user's own code, named in a recipe as ``package.module:name``.

Only a recipe (or the command line) may name code: models (`model.arch`), data sources
(`factory`) and step methods (`method`). The current directory comes first on ``sys.path``, so
that a recipe can refer to a ``.py`` file beside it when mergecli runs as an installed script.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from typing import Any

from mergecli.errors import MergeCliError, one_line

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NAME = re.compile(r"^[A-Za-z_]\w*$")


def is_reference(text: str) -> bool:
    """Whether ``text`` names user code (``package.module:name``) rather than a built-in."""
    return ":" in text


def import_object(
    reference: str, key: str, form: str = "package.module:name", example: str = "mypkg.module:name"
) -> Any:
    """The object ``reference`` (``package.module:name``) names; ``key`` is the recipe key that
    gave it, for messages. Every failure is one line saying what to fix."""
    module_name, sep, attribute = (part.strip() for part in reference.partition(":"))
    if not sep or not _DOTTED.match(module_name) or not _NAME.match(attribute):
        raise MergeCliError(
            f"{key}: '{reference}' is not of the form '{form}' (e.g. '{example}'); use one ':' "
            "between a Python module path and a name"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # files written after startup must be found too
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MergeCliError(
            f"{key} '{reference}': cannot import module '{module_name}' ({type(exc).__name__}: "
            f"{one_line(exc)}); run "
            f"mergecli from the directory that contains it ({cwd} now) or install its package"
        ) from exc
    except Exception as exc:
        raise MergeCliError(
            f"{key} '{reference}': importing module '{module_name}' failed with "
            f"{type(exc).__name__}: {one_line(exc)}; fix the error in that module"
        ) from exc
    found = getattr(module, attribute, None)
    if found is None:
        where = getattr(module, "__file__", None) or module_name
        defined = sorted(
            name
            for name, value in vars(module).items()
            if callable(value)
            and not name.startswith("_")
            and getattr(value, "__module__", None) == module.__name__
        )
        close = difflib.get_close_matches(attribute, defined, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        listing = ", ".join(defined) if defined else "no public functions or classes"
        raise MergeCliError(
            f"{key} '{reference}': module '{module_name}' ({where}) has no '{attribute}'; "
            f"{hint}it defines: {listing}"
        )
    return found

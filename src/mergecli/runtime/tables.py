"""Tables for people: column widths that fit the terminal without breaking a name or a number."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """How a table is drawn: boxed when it fits, compact (one space between columns, a rule
    under the header) when it does not; ``widths`` per column, None where rich may choose."""

    boxed: bool
    widths: list[int] | None
    width: int  # the whole table's width


# Prose (a method's description, a list of parameters) may break after this many characters
# when the terminal is narrow; names and numbers never break.
PROSE_MIN = 12


def chrome(columns: int, boxed: bool) -> int:
    """Characters a table spends on borders and padding: boxed, a line and a space either side
    of every cell; compact, one space between columns."""
    return 3 * columns + 1 if boxed else columns - 1


def layout(
    headers: list[str], cells: list[list[str]], whole: list[bool], numeric: list[bool], width: int
) -> Layout:
    """Widths for ``cells`` (one list per column) within ``width`` characters.

    A column is never narrower than its longest number (``numeric``), its longest word
    (``whole``: names) or its header's longest word; prose may wrap anywhere past PROSE_MIN.
    Past their minimums the spare width goes to the columns in proportion to what they lack.
    A table whose minimums do not fit even compact is drawn as wide as they need: the terminal
    wraps its lines, but nothing is cut off."""
    natural, minimum = [], []
    for header, texts, is_whole, is_number in zip(headers, cells, whole, numeric, strict=True):
        lines = [line for text in texts for line in text.splitlines()] or [""]
        words = [w for text in texts for w in text.split()] or [""]
        header_word = max(map(len, header.split()), default=0)
        natural.append(max(max(map(len, lines)), len(header)))
        if is_number:
            least = max(map(len, lines))
        elif is_whole:
            least = max(map(len, words))
        else:
            least = min(max(map(len, words)), PROSE_MIN)
        minimum.append(max(least, header_word, 1))
    for boxed in (True, False):
        room = width - chrome(len(headers), boxed)
        if sum(natural) <= room:
            return Layout(boxed, None, sum(natural) + chrome(len(headers), boxed))
        if sum(minimum) <= room:
            return Layout(boxed, _share(natural, minimum, room), width)
    return Layout(False, minimum, sum(minimum) + chrome(len(headers), False))


def _share(natural: list[int], minimum: list[int], room: int) -> list[int]:
    """The minimums plus the spare room, shared in proportion to each column's shortfall."""
    spare = room - sum(minimum)
    shortfall = [n - m for n, m in zip(natural, minimum, strict=True)]
    total = sum(shortfall) or 1
    widths = [m + spare * s // total for m, s in zip(minimum, shortfall, strict=True)]
    return [min(w, n) for w, n in zip(widths, natural, strict=True)]

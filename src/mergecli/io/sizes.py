"""Parse human-readable byte sizes such as ``5GB`` or ``2GiB`` (used for ``output.shard_size``)."""

from __future__ import annotations

import re

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)

ACCEPTED_FORMS = (
    "a byte count (123) or a number with a unit: B, KB, MB, GB, TB (powers of 1000) "
    "or KiB, MiB, GiB, TiB (powers of 1024), e.g. 5GB, 500MB, 2GiB, 1.5GB"
)


def parse_size(value: int | str) -> int:
    """Return the number of bytes in ``value`` ("5GB", "2 GiB", "1.5MB", "123" or 123)."""
    # bool is an int subclass, but `shard_size: true` in a recipe is a mistake, not 1 byte.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"invalid size {value!r}; expected {ACCEPTED_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    match = _SIZE_RE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid size {value!r}; expected {ACCEPTED_FORMS}")
    number, unit = match.groups()
    # Decimal arithmetic on the string avoids float error for e.g. "1.1GB" -> 1_100_000_000.
    whole, _, frac = number.partition(".")
    multiplier = _UNITS[unit.lower()]
    scale = 10 ** len(frac)
    numerator = int(whole or "0") * scale + int(frac or "0")
    return (numerator * multiplier + scale // 2) // scale


def format_size(nbytes: float) -> str:
    """Bytes for people: ``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"

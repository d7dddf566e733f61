"""Durations and sizes as people write them: ``500ms``, ``90s``, ``10M``.

Durations are stored as float seconds, sizes as int bytes. ``format_*`` picks the largest
unit that represents the value exactly, so ``parse(format(x)) == x`` for every stored value.
"""

from __future__ import annotations

__all__ = [
    "Duration",
    "Size",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]

import math
import re
from decimal import Decimal
from types import MappingProxyType
from typing import NewType

Duration = NewType("Duration", float)
"""Seconds. Written ``500ms``, ``90s``, ``5m``, ``2h``, ``35d``, or a bare number of seconds."""

Size = NewType("Size", int)
"""Bytes. Written ``300``, ``512K``, ``10M``, ``1G`` (K = 1024)."""

DURATION_UNITS = "ms, s, m, h, d"
SIZE_UNITS = "K, M, G"

# Largest first: format_* tries them in this order.
_DURATION_FACTORS = MappingProxyType(
    {
        "d": Decimal(86400),
        "h": Decimal(3600),
        "m": Decimal(60),
        "s": Decimal(1),
        "ms": Decimal("0.001"),
    }
)
_SIZE_FACTORS = MappingProxyType({"G": 1 << 30, "M": 1 << 20, "K": 1 << 10})

_NUMBER = r"(?P<number>\d+(?:\.\d+)?|\.\d+)"
_DURATION_RE = re.compile(rf"{_NUMBER}\s*(?P<unit>ms|s|m|h|d)?")
_SIZE_RE = re.compile(rf"{_NUMBER}\s*(?P<unit>[KMGkmg])?")


def parse_duration(value: object) -> Duration:
    """Seconds from ``"500ms"``/``"90s"``/``"5m"``/``"2h"``/``"35d"`` or a number of seconds.

    Raises ValueError for anything else, including negative and non-finite values.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"duration too large: {value!r}") from None
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"not a duration: {value!r}")
        factor = _DURATION_FACTORS[match["unit"] or "s"]
        seconds = float(Decimal(match["number"]) * factor)
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {value!r}")
    return Duration(seconds)


def parse_size(value: object) -> Size:
    """Bytes from ``"512K"``/``"10M"``/``"1G"`` (K = 1024, case-insensitive) or an integer.

    Raises ValueError for anything else, including negative values and fractions of a byte.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        count = value
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"not a size: {value!r}")
        factor = _SIZE_FACTORS[match["unit"].upper()] if match["unit"] else 1
        exact = Decimal(match["number"]) * factor
        if exact != exact.to_integral_value():
            raise ValueError(f"not a whole number of bytes: {value!r}")
        count = int(exact)
    else:
        raise ValueError(f"not a size: {value!r}")
    if count < 0:
        raise ValueError(f"not a size: {value!r}")
    return Size(count)


def format_duration(seconds: float) -> str:
    """``0.05`` -> ``"50ms"``, ``90`` -> ``"90s"``, ``7200`` -> ``"2h"``; exact, never rounded."""
    exact = Decimal(repr(float(seconds)))
    if exact == 0:
        return "0s"
    for unit, factor in _DURATION_FACTORS.items():
        count = exact / factor
        if count == count.to_integral_value():
            return f"{int(count)}{unit}"
    return f"{exact:f}s"


def format_size(count: int) -> str:
    """``204800`` -> ``"200K"``, ``10485760`` -> ``"10M"``, ``300`` -> ``"300"``."""
    if count:
        for unit, factor in _SIZE_FACTORS.items():
            if count % factor == 0:
                return f"{count // factor}{unit}"
    return str(count)

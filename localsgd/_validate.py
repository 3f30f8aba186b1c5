"""Argument checks shared by the core and the harness: one test and one wording for "an integer
>= n" and "a finite number >= m". A bool passes neither: ``True`` is an ``int`` to Python, but
``workers=True`` is a mistake, not K = 1.

(``checks.py`` is something else: the workers' agreement before the first average.)
"""

from __future__ import annotations

import math
from typing import TypeGuard


def is_int(value: object, minimum: int) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` of at least ``minimum`` (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_int(name: str, value: object, minimum: int, error: type[Exception] = ValueError) -> int:
    """``value`` if it is an ``int`` of at least ``minimum`` (a bool is not), else ``error``:
    ``"{name} must be an integer >= {minimum}, got {value!r}"``."""
    if not is_int(value, minimum):
        raise error(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def is_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is an ``int`` or a ``float`` (inf and NaN too; a bool is not)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_number(
    name: str, value: object, minimum: float = 0.0, strict: bool = False, error: type[Exception] = ValueError
) -> float:
    """``value`` as a float if it is a finite number of at least ``minimum`` (more than ``minimum``
    if ``strict``; a bool is not a number), else ``error``:
    ``"{name} must be a number >= {minimum:g}, got {value!r}"`` (``>`` if ``strict``)."""
    if not (is_number(value) and math.isfinite(value)) or value < minimum or (strict and value == minimum):
        raise error(f"{name} must be a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)

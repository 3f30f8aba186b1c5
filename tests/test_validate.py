"""The shared argument checks (localsgd._validate): what passes, and each rejection's exact message."""

from __future__ import annotations

import math

import pytest

from localsgd._validate import check_int, check_number, is_int, is_number
from localsgd.harness.config import ConfigError


def test_check_int_returns_what_passes() -> None:
    assert check_int("workers (K)", 4, 1) == 4
    assert check_int("workers (K)", 1, 1) == 1  # the bound itself passes
    assert check_int("overlap_steps (τ)", 0, 0) == 0
    assert is_int(8, 8) and not is_int(7, 8)


@pytest.mark.parametrize(
    ("value", "minimum", "message"),
    [
        (True, 1, "workers (K) must be an integer >= 1, got True"),  # True >= 1 as an int
        (False, 0, "workers (K) must be an integer >= 0, got False"),  # False >= 0 as an int
        (2.0, 1, "workers (K) must be an integer >= 1, got 2.0"),
        ("4", 1, "workers (K) must be an integer >= 1, got '4'"),
        (None, 1, "workers (K) must be an integer >= 1, got None"),
        (0, 1, "workers (K) must be an integer >= 1, got 0"),
        (7, 8, "workers (K) must be an integer >= 8, got 7"),
    ],
)
def test_check_int_rejects_with_one_wording(value: object, minimum: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_int("workers (K)", value, minimum)
    assert str(info.value) == message and type(info.value) is ValueError
    assert not is_int(value, minimum)


def test_check_int_raises_the_callers_error() -> None:
    with pytest.raises(ConfigError) as info:
        check_int("seed", True, 0, ConfigError)
    assert str(info.value) == "seed must be an integer >= 0, got True"


def test_check_number_returns_a_float() -> None:
    assert check_number("latency", 0) == 0.0 and isinstance(check_number("latency", 0), float)
    assert check_number("epochs", 2.5, 0, strict=True) == 2.5
    assert is_number(1) and is_number(1.5) and is_number(math.inf) and is_number(math.nan)


@pytest.mark.parametrize(
    ("value", "minimum", "strict", "message"),
    [
        (True, 0, False, "x must be a number >= 0, got True"),
        (False, 0, False, "x must be a number >= 0, got False"),
        ("1", 0, False, "x must be a number >= 0, got '1'"),
        (math.nan, 0, False, "x must be a number >= 0, got nan"),
        (math.inf, 0, False, "x must be a number >= 0, got inf"),
        (-1, 0, False, "x must be a number >= 0, got -1"),
        (0, 0, True, "x must be a number > 0, got 0"),
        (0.25, 0.5, False, "x must be a number >= 0.5, got 0.25"),
    ],
)
def test_check_number_rejects_with_one_wording(
    value: object, minimum: float, strict: bool, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        check_number("x", value, minimum, strict)
    assert str(info.value) == message
    if isinstance(value, bool) or not isinstance(value, int | float):
        assert not is_number(value)

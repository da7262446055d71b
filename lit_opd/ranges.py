"""Range checks of numeric settings where they enter (a dataclass's `__post_init__`, a module's or
a gate's `__init__`), before any model loads: a value out of range is a ValueError whose one line
names the key, the range and the value (`lit-opd` prints it as `lit-opd: error: ...`)."""

import math


def check_range(key: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                optional: bool = False) -> None:
    """Raise ValueError unless `low` ≤ `value` ≤ `high` (a strict bound with `low_open` /
    `high_open`; None: unbounded on that side). `optional`: None is allowed. NaN is never in range.

    >>> check_range("model.init_args.chunk_size", 0, 1)
    Traceback (most recent call last):
    ValueError: model.init_args.chunk_size must be ≥ 1, got 0
    """
    if value is None and optional:
        return
    in_range = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if in_range and low is not None:
        in_range = value > low if low_open else value >= low
    if in_range and high is not None:
        in_range = value < high if high_open else value <= high
    if not in_range:
        raise ValueError(f"{key} must be {describe(low, high, low_open, high_open)}"
                         f"{' or null' if optional else ''}, got {value!r}")


def describe(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '≥'} {low}"
    if high is not None:
        return f"{'<' if high_open else '≤'} {high}"
    return "a number"

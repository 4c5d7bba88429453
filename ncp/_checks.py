"""Predicates for argument checks: ints and numbers that are not bools."""

from __future__ import annotations


def is_int_at_least(value: object, minimum: int) -> bool:
    """Whether ``value`` is an int (not a bool) ``>= minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_number_above(value: object, bound: float = 0.0, *, inclusive: bool = False) -> bool:
    """Whether ``value`` is an int or float (not a bool) ``> bound`` (``>=`` with
    ``inclusive``); NaN is never above anything."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= bound if inclusive else value > bound

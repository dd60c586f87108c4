"""Typed reads of values that come from outside: config files, GGUF metadata, manifests, command-line and API
arguments.

Every external value goes through one of these before it is used, so a string where a boolean belongs, a fraction
where a size belongs, NaN, or an absurd size is a `ZipjaxError` naming the field and the value, raised before any
allocation, never a silent coercion (`bool("false")` is True; `int(3.7)` is 3). A leaf: imports errors (and numpy)
only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from zipjax.errors import ZipjaxError

# Sizes past these are not models anyone runs; refusing them keeps a hostile config from allocating or looping
# before the weights are compared with it.
MAX_VOCAB = 1 << 24
MAX_WIDTH = 1 << 17  # hidden size, MLP width
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 2048
MAX_POSITIONS = 1 << 24
MAX_SEED = (1 << 63) - 1


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"be {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"be {'<' if hi_open else '<='} {hi}"
    return f"lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def integer(value: Any, name: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """An int (Python or numpy; not a bool, float or string) within [lo, hi]."""
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ZipjaxError(f"{name} has the wrong type: it must be an integer, got {_show(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo in (0, 1):
            limit = "" if hi is None else f" no larger than {hi}"
            raise ZipjaxError(f"{name} must be a {'positive' if lo else 'non-negative'} integer{limit}, got {value}")
        raise ZipjaxError(f"{name} must {_range(lo, hi, False, False)}, got {value}")
    return value


def number(value: Any, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> float:
    """A finite int or float (Python or numpy; not a bool or string) within the bounds (open where asked)."""
    if isinstance(value, np.integer | np.floating):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ZipjaxError(f"{name} has the wrong type: it must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ZipjaxError(f"{name} must be a finite number, got {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        raise ZipjaxError(f"{name} must {_range(lo, hi, lo_open, hi_open)}, got {value}")
    return value


def boolean(value: Any, name: str) -> bool:
    """true or false, nothing that merely converts to one."""
    if not isinstance(value, bool):
        raise ZipjaxError(f"{name} has the wrong type: it must be true or false, got {_show(value)}")
    return value


def string(value: Any, name: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise ZipjaxError(f"{name} has the wrong type: it must be a string, got {_show(value)}")
    if choices is not None and value not in choices:
        raise ZipjaxError(f"{name} must be one of {', '.join(choices)}; got {_show(value)}")
    return value


def optional(read: Callable[..., Any], value: Any, name: str, **bounds) -> Any:
    """None stays None; anything else goes through `read`."""
    return None if value is None else read(value, name, **bounds)


def integers(value: Any, name: str, *, lo: int | None = None, hi: int | None = None,
             max_items: int = 1 << 16) -> tuple[int, ...]:
    """A list (or one int) of integers within bounds."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ZipjaxError(f"{name} has the wrong type: it must be an integer or a list of integers, got {_show(value)}")
    if len(value) > max_items:
        raise ZipjaxError(f"{name} holds {len(value)} entries, more than {max_items}")
    return tuple(integer(v, f"{name}[{i}]", lo=lo, hi=hi) for i, v in enumerate(value))


def mapping(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise ZipjaxError(f"{name} has the wrong type: it must be a JSON object, got {_show(value)}")
    return value

"""Command-line argument readers shared by every `zipjax` subcommand (argparse `type=` functions).

Each turns one argument's text into a value or raises `argparse.ArgumentTypeError` with the reason, which argparse
prints as the one error line. A leaf: imports argparse and pathlib only, so importing a command stays light.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def path(text: str) -> Path:
    """A path argument the operating system can take. An empty one (an unset shell variable, say) is refused here,
    as zipjax.destination refuses it in the API: `Path("")` would silently be the current folder."""
    if text.strip() == "":
        raise argparse.ArgumentTypeError("the path is empty")
    if "\x00" in text:
        raise argparse.ArgumentTypeError("a path cannot contain a NUL byte")
    return Path(text)

"""argparse types that check command-line values where they are read.

A bad value is argparse's usual error (`prog: error: argument --f: expected a number >= 0, got
-1`, exit status 2), before any work starts.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _at_least(kind: type, low: int, strict: bool = False):
    """An argparse type: a `kind` (int or float) >= `low` (> `low` if `strict`)."""
    words = f"{'an integer' if kind is int else 'a number'} {'>' if strict else '>='} {low}"

    def check(text: str):
        value = _number(text, kind)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected {words}, got {text}")
        return value

    check.__name__ = f"{kind.__name__} {'>' if strict else '>='} {low}"
    return check


positive_int = _at_least(int, 1)
non_negative_int = _at_least(int, 0)
positive_float = _at_least(float, 0, strict=True)
non_negative_float = _at_least(float, 0)


def writable_file(text: str) -> str:
    """A file path this process can create or overwrite (its directory exists and is writable)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text} exists and is not writable")
        return text
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: directory {parent} is not "
                                         "writable")
    return text

"""Parsing and printing of the sizes and durations people type in magics and CLIs.

Errors say what was expected so the one-line message a user sees is enough to
fix the input.
"""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes from '4GiB', '512MB', '2g' or a plain number of bytes."""
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(
            f"cannot read size {text!r}: write a number and a unit, e.g. 4GiB or 512MB"
        )
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r} must be more than zero")
    return value


def parse_duration(text: str) -> float:
    """Seconds from '60s', '2m', '500ms', '1h' or a plain number of seconds.

    'inf', 'forever' and '-1' mean no limit and return -1.
    """
    if text.strip().lower() in {"inf", "forever", "-1"}:
        return -1.0
    match = _DURATION_RE.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _DURATION_UNITS:
        raise ValueError(
            f"cannot read duration {text!r}: write a number and a unit, e.g. 60s, 2m or 500ms"
        )
    return float(match.group(1)) * _DURATION_UNITS[unit]


def format_size(n: float) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

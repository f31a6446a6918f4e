"""How every figure about a lease is written: one function per kind.

The widget, ``%gpu status``, the server's ``/leases`` answer and (in
TypeScript, ``labextension/src/format.ts``) the status bar and the panel all
write held time, busy time and share, memory used of the cap, the idle
countdown and the queue place through these functions, so two of them
showing the same lease at the same moment show the same text.
``tests/fixtures/figures.json`` holds cases both sides must give alike.

Pure functions of numbers: no clock, no I/O.
"""

from __future__ import annotations

import math

from gpuattach_broker.units import format_duration

GIB = 1024**3
MIB = 1024**2


def duration_text(seconds: float) -> str:
    """A held or busy time: ``0.4 s``, ``9.1 s``, ``2.5 min``, ``3.0 h``.

    Under a second it stays in seconds (``0.0 s``), so a busy time never
    reads ``0 ms`` next to a held time in seconds.
    """
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds:.1f} s"
    return format_duration(seconds)


def held_text(held: float) -> str:
    """``held 14.0 s``."""
    return f"held {duration_text(held)}"


def share_text(busy: float, held: float) -> str:
    """Busy as a share of held: ``23 %`` (``""`` while nothing is held yet)."""
    if held <= 0:
        return ""
    return f"{100 * min(busy, held) / held:.0f} %"


def busy_text(busy: float, held: float | None = None) -> str:
    """``busy 3.2 s (23 %)``; without `held`, ``busy 3.2 s`` (a figure that
    must not move while nothing runs)."""
    text = f"busy {duration_text(busy)}"
    share = share_text(busy, held) if held is not None else ""
    return f"{text} ({share})" if share else text


def held_busy_text(held: float, busy: float) -> str:
    """``held 14.0 s, busy 3.2 s (23 %)``."""
    return f"{held_text(held)}, {busy_text(busy, held)}"


def _unit(cap: int) -> tuple[int, str]:
    return (GIB, "GiB") if cap >= GIB else (MIB, "MiB")


def memory_text(used: int | None, cap: int) -> str:
    """Memory used of the slice's cap, in the cap's unit: ``3.1/40 GiB``.

    Unknown use: ``cap 40 GiB``; no cap known: the use alone (``3.1 GiB``).
    """
    if cap <= 0:
        if used is None:
            return ""
        factor, unit = _unit(int(used))
        return f"{used / factor:.1f} {unit}"
    factor, unit = _unit(cap)
    total = f"{cap / factor:.1f}".removesuffix(".0")
    if used is None:
        return f"cap {total} {unit}"
    return f"{used / factor:.1f}/{total} {unit}"


def memory_share(used: int | None, cap: int) -> float | None:
    """Used over cap (0..1+), for the colour near the cap; None when unknown."""
    if used is None or cap <= 0:
        return None
    return used / cap


def countdown_text(seconds: float) -> str:
    """Time left before an idle release: ``idle 42s``, ``idle 4m 05s``, ``idle 1h 02m``."""
    left = max(0, math.ceil(seconds - 1e-9))
    if left < 120:
        return f"idle {left}s"
    if left < 3600:
        return f"idle {left // 60}m {left % 60:02d}s"
    return f"idle {left // 3600}h {left % 3600 // 60:02d}m"


def eta_text(seconds: float) -> str:
    """An estimate of a wait, rounded as an estimate: ``~20 s``, ``~1 min``, ``~2 h``;
    ``""`` when unknown (negative)."""
    if seconds < 0:
        return ""
    if seconds < 60:
        return f"~{max(5, 5 * math.ceil(seconds / 5))} s" if seconds < 55 else "~1 min"
    if seconds < 3600:
        return f"~{math.ceil(seconds / 60)} min"
    return f"~{math.ceil(seconds / 3600)} h"


def queue_text(position: int, length: int, eta: float) -> str:
    """``queued #2 of 3 · ~1 min``; the ETA only when it is known."""
    text = f"queued #{position}" + (f" of {length}" if length > position else "")
    wait = eta_text(eta)
    return f"{text} · {wait}" if wait else text


__all__ = [
    "busy_text",
    "countdown_text",
    "duration_text",
    "eta_text",
    "held_busy_text",
    "held_text",
    "memory_share",
    "memory_text",
    "queue_text",
    "share_text",
]

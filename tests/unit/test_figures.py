"""Each kind of figure is written one way (jupyter_gpuattach/figures.py), the
same way as the lab extension's format.ts writes it (shared fixture)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jupyter_gpuattach import figures

CASES: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "figures.json").read_text()
)


@pytest.mark.parametrize(("seconds", "text"), CASES["duration"])
def test_duration(seconds: float, text: str) -> None:
    assert figures.duration_text(seconds) == text


@pytest.mark.parametrize(("busy", "held", "text"), CASES["busy"])
def test_busy(busy: float, held: float | None, text: str) -> None:
    assert figures.busy_text(busy, held) == text


@pytest.mark.parametrize(("held", "busy", "text"), CASES["held_busy"])
def test_held_busy(held: float, busy: float, text: str) -> None:
    assert figures.held_busy_text(held, busy) == text


@pytest.mark.parametrize(("used", "cap", "text"), CASES["memory"])
def test_memory(used: int | None, cap: int, text: str) -> None:
    assert figures.memory_text(used, cap) == text


@pytest.mark.parametrize(("seconds", "text"), CASES["countdown"])
def test_countdown(seconds: float, text: str) -> None:
    assert figures.countdown_text(seconds) == text


@pytest.mark.parametrize(("seconds", "text"), CASES["eta"])
def test_eta(seconds: float, text: str) -> None:
    assert figures.eta_text(seconds) == text


@pytest.mark.parametrize(("position", "length", "eta", "text"), CASES["queue"])
def test_queue(position: int, length: int, eta: float, text: str) -> None:
    assert figures.queue_text(position, length, eta) == text


def test_memory_share_is_unknown_without_a_cap_or_a_sample() -> None:
    assert figures.memory_share(None, 10) is None
    assert figures.memory_share(5, 0) is None
    assert figures.memory_share(9, 10) == 0.9

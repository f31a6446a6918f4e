"""Sizes and durations as people type them in magics and CLIs."""

from __future__ import annotations

import pytest

from gpuattach_broker.units import format_duration, format_size, parse_duration, parse_size

GIB = 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * GIB),
        ("4gib", 4 * GIB),
        ("512MB", 512 * 1000**2),
        ("512MiB", 512 * 1024**2),
        ("2g", 2 * 1000**3),
        ("2G", 2 * 1000**3),
        ("1.5GiB", 1536 * 1024**2),
        ("64KiB", 64 * 1024),
        ("3k", 3000),
        ("1TiB", 1024**4),
        ("1tb", 1000**4),
        ("100", 100),
        ("100b", 100),
        (" 2 GiB ", 2 * GIB),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize(
    "text", ["lots", "", "   ", "-1GiB", "4XB", "GiB", "4 Gibibytes", "1e9", "4,5GiB"]
)
def test_parse_size_malformed_says_what_to_write(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    message = str(info.value)
    assert repr(text) in message
    assert "4GiB" in message  # an example of what to write instead


@pytest.mark.parametrize("text", ["0", "0GiB", "0.0000001b"])
def test_parse_size_zero_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="more than zero"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60s", 60.0),
        ("60", 60.0),
        ("2m", 120.0),
        ("1.5min", 90.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
        ("2H", 7200.0),
        (" 10 s ", 10.0),
        ("0", 0.0),
    ],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["inf", "INF", "forever", "-1", " -1 "])
def test_parse_duration_no_limit(text: str) -> None:
    assert parse_duration(text) == -1.0


@pytest.mark.parametrize("text", ["lots", "", "soon", "-5s", "-2", "3 days", "1d", "5XB"])
def test_parse_duration_malformed_says_what_to_write(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    message = str(info.value)
    assert repr(text) in message
    assert "60s" in message


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536 * 1024**2, "1.5 GiB"),
        (8 * GIB, "8.0 GiB"),
        (5 * 1024**2, "5.0 MiB"),
        (1024**4, "1024.0 GiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.25, "250 ms"),
        (1, "1.0 s"),
        (59.94, "59.9 s"),
        (120, "2.0 min"),
        (90 * 60, "90.0 min"),
        (7200, "2.0 h"),
        (36 * 3600, "36.0 h"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize("n", [1, 999, 4 * GIB, 3 * 1024**2, 12345678])
def test_format_size_reads_back_close(n: int) -> None:
    text = format_size(n).replace(" ", "")
    assert parse_size(text) == pytest.approx(n, rel=0.05)

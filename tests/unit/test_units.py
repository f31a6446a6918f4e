"""Sizes and durations as people type them in magics and CLIs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

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
    with pytest.raises(ValueError, match="4GiB") as info:
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
    with pytest.raises(ValueError, match="60s") as info:
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


# ------------------------------------------------- one duration format ---
# The JupyterLab panel and status bar (labextension/src/format.ts) write
# durations as the widget and %gpu status do. tests/fixtures/durations.json
# is the shared table: generated from format_duration (`python -m
# tests.unit.test_units` rewrites it), checked against it here, and against
# the TypeScript function where node and the extension's node_modules are.

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "durations.json"
LABEXTENSION = Path(__file__).resolve().parents[2] / "labextension"

DURATION_CASES = [
    # milliseconds, with exact ties (half to even) and the edge to seconds
    0.0, -0.0, 1e-9, 0.0004, 0.0005, 0.0015, 0.0025, 0.001, 0.0125, 0.25, 0.5,
    0.9994, 0.9995, 0.99951, 0.9999, 0.99999999,
    # seconds
    1.0, 1.05, 1.25, 1.35, 2.25, 3.0000000000000004, 9.05, 9.1, 9.15, 9.25, 16.0,
    59.95, 60.0, 99.75, 119.94, 119.95, 119.96, 119.99999,
    # minutes
    120.0, 127.5, 135.0, 150.0, 3599.0, 3600.0, 7197.0, 7199.99,
    # hours
    7200.0, 8100.0, 9000.0, 86400.0, 1e6, 3.6e7, 1e25,
    # negative figures (callers clamp countdowns, but the rule is one)
    -0.0004, -1.0, -5.0, -130.0,
]  # fmt: skip


def duration_table() -> dict[str, Any]:
    return {
        "about": "format_duration(seconds) of gpuattach_broker.units; labextension/src/"
        "format.ts formatDuration gives the same text. Regenerate: "
        "python -m tests.unit.test_units",
        "cases": [{"seconds": s, "text": format_duration(s)} for s in DURATION_CASES],
    }


def test_duration_table_matches_the_python_format() -> None:
    table = json.loads(FIXTURE.read_text())
    assert table == duration_table(), "regenerate with: python -m tests.unit.test_units"
    texts = {case["seconds"]: case["text"] for case in table["cases"]}
    # The rule the table pins, in words: ties round half to even, as Python does.
    assert texts[0.0005] == "0 ms"
    assert texts[0.0015] == "2 ms"
    assert texts[135.0] == "2.2 min"
    assert texts[16.0] == "16.0 s"
    assert texts[150.0] == "2.5 min"
    assert texts[0.9995] == "1000 ms"


def test_typescript_format_gives_the_same_durations() -> None:
    node = shutil.which("node")
    typescript = LABEXTENSION / "node_modules" / "typescript"
    if node is None or not typescript.is_dir():
        pytest.skip("node and labextension/node_modules (jlpm install) are needed")
    # Transpile src/format.ts as it is now (no stale build), import it, run the table.
    script = """
const fs = require('fs');
const [dir, fixture] = process.argv.slice(1);
const ts = require(dir + '/node_modules/typescript');
const source = fs.readFileSync(dir + '/src/format.ts', 'utf8');
const js = ts.transpileModule(source, {
  compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2020 }
}).outputText;
import('data:text/javascript;base64,' + Buffer.from(js).toString('base64')).then(m => {
  const table = JSON.parse(fs.readFileSync(fixture, 'utf8'));
  console.log(JSON.stringify(table.cases.map(c => m.formatDuration(c.seconds))));
});
"""
    done = subprocess.run(
        [node, "-e", script, str(LABEXTENSION), str(FIXTURE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    table = json.loads(FIXTURE.read_text())
    got = json.loads(done.stdout)
    wrong = [
        (case["seconds"], case["text"], text)
        for case, text in zip(table["cases"], got, strict=True)
        if case["text"] != text
    ]
    assert not wrong, f"(seconds, Python, TypeScript): {wrong}"


if __name__ == "__main__":
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(duration_table(), indent=1) + "\n")
    print(f"wrote {FIXTURE}")

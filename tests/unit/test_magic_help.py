"""%gpu --help, "did you mean" and completion, from the one table of actions and flags."""

from __future__ import annotations

import pytest
from IPython.core.completer import provisionalcompleter
from IPython.core.interactiveshell import InteractiveShell

from jupyter_gpuattach.magic_help import (
    check_line,
    completions,
    help_text,
    install_completer,
    usage_lines,
    wants_help,
)


def test_help_for_all_and_for_one_action() -> None:
    assert wants_help("--help") == ""
    assert wants_help("attach --help") == "attach"
    assert wants_help("auto -h") == "auto"
    assert wants_help("attach --mem 4GiB") is None
    general = help_text()
    assert all(f"  {a}" in general for a in ("attach", "auto", "release", "status"))
    attach = help_text("attach")
    assert attach.startswith("%gpu attach: ")
    assert "--mem SIZE" in attach
    assert "--idle" not in attach
    assert "--idle DURATION" in help_text("auto")
    assert "%gpu auto off" in help_text("auto")
    assert help_text(cell=True).startswith("%%gpu: ")


def test_usage_is_one_short_line_per_form() -> None:
    lines = usage_lines()
    assert all(len(line) <= 72 for line in lines), lines
    assert not any(line.rstrip().endswith(("--mem", "--idle", "--wait")) for line in lines)


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("atach", "unknown action 'atach' (did you mean attach?)"),
        ("relase", "unknown action 'relase' (did you mean release?)"),
        ("attach --mme 4GiB", "unrecognized arguments: --mme (did you mean --mem?)"),
        ("release --forc", "unrecognized arguments: --forc (did you mean --force?)"),
        ("status --mem 4GiB", "%gpu status: unrecognized arguments: --mem; it takes no options"),
        ("teleport", "unknown action 'teleport'; actions: attach, auto, release, status"),
    ],
)
def test_mistakes_get_a_suggestion(line: str, said: str) -> None:
    assert said in check_line(line)


def test_good_lines_pass() -> None:
    for line in ("attach --fraction 0.5", "auto off", "auto --idle 5s", "", "release --force"):
        assert check_line(line) == "", line
    assert check_line("--mem 1GiB --wait 5s", cell=True) == ""
    assert "did you mean --wait" in check_line("--wiat 5s", cell=True)


@pytest.mark.parametrize(
    ("line", "offered"),
    [
        ("%gpu a", ["attach", "auto"]),
        ("%gpu ", ["attach", "auto", "release", "status"]),
        ("%gpu attach --", ["--mem", "--fraction", "--gpus", "--wait", "--help"]),
        ("%gpu attach --mem 4GiB --", ["--fraction", "--gpus", "--wait", "--help"]),
        ("%gpu attach --mem ", []),  # a size goes here
        ("%gpu auto o", ["off", "on"]),
        ("%%gpu --w", ["--wait"]),
    ],
)
def test_completions(line: str, offered: list[str]) -> None:
    assert completions(line) == offered


def test_other_lines_are_not_ours() -> None:
    assert completions("%gpu") is None
    assert completions("%gpux a") is None
    assert completions("x = 1") is None


def test_ipython_offers_only_the_actions() -> None:
    shell = InteractiveShell.instance()
    install_completer(shell)
    install_completer(shell)  # once only
    assert sum(getattr(m, "_gpuattach", False) for m in shell.Completer.custom_matchers) == 1
    with provisionalcompleter():
        found = [c.text for c in shell.Completer.completions("%gpu a", 6)]
        flags = [c.text for c in shell.Completer.completions("%gpu attach --", 14)]
    assert found == ["attach", "auto"]
    assert flags == ["--fraction", "--gpus", "--help", "--mem", "--wait"]

"""Help, "did you mean" and Tab completion for ``%gpu`` and ``%%gpu``.

One table (`ACTIONS`) says which flags each action takes; the help text,
the check of a typed line and the completer all read it, so they cannot
disagree. Completion is an IPython matcher that suppresses every other
matcher on a ``%gpu`` line: ``%gpu a<Tab>`` offers ``attach`` and ``auto``,
not Python names.
"""

from __future__ import annotations

import difflib
import shlex
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flag:
    name: str
    value: str  # what the flag takes ("" for a switch)
    help: str


FLAGS = {
    "--mem": Flag("--mem", "SIZE", "memory of the slice, e.g. 4GiB (default: a whole device)"),
    "--fraction": Flag("--fraction", "F", "share of one device, e.g. 0.5"),
    "--gpus": Flag("--gpus", "N", "whole devices on one host"),
    "--wait": Flag("--wait", "DURATION", "how long to queue, e.g. 60s or 0 (default: as needed)"),
    "--idle": Flag("--idle", "DURATION", "release after this long without a GPU cell (60s)"),
    "--force": Flag("--force", "", "release even if some names cannot come back"),
    "--help": Flag("--help", "", "show this help"),
}


@dataclass(frozen=True)
class Action:
    name: str
    summary: str
    flags: tuple[str, ...]
    words: tuple[str, ...] = ()  # positional words after the action ("off")


ACTIONS: dict[str, Action] = {
    "attach": Action(
        "attach",
        "hold a GPU slice; every cell runs on it until %gpu release",
        ("--mem", "--fraction", "--gpus", "--wait", "--help"),
    ),
    "auto": Action(
        "auto",
        "attach on the first cell that needs the GPU, release after --idle without one",
        ("--idle", "--mem", "--fraction", "--gpus", "--wait", "--help"),
        ("off", "on"),
    ),
    "release": Action(
        "release", "give the slice back; the kernel's names come home first", ("--force", "--help")
    ),
    "status": Action("status", "what this kernel holds, as a live widget", ("--help",)),
}
CELL_FLAGS = ("--mem", "--fraction", "--gpus", "--wait", "--help")


USAGE_WIDTH = 72


def usage_lines() -> list[str]:
    """One form per line, wrapped between options (never inside one) at
    `USAGE_WIDTH`, so a narrow output area wraps nothing mid-word."""
    lines = []
    for action in ACTIONS.values():
        head = f"  %gpu {action.name}" + (" [off]" if action.words else "")
        lines += _wrapped(head, [_flag_usage(f) for f in action.flags if f != "--help"])
    cell = [_flag_usage(f) for f in CELL_FLAGS if f != "--help"]
    lines += _wrapped("  %%gpu", [*cell, "(one cell on the GPU)"])
    lines.append("  %%local (one cell in the kernel while attached)")
    return lines


def _wrapped(head: str, items: list[str]) -> list[str]:
    lines, line = [], head
    for item in items:
        if len(line) + 1 + len(item) > USAGE_WIDTH:
            lines.append(line)
            line = " " * (len(head) + 1) + item
        else:
            line += " " + item
    return [*lines, line]


def _flag_usage(name: str) -> str:
    flag = FLAGS[name]
    return f"[{name} {flag.value}]" if flag.value else f"[{name}]"


def usage() -> str:
    return "usage:\n" + "\n".join(usage_lines())


def help_text(action: str | None = None, cell: bool = False) -> str:
    """``%gpu --help`` (every action) or ``%gpu <action> --help``."""
    names: tuple[str, ...]
    if cell:
        names, title = CELL_FLAGS, "%%gpu: run this one cell on a GPU slice, then release it"
        head = [title, "", "usage: %%gpu " + " ".join(_flag_usage(f) for f in names[:-1])]
    elif action in ACTIONS:
        spec = ACTIONS[action]
        names = spec.flags
        words = " [off]" if spec.words else ""
        flags = " ".join(_flag_usage(f) for f in names if f != "--help")
        head = [f"%gpu {spec.name}: {spec.summary}", "", f"usage: %gpu {spec.name}{words} {flags}"]
        if spec.words:
            head.append("  %gpu auto off   stop auto mode (a slice held stays attached)")
    else:
        lines = ["%gpu: attach a GPU slice to this kernel, run cells on it, release it", ""]
        lines += [f"  {a.name:<8} {a.summary}" for a in ACTIONS.values()]
        lines += ["", usage(), "", "%gpu <action> --help for one action's options"]
        return "\n".join(lines)
    width = max(len(f) + len(FLAGS[f].value) + 1 for f in names)
    options = [f"  {(f + ' ' + FLAGS[f].value).strip():<{width}}  {FLAGS[f].help}" for f in names]
    return "\n".join([*head, "", "options:", *options])


def did_you_mean(word: str, choices: Any) -> str:
    """`` (did you mean attach?)``, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def check_line(line: str, cell: bool = False) -> str:
    """The first mistake in a ``%gpu`` line, said with a suggestion; ``""`` if none.

    Only what the table knows is checked here (unknown action, a flag the
    action does not take); values are checked where they are read.
    """
    try:
        tokens = shlex.split(line)
    except ValueError as exc:
        return f"cannot read the line: {exc}"
    tokens = [t.split("=", 1)[0] for t in tokens if not t.startswith("--routed")]
    allowed: tuple[str, ...] = CELL_FLAGS
    where = "%%gpu"
    if not cell:
        words = [t for t in tokens if not t.startswith("-")]
        if words and words[0] not in ACTIONS:
            hint = did_you_mean(words[0], ACTIONS)
            return f"%gpu: unknown action {words[0]!r}{hint}; actions: {', '.join(ACTIONS)}"
        action = ACTIONS[words[0]] if words else ACTIONS["status"]
        allowed, where = action.flags, f"%gpu {action.name}"
    for token in tokens:
        if token.startswith("-") and token not in allowed and token not in ("-h",):
            if _is_number(token):
                continue
            hint = did_you_mean(token, allowed)
            takes = ", ".join(f for f in allowed if f != "--help") or "no options"
            return f"{where}: unrecognized arguments: {token}{hint}; it takes {takes}"
    return ""


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def wants_help(line: str) -> str | None:
    """The action whose help was asked for (``""``: the general help), or None."""
    try:
        tokens = shlex.split(line)
    except ValueError:
        return None
    if "--help" not in tokens and "-h" not in tokens:
        return None
    words = [t for t in tokens if not t.startswith("-")]
    return words[0] if words and words[0] in ACTIONS else ""


def completions(line: str) -> list[str] | None:
    """What may come next on a ``%gpu``/``%%gpu`` line ending with the cursor;
    None for any other line (other completers then answer)."""
    stripped = line.lstrip()
    if stripped.startswith("%%gpu"):
        cell, rest = True, stripped[len("%%gpu") :]
    elif stripped.startswith("%gpu"):
        cell, rest = False, stripped[len("%gpu") :]
    else:
        return None
    if not rest or not rest[0].isspace():
        return None  # the magic's own name (or %gpux, another magic) is being typed
    parts = rest.split()
    current = "" if rest.endswith((" ", "\t")) or not parts else parts[-1]
    before = parts[:-1] if current else parts
    words = [p for p in before if not p.startswith("-")]
    if cell:
        options = list(CELL_FLAGS)
    elif not words and not current.startswith("-"):
        options = list(ACTIONS)
    else:
        action = ACTIONS.get(words[0]) if words else ACTIONS["status"]
        if action is None:
            return []
        options = list(action.flags)
        if len(words) == 1 and not current.startswith("-"):
            options += list(action.words)
    if before and before[-1] in FLAGS and FLAGS[before[-1]].value:
        return []  # a value goes here, not a name
    used = set(before)
    return [o for o in options if o.startswith(current) and o not in used]


def install_completer(shell: Any) -> None:
    """Add the ``%gpu`` matcher to the shell's completer (once)."""
    completer = getattr(shell, "Completer", None)
    if completer is None or not hasattr(completer, "custom_matchers"):
        return
    if any(getattr(m, "_gpuattach", False) for m in completer.custom_matchers):
        return
    from IPython.core.completer import SimpleCompletion, context_matcher

    def gpu_matcher(context: Any) -> dict[str, Any]:
        line = context.full_text.split("\n")[context.cursor_line][: context.cursor_position]
        found = completions(line) if context.cursor_line == 0 else None
        if found is None:
            return {"completions": [], "suppress": False}
        return {
            "completions": [SimpleCompletion(text=f, type="magic") for f in found],
            "suppress": True,
        }

    matcher: Any = context_matcher()(gpu_matcher)  # IPython's decorator, untyped
    matcher._gpuattach = True
    completer.custom_matchers.append(matcher)

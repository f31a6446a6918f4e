"""The admin's policy file: who may take how much GPU, with what priority, when.

A TOML file (see ``examples/policy.toml``)::

    [defaults]                 # everyone not in a group
    max_slices = 1             # concurrent slices per user
    gpu_hours_per_day = 4
    priority = "normal"
    on_limit = "queue"         # or "refuse"
    mirror_bytes = "2GiB"      # notebook files mirrored to a GPU host, per lease
    mirror_file_bytes = "1GiB" # ... and per file
    forward_env = ["WANDB_API_KEY"]  # credentials a kernel may forward (none: no list)

    [priorities]
    low = 0
    normal = 10
    high = 20

    [preemption]
    enabled = true
    grace = "30s"

    [groups.course-ml101]
    members = ["alice", "bob"]
    max_slices = 1
    [[groups.course-ml101.windows]]
    days = ["Tue"]
    start = "10:00"
    end = "12:00"
    timezone = "Europe/Berlin"
    priority = "high"

    [users.carol]
    groups = ["course-ml101"]
    admin = true

Limits apply to each member of a group. A user in several groups gets, per
setting, the most generous value among them, and the highest priority of any
group (a group's time window raises its members' priority while it is open);
``forward_env`` lists from several groups add up.

Every mistake is reported with its line and a hint (``gpuattach-broker policy
check FILE``); the broker refuses a bad file at start and keeps the old
policy when a reload finds mistakes.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gpuattach_broker.units import parse_duration, parse_size

DAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}
DEFAULT_PRIORITIES = {"low": 0, "normal": 10, "high": 20}
LIMIT_KEYS = {
    "max_slices": "a whole number of concurrent slices, e.g. 2",
    "max_memory": "a size, e.g. 40GiB (total memory of a user's slices)",
    "gpu_hours_per_day": "a number of GPU-hours, e.g. 4",
    "gpu_hours_per_week": "a number of GPU-hours, e.g. 20",
    "max_slice": 'a fraction (0.5), a size ("24GiB") or "whole"',
    "max_gpus": "a whole number of devices per slice, e.g. 4",
    "default_idle": 'a duration, e.g. "60s"',
    "max_idle": 'a duration, e.g. "10m"',
    "max_lease": 'a duration, e.g. "4h"',
    "priority": "the name of a class from [priorities]",
    "on_limit": '"queue" or "refuse"',
    "mirror_bytes": 'a size, e.g. "2GiB" (notebook files mirrored to a GPU host, per lease)',
    "mirror_file_bytes": 'a size, e.g. "1GiB" (the largest single file mirrored)',
    "forward_env": 'a list of variable names, e.g. ["WANDB_API_KEY"] (credentials a kernel '
    "may send to its worker)",
}
DEFAULT_MIRROR_BYTES = 2 << 30
DEFAULT_MIRROR_FILE_BYTES = 1 << 30
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
GROUP_KEYS = {*LIMIT_KEYS, "members", "windows"}
USER_KEYS = {*LIMIT_KEYS, "groups", "admin"}
WINDOW_KEYS = {"days", "start", "end", "timezone", "priority"}
TOP_KEYS = {"defaults", "priorities", "preemption", "groups", "users"}


@dataclass(frozen=True)
class PolicyError:
    line: int
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" + (f" (hint: {self.hint})" if self.hint else "")


class PolicyErrors(ValueError):
    """Every mistake found in a policy file."""

    def __init__(self, path: str, errors: list[PolicyError]) -> None:
        self.path = path
        self.errors = sorted(errors, key=lambda e: e.line)
        super().__init__("\n".join(f"{path}:{e}" for e in self.errors))


@dataclass(frozen=True)
class Limits:
    """Settings in force for one user; None means no limit."""

    max_slices: int | None = None
    max_memory: int | None = None
    gpu_hours_per_day: float | None = None
    gpu_hours_per_week: float | None = None
    max_slice_fraction: float | None = None  # of one device; None: whole devices allowed
    max_slice_bytes: int | None = None
    max_gpus: int | None = None
    default_idle: float = 60.0
    max_idle: float | None = None
    max_lease: float | None = None
    priority: str = "normal"
    on_limit: str = "queue"
    # The scratch mirror of a notebook's folder on a GPU host that does not
    # share it: bytes per lease, and per file.
    mirror_bytes: int = DEFAULT_MIRROR_BYTES
    mirror_file_bytes: int = DEFAULT_MIRROR_FILE_BYTES
    # Credential variables a kernel may forward to its worker (by naming them
    # in GPUATTACH_FORWARD_ENV); None: no list, the kernel's own choice.
    forward_env: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Window:
    days: frozenset[int]
    start: dt.time
    end: dt.time
    timezone: ZoneInfo
    priority: str

    def open_at(self, when: dt.datetime) -> bool:
        local = when.astimezone(self.timezone)
        return local.weekday() in self.days and self.start <= local.time() < self.end


@dataclass(frozen=True)
class GroupPolicy:
    name: str
    settings: Mapping[str, Any]  # parsed limit values set in this group
    members: frozenset[str] = frozenset()
    windows: tuple[Window, ...] = ()


@dataclass(frozen=True)
class UserPolicy:
    name: str
    settings: Mapping[str, Any]
    groups: tuple[str, ...] = ()
    admin: bool = False


@dataclass(frozen=True)
class Effective:
    """What applies to a user right now."""

    user: str
    groups: tuple[str, ...]
    limits: Limits
    priority: int
    priority_class: str


@dataclass(frozen=True)
class Policy:
    defaults: Limits = field(default_factory=Limits)
    priorities: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PRIORITIES))
    groups: Mapping[str, GroupPolicy] = field(default_factory=dict)
    users: Mapping[str, UserPolicy] = field(default_factory=dict)
    preemption: bool = False
    preemption_grace: float = 30.0
    source: str = "(built-in default: no limits)"

    def admins(self) -> set[str]:
        return {u.name for u in self.users.values() if u.admin}

    def groups_of(self, user: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
        """The policy's groups a user is in: listed as member, by [users], or by identity."""
        names = [g.name for g in self.groups.values() if user in g.members]
        profile = self.users.get(user)
        if profile is not None:
            names.extend(profile.groups)
        names.extend(g for g in extra if g in self.groups)
        return tuple(dict.fromkeys(names))

    def effective(
        self, user: str, extra_groups: Iterable[str] = (), now: dt.datetime | None = None
    ) -> Effective:
        now = now or dt.datetime.now(dt.UTC)
        groups = self.groups_of(user, extra_groups)
        merged: dict[str, Any] = {}
        for name in groups:
            for key, value in self.groups[name].settings.items():
                merged[key] = _more_generous(key, merged[key], value) if key in merged else value
        profile = self.users.get(user)
        if profile is not None:
            merged.update(profile.settings)  # a user's own settings win
        limits = replace(self.defaults, **merged)
        classes = [self.defaults.priority]
        classes += [
            self.groups[g].settings["priority"]
            for g in groups
            if "priority" in self.groups[g].settings
        ]
        priority_class = max(classes, key=lambda c: self.priorities.get(c, 0))
        if profile is not None and "priority" in profile.settings:
            priority_class = profile.settings["priority"]
        limits = replace(limits, priority=priority_class)
        for name in groups:
            for window in self.groups[name].windows:
                if window.open_at(now) and self.priorities[window.priority] > self.priorities.get(
                    priority_class, 0
                ):
                    priority_class = window.priority
        return Effective(
            user, groups, limits, self.priorities.get(priority_class, 0), priority_class
        )


def _more_generous(key: str, a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None  # no limit beats any limit
    if key == "priority":
        return a  # Policy.effective picks the highest class itself
    if key == "on_limit":
        return "queue" if "queue" in (a, b) else "refuse"
    if key == "forward_env":
        return tuple(dict.fromkeys((*a, *b)))  # every group's names
    return max(a, b)


# ------------------------------------------------------------------ parsing ---


class _Lines:
    """Where tables and keys are in the file, for error messages."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r'^\s*("[^"]*"|[A-Za-z0-9_.-]+)\s*=')

    def __init__(self, text: str) -> None:
        self.tables: dict[tuple[str, ...], list[int]] = {}
        self.keys: dict[tuple[tuple[str, ...], str], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), 1):
            header = self._HEADER.match(line)
            if header:
                table = tuple(part.strip().strip('"') for part in header.group(1).split("."))
                self.tables.setdefault(table, []).append(number)
                continue
            key = self._KEY.match(line)
            if key:
                parts = key.group(1).strip('"').split(".")
                self.keys.setdefault((table + tuple(parts[:-1]), parts[-1]), number)

    def of(self, table: tuple[str, ...], key: str | None = None, index: int = 0) -> int:
        if key is not None and (table, key) in self.keys:
            return self.keys[(table, key)]
        for cut in range(len(table), 0, -1):
            lines = self.tables.get(table[:cut])
            if lines:
                return lines[min(index, len(lines) - 1)]
        return 1


class _Parser:
    def __init__(self, text: str) -> None:
        self.lines = _Lines(text)
        self.errors: list[PolicyError] = []

    def error(self, table: tuple[str, ...], key: str | None, message: str, hint: str = "") -> None:
        self.errors.append(PolicyError(self.lines.of(table, key), message, hint))

    def limits(self, table: tuple[str, ...], raw: Mapping[str, Any]) -> dict[str, Any]:
        parsed: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in LIMIT_KEYS:
                continue
            try:
                parsed.update(_parse_limit(key, value))
            except (ValueError, TypeError) as exc:
                self.error(table, key, f"{'.'.join(table)}.{key}: {exc}", LIMIT_KEYS[key])
        return parsed

    def unknown(self, table: tuple[str, ...], raw: Mapping[str, Any], allowed: set[str]) -> None:
        for key in raw:
            if key not in allowed:
                close = ", ".join(sorted(allowed))
                self.error(
                    table,
                    key,
                    f"unknown setting {key!r} in [{'.'.join(table)}]",
                    f"known settings: {close}",
                )

    def table(self, raw: Any, path: tuple[str, ...]) -> Mapping[str, Any]:
        if isinstance(raw, Mapping):
            return raw
        self.error(
            path[:-1],
            path[-1],
            f"{'.'.join(path)} must be a table",
            f"write it as [{'.'.join(path)}] with settings below it",
        )
        return {}


def _parse_limit(key: str, value: Any) -> dict[str, Any]:
    if key in ("max_slices", "max_gpus"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"must be a whole number >= 0, got {value!r}")
        return {key: value}
    if key == "max_memory":
        return {key: parse_size(_text(value))}
    if key in ("gpu_hours_per_day", "gpu_hours_per_week"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {value!r}")
        if value < 0 or math.isnan(value):
            raise ValueError(f"must be >= 0, got {value!r}")
        return {key: float(value)}
    if key == "max_slice":
        if value == "whole":
            return {"max_slice_fraction": None, "max_slice_bytes": None}
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not 0 < value <= 1:
                raise ValueError(f"a fraction must be in (0, 1], got {value!r}")
            return {"max_slice_fraction": float(value)}
        return {"max_slice_bytes": parse_size(_text(value))}
    if key in ("default_idle", "max_idle", "max_lease"):
        seconds = parse_duration(_text(value))
        if seconds < 0:
            raise ValueError("must be a finite duration")
        return {key: seconds}
    if key == "on_limit":
        if value not in ("queue", "refuse"):
            raise ValueError(f'must be "queue" or "refuse", got {value!r}')
        return {key: value}
    if key == "priority":
        return {key: _text(value)}
    if key in ("mirror_bytes", "mirror_file_bytes"):
        size = value if isinstance(value, int) and not isinstance(value, bool) else None
        size = parse_size(_text(value)) if size is None else size
        if size <= 0:
            raise ValueError(f"must be a size above zero, got {value!r}")
        return {key: size}
    if key == "forward_env":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"must be a list of variable names, got {value!r}")
        bad = [v for v in value if not _ENV_NAME.match(v)]
        if bad:
            raise ValueError(f"not a variable name: {', '.join(map(repr, bad))}")
        return {key: tuple(dict.fromkeys(value))}
    raise ValueError(f"unknown setting {key!r}")


def _text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected text or a number, got {value!r}")
    return str(value)


def parse_policy(text: str, path: str = "<policy>") -> Policy:
    """A Policy from TOML text, or PolicyErrors listing every mistake."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = int(match.group(1)) if match else 1
        raise PolicyErrors(
            path,
            [PolicyError(line, f"not valid TOML: {exc}", "check quotes, brackets and '=' there")],
        ) from None
    p = _Parser(text)
    p.unknown((), raw, TOP_KEYS)

    priorities = dict(DEFAULT_PRIORITIES)
    raw_priorities = p.table(raw.get("priorities", {}), ("priorities",))
    for name, value in raw_priorities.items():
        if isinstance(value, bool) or not isinstance(value, int):
            p.error(
                ("priorities",),
                name,
                f"priority {name!r} must be a whole number",
                "higher numbers win, e.g. high = 20",
            )
        else:
            priorities[name] = value

    def check_priority(table: tuple[str, ...], settings: Mapping[str, Any]) -> None:
        name = settings.get("priority")
        if name is not None and name not in priorities:
            p.error(
                table,
                "priority",
                f"unknown priority class {name!r}",
                f"define it under [priorities] or use one of {sorted(priorities)}",
            )

    raw_defaults = p.table(raw.get("defaults", {}), ("defaults",))
    p.unknown(("defaults",), raw_defaults, set(LIMIT_KEYS))
    default_settings = p.limits(("defaults",), raw_defaults)
    check_priority(("defaults",), default_settings)
    defaults = replace(Limits(), **default_settings)

    raw_preemption = p.table(raw.get("preemption", {}), ("preemption",))
    p.unknown(("preemption",), raw_preemption, {"enabled", "grace"})
    enabled = raw_preemption.get("enabled", False)
    if not isinstance(enabled, bool):
        p.error(("preemption",), "enabled", "preemption.enabled must be true or false")
        enabled = False
    grace = 30.0
    if "grace" in raw_preemption:
        try:
            grace = parse_duration(_text(raw_preemption["grace"]))
            if grace < 0:
                raise ValueError("must be a finite duration")
        except (ValueError, TypeError) as exc:
            p.error(("preemption",), "grace", f"preemption.grace: {exc}", 'e.g. grace = "30s"')

    groups: dict[str, GroupPolicy] = {}
    for name, raw_group in p.table(raw.get("groups", {}), ("groups",)).items():
        table = ("groups", name)
        raw_group = p.table(raw_group, table)
        p.unknown(table, raw_group, GROUP_KEYS)
        settings = p.limits(table, raw_group)
        check_priority(table, settings)
        members = raw_group.get("members", [])
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            p.error(
                table,
                "members",
                f"groups.{name}.members must be a list of user names",
                'e.g. members = ["alice", "bob"]',
            )
            members = []
        windows = []
        raw_windows = raw_group.get("windows", [])
        if not isinstance(raw_windows, list):
            p.error(
                table,
                "windows",
                f"groups.{name}.windows must be a list of tables",
                f"write each as [[groups.{name}.windows]]",
            )
            raw_windows = []
        for index, raw_window in enumerate(raw_windows):
            window = _parse_window(p, (*table, "windows"), index, raw_window, priorities)
            if window is not None:
                windows.append(window)
        groups[name] = GroupPolicy(name, settings, frozenset(members), tuple(windows))

    users: dict[str, UserPolicy] = {}
    for name, raw_user in p.table(raw.get("users", {}), ("users",)).items():
        table = ("users", name)
        raw_user = p.table(raw_user, table)
        p.unknown(table, raw_user, USER_KEYS)
        settings = p.limits(table, raw_user)
        check_priority(table, settings)
        user_groups = raw_user.get("groups", [])
        if not isinstance(user_groups, list) or not all(isinstance(g, str) for g in user_groups):
            p.error(table, "groups", f"users.{name}.groups must be a list of group names")
            user_groups = []
        for group in user_groups:
            if group not in groups:
                p.error(
                    table,
                    "groups",
                    f"users.{name} names unknown group {group!r}",
                    f"define [groups.{group}] or remove it",
                )
        admin = raw_user.get("admin", False)
        if not isinstance(admin, bool):
            p.error(table, "admin", f"users.{name}.admin must be true or false")
            admin = False
        users[name] = UserPolicy(name, settings, tuple(user_groups), admin)

    if p.errors:
        raise PolicyErrors(path, p.errors)
    return Policy(defaults, priorities, groups, users, enabled, grace, path)


def _parse_window(
    p: _Parser, table: tuple[str, ...], index: int, raw: Any, priorities: Mapping[str, int]
) -> Window | None:
    where = p.lines.of(table, None, index)

    def fail(message: str, hint: str = "") -> None:
        p.errors.append(PolicyError(where, message, hint))

    if not isinstance(raw, Mapping):
        fail(f"{'.'.join(table)}[{index}] must be a table")
        return None
    for key in raw:
        if key not in WINDOW_KEYS:
            fail(f"unknown window setting {key!r}", f"known: {', '.join(sorted(WINDOW_KEYS))}")
    days_raw = raw.get("days", [])
    days: set[int] = set()
    if not isinstance(days_raw, list) or not days_raw:
        fail('a window needs days, e.g. days = ["Tue", "Thu"]')
    else:
        for day in days_raw:
            key = str(day).strip().lower()[:3]
            if key not in DAYS:
                fail(f"unknown day {day!r}", "use Mon, Tue, Wed, Thu, Fri, Sat or Sun")
            else:
                days.add(DAYS[key])
    times = []
    for key in ("start", "end"):
        try:
            times.append(dt.time.fromisoformat(str(raw[key])))
        except KeyError:
            fail(f'a window needs {key}, e.g. {key} = "10:00"')
        except ValueError:
            fail(f"window {key} {raw[key]!r} is not a time of day", 'write "HH:MM", e.g. "10:00"')
    if len(times) == 2 and times[0] >= times[1]:
        fail("a window must start before it ends", "windows do not wrap past midnight; split it")
    try:
        zone = ZoneInfo(str(raw.get("timezone", "UTC")))
    except (ZoneInfoNotFoundError, ValueError):
        fail(f"unknown timezone {raw.get('timezone')!r}", 'an IANA name, e.g. "Europe/Berlin"')
        zone = ZoneInfo("UTC")
    priority = raw.get("priority", "high")
    if priority not in priorities:
        fail(f"unknown priority class {priority!r}", f"one of {sorted(priorities)}")
    if len(times) != 2 or not days or priority not in priorities:
        return None
    return Window(frozenset(days), times[0], times[1], zone, str(priority))


def load_policy(path: str | Path) -> Policy:
    text = Path(path).read_text()
    return parse_policy(text, str(path))

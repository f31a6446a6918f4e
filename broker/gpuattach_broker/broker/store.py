"""The broker's durable state in SQLite: leases, devices, and an event log.

WAL mode with synchronous=NORMAL: a killed broker process loses nothing that
was committed (the data is in the OS page cache), and a commit costs tens of
microseconds, not an fsync. Tokens are kept only as SHA-256 hashes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    kernel_id TEXT NOT NULL DEFAULT '',
    token_hash TEXT NOT NULL,
    host TEXT NOT NULL DEFAULT '',
    device_ids TEXT NOT NULL DEFAULT '[]',
    device_name TEXT NOT NULL DEFAULT '',
    memory_bytes INTEGER NOT NULL DEFAULT 0,
    req_memory_bytes INTEGER NOT NULL DEFAULT 0,
    req_fraction REAL NOT NULL DEFAULT 0,
    req_gpus INTEGER NOT NULL DEFAULT 1,
    exclusive INTEGER NOT NULL DEFAULT 0,
    worker_endpoint TEXT NOT NULL DEFAULT '',
    requested_at REAL NOT NULL,
    granted_at REAL NOT NULL DEFAULT 0,
    expires_at REAL NOT NULL DEFAULT 0,
    ttl_seconds REAL NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    end_reason TEXT NOT NULL DEFAULT '',
    ended_at REAL NOT NULL DEFAULT 0,
    busy_seconds REAL NOT NULL DEFAULT 0,
    idle_release_at REAL NOT NULL DEFAULT 0,
    idle_override REAL NOT NULL DEFAULT -1,
    priority INTEGER NOT NULL DEFAULT 0,
    preempt_deadline REAL NOT NULL DEFAULT 0,
    gpu_busy_seconds REAL NOT NULL DEFAULT 0,
    groups TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS leases_state ON leases(state);
CREATE INDEX IF NOT EXISTS leases_user ON leases(user);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    memory_bytes INTEGER NOT NULL,
    uuid TEXT NOT NULL DEFAULT '',
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    lease_id TEXT NOT NULL DEFAULT '',
    user TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
"""

# A preempting lease still runs: its kernel is moving its namespace out.
ACTIVE_STATES = ("starting", "active", "preempting")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class LeaseRecord:
    lease_id: str
    user: str
    token_hash: str
    requested_at: float
    state: str
    kernel_id: str = ""
    host: str = ""
    device_ids: list[str] = field(default_factory=list)
    device_name: str = ""
    memory_bytes: int = 0
    req_memory_bytes: int = 0
    req_fraction: float = 0.0
    req_gpus: int = 1
    exclusive: bool = False
    worker_endpoint: str = ""
    granted_at: float = 0.0
    expires_at: float = 0.0
    ttl_seconds: float = 0.0
    end_reason: str = ""
    ended_at: float = 0.0
    busy_seconds: float = 0.0
    idle_release_at: float = 0.0
    idle_override: float = -1.0
    priority: int = 0
    preempt_deadline: float = 0.0
    gpu_busy_seconds: float = 0.0
    # The user's groups when it was granted (identity and policy), so usage
    # can be told per group after memberships change.
    groups: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def held_seconds(self, now: float | None = None) -> float:
        if not self.granted_at:
            return 0.0
        end = self.ended_at or (now if now is not None else time.time())
        return max(0.0, end - self.granted_at)


_LEASE_COLUMNS = [
    "lease_id",
    "user",
    "kernel_id",
    "token_hash",
    "host",
    "device_ids",
    "device_name",
    "memory_bytes",
    "req_memory_bytes",
    "req_fraction",
    "req_gpus",
    "exclusive",
    "worker_endpoint",
    "requested_at",
    "granted_at",
    "expires_at",
    "ttl_seconds",
    "state",
    "end_reason",
    "ended_at",
    "busy_seconds",
    "idle_release_at",
    "idle_override",
    "priority",
    "preempt_deadline",
    "gpu_busy_seconds",
    "groups",
]


def _row_to_lease(row: sqlite3.Row) -> LeaseRecord:
    values: dict[str, Any] = dict(zip(_LEASE_COLUMNS, row, strict=True))
    values["device_ids"] = json.loads(values["device_ids"])
    values["groups"] = json.loads(values["groups"])
    values["exclusive"] = bool(values["exclusive"])
    return LeaseRecord(**values)


@dataclass
class EventRecord:
    ts: float
    lease_id: str
    user: str
    kind: str
    detail: str


class Store:
    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = str(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            self._migrate()

    def _migrate(self) -> None:
        """Bring a state file written by an older version up to this schema."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(leases)")}
        added = (
            ("busy_seconds", 0),
            ("idle_release_at", 0),
            ("idle_override", -1),
            ("priority", 0),
            ("preempt_deadline", 0),
            ("gpu_busy_seconds", 0),
        )
        for name, default in added:
            if name not in columns:
                self.db.execute(
                    f"ALTER TABLE leases ADD COLUMN {name} REAL NOT NULL DEFAULT {default}"
                )
        if "groups" not in columns:
            self.db.execute("ALTER TABLE leases ADD COLUMN groups TEXT NOT NULL DEFAULT '[]'")

    def close(self) -> None:
        self.db.close()

    # ----------------------------------------------------------- leases ---

    def put_lease(self, lease: LeaseRecord) -> None:
        values = [getattr(lease, c) for c in _LEASE_COLUMNS]
        values[_LEASE_COLUMNS.index("device_ids")] = json.dumps(lease.device_ids)
        values[_LEASE_COLUMNS.index("groups")] = json.dumps(lease.groups)
        values[_LEASE_COLUMNS.index("exclusive")] = int(lease.exclusive)
        placeholders = ",".join("?" * len(_LEASE_COLUMNS))
        self.db.execute(
            f"INSERT OR REPLACE INTO leases ({','.join(_LEASE_COLUMNS)}) VALUES ({placeholders})",
            values,
        )

    def get_lease(self, lease_id: str) -> LeaseRecord | None:
        row = self.db.execute(
            f"SELECT {','.join(_LEASE_COLUMNS)} FROM leases WHERE lease_id = ?", (lease_id,)
        ).fetchone()
        return _row_to_lease(row) if row else None

    def renew(
        self,
        lease_id: str,
        expires_at: float,
        busy_seconds: float | None = None,
        idle_release_at: float = 0.0,
    ) -> None:
        if busy_seconds is None:
            self.db.execute(
                "UPDATE leases SET expires_at = ? WHERE lease_id = ?", (expires_at, lease_id)
            )
        else:
            self.db.execute(
                "UPDATE leases SET expires_at = ?, busy_seconds = MAX(busy_seconds, ?), "
                "idle_release_at = ? WHERE lease_id = ?",
                (expires_at, busy_seconds, idle_release_at, lease_id),
            )

    def record_gpu_busy(self, lease_id: str, busy_seconds: float) -> None:
        self.db.execute(
            "UPDATE leases SET gpu_busy_seconds = MAX(gpu_busy_seconds, ?) WHERE lease_id = ?",
            (busy_seconds, lease_id),
        )

    def set_idle_override(self, lease_id: str, idle_seconds: float) -> None:
        self.db.execute(
            "UPDATE leases SET idle_override = ? WHERE lease_id = ?", (idle_seconds, lease_id)
        )

    def leases(self, *, user: str = "", include_ended: bool = False) -> list[LeaseRecord]:
        query = f"SELECT {','.join(_LEASE_COLUMNS)} FROM leases"
        clauses, args = [], []
        if user:
            clauses.append("user = ?")
            args.append(user)
        if not include_ended:
            clauses.append(f"state IN ({','.join('?' * len(ACTIVE_STATES))})")
            args.extend(ACTIVE_STATES)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY requested_at"
        return [_row_to_lease(r) for r in self.db.execute(query, args)]

    def leases_since(self, user: str, since: float) -> list[LeaseRecord]:
        """A user's leases held at any time after `since` (for GPU-hour quotas)."""
        query = (
            f"SELECT {','.join(_LEASE_COLUMNS)} FROM leases WHERE user = ? "
            "AND granted_at > 0 AND (ended_at = 0 OR ended_at >= ?)"
        )
        return [_row_to_lease(r) for r in self.db.execute(query, (user, since))]

    # ---------------------------------------------------------- devices ---

    def put_device(
        self, device_id: str, host: str, name: str, kind: str, memory_bytes: int, uuid: str
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?, ?, ?, ?)",
            (device_id, host, name, kind, memory_bytes, uuid, time.time()),
        )

    def devices(self) -> Iterator[tuple[str, str, str, str, int, str]]:
        yield from self.db.execute(
            "SELECT device_id, host, name, kind, memory_bytes, uuid FROM devices"
        )

    # ----------------------------------------------------------- events ---

    def event(self, kind: str, *, lease_id: str = "", user: str = "", detail: str = "") -> None:
        self.db.execute(
            "INSERT INTO events (ts, lease_id, user, kind, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), lease_id, user, kind, detail),
        )

    def events(
        self, *, since: float = 0.0, lease_id: str = "", user: str = ""
    ) -> list[EventRecord]:
        query = "SELECT ts, lease_id, user, kind, detail FROM events WHERE ts >= ?"
        args: list[Any] = [since]
        if lease_id:
            query += " AND lease_id = ?"
            args.append(lease_id)
        if user:
            query += " AND user = ?"
            args.append(user)
        return [EventRecord(*row) for row in self.db.execute(query + " ORDER BY id", args)]

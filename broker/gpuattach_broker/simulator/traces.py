"""Reading workloads: NotebookOS trace JSON, a plain CSV, the broker's ledger.

Each reader returns a `Workload`; `load_workload` picks the reader from the
file's content when no format is given, so `simulate some-file` just works.
Errors name the file, the line or session, and what was expected.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import sqlalchemy.exc

from gpuattach_broker.broker.store import StoreError, open_store
from gpuattach_broker.simulator.workload import Cell, Session, Workload, make_session
from gpuattach_broker.units import parse_size

Format = Literal["trace", "csv", "ledger"]
FORMATS: tuple[Format, ...] = ("trace", "csv", "ledger")

TICK_SECONDS = 60.0  # NotebookOS traces count time in one-minute ticks
GB = 1000**3  # NotebookOS sizes are in (decimal) GB

CSV_COLUMNS = ("kernel", "start", "duration", "gpus", "memory")
CSV_OPTIONAL = ("user", "groups")  # the kernel's user (default: the kernel name); its groups
_SQLITE_MAGIC = b"SQLite format 3\x00"


class WorkloadError(ValueError):
    """The input cannot be read as a workload; the message says why."""


def detect_format(path: Path) -> Format:
    """Guess from the first bytes: SQLite header, a JSON object, else CSV."""
    with path.open("rb") as f:
        head = f.read(len(_SQLITE_MAGIC))
        if head == _SQLITE_MAGIC:
            return "ledger"
        rest = head + f.read(64)
    if rest.lstrip().startswith((b"{", b"[")):
        return "trace"
    return "csv"


def load_workload(path: str | Path, fmt: Format | None = None) -> Workload:
    if isinstance(path, str) and "://" in path:  # a broker's db_url (PostgreSQL, say)
        if fmt not in (None, "ledger"):
            raise WorkloadError(f"{path}: a database URL holds a ledger, not a {fmt}")
        return load_ledger(path)
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(f"{p}: no such file")
    fmt = fmt or detect_format(p)
    if fmt == "trace":
        return load_trace(p)
    if fmt == "csv":
        return load_csv(p)
    if fmt == "ledger":
        return load_ledger(p)
    raise WorkloadError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


# ------------------------------------------------------------ NotebookOS ---


def load_trace(path: Path) -> Workload:
    """NotebookOS workload JSON: `sessions[]` with ticks of 60 s, `trainings[]`
    with `gpus` (0 = CPU-only cell), `vram` and `memory` in GB."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkloadError(f"{path}: not a NotebookOS trace ({exc})") from exc
    raw_sessions = data.get("sessions") if isinstance(data, dict) else data
    if not isinstance(raw_sessions, list):
        raise WorkloadError(f"{path}: expected a JSON object with a 'sessions' list")
    sessions = []
    for number, raw in enumerate(raw_sessions):
        try:
            sessions.append(_trace_session(raw, number))
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkloadError(f"{path}: session #{number}: cannot read {exc}") from exc
    title = ""
    if isinstance(data, dict):
        title = data.get("workload_title") or data.get("workloadTitle") or ""
    return Workload(name=str(title or path.stem), sessions=tuple(sessions), source_format="trace")


def _trace_session(raw: dict[str, Any], number: int) -> Session:
    kernel = str(raw.get("id") or f"session-{number}")
    cells = [
        Cell(
            kernel=kernel,
            index=i,
            start=float(t["start_tick"]) * TICK_SECONDS,
            duration=float(t["duration_in_ticks"]) * TICK_SECONDS,
            gpus=int(t.get("gpus", 0)),
            vram_bytes=round(float(t.get("vram", 0.0)) * GB),
            namespace_bytes=round(float(t.get("memory", 0.0)) * GB),
        )
        for i, t in enumerate(raw.get("trainings", []))
    ]
    max_request = raw.get("max_resource_request") or {}
    return make_session(
        kernel,
        cells,
        start=float(raw["start_tick"]) * TICK_SECONDS,
        stop=float(raw["stop_tick"]) * TICK_SECONDS,
        max_gpus=int(max_request.get("gpus", 0)),
    )


# ------------------------------------------------------------------- CSV ---


def _size(text: str) -> int:
    text = text.strip()
    if text in ("", "0"):
        return 0
    return parse_size(text)


def load_csv(path: Path) -> Workload:
    """`kernel,start,duration,gpus,memory`: seconds, and memory as bytes or
    with a unit (16GiB). The memory is both the cell's GPU memory (what a
    fractional slice asks for) and the namespace size that migrates.

    Optional columns: `user` (whose kernel it is; default the kernel name),
    `groups` (the user's identity groups, as JupyterHub would report them,
    separated by `;`), `fraction` (share of one GPU a 1-GPU cell asks for),
    `model` (GPU-model constraint), `hosts` (allowed hosts, `;`-separated),
    `cpus` and `host_memory` (what it takes of its host). A kernel belongs to
    one user: its rows must agree.
    """
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise WorkloadError(
                f"{path}: CSV header must contain {','.join(CSV_COLUMNS)}; missing {missing}"
            )
        by_kernel: dict[str, list[Cell]] = defaultdict(list)
        owners: dict[str, tuple[str, tuple[str, ...]]] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            try:
                kernel = row["kernel"]
                if not kernel:
                    raise ValueError("empty kernel name")
                memory = _size(row["memory"])
                cell = Cell(
                    kernel=kernel,
                    index=len(by_kernel[kernel]),
                    start=float(row["start"]),
                    duration=float(row["duration"]),
                    gpus=int(row["gpus"]),
                    vram_bytes=memory,
                    namespace_bytes=memory,
                    fraction=float(row.get("fraction") or 0.0),
                    gpu_model=row.get("model", ""),
                    hosts=tuple(h.strip() for h in row.get("hosts", "").split(";") if h.strip()),
                    cpus=float(row.get("cpus") or 0.0),
                    host_memory_bytes=_size(row.get("host_memory", "")),
                )
                if not 0 <= cell.fraction < 1 or (cell.fraction and cell.gpus != 1):
                    raise ValueError(
                        f"fraction {cell.fraction:g} must be 0 (whole GPUs) or between 0 and 1 "
                        "on a 1-GPU cell"
                    )
                if cell.cpus < 0:
                    raise ValueError("cpus must not be negative")
            except ValueError as exc:
                raise WorkloadError(f"{path}:{line}: {exc}") from exc
            if cell.duration < 0 or cell.gpus < 0:
                raise WorkloadError(f"{path}:{line}: duration and gpus must not be negative")
            groups = tuple(g.strip() for g in row.get("groups", "").split(";") if g.strip())
            owner = (row.get("user", "") or kernel, groups)
            if owners.setdefault(kernel, owner) != owner:
                raise WorkloadError(
                    f"{path}:{line}: kernel {kernel!r} was given user {owners[kernel][0]!r} and "
                    f"groups {list(owners[kernel][1])} before; a kernel belongs to one user"
                )
            by_kernel[kernel].append(cell)
    sessions = tuple(
        make_session(k, cells, user=owners[k][0], groups=owners[k][1])
        for k, cells in by_kernel.items()
    )
    return Workload(name=path.stem, sessions=sessions, source_format="csv")


# ---------------------------------------------------------------- ledger ---


def load_ledger(path: Path | str) -> Workload:
    """The live broker's ledger (its SQLite state file, or its db_url), read
    through the broker's store: every granted lease is one cell of its
    kernel, from `granted_at` to `ended_at` (a lease still active ends at the
    ledger's last timestamp)."""
    try:
        store = open_store(path, readonly=True)
        try:
            leases = store.leases(include_ended=True)
        finally:
            store.close()
    except (StoreError, sqlalchemy.exc.SQLAlchemyError) as exc:
        raise WorkloadError(f"{path}: not a gpuattach broker state file ({exc})") from exc
    rows = sorted(
        (
            (
                r.user,
                r.kernel_id,
                r.granted_at,
                r.ended_at,
                r.req_gpus,
                r.memory_bytes,
                r.req_memory_bytes,
            )
            for r in leases
            if r.granted_at > 0
        ),
        key=lambda row: row[2],
    )
    last_seen = max((max(r[2], r[3]) for r in rows), default=0.0)
    by_kernel: dict[str, list[Cell]] = defaultdict(list)
    users: dict[str, str] = {}
    still_active = 0
    for user, kernel_id, granted, ended, gpus, memory, req_memory in rows:
        kernel = kernel_id or f"user:{user}"
        users[kernel] = user
        if not ended:
            still_active += 1
            ended = last_seen
        by_kernel[kernel].append(
            Cell(
                kernel=kernel,
                index=len(by_kernel[kernel]),
                start=float(granted),
                duration=max(0.0, float(ended) - float(granted)),
                gpus=max(1, int(gpus)),
                vram_bytes=int(req_memory or memory),
                namespace_bytes=0,
            )
        )
    notes = ["the ledger records no namespace sizes: bytes migrated are reported as 0"]
    if still_active:
        notes.append(f"{still_active} lease(s) still active: taken to end at the last timestamp")
    sessions = tuple(make_session(k, cells, user=users[k]) for k, cells in by_kernel.items())
    return Workload(
        name=Path(path).stem if "://" not in str(path) else "ledger",
        sessions=sessions,
        source_format="ledger",
        notes=tuple(notes),
        unix_times=True,
    )

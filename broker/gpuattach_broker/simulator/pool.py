"""The simulated GPU pool: `4x8GPU` means 4 hosts of 8 GPUs each; a node
list (`--nodes FILE`) describes a heterogeneous one, host by host.

The pool is fed to a real `Scheduler` as `DeviceState`s, exactly as agents
register their devices with the live broker, and the scheduler is built as
the live broker builds it (fair share on), with the placement and backfill
under study.

Node-list file (CSV), one line per host or per group of identical hosts::

    host,gpus,model,gpu_memory,cpus,memory,count
    a100-,8,A100,80GiB,96,768GiB,40
    t4-,1,T4,16GiB,16,64GiB,10

`count` (default 1) repeats the line, numbering the host names
(``a100-000``, ``a100-001``, ...); `cpus`/`memory` are the host's (empty:
no limit); `model` is matched by requests' GPU-model constraint.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from gpuattach_broker.broker.scheduler import Backfill, DeviceState, Scheduler
from gpuattach_broker.units import format_size, parse_size

DEFAULT_GPU_MEMORY = 80 * 1024**3
_POOL_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*(?:gpus?)?\s*(?::\s*(\S+))?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class NodeSpec:
    """One host of a heterogeneous pool."""

    host: str
    gpus: int
    model: str = "GPU"
    gpu_memory_bytes: int = DEFAULT_GPU_MEMORY
    cpus: float | None = None
    memory_bytes: int | None = None


@dataclass(frozen=True)
class PoolSpec:
    """`hosts` hosts of `gpus_per_host` GPUs, or (with `nodes`) exactly those
    hosts; then `hosts` is how many of them (cycled) the pool has, and
    `gpus_per_host`/`gpu_memory_bytes` are the largest."""

    hosts: int
    gpus_per_host: int
    gpu_memory_bytes: int = DEFAULT_GPU_MEMORY
    nodes: tuple[NodeSpec, ...] = ()
    name: str = ""

    @property
    def gpus(self) -> int:
        if self.nodes:
            return sum(n.gpus for n in self.node_list())
        return self.hosts * self.gpus_per_host

    def node_list(self) -> list[NodeSpec]:
        """The pool's hosts; a heterogeneous pool grown past its list repeats
        it with new host names (its mix of host shapes stays the same)."""
        if not self.nodes:
            return [
                NodeSpec(f"h{h:03d}", self.gpus_per_host, "simulated GPU", self.gpu_memory_bytes)
                for h in range(self.hosts)
            ]
        listed = len(self.nodes)
        return [
            self.nodes[i % listed]
            if i < listed
            else replace(
                self.nodes[i % listed], host=f"{self.nodes[i % listed].host}~{i // listed}"
            )
            for i in range(self.hosts)
        ]

    def with_hosts(self, hosts: int) -> PoolSpec:
        return replace(self, hosts=hosts)

    def __str__(self) -> str:
        if self.nodes:
            label = self.name or "node list"
            return f"{label} ({self.hosts} hosts, {self.gpus} GPUs)"
        return f"{self.hosts}x{self.gpus_per_host}GPU:{format_size(self.gpu_memory_bytes)}"


def pool_from_nodes(nodes: Iterable[NodeSpec], name: str = "") -> PoolSpec:
    listed = tuple(nodes)
    if not listed:
        raise ValueError("a node list needs at least one host")
    return PoolSpec(
        hosts=len(listed),
        gpus_per_host=max(n.gpus for n in listed),
        gpu_memory_bytes=max(n.gpu_memory_bytes for n in listed),
        nodes=listed,
        name=name,
    )


NODE_COLUMNS = ("host", "gpus", "model", "gpu_memory")


def load_nodes(path: Path) -> PoolSpec:
    """Read a node-list CSV (see the module docstring); errors name the line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read node list {path}: {exc}") from exc
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in NODE_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{path}: node list header must contain {','.join(NODE_COLUMNS)} "
            f"(optional cpus,memory,count); missing {missing}"
        )
    nodes: list[NodeSpec] = []
    seen: set[str] = set()
    for line, raw in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        try:
            count = int(row.get("count") or 1)
            gpus = int(row["gpus"])
            if count < 1 or gpus < 1:
                raise ValueError("gpus and count must be at least 1")
            cpus = float(row["cpus"]) if row.get("cpus") else None
            memory = parse_size(row["memory"]) if row.get("memory") else None
            gpu_memory = parse_size(row["gpu_memory"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}:{line}: {exc}") from exc
        for i in range(count):
            host = row["host"] if count == 1 else f"{row['host']}{i:03d}"
            if not host or host in seen:
                raise ValueError(f"{path}:{line}: host name {host!r} is empty or listed twice")
            seen.add(host)
            nodes.append(NodeSpec(host, gpus, row["model"] or "GPU", gpu_memory, cpus, memory))
    return pool_from_nodes(nodes, name=path.stem)


def write_nodes(nodes: Iterable[NodeSpec], path: Path) -> None:
    """Write a node list that `load_nodes` reads back (one line per host)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["host", "gpus", "model", "gpu_memory", "cpus", "memory"])
        for n in nodes:
            writer.writerow(
                [
                    n.host,
                    n.gpus,
                    n.model,
                    n.gpu_memory_bytes,
                    "" if n.cpus is None else f"{n.cpus:g}",
                    "" if n.memory_bytes is None else n.memory_bytes,
                ]
            )


def parse_pool(text: str) -> PoolSpec:
    """`4x8GPU`, `2x8GPU:80GiB`, `1x1`: hosts x GPUs per host [: memory per GPU]."""
    match = _POOL_RE.match(text)
    if not match:
        raise ValueError(
            f"cannot read pool {text!r}: write HOSTSxGPUS[GPU][:MEMORY], "
            "e.g. 4x8GPU or 2x8GPU:80GiB"
        )
    hosts, per_host = int(match.group(1)), int(match.group(2))
    if hosts < 1 or per_host < 1:
        raise ValueError(f"pool {text!r} needs at least one host with one GPU")
    memory = parse_size(match.group(3)) if match.group(3) else DEFAULT_GPU_MEMORY
    return PoolSpec(hosts=hosts, gpus_per_host=per_host, gpu_memory_bytes=memory)


def pool_devices(spec: PoolSpec) -> list[DeviceState]:
    """Zero-padded ids so that the scheduler's id tie-break orders hosts and
    GPUs numerically, as an operator would number them."""
    return [
        DeviceState(
            device_id=f"{node.host}-gpu{g:02d}",
            host=node.host,
            name=node.model,
            kind="gpu",
            memory_bytes=node.gpu_memory_bytes,
        )
        for node in spec.node_list()
        for g in range(node.gpus)
    ]


def build_scheduler(
    spec: PoolSpec,
    fair_share: bool = True,
    placement: str = "best-fit",
    backfill: Backfill | None = None,
) -> Scheduler:
    """A live-broker `Scheduler` holding the pool's devices (and its hosts'
    CPU and memory), nothing allocated.

    Fair share is on, as in the live broker (`BrokerService` always builds
    `Scheduler(fair_share=True)`); `fair_share=False` gives strict FIFO among
    equal priorities, which no live broker does (for comparisons only).
    `placement` and `backfill` as `Scheduler` takes them.
    """
    scheduler = Scheduler(fair_share=fair_share, placement=placement, backfill=backfill)
    for device in pool_devices(spec):
        scheduler.add_device(device)
    for node in spec.node_list():
        if node.cpus is not None or node.memory_bytes is not None:
            scheduler.set_host_resources(node.host, node.cpus, node.memory_bytes)
    return scheduler

"""Utilization simulator: what would the broker do with this workload?

Replays notebook workloads (a NotebookOS trace, a CSV, or the broker's own
usage ledger) on a virtual GPU pool and compares, side by side:

- **static reservation**: each kernel reserves its maximum GPU count from
  session start to session stop, the way a GPU pod per notebook works;
- **attach per cell** (``%gpu auto``) with idle timeouts (0, 60, 300 s by
  default): a GPU cell attaches a slice if the kernel has none, waiting in
  the broker's queue when the pool is full; the slice goes back when the
  kernel's idle timer says so; a cell needing *more* GPUs than the kernel
  holds releases and re-attaches;
- **fractional slices**: like attach per cell (idle 60 s), but a one-GPU cell
  asks for its own GPU memory (a memory slice, packed with others on one
  card) instead of a whole GPU; multi-GPU cells stay whole.

Usage::

    python -m gpuattach_broker.simulator TRACE --pool 4x8GPU --out report/
    gpuattach-broker simulate TRACE --policy policy.toml --users 20 \
        --start 2026-11-24T09:00:00+00:00

It prints the comparison table and, with ``--out``, writes ``report.md``,
``report.json`` and PNG plots (utilization over time, wait-time CDF, GPUs
needed versus idle timeout).

The model
---------
- **Same code as the live broker.** Every request is admitted or refused by
  ``gpuattach_broker.broker.quotas`` (``admit``, then ``check_hours``: the
  two calls the broker's ``Attach`` makes) under the admin policy (see
  below); every placement and queueing decision is made by
  ``gpuattach_broker.broker.scheduler.Scheduler`` built as the live broker
  builds it, ``Scheduler(fair_share=True)`` (best-fit bin packing by memory;
  waiting requests by priority, then the user holding fewer slices, then the
  user served least recently, then first come; a user at their concurrent
  limit waits: ``submit``, ``grant_waiting``, ``free``, ``withdraw``); and
  every idle release by ``gpuattach_broker.idle.IdleTimer``, the object
  ``%gpu auto`` uses. A change there changes the prediction
  (``tests/integration/test_simulator_parity.py`` plays one scenario on a
  real broker and here, before and after a policy change).
  As in the live broker, an attach prefers a host whose blob cache holds
  the user's tensors: in the model a host caches a user from their first
  attach there on (per-user budgets: nobody else evicts them).
- **Virtual clock.** A discrete-event loop jumps from event to event; a
  two-day trace replays in milliseconds per policy.
- **Cells and kernels.** A kernel runs its cells one at a time. A cell is
  ready at its trace start, or when the kernel's previous cell ends if that
  is later. A GPU cell that waits for a slice starts when granted and runs
  its full duration; the delay pushes the kernel's later cells only where
  they would otherwise overlap (think time in the trace absorbs it). CPU-only
  cells (``gpus == 0``) never need a slice and never wait. A session stops at
  its trace stop, or when its last (delayed) cell ends.
- **Static reservation** is asked for at session start for the larger of
  the session's declared maximum and its largest cell; GPU cells that find
  it still queued wait for it; it is released at session stop.
- **Refused cells.** A GPU cell whose request the policy refuses fails at
  once (in ``%gpu auto`` the refusal is the cell's error): it runs nowhere,
  has no wait, and the kernel goes on with its next cell. Under static
  reservation a refused reservation fails every GPU cell of its session.
  Reports count them (*refused*, ``refused_cells``).
- **Simultaneous events** run in a fixed order: a policy window opens or
  closes, cells end, idle timers fire, sessions stop, sessions start, cells
  become ready. With ``IdleTimer``'s
  ``now >= deadline`` rule, a slice whose idle deadline falls on the instant
  the next cell arrives is released and attached again. NotebookOS traces
  count in whole minutes with gaps of at least one tick, so there an idle
  timeout of 60 s keeps a slice only across gaps that queueing closed.
- **Metrics.** GPU time is counted per physical card: *held* while a card
  carries at least one lease, *busy* while at least one cell runs on it (a
  1-GPU cell in an 8-GPU reservation keeps one card busy). A *wait* runs
  from the moment a GPU cell is ready until it has its slice. A *migration*
  is one namespace transfer: in at each attach, out at each release; its
  size is the cell's ``memory`` (host memory in the trace). The static
  policy migrates nothing: its kernel lives on the GPU host.
- **Placement and backfill.** ``--placement fgd`` makes the scheduler place
  by fragmentation gradient descent instead of memory best fit (see
  ``gpuattach_broker.broker.fragmentation``); ``--backfill SECONDS`` lets
  requests that fit start past waiting ones, with reservations for those
  that waited that long (``Backfill``). Both are the live ``Scheduler``'s
  own options. ``--nodes FILE`` gives a heterogeneous pool (GPU models and
  sizes, host CPU and memory, which requests' ``cpus``/``host_memory``
  columns use up); ``model`` and ``hosts`` columns constrain placement.
- **Saturation** (``--saturate --inflate 1.3 --seed N``): no clock. The GPU
  cells are pods, shuffled with the seed and inflated (sampled with
  replacement) to 1.3x the pool's GPUs, placed once each in that order;
  one that does not fit is skipped, nothing ends. The measure is the
  unallocated share of GPU capacity against arrived demand
  (``gpuattach_broker.simulator.saturation``); the placement study
  (``python -m gpuattach_broker.simulator.placement_study``) runs it and a
  time replay on generated production-shaped workloads
  (``gpuattach_broker.simulator.generate``).
- **GPUs needed.** The smallest pool in *whole hosts* of the ``--pool``
  shape for which the p95 wait of GPU cells is at most 60 s, found by
  re-running the simulation on 1, 2, 3, ... hosts (multi-GPU cells must fit
  on one host, and pools grow by hosts).

Admin policy (``--policy FILE``)
--------------------------------
The broker's own policy file (``gpuattach-broker serve --policy``; see
``examples/policy.toml``). Without one the simulated broker runs the live
broker's built-in default: no limits, one priority, and fair share.

- **Users** are the trace's: a NotebookOS session is its own user (the
  trace names none), a CSV's optional ``user`` column (default: the kernel
  name), a ledger's users. ``--users N`` shares the sessions round-robin
  among ``user1`` .. ``userN`` instead (session i belongs to
  ``user{i % N + 1}``, in input order).
- **Groups** come as they do live: a policy group lists its ``members`` by
  user name, ``[users.NAME]`` names groups; a CSV's optional ``groups``
  column (``;``-separated) stands for identity groups (what JupyterHub
  reports), which the broker also passes to ``admit``.
- **Time windows** are read off the simulated clock: ``--start`` is the
  wall-clock instant of the workload's first session (default
  2026-11-23T00:00:00+00:00, a Monday, so runs are reproducible; a ledger
  keeps its own dates). When a window opens or closes, waiting requests are
  re-ranked at that instant (the live broker re-ranks every 10 s).
- **GPU-hour budgets** (``gpu_hours_per_day``/``_per_week``) count the
  simulated leases, as the broker counts its ledger.
- A request whose user may hold no slice at all (``max_slices = 0``,
  ``on_limit = "queue"``) would wait forever live; here it is refused.

Input formats
-------------
- ``trace``: NotebookOS workload JSON (``sessions[]`` with ``start_tick``,
  ``stop_tick``, ``max_resource_request``, ``trainings[]`` with
  ``start_tick``, ``duration_in_ticks``, ``gpus``, ``vram`` and ``memory`` in
  GB); one tick is 60 s.
- ``csv``: header ``kernel,start,duration,gpus,memory`` (optional columns
  ``user``, ``groups``); seconds; memory in bytes or with a unit
  (``16GiB``), used both as the cell's GPU memory and as its namespace size;
  ``0`` on a GPU cell asks for whole GPUs. A kernel lives from its first
  cell's start to its last cell's end.
- ``ledger``: the live broker's SQLite state file; each granted lease becomes
  one cell of its kernel from ``granted_at`` to ``ended_at``.

What it cannot know (limits)
----------------------------
- **Migration time.** Moving a namespace in and out is taken as instant.
  Some trace namespaces are hundreds of GB; on a real network they take
  minutes each way, during which the slice is held but idle, so the attach
  policies' utilization and waits are optimistic, more so at idle 0.
- **Network and storage contention.** Concurrent migrations share links and
  the blob cache; warm workers and cached blobs (the scheduler's warm-host
  preference) are not modelled: no host is ever warm.
- **Users react to queueing.** Think time and the cells themselves are taken
  from the trace as if nothing changed; real users who wait go for coffee,
  give up, or batch their work differently. Nobody gives up in the model.
- **Co-located slices don't slow each other.** Fractional slices on one
  card run as fast as alone; real compute sharing (MPS, time slicing) slows
  both. Memory needs are the trace's ``vram`` with a floor (``--min-slice``,
  default 1 GiB) for cells that list almost none.
- **Part of the policy layer.** Priorities, time windows, concurrent limits
  (``max_slices``, ``on_limit``), slice sizes (``max_slice``, ``max_gpus``)
  and GPU-hour budgets apply; preemption (``[preemption]``) and the maximum
  lease length (``max_lease``) do not: nobody is moved out for a
  higher-priority request, and leases are never cut short. Broker or host
  failures, heartbeat loss and kernel restarts are not modelled.
- **Ledger inputs** know when leases were held, not when cells ran or how big
  namespaces were: each lease is taken as one busy cell, migrated bytes are 0.
"""

from __future__ import annotations

from gpuattach_broker.simulator.admission import DEFAULT_START, Admission
from gpuattach_broker.simulator.engine import SimulationError, simulate
from gpuattach_broker.simulator.metrics import RunResult
from gpuattach_broker.simulator.policies import (
    Policy,
    attach_policy,
    default_policies,
    fractional_policy,
    static_policy,
)
from gpuattach_broker.simulator.pool import PoolSpec, parse_pool
from gpuattach_broker.simulator.traces import load_workload
from gpuattach_broker.simulator.workload import Cell, Session, Workload, with_users

__all__ = [
    "DEFAULT_START",
    "Admission",
    "Cell",
    "Policy",
    "PoolSpec",
    "RunResult",
    "Session",
    "SimulationError",
    "Workload",
    "attach_policy",
    "default_policies",
    "fractional_policy",
    "load_workload",
    "parse_pool",
    "simulate",
    "static_policy",
    "with_users",
]

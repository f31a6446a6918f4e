"""Back-to-back release -> attach -> first remote cell, with and without the zygote.

    .venv/bin/python benchmarks/reattach.py [--rounds 10]

A real ``gpuattach-broker serve`` and ``gpuattach-agent --devices
cpu:1x64GiB --pool-size 1`` (`stack.py`), once as deployed (workers forked
from the agent's zygote) and once with ``--no-zygote`` (each worker a fresh
Python that imports torch). Each round releases the lease it holds, attaches
again at once (attach RPC until granted, then the kernel's Hello) and runs a
first remote cell, through the real client classes (`ours.Lease`). Without
the zygote the replacement of the worker handed out in the previous round
is still importing torch, so the attach waits for a worker to start; with it
the replacement was ready about 0.1 s after the hand-out.

It also measures, apart from the rounds, how long after a hand-out the
agent's pool is warm again (a replacement listening).

And what worker isolation costs at attach: the zygote agent runs once with
``--isolation none`` (every worker the agent's user) and once with
``--isolation uid`` (each lease's worker drops to its user's own uid, in a
private mount namespace, before it accepts the lease), in the same run. Only
as root; elsewhere the isolated rows say why they are missing.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from ours import Lease, attach_request, open_worker
from stack import Stack, worker_processes
from stats import latency


class ReattachStack(Stack):
    """`Stack` whose agent runs with or without its zygote, isolated or not,
    and which counts forked workers (grandchildren of the agent) too."""

    zygote: bool = True
    isolation: str = "none"

    def _popen(self, args: list[str], log_name: str) -> Any:
        if log_name == "agent.log":
            if self.isolation == "uid":
                args += ["--user-map", "range:290000-290099"]
            if not self.zygote:
                args = [*args, "--no-zygote"]
        return super()._popen(args, log_name)

    def worker_processes(self) -> list[psutil.Process]:
        if self.agent is None or self.agent.poll() is not None:
            return []
        return worker_processes(self.agent.pid)


def measure_rounds(stack: Stack, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """`rounds` back-to-back release -> attach -> first cell (after one untimed)."""
    broker = stack.client()
    release_s, attach_s, cell_s, round_s = [], [], [], []
    try:
        stack.wait_pool_warm(timeout=90)
        lease = Lease(broker)
        lease.run("x = 1")
        for i in range(rounds + 1):
            started = time.perf_counter()
            lease.release()
            released = time.perf_counter()
            lease = Lease(broker)  # attach until granted, then Hello
            attached = time.perf_counter()
            lease.run("x = 1")  # the first remote cell
            ran = time.perf_counter()
            if i == 0:
                continue  # the first one warms the client's channels up
            release_s.append(released - started)
            attach_s.append(attached - released)
            cell_s.append(ran - attached)
            round_s.append(ran - started)
            log(f"  round {i}/{rounds}: attach {attach_s[-1] * 1e3:.0f} ms")
        lease.release()
    finally:
        broker.close()
    return {
        "release": latency(release_s),
        "attach": latency(attach_s),
        "first_cell": latency(cell_s),
        "round": latency(round_s),
    }


def measure_refill(stack: Stack, n: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds from a warm attach's grant until the pool is warm again."""
    broker = stack.client()
    refill_s = []
    try:
        for _ in range(n):
            stack.wait_pool_warm(timeout=90)
            lease = broker.attach(attach_request())
            granted = time.perf_counter()
            deadline = granted + 60
            while not stack.pool_is_warm(leased=1) and time.perf_counter() < deadline:
                time.sleep(0.01)
            refill_s.append(time.perf_counter() - granted)
            open_worker(lease).close()
            broker.release(lease, reason="benchmark")
            log(f"  pool warm again {refill_s[-1] * 1e3:.0f} ms after a hand-out")
    finally:
        broker.close()
    return {"pool_warm_again": latency(refill_s)}


def measure(
    workdir: Path, rounds: int, log: Callable[[str], None], refills: int = 5
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    variants = [("zygote", True, "none"), ("no_zygote", False, "none")]
    if os.geteuid() == 0:
        variants.insert(1, ("zygote_isolated", True, "uid"))
    else:
        figures["zygote_isolated"] = {"skipped": "the agent isolates workers only as root"}
    for name, zygote, isolation in variants:
        how = "with" if zygote else "without"
        log(f"reattach: {rounds} back-to-back rounds, agent {how} zygote, isolation {isolation}")
        stack = ReattachStack(workdir / name)
        stack.zygote = zygote
        stack.isolation = isolation
        try:
            stack.start()
            figures[name] = measure_rounds(stack, rounds, log)
            figures[name].update(measure_refill(stack, refills, log))
        except Exception:
            for log_name in ("broker.log", "agent.log"):
                print(f"--- {log_name}\n{stack.log_tail(log_name)}", file=sys.stderr)
            raise
        finally:
            stack.stop()  # and, by process id, every worker it counted
    return figures


ROWS = (
    ("release", "release"),
    ("attach (attach RPC + Hello)", "attach"),
    ("first remote cell", "first_cell"),
    ("round: release -> attach -> first cell", "round"),
    ("pool warm again after a hand-out", "pool_warm_again"),
)


def _ms(fig: dict[str, Any] | None, key: str) -> str:
    if not fig or key not in fig or math.isnan(fig[key]):
        return "-"
    return f"{fig[key]:.0f} ms" if fig[key] >= 10 else f"{fig[key]:.1f} ms"


def markdown(figures: dict[str, Any]) -> str:
    lines = [
        "### Back-to-back re-attach: zygote vs fresh worker processes",
        "",
        "| figure | zygote p50 | zygote p99 | no zygote p50 | no zygote p99 |",
        "| --- | --- | --- | --- | --- |",
    ]
    on, off = figures.get("zygote", {}), figures.get("no_zygote", {})
    for label, key in ROWS:
        a, b = on.get(key), off.get(key)
        lines.append(
            f"| {label} | {_ms(a, 'p50')} | {_ms(a, 'p99')} | {_ms(b, 'p50')} | {_ms(b, 'p99')} |"
        )
    n = on.get("round", {}).get("n", 0)
    lines += ["", f"{n} rounds each; p99 of so few rounds is their maximum."]
    return "\n".join(lines) + "\n" + isolation_markdown(figures)


ISOLATION_ROWS = (
    ("attach, no isolation", "zygote", "attach"),
    ("attach, isolated (uid)", "zygote_isolated", "attach"),
    ("first remote cell, no isolation", "zygote", "first_cell"),
    ("first remote cell, isolated (uid)", "zygote_isolated", "first_cell"),
    ("pool warm again, no isolation", "zygote", "pool_warm_again"),
    ("pool warm again, isolated (uid)", "zygote_isolated", "pool_warm_again"),
)


def isolation_markdown(figures: dict[str, Any]) -> str:
    """What isolating each worker under its user's uid costs (same run, zygote agent)."""
    lines = [
        "",
        "### Attach cost of worker isolation (zygote agent, same run)",
        "",
        "| figure | p50 | p99 |",
        "| --- | --- | --- |",
    ]
    for label, variant, key in ISOLATION_ROWS:
        fig = figures.get(variant, {}).get(key)
        lines.append(f"| {label} | {_ms(fig, 'p50')} | {_ms(fig, 'p99')} |")
    skipped = figures.get("zygote_isolated", {}).get("skipped")
    if skipped:
        lines += ["", f"Isolated rows not measured: {skipped}."]
    return "\n".join(lines) + "\n"


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="back-to-back rounds per agent")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="gpuattach-reattach-"))
    try:
        figures = measure(workdir, args.rounds, log)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

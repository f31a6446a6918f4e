"""Benchmarks of jupyter-gpuattach against the machine's limits and two peers, in one run.

    .venv/bin/python benchmarks/run.py [--quick] [--no-peer] [--no-ray]

Starts a real broker and agent (CPU backend) on loopback, measures the
machine's limits (gRPC and TCP round trips, TCP throughput, memcpy), our
figures through the real client classes, and two peers: ipyparallel with one
engine and Ray with one actor;
prints a Markdown table and writes benchmarks/results/latest.{json,md}.
Targets are reported as PASS/FAIL; they never fail the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MB = 10**6
GiB = 2**30


@dataclass
class Config:
    mode: str
    grpc_n: int
    pingpong_n: int
    tcp_bytes: int
    tcp_reps: int
    memcpy_bytes: int
    memcpy_reps: int
    control_seconds: float
    attach_n: int
    load_seconds: float  # failover_load: 500 kernels, two brokers on PostgreSQL
    cold_n: int
    cell_n: int
    stream_n: int
    sizes: list[tuple[str, int, int]] = field(default_factory=list)  # label, bytes, reps
    peer_sizes: list[tuple[str, int, int]] = field(default_factory=list)
    reattach_sizes: list[tuple[str, int, int]] = field(default_factory=list)

    @classmethod
    def quick(cls) -> Config:
        return cls(
            mode="quick",
            grpc_n=300,
            pingpong_n=1000,
            tcp_bytes=256 * 2**20,
            tcp_reps=3,
            memcpy_bytes=256 * 2**20,
            memcpy_reps=3,
            control_seconds=3.0,
            attach_n=3,
            load_seconds=10.0,
            cold_n=2,
            cell_n=50,
            stream_n=5,
            sizes=[("4 MB", 4 * MB, 3), ("16 MB", 16 * MB, 3)],
            peer_sizes=[("4 MB", 4 * MB, 2), ("16 MB", 16 * MB, 2)],
            reattach_sizes=[("16 MB", 16 * MB, 2)],
        )

    @classmethod
    def full(cls) -> Config:
        return cls(
            mode="full",
            grpc_n=2000,
            pingpong_n=5000,
            tcp_bytes=GiB,
            tcp_reps=3,
            memcpy_bytes=GiB,
            memcpy_reps=5,
            control_seconds=8.0,
            attach_n=15,
            load_seconds=60.0,
            cold_n=5,
            cell_n=300,
            stream_n=20,
            sizes=[("100 MB", 100 * MB, 5), ("1 GiB", GiB, 3)],
            peer_sizes=[("100 MB", 100 * MB, 3), ("1 GiB", GiB, 2)],
            reattach_sizes=[("200 MB", 200 * MB, 3), ("2 GB", 2000 * MB, 3)],
        )


T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _clean(value: Any) -> Any:
    """JSON without NaN/inf."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _control_plane_pg(workdir: Path, seconds: float, log: Any) -> dict[str, Any]:
    """control_plane.py against a broker on a PostgreSQL server of its own (tests/pg.py)."""
    import control_plane
    from stack import Stack

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.pg import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        log(f"control plane on PostgreSQL: not measured: {exc}")
        return {"error": str(exc)}
    control = Stack(workdir, ttl="60s", db_url=server.database("control"))
    try:
        control.start_broker()
        return control_plane.measure(control, seconds=seconds)
    finally:
        control.stop()
        server.stop()


def _failover_load(workdir: Path, seconds: float, log: Any) -> dict[str, Any]:
    """benchmarks/failover_load.py on a PostgreSQL server of its own (tests/pg.py)."""
    import failover_load

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.pg import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        log(f"failover load: not measured: {exc}")
        return {"error": str(exc)}
    try:
        url = server.database("load")
        return failover_load.run(
            workdir, url, kernels=500, seconds=seconds, devices=8, real_kernels=10
        )
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few iterations (<1 min)")
    parser.add_argument("--no-peer", action="store_true", help="skip ipyparallel")
    parser.add_argument("--no-ray", action="store_true", help="skip Ray (the second peer)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for latest.{json,md}")
    args = parser.parse_args(argv)
    cfg = Config.quick() if args.quick else Config.full()
    signal.signal(signal.SIGTERM, _sigterm)

    workdir = Path(tempfile.mkdtemp(prefix="gpuattach-bench-"))
    # ipyparallel's profile (connection files, logs) stays in the scratch folder.
    os.environ["IPYTHONDIR"] = str(workdir / "ipython")
    # The kernel-side measurements (GPUSession) ask as the same person as the protocol-level
    # ones: run as root, the agent refuses to start a worker for the system account.
    os.environ.setdefault("JUPYTERHUB_USER", "bench")

    # After the signal handler: importing torch takes seconds.
    import control_plane
    import fresh_host
    import limits
    import ours
    import peer
    import ray_peer
    import reattach
    import report
    import scheduling
    from stack import Stack

    machine = report.machine_info()
    log(f"mode {cfg.mode}; scratch {workdir}")
    stack = None
    try:
        limit_figures = limits.measure(cfg, log)
        log("starting broker + agent (cpu:1x64GiB, pool of 1)")
        stack = Stack(workdir / "stack")
        try:
            stack.start()
            our_figures = ours.measure(stack, cfg, log)
        except Exception:
            for name in ("broker.log", "agent.log"):
                print(f"--- {name}\n{stack.log_tail(name)}", file=sys.stderr)
            raise
        finally:
            stack.stop()
        our_figures["back_to_back_reattach"] = reattach.measure(
            workdir / "reattach", 3 if cfg.mode == "quick" else 10, log
        )
        log("fresh host: import torch alone vs load_ext -> first remote cell")
        our_figures["fresh_host"] = fresh_host.measure(
            workdir / "fresh", 1 if cfg.mode == "quick" else 3, log
        )
        log("broker control plane: attach+release pairs with 50 and 200 concurrent clients")
        control = Stack(workdir / "control", ttl="60s")
        try:
            control.start_broker()
            our_figures["control_plane"] = control_plane.measure(
                control, seconds=cfg.control_seconds
            )
        finally:
            control.stop()
        log("broker control plane on PostgreSQL: the same clients")
        our_figures["control_plane_pg"] = _control_plane_pg(
            workdir / "control-pg", cfg.control_seconds, log
        )
        log(f"failover load: 500 kernels, two brokers on PostgreSQL, {cfg.load_seconds:.0f} s")
        our_figures["failover_load"] = _failover_load(workdir / "load", cfg.load_seconds, log)
        peer_figures = None if args.no_peer else peer.measure(cfg, log)
        ray_figures = None
        if not args.no_ray:
            try:
                ray_figures = ray_peer.measure(cfg, log)
            # A peer that cannot start (Ray's node start-up times out on a loaded machine)
            # must not lose our figures: the report says why its columns are empty.
            except Exception as exc:  # noqa: BLE001 - Ray's start-up raises bare Exception
                log(f"ray: not measured: {type(exc).__name__}: {exc}")
                ray_figures = {"error": f"{type(exc).__name__}: {exc}"}
        log("scheduling decisions at 1,000 devices and 10,000 queued requests")
        our_figures["scheduling"] = scheduling.measure()
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    finally:
        if stack is not None:
            stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    quick = cfg.mode == "quick"
    result: dict[str, Any] = {
        "mode": cfg.mode,
        "machine": machine,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": time.monotonic() - T0,
        "config": asdict(cfg),
        "limits": limit_figures,
        "ours": our_figures,
        "peer": peer_figures,
        "ray": ray_figures,
        "rows": report.build_rows(limit_figures, our_figures, peer_figures, quick, ray_figures),
        "notes": list(report.NOTES),
    }
    if quick:
        result["notes"].append(
            "Quick mode: small sizes and few iterations; the 1 GiB target is "
            "checked at the largest quick size."
        )
    if ray_figures and "error" in ray_figures:
        result["notes"].append(f"Ray was not measured in this run: {ray_figures['error']}")
    text = report.markdown(result) + "\n" + reattach.markdown(our_figures["back_to_back_reattach"])
    targets = [{"figure": r["figure"], **r["target"]} for r in result["rows"] if r.get("target")]
    result["targets"] = targets
    for row in result["rows"]:
        row.pop("cells", None)
        row.pop("ray_cells", None)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(_clean(result), indent=2) + "\n")
    (args.out / "latest.md").write_text(text)
    print(text)
    log(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

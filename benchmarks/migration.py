"""Namespace migration alone, next to loopback TCP measured in the same run.

    python benchmarks/migration.py [--mib 1024] [--reps 3]

Five paths, each timed in and out (`ours.measure_migration` and
`ours.measure_same_host_migration`, the figures `make bench` reports):

- cross-host path, side channel: the worker client as a kernel on another
  host uses it (tensor bytes on a raw TCP stream, gRPC for the header);
- cross-host path, gRPC only (``GPUATTACH_SIDE_CHANNEL=0``): the fallback;
- same host, shared memory: the kernel's own GPUSession; tensor bytes in a
  memfd handed over a Unix socket by descriptor, mapped by the receiver or
  copied into the tensors it already holds;
- same host, shared memory, pull into fresh pages (``GPUATTACH_IN_PLACE=0``):
  what writing pulled tensors into the kernel's own storages saves;
- same host, tmpfs blob cache (``GPUATTACH_SAME_HOST_CHANNEL=0``): the path
  before it, for comparison in the same run.

Targets (issue 14): cross-host >= 60 % of loopback TCP both ways; same host
>= 1.5x loopback TCP. The load average before and after is printed: the
machine is shared, so only ratios within one run mean anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def forget_blobs(stack: Any) -> None:
    """Empty the host's blob cache: a later path must not find the bytes there."""
    folder = getattr(stack, "blob_cache", None)
    if folder is None or not Path(folder).is_dir():
        return
    for entry in Path(folder).iterdir():
        if entry.is_dir():
            for blob in entry.iterdir():
                blob.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="namespace size in MiB")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    nbytes = args.mib << 20
    os.environ.setdefault("JUPYTERHUB_USER", "bench")

    import limits
    import ours
    from stack import Stack

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="gpuattach-migration-"))
    rows: dict[str, dict[str, Any]] = {}
    try:
        log(f"loopback TCP throughput ({args.mib} MiB x{args.reps})")
        tcp = limits.tcp_throughput(nbytes, args.reps)
        stack = Stack(workdir / "stack")
        try:
            stack.start()
            broker = stack.client()
            try:
                for label, switch in (("side channel", "1"), ("gRPC only", "0")):
                    os.environ["GPUATTACH_SIDE_CHANNEL"] = switch
                    forget_blobs(stack)  # each path moves every byte
                    stack.wait_pool_warm(timeout=60)
                    lease = ours.Lease(broker)
                    try:
                        if (lease.worker.side is not None) != (switch == "1"):
                            raise RuntimeError(f"{label}: the side channel is not as asked")
                        log(f"cross-host path, {label}")
                        rows[f"cross-host, {label}"] = ours.measure_migration(
                            lease, nbytes, args.reps, log
                        )
                    finally:
                        lease.release()
                os.environ.pop("GPUATTACH_SIDE_CHANNEL", None)
                same_host = (
                    ("shared memory", "1", "1"),
                    ("shared memory, pull into fresh pages", "1", "0"),
                    ("tmpfs blob cache", "0", "1"),
                )
                for label, switch, in_place in same_host:
                    os.environ["GPUATTACH_SAME_HOST_CHANNEL"] = switch
                    os.environ["GPUATTACH_IN_PLACE"] = in_place
                    forget_blobs(stack)
                    stack.wait_pool_warm(timeout=60)
                    log(f"same host, {label}")
                    same = ours.measure_same_host_migration(
                        broker, nbytes, args.reps, log, expect_local=switch == "1"
                    )
                    if same:
                        rows[f"same host, {label}"] = same
                os.environ.pop("GPUATTACH_SAME_HOST_CHANNEL", None)
                os.environ.pop("GPUATTACH_IN_PLACE", None)
            finally:
                broker.close()
        finally:
            stack.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    limit = tcp["p50"]
    print(f"\nmigration of {args.mib} MiB, {args.reps} reps, p50 (best) GB/s")
    print(f"loopback TCP: {limit:.2f} ({tcp['best']:.2f})")
    before, after = load_before[0], load_after[0]
    print(f"load average before {before:.2f}, after {after:.2f}, cores {os.cpu_count()}")
    print("| path | in GB/s | in / TCP | out GB/s | out / TCP |")
    print("| --- | --- | --- | --- | --- |")
    for name, fig in rows.items():
        cells = []
        for way in ("in", "out"):
            rate = fig[way]
            cells += [f"{rate['p50']:.2f} ({rate['best']:.2f})", f"{rate['p50'] / limit:.0%}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``gpuattach-agent``: offer this host's devices to a broker, or check them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from gpuattach_broker.agent.agent import Agent
from gpuattach_broker.agent.backends import BackendError, CpuBackend, NvmlBackend, open_backend
from gpuattach_broker.rpc import read_key_file
from gpuattach_broker.units import format_size, parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuattach-agent", description="Run the workers of GPU leases on this host."
    )
    parser.add_argument("command", nargs="?", default="run", choices=["run", "check"])
    parser.add_argument(
        "--broker",
        default=os.environ.get("GPUATTACH_BROKER", "127.0.0.1:50051"),
        help="broker address host:port",
    )
    parser.add_argument(
        "--devices",
        default="auto",
        help="auto (NVML if a GPU is present, else CPU), nvml, or cpu:NxSIZE",
    )
    parser.add_argument("--host", default="", help="name of this host in the pool")
    parser.add_argument("--pool-size", type=int, default=1, help="warm workers kept ready")
    parser.add_argument("--bind", default="127.0.0.1", help="address workers listen on")
    parser.add_argument("--advertise", default="", help="address kernels reach workers at")
    parser.add_argument("--key-file", default="", help="file with the broker's key")
    parser.add_argument(
        "--blob-cache",
        default="",
        help="folder of the per-user tensor blob cache (default: /dev/shm)",
    )
    parser.add_argument(
        "--blob-cache-bytes", default="8GiB", help="byte budget of each user's blob cache (LRU)"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def check(spec: str) -> int:
    """Print what this host offers and why; non-zero when the asked backend is broken."""
    try:
        nvml = NvmlBackend()
    except BackendError as exc:
        print(f"NVML: {exc}")
        if spec in ("auto",) or spec.startswith("cpu:"):
            backend = open_backend(spec)
            print(f"backend: {backend.name}")
            for device in backend.devices():
                print(f"  {device.local_id}: {device.name}, {format_size(device.memory_bytes)}")
            return 0
        return 1
    print("backend: nvml")
    for device in nvml.devices():
        print(f"  {device.local_id}: {device.name}, {format_size(device.memory_bytes)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return check(args.devices)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        backend = open_backend(args.devices)
    except BackendError as exc:
        print(f"gpuattach-agent: {exc}", file=sys.stderr)
        return 2
    key = os.environ.get("GPUATTACH_BROKER_KEY", "")
    if args.key_file:
        key = read_key_file(args.key_file)
    try:
        cache_bytes = parse_size(args.blob_cache_bytes)
    except ValueError as exc:
        print(f"gpuattach-agent: --blob-cache-bytes: {exc}", file=sys.stderr)
        return 2
    agent = Agent(
        args.broker,
        backend,
        host=args.host,
        pool_size=args.pool_size,
        bind=args.bind,
        advertise=args.advertise,
        key=key,
        blob_cache=args.blob_cache or None,
        blob_cache_bytes=cache_bytes,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    asyncio.run(run())
    return 0


__all__ = ["CpuBackend", "main"]

if __name__ == "__main__":
    sys.exit(main())

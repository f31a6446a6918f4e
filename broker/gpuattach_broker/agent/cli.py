"""``gpuattach-agent``: offer this host's devices to a broker, or check them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from gpuattach_broker.agent import mps
from gpuattach_broker.agent.agent import Agent
from gpuattach_broker.agent.backends import BackendError, CpuBackend, NvmlBackend, open_backend
from gpuattach_broker.agent.caps import CapPolicy
from gpuattach_broker.agent.check import run_check
from gpuattach_broker.agent.gpu_host import GpuOptions
from gpuattach_broker.rpc import read_key_file
from gpuattach_broker.tls import TLSFiles
from gpuattach_broker.units import parse_duration, parse_size


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
        help="auto (NVML if a GPU is present, else CPU), nvml, nvml:<index|UUID>,... "
        "(only those GPUs or MIG instances), or cpu:NxSIZE",
    )
    parser.add_argument("--host", default="", help="name of this host in the pool")
    parser.add_argument(
        "--pool-size",
        type=int,
        default=1,
        help="warm workers kept ready (on a GPU host: per device, CUDA context made)",
    )
    parser.add_argument("--bind", default="127.0.0.1", help="address workers listen on")
    parser.add_argument("--advertise", default="", help="address kernels reach workers at")
    parser.add_argument("--key-file", default="", help="file with the broker's key")
    parser.add_argument("--tls-ca", default="", help="CA of the broker's certificate (TLS)")
    parser.add_argument("--tls-cert", default="", help="this agent's client certificate (mTLS)")
    parser.add_argument("--tls-key", default="", help="the key of that certificate")
    parser.add_argument(
        "--blob-cache",
        default="",
        help="folder of the per-user tensor blob cache (default: /dev/shm)",
    )
    parser.add_argument(
        "--blob-cache-bytes", default="8GiB", help="byte budget of each user's blob cache (LRU)"
    )
    gpu = parser.add_argument_group("GPU hosts (NVML backend)")
    gpu.add_argument(
        "--mps",
        default="auto",
        choices=mps.MODES,
        help="compute shares: auto (use a running MPS control daemon), start (start one if "
        "none runs), off (time-slicing)",
    )
    gpu.add_argument("--sample-interval", default="1s", help="how often leases' GPU use is read")
    gpu.add_argument(
        "--refresh-interval",
        default="30s",
        help="how often the GPU inventory is re-read (hot-plug, MIG changes)",
    )
    gpu.add_argument(
        "--cap-margin",
        default="1GiB",
        help="GPU memory a fractional lease may hold over its cap (at least 10%% of the cap) "
        "before the agent ends it",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def gpu_options(args: argparse.Namespace) -> GpuOptions:
    """The GPU watch settings; ValueError names the bad option."""
    try:
        sample = parse_duration(args.sample_interval)
        refresh = parse_duration(args.refresh_interval)
    except ValueError as exc:
        raise ValueError(f"--sample-interval/--refresh-interval: {exc}") from exc
    if sample <= 0 or refresh <= 0:
        raise ValueError("--sample-interval and --refresh-interval must be more than zero")
    try:
        margin = parse_size(args.cap_margin)
    except ValueError as exc:
        raise ValueError(f"--cap-margin: {exc}") from exc
    return GpuOptions(sample, refresh, CapPolicy(margin_bytes=margin))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        state = mps.disabled() if args.mps == "off" else mps.detect()
        code, text = run_check(args.devices, state)
        print(text, end="")
        return code
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        options = gpu_options(args)
        cache_bytes = parse_size(args.blob_cache_bytes)
    except ValueError as exc:
        print(f"gpuattach-agent: {exc}", file=sys.stderr)
        return 2
    mps_state = mps.disabled() if args.mps == "off" else mps.detect()
    try:
        backend = open_backend(args.devices, mps=mps_state)
    except BackendError as exc:
        print(f"gpuattach-agent: {exc}", file=sys.stderr)
        return 2
    if isinstance(backend, NvmlBackend):
        if args.mps == "start":
            backend.mps = mps.start(mps_state.pipe_dir)
        backend.caps = options.caps
        logging.getLogger("gpuattach.agent").info("compute shares: %s", backend.mps.reason)
    key = os.environ.get("GPUATTACH_BROKER_KEY", "")
    if args.key_file:
        key = read_key_file(args.key_file)
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
        gpu=options,
        tls=TLSFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca),
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    try:
        asyncio.run(run())
    finally:
        if isinstance(backend, NvmlBackend):
            mps.stop(backend.mps)
    return 0


__all__ = ["CpuBackend", "main"]

if __name__ == "__main__":
    sys.exit(main())

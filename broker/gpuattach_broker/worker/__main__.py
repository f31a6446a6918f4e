"""Entry point of a worker process: ``python -m gpuattach_broker.worker``.

Started by the agent before any lease exists (a warm worker: torch already
imported, the shell built); it prints one JSON line with its port when ready,
then waits for the agent to bind it to a lease. The agent usually forks it
from its zygote (``gpuattach_broker.worker.zygote``), which runs `main` in
the forked child with the imports (`_preload`) already done.

With ``--warm-cuda`` (GPU hosts; the agent sets CUDA_VISIBLE_DEVICES to one
device first) it also makes its CUDA context and loads the kernels a first
cell needs before reporting ready, so attach does not pay for them. Such a
worker can then only serve a lease on that device.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import grpc

# What a worker imports before it serves: the user's usual libraries, and what
# its shell loads (IPython, matplotlib's inline backend). No CUDA, no threads
# of our own: the zygote runs this too, and forks after it.
PRELOAD = (
    "numpy",
    "numpy.random",
    "torch",
    "IPython.core.interactiveshell",
    "IPython.core.application",
    "IPython.core.completer",
    "IPython.core.completerlib",
    "IPython.core.magics",
    "IPython.core.oinspect",
    "matplotlib",
    "matplotlib.pyplot",
    "matplotlib_inline.backend_inline",
)
_preloaded = False


def _preload() -> None:
    """Pay the imports and first-use costs before any lease, not during attach.

    Once per process: a worker forked from the zygote finds it done."""
    global _preloaded
    if _preloaded:
        return
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # not installed, or broken: the cell that imports it says so
            pass
    try:  # the shell's enable_matplotlib("inline") reads the backends' entry points
        from matplotlib.backends.registry import backend_registry

        backend_registry.resolve_gui_or_backend("inline")
    except Exception:
        pass
    from gpuattach_broker import codec

    encoded = codec.encode_namespace({"warm": [1, 2, 3]})
    codec.decode_namespace([bytes(p) for p in encoded.parts])
    _preloaded = True


def _warm_cuda() -> tuple[bool, str]:
    """Make the CUDA context now; (ok, device name or why not). Never raises:
    a worker that cannot use CUDA still serves (its cells then see no GPU)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    try:
        if not torch.cuda.is_available():
            built = torch.version.cuda or "none (a CPU build of torch)"
            return False, f"torch sees no CUDA device (torch CUDA: {built})"
        x = torch.ones((64, 64), device="cuda")
        (x @ x).add_(1).sum().item()  # context, allocator, cuBLAS handle, first kernels
        torch.cuda.synchronize()
        del x
        torch.cuda.empty_cache()  # keep no cached block: a fractional cap applies later
        return True, str(torch.cuda.get_device_name(0))
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def _watch_parent(parent_pid: int, on_gone: Any) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            on_gone()
            return


def _read_tls(cert: str, key: str) -> tuple[bytes, bytes] | None:
    """(key, certificate) PEM of the workers' certificate, read into memory."""
    if not cert:
        return None
    with open(key, "rb") as key_file, open(cert, "rb") as cert_file:
        return key_file.read(), cert_file.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuattach-worker")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process ends")
    parser.add_argument("--max-namespace-bytes", type=int, default=0)
    parser.add_argument(
        "--warm-cuda", action="store_true", help="make the CUDA context before reporting ready"
    )
    parser.add_argument("--tls-cert", default="", help="serve TLS with this certificate")
    parser.add_argument("--tls-key", default="", help="the key of that certificate")
    parser.add_argument(
        "--private-mounts",
        action="store_true",
        help="an isolated worker: its own mount namespace (tmpfs /tmp, /proc of its user)",
    )
    args = parser.parse_args(argv)

    # Read the TLS key now, as the agent's user and before /tmp is private: an
    # isolated worker later drops to its lease's user, who cannot open it.
    tls_pair = _read_tls(args.tls_cert, args.tls_key)
    mounts = None
    if args.private_mounts:  # first: unshare needs the process still single-threaded
        from gpuattach_broker.worker.privileges import enter_private_mounts

        mounts = enter_private_mounts()

    agent_key = os.environ.pop("GPUATTACH_AGENT_KEY", "")
    if not agent_key:
        print(
            "gpuattach-worker: GPUATTACH_AGENT_KEY is not set; start workers through the agent",
            file=sys.stderr,
        )
        return 2

    from gpuattach_broker.memory import keep_message_buffers

    keep_message_buffers()
    _preload()
    cuda_ok, cuda = _warm_cuda() if args.warm_cuda else (False, "")
    from gpuattach_broker import transfer
    from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
    from gpuattach_broker.worker.service import (
        MainThreadExecutor,
        WorkerService,
        install_interrupt_handler,
    )
    from gpuattach_broker.worker.shell import make_shell

    shell = make_shell()
    executor = MainThreadExecutor()
    service = WorkerService(
        shell, executor, agent_key, max_namespace_bytes=args.max_namespace_bytes or None
    )
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=8), options=transfer.GRPC_OPTIONS
    )
    pb_grpc.add_WorkerServicer_to_server(service, server)
    if tls_pair is not None:
        credentials = grpc.ssl_server_credentials([tls_pair])
        port = server.add_secure_port(f"{args.bind}:0", credentials)
    else:
        port = server.add_insecure_port(f"{args.bind}:0")
    server.start()

    def shutdown(*_: Any) -> None:
        server.stop(grace=0.5)
        executor.stop()

    signal.signal(signal.SIGTERM, shutdown)
    install_interrupt_handler(executor)
    if args.parent_pid:
        threading.Thread(
            target=_watch_parent, args=(args.parent_pid, shutdown), daemon=True
        ).start()
    ready = sys.__stdout__
    assert ready is not None, "the agent reads the ready line from stdout"
    line: dict[str, Any] = {"port": port, "pid": os.getpid(), "cuda_ok": cuda_ok, "cuda": cuda}
    if mounts is not None:
        line.update(mounts=mounts.describe(), mounts_private=mounts.private)
    ready.write(json.dumps(line) + "\n")
    ready.flush()
    executor.run_forever()
    # A lease's end: files the user's cells left open (a training log) are
    # flushed and closed so no buffered line is lost with the process.
    from gpuattach_broker.reducers import close_user_files

    close_user_files(shell.user_ns)
    home: str = getattr(service, "private_home", "")
    if home:
        from gpuattach_broker.worker.privileges import remove_home

        remove_home(home)  # an isolated worker's own files
    return 0


if __name__ == "__main__":
    sys.exit(main())

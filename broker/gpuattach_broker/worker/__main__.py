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

A worker never outlives its lease or its agent. It stops (`Stopper`) on
SIGTERM (the agent ends the lease) or when its parent dies: the kernel sends
it SIGTERM then (``PR_SET_PDEATHSIG``, armed first thing; its parent is the
zygote, which gets the same on the agent's death), and a thread watching the
parent's pidfd notices too. Stopping interrupts the running cell at once (as
Ctrl-C would, again every `INTERRUPT_EVERY_S`), refuses new calls, and exits;
a cell that does not stop (it catches the interrupt, or sits in native code)
has the user's open files flushed and closed and the process ends anyway
`STOP_DEADLINE_S` after the request.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import json
import os
import selectors
import signal
import sys
import threading
import time
from collections.abc import Callable
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
        except Exception:  # noqa: BLE001 - not installed, or broken: the cell that imports it says so
            pass
    try:  # the shell's enable_matplotlib("inline") reads the backends' entry points
        from matplotlib.backends.registry import backend_registry

        backend_registry.resolve_gui_or_backend("inline")
    except Exception:  # noqa: BLE001 - a warm-up only: a broken matplotlib must not stop the worker
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
    except Exception as exc:  # noqa: BLE001 - the probe reports any CUDA failure as text
        return False, f"{type(exc).__name__}: {exc}"


# From a stop's request (SIGTERM, the parent gone) to the process's end, at most.
STOP_DEADLINE_S = 1.5
# The last part of it, for flushing and closing the user's open files when the
# running cell did not stop by itself.
FILES_DEADLINE_S = 0.3
INTERRUPT_EVERY_S = 0.25  # a cell that caught the interrupt is interrupted again
FORCED_EXIT = 3  # exit code of a worker whose cell did not stop in time


class Stopper:
    """Stops the worker when asked (`request`: SIGTERM's handler) or when its
    parent process ends, within `STOP_DEADLINE_S` whatever the running cell does.

    Its thread waits on the parent's pidfd and on the signal wakeup pipe (so a
    SIGTERM is seen even while the main thread sits in native code that does
    not return to Python), then interrupts the running cell, stops the gRPC
    server and the main-thread executor, and ends the process if the main
    thread has not by the deadline."""

    def __init__(
        self, server: grpc.Server, executor: Any, user_ns: Callable[[], dict[str, Any]]
    ) -> None:
        self.server = server
        self.executor = executor
        self.user_ns = user_ns
        self.why = ""
        self.requested_at = 0.0
        self.requested = threading.Event()
        self.returned = threading.Event()  # the main thread left its loop: cleaning up
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    def request(self, why: str) -> None:
        """Stop now (safe in a signal handler; the first reason is kept)."""
        if not self.requested.is_set():
            self.why = why
            self.requested_at = time.monotonic()
            self.requested.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def start(self, parent_pid: int = 0) -> None:
        """Handle SIGTERM, and watch `parent_pid` (0: no parent to watch).
        On the main thread (the signal handler and wakeup pipe are set there)."""
        signal.signal(signal.SIGTERM, lambda *_: self.request("SIGTERM"))
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        parent_fd = -1
        if parent_pid:
            with contextlib.suppress(OSError, AttributeError):
                parent_fd = os.pidfd_open(parent_pid)
        threading.Thread(
            target=self._run, args=(parent_pid, parent_fd), name="gpuattach-stopper", daemon=True
        ).start()

    def _run(self, parent_pid: int, parent_fd: int) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            if parent_fd >= 0:
                selector.register(parent_fd, selectors.EVENT_READ)
            # Without a pidfd (an old kernel) the parent is polled.
            timeout = None if parent_fd >= 0 or not parent_pid else 0.2
            while not self.requested.is_set():
                for key, _ in selector.select(timeout):
                    if key.fd == parent_fd:
                        self.request(f"its parent process {parent_pid} exited")
                    else:
                        with contextlib.suppress(OSError):
                            if signal.SIGTERM in os.read(self._wake_r, 512):
                                self.request("SIGTERM")
                if parent_fd < 0 and parent_pid and os.getppid() != parent_pid:
                    self.request(f"its parent process {parent_pid} exited")
        self._stop()

    def _stop(self) -> None:
        self.executor.interrupt()
        self.executor.stop(now=True)  # no queued job starts
        self.server.stop(grace=0.5)
        files_at = self.requested_at + STOP_DEADLINE_S - FILES_DEADLINE_S
        while not self.returned.wait(max(0.0, min(INTERRUPT_EVERY_S, files_at - time.monotonic()))):
            if time.monotonic() >= files_at:
                break
            self.executor.interrupt()
        if not self.returned.is_set():
            print(
                f"gpuattach-worker: stopping ({self.why}): the running cell did not stop within "
                f"{STOP_DEADLINE_S - FILES_DEADLINE_S:.1f} s of its interrupt; ending the process",
                file=sys.stderr,
                flush=True,
            )
            closer = threading.Thread(target=self._close_files, daemon=True)
            closer.start()
            closer.join(max(0.0, self.requested_at + STOP_DEADLINE_S - time.monotonic()))
        else:  # the main thread cleans up and exits: give it until the deadline
            time.sleep(max(0.0, self.requested_at + STOP_DEADLINE_S - time.monotonic()))
        os._exit(FORCED_EXIT)

    def _close_files(self) -> None:
        from gpuattach_broker.reducers import close_user_files

        with contextlib.suppress(Exception):
            close_user_files(self.user_ns())


def exit_now(code: int) -> None:
    """End the process as the interpreter would (atexit functions, flushed
    streams), without waiting for other threads or tearing down modules."""
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(BaseException):
            if stream is not None:
                stream.flush()
    os._exit(code if 0 <= code <= 255 else 1)


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
    if args.parent_pid:  # first: a worker never outlives its parent (agent or zygote)
        from gpuattach_broker.worker.privileges import die_with_parent

        if not die_with_parent(signal.SIGTERM, args.parent_pid):
            return 0

    # Read the TLS key now, as the agent's user and before /tmp is private: an
    # isolated worker later drops to its lease's user, who cannot open it.
    tls_pair = _read_tls(args.tls_cert, args.tls_key)
    mounts = None
    if args.private_mounts:  # first: unshare needs the process still single-threaded
        from gpuattach_broker.worker.privileges import enter_private_mounts

        mounts = enter_private_mounts()

    agent_key = os.environ.pop("GPUATTACH_AGENT_KEY", "")
    # The agent's key for signed lease tokens (hex); no cell ever sees it.
    lease_key = bytes.fromhex(os.environ.pop("GPUATTACH_LEASE_KEY", ""))
    blob_root = os.environ.pop("GPUATTACH_BLOB_CACHE_ROOT", "")
    blob_bytes = int(os.environ.pop("GPUATTACH_BLOB_CACHE_ROOT_BYTES", "0") or 0) or 8 << 30
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
        shell,
        executor,
        agent_key,
        max_namespace_bytes=args.max_namespace_bytes or None,
        lease_key=lease_key,
        self_bind=not args.private_mounts,  # isolated: its user first, at Assign
        blob_cache_root=blob_root,
        blob_cache_bytes=blob_bytes,
    )
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=8), options=transfer.GRPC_OPTIONS
    )
    pb_grpc.add_WorkerServicer_to_server(service, server)
    # Tensor bytes of namespace moves: a raw TCP listener next to the gRPC
    # port, TLS with the same certificate (the key read before privileges drop).
    from gpuattach_broker import sidechannel

    side_tls = sidechannel.server_context(tls_pair[1], tls_pair[0]) if tls_pair else None
    service.side = sidechannel.SideChannelServer(args.bind, side_tls)
    if tls_pair is not None:
        credentials = grpc.ssl_server_credentials([tls_pair])
        port = server.add_secure_port(f"{args.bind}:0", credentials)
    else:
        port = server.add_insecure_port(f"{args.bind}:0")
    service.port = port  # the endpoint a signed token must name
    server.start()

    stopper = Stopper(server, executor, lambda: shell.user_ns)
    stopper.start(args.parent_pid)
    install_interrupt_handler(executor)
    ready = sys.__stdout__
    assert ready is not None, "the agent reads the ready line from stdout"
    line: dict[str, Any] = {"port": port, "pid": os.getpid(), "cuda_ok": cuda_ok, "cuda": cuda}
    if mounts is not None:
        line.update(mounts=mounts.describe(), mounts_private=mounts.private)
    ready.write(json.dumps(line) + "\n")
    ready.flush()
    executor.run_forever()
    stopper.returned.set()
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
    exit_now(main())

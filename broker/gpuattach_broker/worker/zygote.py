"""The worker zygote: a template process that forks warm workers in milliseconds.

``python -m gpuattach_broker.worker.zygote --control-fd N --parent-pid P`` is
started by the agent, one per agent, shared by all its warm pools (`Zygote`
below is the agent's end). It pays once what every worker pays before it can
serve: Python start-up, ``import torch``, numpy, grpc, IPython, matplotlib and
the codec's first use (``_preload`` in ``gpuattach_broker.worker.__main__``),
2-3 s. Then it forks a worker per request: the child takes the environment
the agent sent, its own stdout pipe, and runs the worker's ``main(argv)``
in-process. A forked worker reports ready after its shell and gRPC server
exist (about 0.1 s) instead of after a fresh interpreter's imports.

Why the zygote never initialises CUDA nor creates a gRPC object
----------------------------------------------------------------
``fork()`` copies the memory of a process but only its calling thread. The
CUDA driver's state (a context, the threads it starts, its mappings of device
memory, the locks those threads hold) does not survive that: a child of a
process that initialised CUDA cannot use the GPU (torch refuses with "Cannot
re-initialize CUDA in forked subprocess"; the driver itself fails or hangs).
gRPC's core likewise starts threads (polling, timers, executors) as soon as a
channel or server exists, and a fork would copy their locks held by threads
that do not exist in the child. So the zygote only *imports*: ``import
torch`` does not touch the driver (``torch.cuda.is_initialized()`` stays
false; the ``status`` request reports it), and nothing here calls into CUDA or
makes a channel or server. Each forked worker makes its own, after fork: a
device pool's worker (``--warm-cuda``) gets ``CUDA_VISIBLE_DEVICES`` in the
environment it is forked with, and CUDA reads that variable when it
initialises, in the child. The same holds for the other variables a pool
sets (``CUDA_MPS_PIPE_DIRECTORY``); a variable a library reads at *import*
time would take the zygote's value, which is the agent's environment, as a
freshly started worker's would. The zygote keeps one Python thread; the only
other thread, numpy's OpenBLAS pool, has its own fork handlers.

Protocol
--------
A Unix ``SOCK_SEQPACKET`` socket pair, one JSON object per message, file
descriptors passed alongside with ``SCM_RIGHTS``.

agent -> zygote:
  ``{"op": "spawn", "id": n, "argv": [...], "env": {...}, "cwd": "..."}`` with
  one descriptor, the write end of the child's stdout pipe (the agent keeps
  the read end and reads the worker's ready line from it);
  ``{"op": "status", "id": n}``.

zygote -> agent:
  ``{"op": "ready", "pid": p}`` once, after the preload;
  ``{"op": "spawned", "id": n, "pid": p}`` with the child's pidfd (the agent
  signals through it: no signal can reach a recycled pid);
  ``{"op": "error", "id": n, "error": "..."}``;
  ``{"op": "status", "id": n, "cuda_initialized": ..., ...}``;
  ``{"op": "exit", "pid": p, "code": c}`` when a child is reaped, `c` as
  asyncio's ``returncode`` (``-9``: killed by SIGKILL).

The zygote exits when the agent closes its end or dies, or on SIGTERM: it
stops its workers (SIGTERM, SIGKILL after `STOP_GRACE_S`), reaps them,
reports their exits, and exits. It notices the agent's death by construction:
the kernel sends it SIGTERM then (``PR_SET_PDEATHSIG``, armed first thing),
besides the end of file on its socket and a changed parent. A worker forked
from it gets the zygote's pid as ``--parent-pid`` and arms the same on the
zygote's death, as a worker started directly does on the agent's. The agent
starts the zygote in a process group of its own, which its workers share, so
that a later agent can kill whatever an earlier one left behind
(``gpuattach_broker.agent.pool.ProcessLedger``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("gpuattach.agent")

MAX_MESSAGE = 1 << 20  # a request carries a whole environment
# Workers stopping with the zygote: SIGTERM, then SIGKILL after this. A worker
# ends itself sooner (gpuattach_broker.worker.__main__.STOP_DEADLINE_S); this
# bounds one whose Python cannot run (stopped, or stuck holding the GIL).
STOP_GRACE_S = 1.8
READY_TIMEOUT_S = 120.0  # the zygote's preload (import torch on a slow host)
REQUEST_TIMEOUT_S = 30.0  # one fork, answered in milliseconds when healthy
UNKNOWN_EXIT = 255  # the zygote died before it reported a child's exit (as asyncio)


class ZygoteError(RuntimeError):
    """The zygote could not fork a worker (not started, gone, or refused)."""


# --------------------------------------------------------------- zygote side ---


def _preload() -> None:
    """Everything a worker imports before it serves, and nothing that starts
    CUDA, a gRPC channel or server, or a thread (see the module docstring)."""
    from gpuattach_broker.memory import keep_message_buffers
    from gpuattach_broker.worker import __main__ as worker_main

    keep_message_buffers()
    worker_main._preload()
    import grpc  # noqa: F401

    from gpuattach_broker import tls, transfer  # noqa: F401
    from gpuattach_broker.protos import gpuattach_pb2_grpc  # noqa: F401
    from gpuattach_broker.worker import service, shell  # noqa: F401


def _status() -> dict[str, Any]:
    torch = sys.modules.get("torch")
    cuda = bool(torch is not None and torch.cuda.is_initialized())
    return {
        "pid": os.getpid(),
        "cuda_initialized": cuda,
        "torch_imported": torch is not None,
        "threads": len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0,
        "grpc_objects": _grpc_objects(),
    }


def _grpc_objects() -> int:
    """gRPC channels and servers alive in this process (must stay 0)."""
    grpc = sys.modules.get("grpc")
    if grpc is None:
        return 0
    kinds = tuple(
        k for k in (getattr(grpc, "Channel", None), getattr(grpc, "Server", None)) if k is not None
    )
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kinds))


class _Server:
    def __init__(self, control: socket.socket, parent_pid: int) -> None:
        self.control = control
        self.parent_pid = parent_pid
        self.children: set[int] = set()
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector = selectors.DefaultSelector()

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(message).encode()
        with contextlib.suppress(OSError):  # the agent is gone: we stop at end of file
            if fds:
                socket.send_fds(self.control, [data], list(fds))
            else:
                self.control.send(data)

    def serve(self) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent owns a terminal's Ctrl-C
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below
        signal.set_wakeup_fd(self.wake_w)
        selector = self.selector
        selector.register(self.control, selectors.EVENT_READ)
        selector.register(self.wake_r, selectors.EVENT_READ)
        self.send({"op": "ready", "pid": os.getpid()})
        while not self.stopping:
            events = selector.select(timeout=1.0)
            self._reap()
            if os.getppid() != self.parent_pid:
                break  # the agent died
            for key, _ in events:
                if key.fileobj is self.control:
                    if not self._receive():
                        self.stopping = True
                        break
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 512)
        self._stop_children()
        return 0

    def _on_term(self, *_: Any) -> None:
        self.stopping = True

    def _receive(self) -> bool:
        try:
            data, fds, flags, _ = socket.recv_fds(self.control, MAX_MESSAGE, 4)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            request = json.loads(data)
            op = request.get("op")
            if flags & socket.MSG_TRUNC:
                raise ValueError("request too large")
            if op == "spawn":
                self._spawn(request, fds)
                fds = []
            elif op == "status":
                self.send({"op": "status", "id": request.get("id"), **_status()})
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as exc:  # noqa: BLE001 - any failure goes back to the requester
            self.send({"op": "error", "id": _request_id(data), "error": f"{exc}"})
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def _spawn(self, request: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ValueError("a spawn request passes one descriptor (the child's stdout)")
        stdout = fds[0]
        argv = [str(a) for a in request["argv"]]
        env = {str(k): str(v) for k, v in dict(request["env"]).items()}
        cwd = str(request.get("cwd") or "")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # nothing buffered here may be written twice
        try:
            pid = os.fork()
        except OSError:
            os.close(stdout)
            raise
        if pid == 0:
            self._child(argv, env, cwd, stdout)  # never returns
        os.close(stdout)
        self.children.add(pid)
        pidfd = -1
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(pid)
        try:
            self.send(
                {"op": "spawned", "id": request.get("id"), "pid": pid},
                [pidfd] if pidfd >= 0 else [],
            )
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def _child(self, argv: list[str], env: dict[str, str], cwd: str, stdout: int) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.selector.close()  # the child's copies of the zygote's descriptors
            for fd in (self.wake_r, self.wake_w):
                os.close(fd)
            self.control.close()
            os.dup2(stdout, 1)
            os.close(stdout)
            if cwd:
                os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            _reseed()
            from gpuattach_broker.worker import __main__ as worker_main

            sys.argv = [str(worker_main.__file__), *argv]
            code = worker_main.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - a forked child must reach os._exit, never return
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(_exit_child(code))

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send({"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    def _stop_children(self) -> None:
        """Stop every worker still running (the agent is gone or closed us)."""
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
            for pid in list(self.children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while self.children and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.02)
        self._reap()


def _request_id(data: bytes) -> Any:
    try:
        return json.loads(data).get("id")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return None


def _reseed() -> None:
    """A fresh process seeds numpy's global generator from the OS; forked ones
    would all share the zygote's. (``random`` reseeds itself at fork; torch
    starts from a fixed default seed in any new process, and the zygote never
    draws from it.)"""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        with contextlib.suppress(Exception):
            numpy.random.seed()


def _exit_child(code: Any) -> int:
    """What the interpreter does at exit, short of unwinding the zygote's stack."""
    import atexit

    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            if stream is not None:
                stream.flush()
    return code if isinstance(code, int) and 0 <= code <= 255 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuattach-worker-zygote")
    parser.add_argument("--control-fd", type=int, required=True, help="the agent's socket")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process ends")
    args = parser.parse_args(argv)
    parent = args.parent_pid or os.getppid()
    from gpuattach_broker.worker.privileges import die_with_parent

    if not die_with_parent(signal.SIGTERM, parent):  # first: never outlive the agent
        return 0
    control = socket.socket(fileno=args.control_fd)
    control.setblocking(True)
    _preload()
    # What the preload made stays as it is in every child: keep the children's
    # garbage collector off it, or its first pass writes to (copies) every page.
    gc.collect()
    gc.freeze()
    if os.getppid() != parent:
        return 0  # the agent went away while this one imported torch
    return _Server(control, parent).serve()


# ---------------------------------------------------------------- agent side ---


class ForkedProcess:
    """A worker forked by the zygote, with what the agent uses of
    `asyncio.subprocess.Process`: pid, returncode, stdout, wait, send_signal,
    terminate and kill. Its exit status comes from the zygote, its parent."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.stdout: asyncio.StreamReader | None = None
        self._pidfd = pidfd
        self._returncode: int | None = None
        self._exited = asyncio.get_running_loop().create_future()
        self._transport: asyncio.BaseTransport | None = None
        self._watching = False

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self._returncode is not None:
            raise ProcessLookupError(self.pid)
        if self._pidfd >= 0:
            signal.pidfd_send_signal(self._pidfd, sig)
        else:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _set_exit(self, code: int) -> None:
        if self._returncode is not None:
            return
        self._returncode = code
        if not self._exited.done():
            self._exited.set_result(code)
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, -1
        if fd >= 0:
            if self._watching:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    async def _outlive_zygote(self) -> None:
        """The zygote died before reporting this child's exit: the child stops
        by itself (its parent is gone); learn when from its pidfd."""
        if self._returncode is not None:
            return
        loop = asyncio.get_running_loop()
        if self._pidfd >= 0:
            gone: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not gone.done():
                    gone.set_result(None)

            loop.add_reader(self._pidfd, readable)
            self._watching = True
            await gone
        else:
            while _pid_alive(self.pid):  # noqa: ASYNC110 - no pidfd: no event to wait on
                await asyncio.sleep(0.2)
        self._set_exit(UNKNOWN_EXIT)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Zygote:
    """The agent's end: starts the zygote process (lazily, on the first
    `spawn`), asks it for workers, and relays their exits."""

    def __init__(self, python: str = "", env: Mapping[str, str] | None = None) -> None:
        self.python = python or sys.executable
        self.env = dict(env) if env is not None else None
        self.proc: asyncio.subprocess.Process | None = None
        self.children: dict[int, ForkedProcess] = {}
        self.failures = 0  # consecutive failed starts or deaths; reset by a fork
        self.retry_at = 0.0  # monotonic time before which no restart is tried
        self._sock: socket.socket | None = None
        self._ready: asyncio.Future[int] | None = None
        self._starting: asyncio.Task[int] | None = None
        self._pending: dict[int, tuple[asyncio.Future[Any], int]] = {}
        self._next_id = 0
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def alive(self) -> bool:
        return self._sock is not None and self._ready is not None and self._ready.done()

    async def ready(self) -> int:
        """The zygote's pid, starting it first if need be; ZygoteError when it
        cannot be had now (failed recently: the caller starts workers directly)."""
        if self._closed:
            raise ZygoteError("the zygote is closed")
        if self.alive and self._ready is not None and not self._ready.exception():
            return self._ready.result()
        if self._starting is None or self._starting.done():
            wait = self.retry_at - time.monotonic()
            if wait > 0:
                raise ZygoteError(f"the zygote failed; next start in {wait:.0f} s")
            self._starting = asyncio.create_task(self._start())
        try:
            return await asyncio.shield(self._starting)
        except ZygoteError:
            raise
        except Exception as exc:  # could not even start the interpreter
            raise ZygoteError(f"could not start the zygote: {exc}") from exc

    async def _start(self) -> int:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # as workers started directly
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "gpuattach_broker.worker.zygote",
                "--control-fd",
                str(theirs.fileno()),
                "--parent-pid",
                str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=env,
                # A group of its own that its workers share: a terminal's Ctrl-C
                # for the agent never reaches a user's cell, and a later agent
                # kills the whole group if this one dies (see ProcessLedger).
                process_group=0,
            )
        except BaseException:
            ours.close()
            self.failures += 1
            self.retry_at = time.monotonic() + self._backoff()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        ready: asyncio.Future[int] = loop.create_future()
        self.proc, self._sock, self._ready = proc, ours, ready
        loop.add_reader(ours.fileno(), self._on_readable, ours)
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait(
                {ready, exited}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            if ready.done() and not ready.exception():
                pid = ready.result()
                log.info("worker zygote %d ready in %.1f s", pid, time.monotonic() - started)
                self._keep(asyncio.ensure_future(self._watch(proc, exited)))
                return pid
            if ready.done() and not exited.done():  # its socket closed: it is exiting
                await asyncio.wait({exited}, timeout=2.0)
            if exited.done():
                why = f"exited with code {proc.returncode} before it was ready"
            elif ready.done():
                why = f"failed before it was ready ({ready.exception()})"
            else:
                why = "was not ready in time"
            raise ZygoteError(f"the zygote {why}")
        except BaseException as exc:
            self._failed(exc)
            if not exited.done():
                exited.cancel()
            await self._kill(proc)
            raise

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, proc: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> None:
        code = await exited
        if self.proc is proc and not self._closed:
            how = f"code {code}" if code >= 0 else _signal_name(-code)
            log.error(
                "worker zygote %d exited (%s); it starts again on the next worker, "
                "and workers start directly while it cannot",
                proc.pid,
                how,
            )
            self._failed(ZygoteError(f"the zygote exited ({how})"))

    def _backoff(self) -> float:
        return 0.0 if self.failures <= 1 else min(60.0, 2.0**self.failures)

    def _failed(self, exc: BaseException) -> None:
        """The zygote is gone or never came: forget it; a later `ready` restarts it."""
        if self._sock is None:
            return  # already counted (its socket closed before the process was reaped)
        self.failures += 1
        self.retry_at = time.monotonic() + self._backoff()
        self._disconnect(exc)

    def _disconnect(self, exc: BaseException) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ZygoteError(str(exc)))
            self._ready.exception()  # retrieved: no "never retrieved" warning
        self._ready = None
        pending, self._pending = self._pending, {}
        for future, stdout in pending.values():
            os.close(stdout)
            if not future.done():
                future.set_exception(ZygoteError(f"the zygote is gone ({exc})"))
        children, self.children = self.children, {}
        for child in children.values():
            self._keep(asyncio.ensure_future(child._outlive_zygote()))

    def _on_readable(self, sock: socket.socket) -> None:
        while self._sock is sock:
            try:
                data, fds, _flags, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
            except BlockingIOError:
                return
            except OSError as exc:
                data, fds = b"", []
                log.error("lost the worker zygote: %s", exc)
            if not data:
                for fd in fds:
                    os.close(fd)
                if self._closed:
                    self._disconnect(ZygoteError("closed"))
                else:
                    self._failed(ZygoteError("the zygote closed its socket"))
                return
            try:
                self._dispatch(json.loads(data), fds)
            except Exception:
                log.exception("bad message from the worker zygote")
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(int(message["pid"]))
            return
        if op == "exit":
            child = self.children.pop(int(message["pid"]), None)
            if child is not None:
                child._set_exit(int(message["code"]))
            return
        future, stdout = self._pending.pop(int(message.get("id") or -1), (None, -1))
        if op == "spawned":
            pid = int(message["pid"])
            child = ForkedProcess(pid, fds[0] if fds else -1)
            self.children[pid] = child
            self.failures = 0
            if future is None or future.done():  # the caller gave up: no orphan worker
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                if stdout >= 0:
                    os.close(stdout)
                return
            future.set_result((child, stdout))
            return
        for fd in fds:
            os.close(fd)
        if stdout >= 0:
            os.close(stdout)
        if future is not None and not future.done():
            if op == "error":
                future.set_exception(ZygoteError(str(message.get("error"))))
            else:
                future.set_result(message)

    def _request(self, message: dict[str, Any], fds: Sequence[int] = (), keep: int = -1) -> Any:
        """Send one request; the future of its answer. `keep`: a descriptor the
        answer is paired with (closed here unless the answer hands it on)."""
        sock = self._sock
        if sock is None:
            raise ZygoteError("the zygote is not running")
        self._next_id += 1
        message = dict(message, id=self._next_id)
        future = asyncio.get_running_loop().create_future()
        try:
            data = json.dumps(message).encode()
            if len(data) > MAX_MESSAGE:
                raise ZygoteError("request too large for the zygote")
            if fds:
                socket.send_fds(sock, [data], list(fds))
            else:
                sock.send(data)
        except (OSError, ZygoteError) as exc:
            if keep >= 0:
                os.close(keep)
            raise ZygoteError(f"could not ask the zygote: {exc}") from exc
        self._pending[self._next_id] = (future, keep)
        return future

    async def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str = ""
    ) -> ForkedProcess:
        """Fork a worker running ``gpuattach_broker.worker`` with `argv` and
        exactly `env`; its stdout is the returned process's `stdout`."""
        await self.ready()
        read_end, write_end = os.pipe()
        try:
            future = self._request(
                {"op": "spawn", "argv": list(argv), "env": dict(env), "cwd": cwd or os.getcwd()},
                [write_end],
                keep=read_end,
            )
        finally:
            os.close(write_end)
        child: ForkedProcess
        child, stdout = await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                os.fdopen(stdout, "rb", buffering=0),
            )
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            raise
        child.stdout = reader
        child._transport = transport
        return child

    async def status(self) -> dict[str, Any]:
        """What the zygote holds (cuda_initialized, threads, grpc_objects)."""
        await self.ready()
        result: dict[str, Any] = await asyncio.wait_for(
            self._request({"op": "status"}), REQUEST_TIMEOUT_S
        )
        return result

    async def close(self, timeout: float = STOP_GRACE_S + 5.0) -> None:  # noqa: ASYNC109
        """Stop the zygote and every worker it forked that still runs.

        `timeout` is the grace before the zygote is killed, not a deadline for
        the caller (a caller's asyncio.timeout would skip the kill)."""
        self._closed = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
        proc, sock = self.proc, self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)  # end of file: the zygote stops its workers
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                await self._kill(proc)
        # Exits it reported before it went are read by now or still queued: read them.
        if sock is not None and self._sock is sock:
            self._on_readable(sock)
        self._disconnect(ZygoteError("closed"))
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


if __name__ == "__main__":
    sys.exit(main())

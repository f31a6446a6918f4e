"""GPU acceptance check: real slices on a real GPU, through the real broker and agent.

Run on a machine with an NVIDIA GPU (MIG off on the chosen GPU, or name a
MIG instance by UUID)::

    .venv/bin/python benchmarks/gpu_check.py [--gpu 0] [--json out.json]

It starts ``gpuattach-broker serve`` and ``gpuattach-agent --devices
nvml:<that GPU> --mps off`` as separate processes and drives them with the
project's own clients (BrokerClient, WorkerClient), the way a kernel does.
Checks, one table row each:

1. two leases of ``--fraction 0.5`` on the GPU train at the same time;
2. with two leases of 0.4 training, a third of 0.2 that allocates past its
   cap (it lifts torch's fraction, as a careless cell or another library
   would) is ended with the agent's cap message, and the two others train
   on through it (the broker never places caps that add up to more than the
   device, so this phase uses 0.4 + 0.4 + 0.2);
3. a whole-GPU lease's training step time is within ``--tolerance``
   (3 %) of bare torch on the same GPU (bare runs before and after);
4. warm attach, from the Attach call to the first CUDA result in the
   worker, has p50 <= ``--attach-target-ms`` (150 ms).

MPS is off for the agent on purpose: with MPS the driver's hard memory
limit stops the third lease's allocation before the agent has to act.

Exit codes: 0 every check passed, 1 a check failed, 2 the stack could not
be set up (broker/agent did not start, torch cannot use the GPU), 3 no
NVIDIA GPU on this machine (nothing was run).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_NO_GPU = 0, 1, 2, 3
BIN = Path(sys.executable).parent
MARK = "GPUCHECK "

# One training loop, the same for bare torch and for a lease: a compute-bound MLP
# so the comparison measures the GPU, not Python.
TRAIN = """
import json, time, torch
torch.manual_seed(0)
width, batch = {width}, {batch}
model = torch.nn.Sequential(
    torch.nn.Linear(width, width), torch.nn.ReLU(),
    torch.nn.Linear(width, width), torch.nn.ReLU(),
    torch.nn.Linear(width, 10),
).to("cuda")
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x = torch.randn(batch, width, device="cuda")
y = torch.randint(0, 10, (batch,), device="cuda")
loss_fn = torch.nn.CrossEntropyLoss()

def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()

for _ in range({warmup}):
    step()
torch.cuda.synchronize()
times = []
started = time.time()
while len(times) < {steps} or time.time() - started < {seconds}:
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
ended = time.time()
times.sort()
print({mark!r} + json.dumps({{"median_s": times[len(times) // 2], "steps": len(times),
                              "start": started, "end": ended}}), flush=True)
"""

HOG = """
import os, time, torch
total = torch.cuda.get_device_properties(0).total_memory
cap = int(total * float(os.environ["GPUATTACH_MEMORY_FRACTION"]))
torch.cuda.set_per_process_memory_fraction(1.0)  # lifts the framework's cap: only NVML sees this
hog = torch.empty(int(cap * {factor}), dtype=torch.uint8, device="cuda")
hog.fill_(1)
torch.cuda.synchronize()
print({mark!r} + '{{"allocated": %d, "cap": %d, "at": %f}}' % (hog.numel(), cap, time.time()),
      flush=True)
time.sleep({hold})
"""

FIRST_CUDA = "__import__('torch').ones(8, device='cuda').add_(1).sum().item()"


# ------------------------------------------------------------ results ---


@dataclass
class Check:
    name: str
    measured: str
    target: str
    passed: bool
    details: dict[str, Any] = field(default_factory=dict)


def table(checks: list[Check]) -> str:
    """The report: one row per check, fixed-width, PASS/FAIL last."""
    head = ("check", "measured", "target", "result")
    rows = [(c.name, c.measured, c.target, "PASS" if c.passed else "FAIL") for c in checks]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = [head, tuple("-" * w for w in widths), *rows]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def overlap_seconds(a: dict[str, float], b: dict[str, float]) -> float:
    """How long two runs (start/end epoch seconds) ran at the same time."""
    return max(0.0, min(a["end"], b["end"]) - max(a["start"], b["start"]))


def judge_overhead(bare_s: list[float], lease_s: float, tolerance: float) -> Check:
    bare = statistics.mean(bare_s)
    ratio = lease_s / bare
    return Check(
        "whole-GPU step time vs bare torch",
        f"{lease_s * 1e3:.2f} ms vs {bare * 1e3:.2f} ms ({(ratio - 1) * 100:+.1f} %)",
        f"<= +{tolerance * 100:.0f} %",
        ratio <= 1 + tolerance,
        {"bare_median_s": bare_s, "lease_median_s": lease_s, "ratio": ratio},
    )


def judge_attach(total_s: list[float], attach_s: list[float], target_ms: float) -> Check:
    value = p50(total_s) * 1e3
    return Check(
        "warm attach to first CUDA result",
        f"p50 {value:.0f} ms (attach RPC {p50(attach_s) * 1e3:.0f} ms), n={len(total_s)}",
        f"p50 <= {target_ms:.0f} ms",
        bool(total_s) and value <= target_ms,
        {"total_s": total_s, "attach_s": attach_s},
    )


# --------------------------------------------------------------- GPU ---


def find_gpu(spec: str) -> tuple[str, str] | str:
    """(UUID, name) of the GPU or MIG instance `spec` names, or why there is none."""
    try:
        import pynvml
    except ImportError:
        return "pynvml is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"NVML is not usable ({exc})"
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return "NVML lists no GPU"
        if spec.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(spec))
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(spec)
        uuid, name = str(pynvml.nvmlDeviceGetUUID(handle)), str(pynvml.nvmlDeviceGetName(handle))
        if uuid.startswith("GPU-"):
            try:
                current, _ = pynvml.nvmlDeviceGetMigMode(handle)
            except pynvml.NVMLError:
                current = pynvml.NVML_DEVICE_MIG_DISABLE
            if current == pynvml.NVML_DEVICE_MIG_ENABLE:
                raise SetupError(f"GPU {spec} is in MIG mode: pass one MIG instance's UUID")
        return uuid, name
    except pynvml.NVMLError as exc:
        raise SetupError(f"cannot use GPU {spec!r}: {exc}") from exc
    finally:
        pynvml.nvmlShutdown()


class SetupError(RuntimeError):
    """The check could not be set up; exit 2 with this message."""


def train_code(args: argparse.Namespace, steps: int, seconds: float) -> str:
    return TRAIN.format(
        width=args.width, batch=args.batch, warmup=args.warmup, steps=steps, seconds=seconds,
        mark=MARK,
    )  # fmt: skip


def parse_marked(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith(MARK):
            value: dict[str, Any] = json.loads(line[len(MARK) :])
            return value
    raise RuntimeError(f"no {MARK.strip()} line in the output: {text[-2000:]!r}")


def bare_run(args: argparse.Namespace, uuid: str) -> dict[str, Any]:
    """The training loop in a plain Python process that sees only this GPU."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=uuid)
    done = subprocess.run(
        [sys.executable, "-c", train_code(args, args.steps, 0)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SetupError(f"bare torch failed on {uuid}: {done.stderr[-2000:]}")
    return parse_marked(done.stdout)


# ------------------------------------------------------------- stack ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """The broker and an agent offering one GPU, as real processes."""

    def __init__(self, workdir: Path, uuid: str, pool_size: int, mps: str) -> None:
        self.workdir = workdir
        self.uuid = uuid
        self.pool_size = pool_size
        self.mps = mps
        self.key = "gpu-check-key"
        self.address = f"127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            GPUATTACH_BROKER=self.address,
            GPUATTACH_BROKER_KEY=self.key,
            GPUATTACH_STATE_DIR=str(self.workdir / "state"),
            IPYTHONDIR=str(self.workdir / "ipython"),
            PYTHONUNBUFFERED="1",
        )

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with open(self.workdir / log_name, "ab") as log:
            proc = subprocess.Popen(
                args, env=self.env(), stdout=log, stderr=log, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self._spawn(
            [str(BIN / "gpuattach-broker"), "serve", "--address", self.address,
             "--db", str(self.workdir / "broker.sqlite"), "--ttl", "10m",
             "--log-level", "WARNING"],
            "broker.log",
        )  # fmt: skip
        self.wait(lambda: self.pool() is not None, 60, "the broker to answer", "broker.log")
        self.agent = self._spawn(
            [str(BIN / "gpuattach-agent"), "--broker", self.address,
             "--devices", f"nvml:{self.uuid}", "--pool-size", str(self.pool_size),
             "--host", "gpucheck", "--mps", self.mps, "--sample-interval", "0.5s"],
            "agent.log",
        )  # fmt: skip
        self.wait(
            lambda: (p := self.pool()) is not None and p.agents_online == 1 and len(p.devices) > 0,
            120,
            "the agent to register its GPU",
            "agent.log",
        )
        self.wait_warm()

    def client(self) -> Any:
        from gpuattach_broker.client.broker_client import BrokerAddress, BrokerClient

        return BrokerClient(BrokerAddress(self.address, self.key))

    def pool(self) -> Any:
        from gpuattach_broker.client.broker_client import BrokerError

        client = self.client()
        try:
            return client.pool_status()
        except BrokerError:
            return None
        finally:
            client.close()

    def warm_workers(self) -> int:
        """Workers listening and not bound to a lease (a device pool's worker warms
        its CUDA context before it listens)."""
        import psutil
        from stack import worker_processes

        count = 0
        for worker in worker_processes(self.agent.pid):
            try:
                if any(c.status == psutil.CONN_LISTEN for c in worker.net_connections("tcp")):
                    count += 1
            except psutil.Error:
                continue
        return count

    def wait_warm(self, leased: int = 0, timeout: float = 180.0) -> float:
        """Seconds until `pool_size` warm workers (plus `leased` bound ones) listen."""
        started = time.monotonic()
        self.wait(
            lambda: self.warm_workers() >= self.pool_size + leased,
            timeout,
            "the agent's warm CUDA worker",
            "agent.log",
        )
        return time.monotonic() - started

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str, log: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise SetupError(f"a stack process exited while waiting for {what}: "
                                     f"{self.tail(log)}")  # fmt: skip
            if predicate():
                return
            time.sleep(0.05)
        raise SetupError(f"timed out waiting for {what}: {self.tail(log)}")

    def tail(self, name: str) -> str:
        try:
            return (self.workdir / name).read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


class Lease:
    """One attached slice: the broker lease and a worker client, as a kernel holds them."""

    def __init__(self, stack: Stack, user: str, fraction: float = 0.0) -> None:
        from gpuattach_broker.client.worker_client import (
            WorkerClient,
            check_compatible,
            kernel_hello,
        )
        from gpuattach_broker.protos import gpuattach_pb2 as pb

        self.broker = stack.client()
        self.started = time.perf_counter()
        self.lease = self.broker.attach(
            pb.AttachRequest(
                user=user,
                kernel_id=f"gpu-check-{user}",
                slice=pb.SliceSpec(fraction=fraction),
                wait_seconds=60,
                client_host=socket.gethostname(),
            )
        )
        self.granted = time.perf_counter()
        self.worker = WorkerClient(self.lease.worker_endpoint, self.lease.token)
        hello = kernel_hello(os.getcwd(), list(sys.path), {})
        reply = self.worker.hello(hello)
        check_compatible(hello, reply)
        self.ready = time.perf_counter()
        self.worker_pid = int(reply.pid)
        self.count = 0

    def run(self, code: str) -> tuple[bool, str]:
        """Run a cell; (finished ok, its stdout + error text)."""
        out: list[str] = []

        def on_output(item: Any) -> None:
            kind = item.WhichOneof("msg")
            if kind == "stream":
                out.append(item.stream.text)
            elif kind == "error":
                out.append(f"{item.error.ename}: {item.error.evalue}\n")

        self.count += 1
        done = self.worker.execute(code, self.count, on_output, lambda request: "")
        return bool(done.ok), "".join(out)

    def state(self) -> tuple[str, str]:
        for lease in self.broker.list_leases(include_ended=True):
            if lease.lease_id == self.lease.lease_id:
                return str(lease.state), str(lease.end_reason)
        return "unknown", ""

    def release(self) -> None:
        from gpuattach_broker.client.broker_client import BrokerError

        self.worker.close()
        try:
            self.broker.release(self.lease, reason="gpu_check", patience=5.0)
        except BrokerError:
            pass  # already ended (the evicted lease)
        self.broker.close()
        # Its worker exits; until it has, it would pass for a warm one in `wait_warm`.
        import psutil

        deadline = time.monotonic() + 15
        while psutil.pid_exists(self.worker_pid) and time.monotonic() < deadline:
            try:
                if psutil.Process(self.worker_pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)


@contextlib.contextmanager
def leases(stack: Stack, *wanted: tuple[str, float]) -> Iterator[list[Lease]]:
    """Attach (user, fraction) slices in order; release every one attached, whatever happens."""
    held: list[Lease] = []
    try:
        for user, fraction in wanted:
            held.append(Lease(stack, user, fraction))
        yield held
    finally:
        for lease in held:
            lease.release()


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start fn on a thread; the returned callable joins and returns (or raises) its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by join() on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


# ------------------------------------------------------------ checks ---


def check_two_halves(stack: Stack, args: argparse.Namespace) -> Check:
    with leases(stack, ("half-a", 0.5), ("half-b", 0.5)) as (a, b):
        same = list(a.lease.device_ids) == list(b.lease.device_ids)
        code = train_code(args, 1, args.train_seconds)
        joins = [in_thread(functools.partial(lease.run, code)) for lease in (a, b)]
        (ok_a, out_a), (ok_b, out_b) = (join() for join in joins)
    if not (ok_a and ok_b):
        return Check("two 0.5 leases train at once", f"a cell failed: {out_a} {out_b}"[:200],
                     "both train", False)  # fmt: skip
    ra, rb = parse_marked(out_a), parse_marked(out_b)
    together = overlap_seconds(ra, rb)
    return Check(
        "two 0.5 leases train at once",
        f"{ra['steps']} + {rb['steps']} steps, {together:.1f} s together"
        + ("" if same else " (NOT on one GPU)"),
        "same GPU, overlapping",
        same and together > 0.5 * args.train_seconds,
        {"a": ra, "b": rb, "same_device": same},
    )


def check_cap_eviction(stack: Stack, args: argparse.Namespace) -> Check:
    name = "over-cap lease ended, others unaffected"
    with leases(stack, ("cap-a", 0.4), ("cap-b", 0.4), ("cap-c", 0.2)) as (a, b, c):
        code = train_code(args, 1, args.train_seconds)
        joins = [in_thread(functools.partial(lease.run, code)) for lease in (a, b)]
        time.sleep(min(5.0, args.train_seconds / 4))  # both are training now
        hog = HOG.format(factor=args.hog_factor, hold=args.train_seconds * 4, mark=MARK)
        began = time.time()
        try:
            _, out_c = c.run(hog)
        except Exception as exc:  # noqa: BLE001 - the worker was stopped under the cell: expected
            out_c = f"{type(exc).__name__}: {exc}"
        deadline = time.monotonic() + 60
        state, reason = c.state()
        while state in ("active", "starting") and time.monotonic() < deadline:
            time.sleep(0.2)
            state, reason = c.state()
        ended_after = time.time() - began
        (ok_a, out_a), (ok_b, out_b) = (join() for join in joins)
    allocated = MARK in out_c
    cap_message = "GPU memory cap exceeded" in reason
    others = ok_a and ok_b
    ra = parse_marked(out_a) if ok_a else {}
    rb = parse_marked(out_b) if ok_b else {}
    through = others and min(ra["end"], rb["end"]) > began + ended_after
    measured = (
        f"C {state} after {ended_after:.1f} s ({'cap message' if cap_message else reason[:80]!r})"
        f"; A {'ok' if ok_a else 'FAILED'}, B {'ok' if ok_b else 'FAILED'}"
    )
    if not allocated:
        measured += f"; C never allocated past its cap: {out_c[-160:]!r}"
    return Check(
        name,
        measured,
        "C ended with the cap message; A, B train through it",
        allocated and cap_message and state not in ("active", "starting") and others and through,
        {"c_state": state, "c_reason": reason, "c_output": out_c[-2000:], "a": ra, "b": rb,
         "a_output": out_a[-2000:], "b_output": out_b[-2000:]},
    )  # fmt: skip


def check_overhead(stack: Stack, args: argparse.Namespace) -> Check:
    bare = [bare_run(args, stack.uuid)["median_s"]]
    stack.wait_warm()
    with leases(stack, ("whole", 0.0)) as (lease,):
        ok, out = lease.run(train_code(args, args.steps, 0))
    if not ok:
        return Check("whole-GPU step time vs bare torch", f"cell failed: {out[-160:]!r}",
                     f"<= +{args.tolerance * 100:.0f} %", False)  # fmt: skip
    bare.append(bare_run(args, stack.uuid)["median_s"])
    return judge_overhead(bare, parse_marked(out)["median_s"], args.tolerance)


def check_warm_attach(stack: Stack, args: argparse.Namespace) -> Check:
    total, attach = [], []
    for i in range(args.attaches + 1):  # the first warms the client's channels: not counted
        stack.wait_warm()
        time.sleep(0.2)
        with leases(stack, ("attach", 0.0)) as (lease,):
            ok, out = lease.run(FIRST_CUDA)
            first = time.perf_counter()
        if not ok:
            return Check("warm attach to first CUDA result", f"cell failed: {out[-160:]!r}",
                         f"p50 <= {args.attach_target_ms:.0f} ms", False)  # fmt: skip
        if i:
            total.append(first - lease.started)
            attach.append(lease.granted - lease.started)
    return judge_attach(total, attach, args.attach_target_ms)


CHECKS: dict[str, Callable[[Stack, argparse.Namespace], Check]] = {
    "halves": check_two_halves,
    "cap": check_cap_eviction,
    "overhead": check_overhead,
    "attach": check_warm_attach,
}


# -------------------------------------------------------------- main ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="GPU acceptance check of jupyter-gpuattach (exit 3 without a GPU).",
    )
    parser.add_argument("--gpu", default="0", help="GPU index, GPU UUID or MIG UUID")
    parser.add_argument(
        "--only", default=",".join(CHECKS), help="checks to run: " + ",".join(CHECKS)
    )
    parser.add_argument("--steps", type=int, default=300, help="timed steps of the overhead check")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument("--width", type=int, default=4096, help="MLP width")
    parser.add_argument("--batch", type=int, default=4096, help="batch size")
    parser.add_argument("--train-seconds", type=float, default=20.0, help="length of shared runs")
    parser.add_argument("--hog-factor", type=float, default=1.6, help="over-cap allocation / cap")
    parser.add_argument("--tolerance", type=float, default=0.03, help="step-time overhead allowed")
    parser.add_argument("--attaches", type=int, default=20, help="warm attaches measured")
    parser.add_argument("--attach-target-ms", type=float, default=150.0)
    parser.add_argument("--pool-size", type=int, default=1, help="warm workers on the GPU")
    parser.add_argument("--mps", default="off", choices=["off", "auto"], help="the agent's --mps")
    parser.add_argument("--workdir", default="", help="keep logs here (default: a temp folder)")
    parser.add_argument("--json", default="", help="write every figure to this file")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [c for c in args.only.split(",") if c and c not in CHECKS]
    if unknown:
        parser.error(f"--only: unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    if not 0 < args.tolerance < 1 or args.steps < 10 or args.attaches < 1:
        parser.error("--tolerance in (0, 1), --steps >= 10 and --attaches >= 1")
    if args.hog_factor <= 1.2:
        parser.error("--hog-factor must exceed 1.2 (the agent allows a margin over the cap)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        found = find_gpu(args.gpu)
    except SetupError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return EXIT_SETUP
    if isinstance(found, str):
        print(f"gpu_check: no GPU: {found}. This check needs an NVIDIA GPU; nothing was run.")
        return EXIT_NO_GPU
    uuid, gpu_name = found
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpuattach-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {gpu_name} ({uuid}); logs in {workdir}", flush=True)
    stack = Stack(workdir, uuid, args.pool_size, args.mps)
    checks: list[Check] = []
    try:
        bare_run(args, uuid)  # torch can use this GPU at all (else: setup error, not a FAIL)
        stack.start()
        for key in [c for c in args.only.split(",") if c]:
            print(f"gpu_check: {key} ...", flush=True)
            checks.append(CHECKS[key](stack, args))
    except SetupError as exc:
        print(f"gpu_check: setup failed: {exc}", file=sys.stderr)
        return EXIT_SETUP
    finally:
        stack.stop()
    print(table(checks))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"gpu": gpu_name, "uuid": uuid, "checks": [asdict(c) for c in checks]}, indent=2
            )
        )
    return EXIT_OK if all(c.passed for c in checks) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

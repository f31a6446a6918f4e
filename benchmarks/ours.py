"""Our figures, through the real client classes against a real broker and agent.

No Jupyter kernel: the same calls GPUSession makes (BrokerClient.attach,
WorkerClient.hello/execute/push/pull, codec.encode_namespace/decode_namespace),
timed one by one.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from stack import Stack
from stats import latency, throughput

from gpuattach_broker import codec
from gpuattach_broker.client.broker_client import BrokerClient
from gpuattach_broker.client.worker_client import WorkerClient, check_compatible, kernel_hello
from gpuattach_broker.protos import gpuattach_pb2 as pb

STREAM_LINES = 1000
STREAM_CODE = f"for line in range({STREAM_LINES}):\n    print(f'line {{line}}')\n"


def make_tensors(nbytes: int, count: int = 4) -> dict[str, torch.Tensor]:
    """`count` float32 tensors of nbytes in all, touched (not lazily zero pages)."""
    elements = nbytes // 4
    per = elements // count
    sizes = [per] * (count - 1) + [elements - per * (count - 1)]
    return {f"t{i}": torch.empty(n, dtype=torch.float32).fill_(1.0) for i, n in enumerate(sizes)}


def refresh(tensors: dict[str, torch.Tensor], rep: int) -> None:
    """New content each repetition: a content-addressed cache must not skip the bytes."""
    for i, t in enumerate(tensors.values()):
        t.fill_(float(rep * 8 + i + 2))


def attach_request() -> pb.AttachRequest:
    return pb.AttachRequest(
        user="bench",
        kernel_id="bench",
        slice=pb.SliceSpec(),
        wait_seconds=30,
        client_host=socket.gethostname(),
    )


def hello_request() -> pb.HelloRequest:
    return kernel_hello(os.getcwd(), list(sys.path), os.environ)


def _noop(*_: Any) -> None:
    return None


def open_worker(lease: pb.Lease) -> WorkerClient:
    """A client of the lease's worker, after the Hello a kernel makes first."""
    return open_worker_reply(lease)[0]


def open_worker_reply(lease: pb.Lease) -> tuple[WorkerClient, pb.HelloReply]:
    """`open_worker`, with the worker's Hello reply (how it was bound)."""
    worker = WorkerClient(lease.worker_endpoint, lease.token, lease.worker_tls_root)
    hello = hello_request()
    reply = worker.hello(hello)
    check_compatible(hello, reply)
    return worker, reply


def kernel_session(broker: BrokerClient, notify: Callable[[str], None]) -> tuple[Any, Any]:
    """The kernel's own GPUSession over a bare namespace (no Jupyter kernel):
    (session, shell), with `shell.user_ns` as the user's variables."""
    from types import SimpleNamespace

    from jupyter_gpuattach.session import GPUSession

    shell = SimpleNamespace(user_ns={}, user_ns_hidden={}, execution_count=1)
    session = GPUSession(shell)
    session.broker = broker
    session.notify = notify
    return session, shell


class Lease:
    """An attached lease: broker lease plus a connected worker client."""

    def __init__(self, broker: BrokerClient) -> None:
        self.broker = broker
        self.lease = broker.attach(attach_request())
        self.worker = open_worker(self.lease)
        side = self.worker.side
        if side is not None and side.local:
            # The cross-host path: a kernel on another host has no same-host socket.
            self.worker.side = dataclasses.replace(side, local="")
        self.count = 0

    def run(self, code: str, on_output: Callable[[pb.ExecuteOutput], None] = _noop) -> None:
        self.count += 1
        done = self.worker.execute(code, self.count, on_output, lambda request: "")
        if not done.ok:
            raise RuntimeError(f"remote cell failed: {code!r}")

    def release(self) -> None:
        self.worker.close()
        self.broker.release(self.lease, reason="benchmark")


def measure_attach(stack: Stack, broker: BrokerClient, n: int, log: Any) -> dict[str, Any]:
    """Warm attach: attach RPC until granted, then Hello (the first cell could run).

    Each iteration starts with the agent's warm pool refilled and idle, and
    ends with a release (timed too).
    """
    attach_s, hello_s, total_s, push_s, release_s, refill_s = [], [], [], [], [], []
    # Where the attach's time goes: the broker's decision (policy, placement),
    # the agent's start of the worker (StartLease -> LeaseStarted), the rest of
    # the broker's work (store writes, signing), and the grant's delivery (the
    # Attach call as the client saw it, less the broker's part).
    decision_s, start_s, broker_rest_s, delivery_s = [], [], [], []
    by_token = before_assign = 0
    empty = codec.encode_namespace({})
    not_warm = 0
    for i in range(n + 1):  # the first iteration warms the client's channel up
        try:
            refill = stack.wait_pool_warm(timeout=45)
        except TimeoutError as exc:
            # Not a warm attach: still run it (the lease must go back), but keep it out.
            log(f"  warning: {exc}")
            not_warm += 1
            refill = math.nan
        gc.collect()
        started = time.perf_counter()
        lease = broker.attach(attach_request())
        granted = time.perf_counter()
        worker, reply = open_worker_reply(lease)
        ready = time.perf_counter()
        worker.push(empty, {})  # what %gpu attach also does with an empty namespace
        pushed = time.perf_counter()
        worker.close()
        released_at = time.perf_counter()
        broker.release(lease, reason="benchmark")
        released = time.perf_counter()
        if i == 0 or math.isnan(refill):
            continue
        attach_s.append(granted - started)
        hello_s.append(ready - granted)
        total_s.append(ready - started)
        push_s.append(pushed - ready)
        release_s.append(released - released_at)
        refill_s.append(refill)
        decision_s.append(lease.broker_decision_s)
        start_s.append(lease.worker_start_s)
        broker_rest_s.append(
            max(0.0, lease.broker_total_s - lease.broker_decision_s - lease.worker_start_s)
        )
        delivery_s.append(max(0.0, (granted - started) - lease.broker_total_s))
        by_token += reply.bound_by == "token"
        before_assign += not reply.assigned
        log(
            f"  attach {i}/{n}: {(ready - started) * 1e3:.1f} ms (decision "
            f"{lease.broker_decision_s * 1e3:.2f}, worker start {lease.worker_start_s * 1e3:.2f}, "
            f"broker rest {broker_rest_s[-1] * 1e3:.2f}, delivery {delivery_s[-1] * 1e3:.2f}, "
            f"Hello {(ready - granted) * 1e3:.2f} ms; bound by {reply.bound_by or '?'})"
        )
    try:
        stack.wait_pool_warm(timeout=45)
    except TimeoutError as exc:
        log(f"  warning: {exc}")
    if not total_s:
        raise RuntimeError("no attach found the agent's warm pool refilled")
    return {
        "warm_attach": latency(total_s),
        "attach_rpc": latency(attach_s),
        "hello_rpc": latency(hello_s),
        "empty_push": latency(push_s),
        "release": latency(release_s),
        "pool_refill_wait": latency(refill_s),
        "attaches_without_warm_pool": not_warm,
        "attach_steps": {
            "broker_decision": latency(decision_s),
            "worker_start": latency(start_s),
            "broker_rest": latency(broker_rest_s),
            "grant_delivery": latency(delivery_s),
            "first_hello": latency(hello_s),
            "bound_by_token": by_token,
            "hello_before_assign": before_assign,
            "n": len(total_s),
        },
    }


def measure_cold_attach(stack: Stack, broker: BrokerClient, n: int, log: Any) -> dict[str, Any]:
    """Cold attach: no warm worker ready, so the agent starts one for the lease.

    A first lease takes the pool's warm worker; a second one, asked for at
    once (the pool refills only a second later), waits for a fresh worker
    process (Python start-up, ``import torch``, the shell). Both are half
    slices so they fit on the one device.
    """
    half = attach_request()
    half.slice.fraction = 0.5
    total_s = []
    for i in range(n):
        stack.wait_pool_warm(timeout=45)
        holder = broker.attach(half)
        started = time.perf_counter()
        lease = broker.attach(half)
        worker = open_worker(lease)
        total_s.append(time.perf_counter() - started)
        worker.close()
        broker.release(lease, reason="benchmark")
        broker.release(holder, reason="benchmark")
        log(f"  cold attach {i + 1}/{n}: {total_s[-1] * 1e3:.0f} ms")
    stack.wait_pool_warm(timeout=45)
    return {"cold_attach": latency(total_s)}


def measure_cells(lease: Lease, n_empty: int, n_stream: int) -> dict[str, Any]:
    for _ in range(20):
        lease.run("pass")
    gc.collect()
    empty = []
    for _ in range(n_empty):
        started = time.perf_counter()
        lease.run("pass")
        empty.append(time.perf_counter() - started)

    stream, first = [], []
    for rep in range(n_stream + 1):
        lines = 0
        first_at = 0.0

        def count(output: pb.ExecuteOutput) -> None:
            nonlocal lines, first_at
            if output.WhichOneof("msg") == "stream":
                if not first_at:
                    first_at = time.perf_counter()
                lines += output.stream.text.count("\n")

        started = time.perf_counter()
        lease.run(STREAM_CODE, count)
        ended = time.perf_counter()
        if lines != STREAM_LINES:
            raise RuntimeError(f"expected {STREAM_LINES} lines back, got {lines}")
        if rep:
            stream.append(ended - started)
            first.append(first_at - started)
    return {
        "empty_cell": latency(empty),
        "stream_1000_lines": latency(stream),
        "stream_first_output": latency(first),
    }


def blob_aware(worker: WorkerClient) -> bool:
    """Whether this version sends tensors the worker's host caches by reference."""
    return hasattr(worker, "missing_blobs") and hasattr(codec, "storage_digests")


def encode_for(worker: WorkerClient, values: dict[str, Any]) -> codec.Encoded:
    """Encode as the kernel does: blobs the worker already has go by reference."""
    if not blob_aware(worker):
        return codec.encode_namespace(values)
    digests = codec.storage_digests(values)
    have = digests - set(worker.missing_blobs(digests))
    if not have:
        return codec.encode_namespace(values)
    return codec.encode_namespace(values, receiver_has=have)


def measure_migration(lease: Lease, nbytes: int, reps: int, log: Any) -> dict[str, Any]:
    """In: encode + push (worker receives and decodes). Out: pull + decode here.

    Every repetition changes the tensors' content, so all bytes travel both
    ways (a cold migration). Where the worker caches blobs, an unchanged
    re-push is timed too.
    """
    tensors = make_tensors(nbytes)
    push_s, encode_s, pull_s, decode_s, repush_s = [], [], [], [], []
    sent_bytes = repush_bytes = 0
    try:
        for rep in range(reps):
            refresh(tensors, rep)
            gc.collect()
            started = time.perf_counter()
            encoded = encode_for(lease.worker, tensors)
            encoded_at = time.perf_counter()
            reply, sent_bytes = lease.worker.push(encoded, {})
            pushed = time.perf_counter()
            del encoded
            if sorted(reply.names) != sorted(tensors):
                raise RuntimeError(f"push landed {list(reply.names)}")
            push_s.append(pushed - started)
            encode_s.append(encoded_at - started)

            if blob_aware(lease.worker):
                gc.collect()
                started = time.perf_counter()
                reply, repush_bytes = lease.worker.push(encode_for(lease.worker, tensors), {})
                repush_s.append(time.perf_counter() - started)

            gc.collect()
            started = time.perf_counter()
            header, parts, _received = lease.worker.pull(skip=[], force=False)
            pulled = time.perf_counter()
            values = codec.decode_namespace(parts) if parts else {}
            decoded = time.perf_counter()
            back = values.get("t0")
            if not isinstance(back, torch.Tensor) or back.numel() != tensors["t0"].numel():
                raise RuntimeError("pull did not bring the tensors back")
            pull_s.append(decoded - started)
            decode_s.append(decoded - pulled)
            del values, parts, header, back
            log(
                f"  {nbytes / 1e6:.0f} MB rep {rep + 1}/{reps}: in {nbytes / push_s[-1] / 1e9:.2f}"
                f" GB/s, out {nbytes / pull_s[-1] / 1e9:.2f} GB/s"
            )
        lease.run("del t0, t1, t2, t3\nimport gc\ngc.collect()")
    finally:
        del tensors
        gc.collect()
    figures: dict[str, Any] = {
        "in": {**throughput(nbytes, push_s), "encode_ms_p50": _p50_ms(encode_s)},
        "out": {**throughput(nbytes, pull_s), "decode_ms_p50": _p50_ms(decode_s)},
        "wire_bytes": sent_bytes,
    }
    if repush_s:
        figures["repush_unchanged"] = {**latency(repush_s), "wire_bytes": repush_bytes}
    return figures


def measure_same_host_migration(
    broker: BrokerClient, nbytes: int, reps: int, log: Any, expect_local: bool | None = None
) -> dict[str, Any]:
    """The kernel's own code path on one host: GPUSession moves tensors through
    shared memory, a memfd handed over by descriptor (or, where the same-host
    channel is off, ``GPUATTACH_SAME_HOST_CHANNEL=0``, through the shared tmpfs
    blob cache: written once, mapped by the worker) and syncs back the same way.
    `expect_local`: fail unless the session did (True) or did not (False) use
    the memfd channel.

    In: fresh tensor content pushed (push_changes). Out: every tensor changed
    on the worker, then synced back into the kernel (the background sync /
    release path).
    """
    from jupyter_gpuattach.session import AttachOptions

    session, shell = kernel_session(broker, log)
    session.attach(AttachOptions())
    if session.host_cache is None:
        session.release()
        return {}
    side = session.worker.side if session.worker is not None else None
    local = side is not None and bool(side.local)
    if expect_local is not None and local != expect_local:
        session.release()
        raise RuntimeError(f"the same-host memfd channel is {'on' if local else 'off'}")
    tensors = make_tensors(nbytes)
    push_s, pull_s = [], []
    try:
        for rep in range(reps):
            refresh(tensors, rep)
            shell.user_ns.update(tensors)
            gc.collect()
            started = time.perf_counter()
            session.push_changes()
            push_s.append(time.perf_counter() - started)
            session.run_cell(
                "for name in ('t0', 't1', 't2', 't3'):\n    globals()[name].mul_(-1.5)"
            )
            session.wait_for_sync()  # the background sync of that cell is the "out" path
            last = session.transfers[-1]
            if last.kind != "sync" or last.wire_bytes < nbytes:
                raise RuntimeError(f"sync moved {last.wire_bytes} bytes, expected {nbytes}")
            pull_s.append(last.seconds)
            log(
                f"  {nbytes / 1e6:.0f} MB same host rep {rep + 1}/{reps}: in "
                f"{nbytes / push_s[-1] / 1e9:.2f} GB/s, out {nbytes / pull_s[-1] / 1e9:.2f} GB/s"
            )
    finally:
        for name in tensors:
            shell.user_ns.pop(name, None)
        del tensors
        session.release(force=True)
        gc.collect()
    return {"in": throughput(nbytes, push_s), "out": throughput(nbytes, pull_s)}


def measure_reattach(
    stack: Stack, broker: BrokerClient, nbytes: int, reps: int, log: Any
) -> dict[str, Any]:
    """Auto mode's cycle, through the kernel's own GPUSession on one host.

    First attach of a namespace of `nbytes` (every byte travels), then
    `reps` rounds of: idle release (auto mode, 1 s idle; timed from the
    idle deadline until the broker shows the capacity back in the pool) and
    re-attach of the unchanged namespace (timed until the first cell could
    run; tensors go by digest, the worker maps them from the host's cache).
    Bytes on the wire of each attach come from the session's own transfer log.
    """
    from jupyter_gpuattach.session import AttachOptions

    session, shell = kernel_session(broker, lambda line: None)
    tensors = make_tensors(nbytes)
    refresh(tensors, 1000 + int(time.time()) % 100_000)  # content no earlier run cached
    shell.user_ns.update(tensors)
    idle_s, reattach_s, reattach_bytes = [], [], []
    idle = 1.0
    try:
        stack.wait_pool_warm(timeout=45)
        gc.collect()
        started = time.perf_counter()
        session.attach(AttachOptions())
        first_s = time.perf_counter() - started
        first_bytes = session.transfers[-1].wire_bytes
        for rep in range(reps):
            session.enable_auto(AttachOptions(), idle)
            deadline = time.perf_counter() + idle
            while broker.pool_status().devices[0].allocated_bytes:
                time.sleep(0.005)
            idle_s.append(time.perf_counter() - deadline)
            session.disable_auto()
            if session.attached:
                raise RuntimeError("the broker freed the slice but the session still holds it")
            stack.wait_pool_warm(timeout=45)
            gc.collect()
            started = time.perf_counter()
            session.attach(AttachOptions())
            reattach_s.append(time.perf_counter() - started)
            reattach_bytes.append(session.transfers[-1].wire_bytes)
            log(
                f"  {nbytes / 1e6:.0f} MB rep {rep + 1}/{reps}: idle release "
                f"{idle_s[-1] * 1e3:.0f} ms after the deadline, re-attach "
                f"{reattach_s[-1] * 1e3:.0f} ms, {reattach_bytes[-1]:,} bytes"
            )
    finally:
        session.disable_auto()
        session.release(force=True)
        for name in tensors:
            shell.user_ns.pop(name, None)
        del tensors
        gc.collect()
    return {
        "bytes": nbytes,
        "first_attach": {**latency([first_s]), "wire_bytes": first_bytes},
        "reattach": {**latency(reattach_s), "wire_bytes": max(reattach_bytes)},
        "idle_release": latency(idle_s),
    }


def _p50_ms(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2] * 1e3


def measure(stack: Stack, cfg: Any, log: Callable[[str], None]) -> dict[str, Any]:
    broker = stack.client()
    try:
        log(f"ours: warm attach x{cfg.attach_n}")
        figures = measure_attach(stack, broker, cfg.attach_n, log)
        log(f"ours: cold attach x{cfg.cold_n}")
        figures.update(measure_cold_attach(stack, broker, cfg.cold_n, log))
        lease = Lease(broker)
        try:
            # The agent starts a replacement warm worker a second after the
            # attach (about 2 s of CPU for import torch): measure after it.
            stack.wait_pool_warm(leased=1, timeout=45)
            log(f"ours: empty cell x{cfg.cell_n}, streaming {STREAM_LINES} lines x{cfg.stream_n}")
            figures.update(measure_cells(lease, cfg.cell_n, cfg.stream_n))
            figures["migration"] = {}
            for label, nbytes, reps in cfg.sizes:
                log(f"ours: migration {label} x{reps}")
                figures["migration"][label] = measure_migration(lease, nbytes, reps, log)
        finally:
            lease.release()
        figures["migration_same_host"] = {}
        for label, nbytes, reps in cfg.sizes:
            log(f"ours: same-host migration {label} x{reps}")
            stack.wait_pool_warm(timeout=45)
            same = measure_same_host_migration(broker, nbytes, reps, log)
            if same:
                figures["migration_same_host"][label] = same
        figures["reattach"] = {}
        for label, nbytes, reps in cfg.reattach_sizes:
            log(f"ours: idle release and re-attach of an unchanged {label} x{reps}")
            figures["reattach"][label] = measure_reattach(stack, broker, nbytes, reps, log)
    finally:
        broker.close()
    return figures

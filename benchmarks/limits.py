"""The machine's own limits, measured in the same run as our figures.

- empty gRPC unary round trip (and an empty bidi-stream call, the shape of
  Execute) against a trivial server in another process, with a generic
  handler and raw bytes: no .proto involved;
- how many empty unary calls an asyncio gRPC server (the broker's kind: one
  event loop) answers per second under 200 concurrent clients, and its CPU
  per call: the ceiling of any Python control plane on this machine;
- raw TCP 1-byte ping-pong between two processes;
- loopback TCP throughput between two processes, both ends reusing touched
  buffers (first touch of fresh memory costs 1-2.5 s per GiB here);
- memcpy into a touched buffer, and into fresh pages (first touch).

The servers run in processes started with ``spawn`` so they import nothing
of the benchmark's state (no torch).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import socket
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import numpy as np
from stats import latency, throughput, time_calls

CTX = mp.get_context("spawn")
SERVICE = "bench.Echo"
TCP_BUFFER = 64 * 1024 * 1024
# The chunk size and message limits the project's namespace transfer uses.
GRPC_CHUNK = 4 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


# ------------------------------------------------------ child processes ---


def _grpc_server(port_queue: Any, stop: Any) -> None:
    import grpc

    def ping(request: bytes, context: Any) -> bytes:
        return b""

    def chat(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for _ in requests:
            yield b""

    chunk = b"\1" * GRPC_CHUNK

    def flood(request: bytes, context: Any) -> Iterator[bytes]:
        for _ in range(int(request)):
            yield chunk

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Ping": grpc.unary_unary_rpc_method_handler(ping),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Flood": grpc.unary_stream_rpc_method_handler(flood),
        },
    )
    # The same server shape as the worker's: sync server, thread pool of 8.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_queue.put(port)
    stop.wait()
    server.stop(0)


def _grpc_aio_server(port_queue: Any, stop: Any) -> None:
    """An asyncio gRPC server with one empty unary method, as the broker serves."""
    import asyncio

    import grpc

    async def ping(request: bytes, context: Any) -> bytes:
        return b""

    async def serve() -> None:
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_queue.put(port)
        await asyncio.to_thread(stop.wait)
        await server.stop(0)

    asyncio.run(serve())


def _listen() -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    return listener


def _tcp_echo_server(port_queue: Any) -> None:
    listener = _listen()
    port_queue.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = conn.recv(1)
        if not data:
            return
        conn.sendall(data)


def _tcp_sink_server(port_queue: Any, total: int, reps: int) -> None:
    listener = _listen()
    port_queue.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray(b"\0" * TCP_BUFFER)  # touched once, reused
    view = memoryview(buffer)
    for _ in range(reps):
        left = total
        while left:
            got = conn.recv_into(view[: min(left, TCP_BUFFER)])
            if not got:
                return
            left -= got
        conn.sendall(b"k")


@contextlib.contextmanager
def _child(target: Callable[..., None], *args: Any) -> Iterator[int]:
    """Start a server process; yield its port; always stop it."""
    port_queue = CTX.Queue()
    proc = CTX.Process(target=target, args=(port_queue, *args), daemon=True)
    proc.start()
    try:
        yield int(port_queue.get(timeout=60))
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)


def _stop_child(proc: Any, stop: Any) -> None:
    """Ask a server process started with a stop event to end; then make sure."""
    stop.set()
    proc.join(5)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)


# ------------------------------------------------------------- figures ---


def grpc_figures(n: int, stream_bytes: int, stream_reps: int, warmup: int = 100) -> dict[str, Any]:
    import grpc

    port_queue, stop = CTX.Queue(), CTX.Event()
    proc = CTX.Process(target=_grpc_server, args=(port_queue, stop), daemon=True)
    proc.start()
    try:
        target = f"127.0.0.1:{int(port_queue.get(timeout=60))}"
        with grpc.insecure_channel(target, options=GRPC_OPTIONS) as channel:
            ping = channel.unary_unary(f"/{SERVICE}/Ping", None, None)  # raw bytes both ways
            chat = channel.stream_stream(f"/{SERVICE}/Chat", None, None)
            flood = channel.unary_stream(f"/{SERVICE}/Flood", None, None)
            unary = time_calls(lambda: ping(b"", timeout=10), n, warmup)

            def one_exchange() -> None:
                for _ in chat(iter([b""]), timeout=10):
                    pass

            bidi = time_calls(one_exchange, max(10, n // 4), warmup // 4)

            messages = max(1, stream_bytes // GRPC_CHUNK)

            def stream() -> None:
                got = sum(len(m) for m in flood(str(messages).encode(), timeout=120))
                if got != messages * GRPC_CHUNK:
                    raise ConnectionError(f"streamed {got} bytes, expected {messages * GRPC_CHUNK}")

            streamed = time_calls(stream, stream_reps, warmup=1)

        def fresh_channel() -> None:
            with grpc.insecure_channel(target) as fresh:
                fresh.unary_unary(f"/{SERVICE}/Ping", None, None)(b"", timeout=10)

        first_call = time_calls(fresh_channel, max(10, n // 20), warmup=3)
        return {
            "unary": latency(unary),
            "bidi_stream": latency(bidi),
            "new_channel_first_call": latency(first_call),
            "stream_throughput": {
                **throughput(messages * GRPC_CHUNK, streamed),
                "message_bytes": GRPC_CHUNK,
            },
        }
    finally:
        _stop_child(proc, stop)


def grpc_aio_capacity(clients: int = 200, seconds: float = 3.0) -> dict[str, Any]:
    """Empty unary calls/s of an asyncio gRPC server under `clients` concurrent
    callers (each its own channel, as the control-plane benchmark's), and the
    server's CPU per call. The callers share this machine, as there."""
    import asyncio

    import grpc
    import psutil

    port_queue, stop = CTX.Queue(), CTX.Event()
    proc = CTX.Process(target=_grpc_aio_server, args=(port_queue, stop), daemon=True)
    proc.start()
    try:
        target = f"127.0.0.1:{int(port_queue.get(timeout=60))}"
        server = psutil.Process(proc.pid)

        async def caller(calls: list[int], measure_from: float, stop_at: float) -> None:
            async with grpc.aio.insecure_channel(target) as channel:
                ping = channel.unary_unary(f"/{SERVICE}/Ping", None, None)
                while time.monotonic() < stop_at:
                    await ping(b"", timeout=30)
                    if time.monotonic() >= measure_from:
                        calls[0] += 1

        async def load() -> dict[str, Any]:
            calls = [0]
            now = time.monotonic()
            measure_from, stop_at = now + 1.0, now + 1.0 + seconds
            tasks = [
                asyncio.create_task(caller(calls, measure_from, stop_at)) for _ in range(clients)
            ]
            await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
            cpu_before = sum(server.cpu_times()[:2])
            counted_before = calls[0]
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
            cpu_used = sum(server.cpu_times()[:2]) - cpu_before
            counted = calls[0] - counted_before
            await asyncio.gather(*tasks)
            return {
                "clients": clients,
                "calls_per_second": counted / seconds,
                "server_cpu_share": cpu_used / seconds,
                "server_cpu_us_per_call": 1e6 * cpu_used / counted if counted else None,
            }

        return asyncio.run(load())
    finally:
        _stop_child(proc, stop)


def tcp_pingpong(n: int, warmup: int = 200) -> dict[str, Any]:
    with _child(_tcp_echo_server) as port:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:

            def exchange() -> None:
                sock.sendall(b"x")
                if not sock.recv(1):
                    raise ConnectionError("echo server went away")

            samples = time_calls(exchange, n, warmup)
        finally:
            sock.close()
    summary = latency(samples)
    return {**summary, "unit": "us", **{k: summary[k] * 1e3 for k in ("p50", "p99", "min", "max")}}


def tcp_throughput(total: int, reps: int) -> dict[str, Any]:
    buffer = np.ones(TCP_BUFFER, dtype=np.uint8)  # touched once, reused
    view = buffer.data.cast("B")
    samples = []
    with _child(_tcp_sink_server, total, reps) as port:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for _ in range(reps):
                started = time.perf_counter()
                left = total
                while left:
                    piece = view[: min(left, TCP_BUFFER)]
                    sock.sendall(piece)
                    left -= piece.nbytes
                if sock.recv(1) != b"k":
                    raise ConnectionError("sink server went away")
                samples.append(time.perf_counter() - started)
        finally:
            sock.close()
    return throughput(total, samples)


def memcpy(nbytes: int, reps: int) -> dict[str, Any]:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    dst.fill(1)  # np.zeros may leave pages untouched; touch them
    samples = time_calls(lambda: np.copyto(dst, src), reps, warmup=1)
    return throughput(nbytes, samples)


def memcpy_fresh(nbytes: int, reps: int) -> dict[str, Any]:
    """Copy into newly allocated pages: what a receiver pays when its bytes
    land in fresh memory (the kernel's page faults and zeroing come with the
    first touch), next to `memcpy` into a touched buffer."""
    src = np.ones(nbytes, dtype=np.uint8)

    def copy_into_fresh() -> None:
        dst = np.empty(nbytes, dtype=np.uint8)
        np.copyto(dst, src)
        del dst

    return throughput(nbytes, time_calls(copy_into_fresh, reps, warmup=1))


def measure(cfg: Any, log: Callable[[str], None]) -> dict[str, Any]:
    log("limits: gRPC round trips and server-streaming throughput")
    rpc = grpc_figures(cfg.grpc_n, cfg.tcp_bytes, cfg.tcp_reps)
    log("limits: asyncio gRPC server, empty unary calls/s under 200 clients")
    capacity = grpc_aio_capacity(seconds=1.0 if cfg.grpc_n < 500 else 3.0)
    log("limits: TCP 1-byte ping-pong")
    pingpong = tcp_pingpong(cfg.pingpong_n)
    log(f"limits: loopback TCP throughput ({cfg.tcp_bytes / 2**20:.0f} MiB)")
    tcp = tcp_throughput(cfg.tcp_bytes, cfg.tcp_reps)
    log(f"limits: memcpy ({cfg.memcpy_bytes / 2**20:.0f} MiB)")
    copy = memcpy(cfg.memcpy_bytes, cfg.memcpy_reps)
    log(f"limits: copy into fresh pages ({cfg.memcpy_bytes / 2**20:.0f} MiB)")
    fresh = memcpy_fresh(cfg.memcpy_bytes, cfg.memcpy_reps)
    return {
        "grpc_unary_rtt": rpc["unary"],
        "grpc_bidi_call": rpc["bidi_stream"],
        "grpc_new_channel_first_call": rpc["new_channel_first_call"],
        "grpc_stream_throughput": rpc["stream_throughput"],
        "grpc_aio_capacity": capacity,
        "tcp_pingpong": pingpong,
        "tcp_throughput": tcp,
        "memcpy": copy,
        "memcpy_fresh_pages": fresh,
    }

"""The kernel's bound for an unreachable worker, and a cut link noticed within it
(a real gRPC server behind the test's fault proxy; no project part stands in)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import grpc
import pytest

from gpuattach_broker import transfer
from gpuattach_broker.client.worker_client import (
    DEFAULT_LIVENESS_BOUND,
    keepalive_options,
    liveness_bound,
)
from tests.faultproxy import FaultProxy


@pytest.mark.parametrize(
    ("value", "bound"),
    [
        ("", 15.0),
        ("3", 3.0),
        ("2.5", 2.5),
        ("500ms", 1.0),
        ("1m", 60.0),
        ("nonsense", 15.0),
        ("0", 15.0),
    ],
)
def test_bound_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, bound: float
) -> None:
    monkeypatch.setenv("GPUATTACH_WORKER_TIMEOUT", value)
    assert liveness_bound() == bound
    assert DEFAULT_LIVENESS_BOUND == 15.0


def test_keepalive_fits_in_the_bound() -> None:
    options = dict(keepalive_options(15.0))
    assert options["grpc.keepalive_time_ms"] == 5000
    assert options["grpc.keepalive_timeout_ms"] == 7500
    # a probe ping in flight would otherwise wait 60 s and hold the keepalive back
    assert options["grpc.http2.ping_timeout_ms"] == 7500
    assert options["grpc.http2.max_pings_without_data"] == 0


def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(1000):
        time.sleep(0.1)
        yield b"%d" % i


@pytest.fixture
def server() -> Iterator[str]:
    handler = grpc.method_handlers_generic_handler(
        "t.T", {"S": grpc.unary_stream_rpc_method_handler(_stream)}
    )
    srv = grpc.server(
        concurrent.futures.ThreadPoolExecutor(4),
        handlers=[handler],
        options=transfer.GRPC_OPTIONS,
    )
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(0)


def test_a_cut_link_fails_its_stream_within_the_bound_and_a_short_cut_does_not(
    server: str,
) -> None:
    bound = 2.0
    with FaultProxy(upstream=server) as proxy:
        options = [*transfer.GRPC_OPTIONS, *keepalive_options(bound)]
        with grpc.insecure_channel(proxy.address, options=options) as channel:
            stream = channel.unary_stream("/t.T/S", None, None)
            # a cut shorter than the keepalive timeout: the stream goes on
            call = stream(b"")
            for n, _ in enumerate(call):
                if n == 3:
                    proxy.cut()
                    time.sleep(0.5)
                    proxy.restore()
                if n == 10:
                    call.cancel()
                    break
            # a cut that lasts: the stream fails within the bound, not a reset
            call = stream(b"")
            cut_at: list[float] = []

            def read_through_a_cut() -> None:
                for n, _ in enumerate(call):
                    if n == 3:
                        proxy.cut()
                        cut_at.append(time.monotonic())

            with pytest.raises(grpc.RpcError) as failed:
                read_through_a_cut()
            assert time.monotonic() - cut_at[0] <= bound + 0.5
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "ping timeout" in (failed.value.details() or "")

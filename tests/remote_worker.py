"""A lease's worker driven at the protocol level, for the side-channel tests:
attach, run a cell, and a namespace with a notebook's aliasing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from gpuattach_broker.client.worker_client import WorkerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.harness import Stack

MIB = 1 << 20


@contextlib.contextmanager
def attached(stack: Stack, user: str = "ada", token: str = "") -> Iterator[WorkerClient]:
    """A granted lease's worker client (no Hello yet); released afterwards."""
    client = stack.client(token) if token else stack.client()
    lease = client.attach(pb.AttachRequest(user=user, wait_seconds=-1))
    worker = WorkerClient(lease.worker_endpoint, lease.token, lease.worker_tls_root)
    try:
        yield worker
    finally:
        worker.close()
        client.release(lease)
        client.close()


def run(worker: WorkerClient, code: str) -> str:
    """Run a cell on the worker; its stdout (the cell must succeed)."""
    outputs: list[pb.ExecuteOutput] = []
    done = worker.execute(code, 1, outputs.append, lambda request: "")
    text = "".join(o.stream.text for o in outputs)
    errors = [o.error for o in outputs if o.WhichOneof("msg") == "error"]
    assert done.ok, (text, errors)
    return text


def aliased_namespace() -> dict[str, Any]:
    """8 MiB of tensors with the aliasing a notebook has: a view, a tied weight."""
    torch.manual_seed(7)
    w = torch.randn(2 * MIB)
    model = torch.nn.Linear(512, 512)
    return {"w": w, "view": w[100:200], "model": model, "tied": model.weight, "n": 3}

"""The worker's side of GPU warm-up: --warm-cuda, and refusing a slice its context cannot serve."""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace

import pytest

from gpuattach_broker.agent.pool import WARM_CUDA_FLAG, WorkerPool
from gpuattach_broker.worker.service import _context_conflict


def fake_torch(initialized: bool) -> SimpleNamespace:
    return SimpleNamespace(cuda=SimpleNamespace(is_initialized=lambda: initialized))


def test_no_conflict_before_cuda_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(False))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a")
    env = {"CUDA_VISIBLE_DEVICES": "GPU-b", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}
    assert _context_conflict(env) == ""


def test_warm_context_serves_only_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(True))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a")
    assert _context_conflict({"CUDA_VISIBLE_DEVICES": "GPU-a"}) == ""
    assert "cannot serve 'GPU-b'" in _context_conflict({"CUDA_VISIBLE_DEVICES": "GPU-b"})
    late = _context_conflict(
        {"CUDA_VISIBLE_DEVICES": "GPU-a", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}
    )
    assert "before the CUDA context exists" in late


def test_real_worker_with_warm_cuda_reports_why_not_here() -> None:
    """A real worker process on this GPU-less machine: ready, and says why CUDA is not warm."""
    pool = WorkerPool(size=1, args=[WARM_CUDA_FLAG], device="GPU-none")

    async def scenario() -> None:
        worker = await pool.spawn()
        try:
            assert worker.device == ""  # not warmed: the pool must not treat it as device-bound
            assert "no CUDA device" in worker.cuda or "not installed" in worker.cuda
        finally:
            await worker.stop(grace=2.0)

    asyncio.run(scenario())

"""Per-lease GPU samples, memory-cap decisions and Xid handling at the pynvml boundary."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import pynvml as real
import pytest

from gpuattach_broker.agent.backends.base import Device
from gpuattach_broker.agent.backends.nvml_inventory import ALL_INSTANCES
from gpuattach_broker.agent.caps import CapEnforcer, CapPolicy
from gpuattach_broker.agent.gpu_monitor import GpuMonitor, TrackedLease, process_tree
from gpuattach_broker.agent.xid import XidEvent, XidWatcher, classify, describe
from tests.unit.test_nvml_fake import FakeNvml, Proc, a100_mig, h100_plain, two_a100_80gb

GIB = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gpu_device(fake: FakeNvml, index: int = 0) -> Device:
    gpu = fake.gpus[index]
    return Device(gpu.uuid, gpu.name, "gpu", gpu.memory_mib << 20, gpu.uuid)


def monitor_for(fake: FakeNvml, trees: dict[int, set[int]], clock: Clock) -> GpuMonitor:
    fake.nvmlInit()
    return GpuMonitor(
        fake,
        clock=clock,
        wall=lambda: 1.7e9,
        pids_of=lambda pid: trees.get(pid, {pid}),
        pid_exists=lambda pid: True,
    )


# ---------------------------------------------------------------- monitor ---


def test_two_fractional_leases_on_one_gpu() -> None:
    fake = FakeNvml(h100_plain())
    gpu = fake.gpus[0]
    gpu.procs = [Proc(100, 2 * GIB), Proc(101, 1 * GIB), Proc(200, 5 * GIB), Proc(999, GIB)]
    gpu.util_samples = [(100, 10, 30), (101, 12, 20), (200, 11, 50), (200, 9, 90)]
    clock = Clock()
    monitor = monitor_for(fake, {100: {100, 101}}, clock)
    device = gpu_device(fake)
    monitor.track(TrackedLease("a", 100, (device,), cap_bytes=10 * GIB))
    monitor.track(TrackedLease("b", 200, (device,), cap_bytes=10 * GIB))

    first = {s.lease_id: s for s in monitor.sample()}
    assert first["a"].memory_bytes == 3 * GIB  # the worker and its child
    assert first["b"].memory_bytes == 5 * GIB
    assert first["a"].sm_percent == 50.0
    assert first["b"].devices[0].sm_source == "process"
    assert (first["a"].busy_seconds, first["a"].sm_seconds) == (0.0, 0.0)
    assert first["a"].pids == (100, 101)

    clock.now += 2.0
    gpu.util_samples += [(100, 20, 80), (200, 21, 0)]
    second = {s.lease_id: s for s in monitor.sample()}
    assert second["a"].sm_percent == 80.0
    assert second["a"].busy_seconds == pytest.approx(2.0)
    assert second["a"].sm_seconds == pytest.approx(1.6)
    assert second["b"].busy_seconds == 0.0  # sampled at 0 % since the last pass

    clock.now += 3.0  # no new sample: NotFound, nothing ran on the SMs
    third = {s.lease_id: s for s in monitor.sample()}
    assert third["a"].sm_percent == 0.0
    assert third["a"].busy_seconds == pytest.approx(2.0)
    assert monitor.latest["a"] == third["a"]
    assert monitor.untrack("a") == third["a"]
    assert [s.lease_id for s in monitor.sample()] == ["b"]


def test_device_utilisation_counts_only_for_a_lease_alone() -> None:
    fake = FakeNvml(two_a100_80gb())
    for gpu in fake.gpus:
        gpu.util_samples = None  # per-process utilisation not supported here
        gpu.device_util = 70
    monitor = monitor_for(fake, {}, Clock())
    d0, d1 = gpu_device(fake, 0), gpu_device(fake, 1)
    monitor.track(TrackedLease("alone", 1, (d0,)))
    monitor.track(TrackedLease("x", 2, (d1,), cap_bytes=GIB))
    monitor.track(TrackedLease("y", 3, (d1,), cap_bytes=GIB))
    samples = {s.lease_id: s for s in monitor.sample()}
    assert (samples["alone"].sm_percent, samples["alone"].devices[0].sm_source) == (70.0, "device")
    assert samples["x"].sm_percent is None
    assert samples["x"].devices[0].sm_source == "none"


def test_mig_instance_memory_and_no_utilisation() -> None:
    fake = FakeNvml(a100_mig())
    mig = fake.gpus[0].migs[2]
    assert mig is not None
    mig.procs = [Proc(300, 3 * GIB, gi=13, ci=0)]
    monitor = monitor_for(fake, {}, Clock())
    device = Device(mig.uuid, "1g.5gb", "mig", mig.memory_mb << 20, mig.uuid)
    monitor.track(TrackedLease("m", 300, (device,)))
    (sample,) = monitor.sample()
    assert sample.memory_bytes == 3 * GIB
    assert sample.sm_percent is None  # MIG: neither per-process nor device-wide utilisation


def test_mps_clients_and_unknown_memory() -> None:
    fake = FakeNvml(h100_plain())
    fake.gpus[0].procs = [Proc(50, 400 << 20)]  # the MPS server itself
    fake.gpus[0].mps_procs = [Proc(100, 6 * GIB)]
    monitor = monitor_for(fake, {}, Clock())
    device = gpu_device(fake)
    monitor.track(TrackedLease("mps", 100, (device,), cap_bytes=4 * GIB))
    assert monitor.sample()[0].memory_bytes == 6 * GIB
    fake.gpus[0].mps_procs = [Proc(100, None)]  # NVML_VALUE_NOT_AVAILABLE
    assert monitor.sample()[0].devices[0].memory_bytes is None


def test_lost_gpu_is_reported() -> None:
    fake = FakeNvml(two_a100_80gb())
    monitor = monitor_for(fake, {}, Clock())
    monitor.track(TrackedLease("a", 1, (gpu_device(fake, 0),)))
    monitor.track(TrackedLease("b", 2, (gpu_device(fake, 1),)))
    fake.gpus[1].lost = True
    samples = {s.lease_id: s for s in monitor.sample()}
    assert monitor.lost_devices == {fake.gpus[1].uuid}
    assert "GpuIsLost" in monitor.device_errors[fake.gpus[1].uuid]
    assert samples["b"].devices[0].memory_bytes is None
    assert samples["a"].devices[0].memory_bytes == 0


def test_foreign_pid_namespace_is_flagged() -> None:
    fake = FakeNvml(h100_plain())
    fake.gpus[0].procs = [Proc(4242, GIB)]
    fake.nvmlInit()
    monitor = GpuMonitor(fake, pids_of=lambda pid: {pid}, pid_exists=lambda pid: False)
    monitor.track(TrackedLease("a", 7, (gpu_device(fake),), cap_bytes=GIB))
    monitor.sample()
    assert monitor.foreign_pids


def test_process_tree_finds_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert {os.getpid(), child.pid} <= process_tree(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert process_tree(2**22 + 17) == {2**22 + 17}  # no such process: just itself


# ------------------------------------------------------------------- caps ---


@pytest.mark.parametrize(
    ("cap", "allowance"), [(10 * GIB, 11 * GIB), (40 * GIB, 44 * GIB), (2 * GIB, 3 * GIB)]
)
def test_allowance_is_cap_plus_margin(cap: int, allowance: int) -> None:
    assert CapPolicy().allowance(cap) == allowance


def test_breach_after_grace_with_the_numbers() -> None:
    enforcer = CapEnforcer(CapPolicy(grace_samples=2))
    args = ("lease-1", "NVIDIA H100 80GB HBM3", "GPU-1")
    assert enforcer.observe(*args, 10 * GIB, 12 * GIB) is None
    assert enforcer.observe(*args, 10 * GIB, 10 * GIB) is None  # back under: strikes reset
    assert enforcer.observe(*args, 10 * GIB, 12 * GIB) is None
    breach = enforcer.observe(*args, 10 * GIB, 12 * GIB)
    assert breach is not None
    message = breach.message()
    for words in (
        "GPU memory cap exceeded",
        "10.0 GiB",
        "12.0 GiB",
        "11.0 GiB",
        "NVIDIA H100 80GB HBM3",
        "%gpu attach --mem",
    ):
        assert words in message


def test_no_cap_or_unknown_memory_never_breaches() -> None:
    enforcer = CapEnforcer(CapPolicy(grace_samples=1))
    assert enforcer.observe("a", "GPU", "u", 0, 100 * GIB) is None
    assert enforcer.observe("a", "GPU", "u", GIB, None) is None
    assert enforcer.observe("a", "GPU", "u", GIB, 3 * GIB) is not None
    enforcer.forget("a")
    assert not enforcer._strikes


# -------------------------------------------------------------------- xid ---


@pytest.mark.parametrize(
    ("xid", "action"), [(79, "end"), (48, "end"), (95, "end"), (31, "ignore"), (13, "ignore"),
                        (63, "drain"), (4321, "drain")],
)  # fmt: skip
def test_classify_xid(xid: int, action: str) -> None:
    assert classify(xid).action == action


def test_describe_names_the_mig_instance() -> None:
    text = describe(XidEvent("GPU-1", 94, 5, 0), classify(94))
    assert text == (
        "Xid 94 on GPU GPU-1 (MIG GPU instance 5, compute instance 0): contained ECC error"
    )
    assert "instance" not in describe(XidEvent("GPU-1", 79, ALL_INSTANCES), classify(79))


def test_xid_watcher_delivers_events_and_stops() -> None:
    fake = FakeNvml(two_a100_80gb())
    fake.gpus[1].xid_supported = False
    fake.nvmlInit()
    got: list[XidEvent] = []
    arrived = threading.Event()

    def on_event(event: XidEvent) -> None:
        got.append(event)
        arrived.set()

    watcher = XidWatcher(fake, [g.uuid for g in fake.gpus], on_event, timeout_ms=10)
    watcher.start()
    assert watcher.watched == [fake.gpus[0].uuid]
    assert watcher.unsupported == {fake.gpus[1].uuid: "NotSupported"}
    fake.events.append((fake.gpus[0].uuid, 79, ALL_INSTANCES, ALL_INSTANCES))
    assert arrived.wait(5)
    watcher.stop()
    assert got == [XidEvent(fake.gpus[0].uuid, 79, ALL_INSTANCES, ALL_INSTANCES)]
    assert watcher._thread is None


def test_xid_watcher_survives_wait_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(h100_plain())
    fake.nvmlInit()
    calls: list[int] = []
    retried = threading.Event()

    def failing_wait(eventSet: Any, timeoutms: int) -> Any:
        calls.append(timeoutms)
        if len(calls) >= 2:
            retried.set()
        raise real.NVMLError(real.NVML_ERROR_UNKNOWN)

    monkeypatch.setattr(fake, "nvmlEventSetWait_v2", failing_wait)
    watcher = XidWatcher(fake, [fake.gpus[0].uuid], lambda event: None, timeout_ms=10)
    watcher.start()
    assert retried.wait(10), "the watcher gave up after a failed wait"
    watcher.stop()  # and stop() still returns

"""A device backend from another distribution, found through its entry point.

The dummy backend below is not part of this project: it lives in a
temporary folder as a module plus the ``*.dist-info`` an installer would
write for it (``entry_points.txt`` in the ``gpuattach.backends`` group).
With that folder on ``PYTHONPATH``, importlib.metadata finds it the way it
finds an installed package, and a real agent run with ``--devices dummy:...``
offers its devices to a real broker; a real kernel attaches to one and runs
a cell on a worker that sees the environment the dummy backend gave it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import BIN, Kernel, Stack

pytestmark = pytest.mark.integration

GIB = 1 << 30

DUMMY_MODULE = '''
"""An accelerator this project knows nothing about."""

from gpuattach_broker.agent.backends import BackendError, Device, DeviceBackend


class DummyBackend(DeviceBackend):
    name = "dummy"

    def __init__(self, count, memory_bytes):
        self._devices = [
            Device(local_id=f"dummy{i}", name="Dummy accelerator", kind="cpu",
                   memory_bytes=memory_bytes)
            for i in range(count)
        ]

    @classmethod
    def open(cls, options, settings):
        count, _, gib = (options or "1x1").partition("x")
        if not (count.isdigit() and gib.isdigit()):
            raise BackendError(f"dummy backend: cannot read {options!r}, write dummy:<n>x<GiB>")
        return cls(int(count), int(gib) << 30)

    def devices(self):
        return list(self._devices)

    def slice_env(self, devices, memory_bytes):
        return {
            "CUDA_VISIBLE_DEVICES": "",
            "GPUATTACH_DEVICES": ",".join(d.local_id for d in devices),
            "GPUATTACH_MEMORY_BYTES": str(memory_bytes),
            "DUMMY_ACCELERATOR": ",".join(d.local_id for d in devices),
        }
'''


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding the dummy distribution, first on every child's PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "gpuattach_dummy_backend.py").write_text(DUMMY_MODULE)
    info = site / "gpuattach_dummy_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: gpuattach-dummy-backend\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[gpuattach.backends]\ndummy = gpuattach_dummy_backend:DummyBackend\n"
    )
    parts = [str(site), *filter(None, [os.environ.get("PYTHONPATH", "")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(parts))
    return site


@pytest.fixture
def dummy_stack(tmp_path: Path, plugin_path: Path) -> Iterator[Stack]:
    stack = Stack(workdir=tmp_path / "stack", devices="dummy:2x3", pool_size=0)
    try:
        yield stack.start()
    finally:
        stack.stop()


def test_agent_serves_a_backend_registered_through_an_entry_point(
    dummy_stack: Stack, tmp_path: Path
) -> None:
    pool = dummy_stack.pool()
    offered = {d.device_id: (d.name, d.memory_bytes) for d in pool.devices}
    assert offered == {
        "testhost/dummy0": ("Dummy accelerator", 3 * GIB),
        "testhost/dummy1": ("Dummy accelerator", 3 * GIB),
    }
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    kernel = Kernel(dummy_stack.env(), notebook)
    try:
        kernel.ok("%load_ext jupyter_gpuattach")
        attached = kernel.ok("%gpu attach --mem 1GiB")
        assert "GPU attached" in attached.stdout, attached.stdout
        (lease,) = dummy_stack.leases()
        assert len(lease.device_ids) == 1
        assert lease.device_ids[0] in offered
        held = lease.device_ids[0].split("/", 1)[1]
        seen: Any = kernel.value("__import__('os').environ.get('DUMMY_ACCELERATOR')")
        assert seen == held  # the cell ran on a worker the dummy backend set up
        kernel.ok("%gpu release")
    finally:
        kernel.shutdown()


def test_check_reports_what_the_plugin_offers(plugin_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "gpuattach-agent"), "check", "--devices", "dummy:2x3", "--isolation", "none"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "device backend dummy: 2 devices, capabilities none" in done.stdout
    assert "dummy1: Dummy accelerator, 3.0 GiB" in done.stdout


def test_unknown_backend_names_the_installed_ones(plugin_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "gpuattach-agent"), "--devices", "rocm:0", "--broker", "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert done.returncode == 2, done.stderr
    # The installed names, the dummy among them, in the one-line message.
    assert "unknown device spec 'rocm:0'" in done.stderr
    assert "(cpu, dummy, nvml)" in done.stderr, done.stderr


def test_a_broken_plugin_is_named_in_the_error(plugin_path: Path) -> None:
    (plugin_path / "gpuattach_dummy_backend.py").write_text("raise ImportError('no driver')\n")
    code = (
        "from gpuattach_broker.agent.backends import BackendError, open_backend\n"
        "try:\n    open_backend('dummy:1x1')\nexcept BackendError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "device backend 'dummy' (gpuattach_dummy_backend:DummyBackend) cannot be loaded" in (
        done.stdout
    )
    assert "ImportError: no driver" in done.stdout

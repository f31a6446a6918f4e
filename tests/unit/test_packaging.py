"""Each role installs what it needs: a kernel takes the base install only.

`pip install jupyter-gpuattach` must give a kernel everything it imports;
NVML (the agent's) and Prometheus (the broker's) come with extras. Two
checks: the declared requirements, and a kernel process in which those
packages cannot be imported at all (an import hook refuses them) loading the
extension, its session code and an embedded broker on the CPU backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from gpuattach_broker.agent.backends.registry import BUILTIN, GROUP

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Not in the base install; a kernel must not need them.
ROLE_PACKAGES = {
    "nvidia-ml-py": "pynvml",
    "prometheus-client": "prometheus_client",
}
# Never needed by a kernel either (tests, the server, the lab, benchmarks).
ALSO_BLOCKED = ["grpc_tools", "jupyter_server", "jupyterlab", "psutil", "torch"]


def names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def test_base_requirements_are_the_kernels_and_extras_carry_the_roles() -> None:
    base = names(PROJECT["dependencies"])
    assert not base & set(ROLE_PACKAGES), base
    extras = PROJECT["optional-dependencies"]
    assert "nvidia-ml-py" in names(extras["agent"])
    assert "prometheus-client" in names(extras["broker"])
    # `make install` (dev) still installs every role.
    test_extras = {
        extra
        for r in extras["test"]
        if Requirement(r).name == PROJECT["name"]
        for extra in Requirement(r).extras
    }
    assert {"agent", "broker", "jupyter", "torch"} <= test_extras
    assert any(Requirement(r).name == PROJECT["name"] for r in extras["dev"])


def test_builtin_backends_are_registered_as_entry_points() -> None:
    assert PROJECT["entry-points"][GROUP] == BUILTIN


KERNEL = """
import importlib.abc, json, sys

BLOCKED = set(sys.argv[1].split(","))

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)
        return None

sys.meta_path.insert(0, Refuse())

import jupyter_gpuattach
from IPython.core.interactiveshell import InteractiveShell

shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "jupyter_gpuattach")
assert "gpu" in shell.magics_manager.magics["line"]
import jupyter_gpuattach.session, jupyter_gpuattach.namespace_sync, jupyter_gpuattach.widget
import gpuattach_broker.shared.blobcache

# The embedded broker a kernel starts runs from this install too (CPU backend).
from gpuattach_broker.agent.backends import open_backend
backend = open_backend("auto")
from gpuattach_broker.broker.metrics import BrokerMetrics
metrics = BrokerMetrics()
metrics.leases_ended.labels("released").inc()
try:
    metrics.serve("127.0.0.1:0")
except ValueError as exc:
    refused = str(exc)
print(json.dumps({
    "backend": backend.name,
    "metrics": metrics.enabled,
    "refused": refused,
    "loaded": sorted(m for m in BLOCKED if m in sys.modules),
}))
"""


def test_kernel_imports_and_loads_the_extension_without_role_packages() -> None:
    blocked = [*ROLE_PACKAGES.values(), *ALSO_BLOCKED]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUATTACH_")}
    done = subprocess.run(
        [sys.executable, "-c", KERNEL, ",".join(blocked)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["backend"] == "cpu"  # no pynvml: a GPU-less host is a CPU host
    assert report["metrics"] is False
    assert "pip install 'jupyter-gpuattach[broker]'" in report["refused"]

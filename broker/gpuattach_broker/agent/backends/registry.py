"""Device backends as plug-ins: found by name in the ``gpuattach.backends`` entry points.

A package adds a kind of device (ROCm, another accelerator, a simulator)
without touching this project: it subclasses `DeviceBackend` and declares
in its own ``pyproject.toml``::

    [project.entry-points."gpuattach.backends"]
    rocm = "gpuattach_rocm:RocmBackend"

and an agent run with ``--devices rocm[:OPTIONS]`` uses it. The built-in
``cpu`` and ``nvml`` backends are registered the same way by this
project's own ``pyproject.toml``; `BUILTIN` repeats them so that a source
tree on ``sys.path`` whose package metadata is missing or older than the
code (not re-installed since) still finds its own backends. An entry point
of the same name wins over it.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from gpuattach_broker.agent.backends.base import BackendError, DeviceBackend

GROUP = "gpuattach.backends"
BUILTIN = {
    "cpu": "gpuattach_broker.agent.backends.cpu:CpuBackend",
    "nvml": "gpuattach_broker.agent.backends.nvml:NvmlBackend",
}


def installed() -> dict[str, EntryPoint]:
    """Every backend name this environment offers, with where its class lives."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    for name, value in BUILTIN.items():
        found.setdefault(name, EntryPoint(name, value, GROUP))
    return dict(sorted(found.items()))


def backend_class(name: str) -> type[DeviceBackend]:
    """The class registered as `name`; BackendError lists the installed names."""
    available = installed()
    entry = available.get(name)
    if entry is None:
        raise BackendError(
            f"no device backend named {name!r}: installed are {', '.join(available)} "
            f"(entry point group {GROUP!r})"
        )
    try:
        loaded = entry.load()
    except (ImportError, AttributeError) as exc:  # its module, a dependency, or the class
        raise BackendError(
            f"device backend {name!r} ({entry.value}) cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(loaded, type) and issubclass(loaded, DeviceBackend)):
        raise BackendError(
            f"device backend {name!r} ({entry.value}) is not a subclass of "
            "gpuattach_broker.agent.backends.DeviceBackend"
        )
    return loaded

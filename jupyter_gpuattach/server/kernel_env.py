"""Settings for the kernels this server starts, given in each kernel's environment.

The server extension knows which broker the user's kernels should use (and,
with a shared broker, the user's token; with the embedded one, how long it
lingers). A kernel learns it from its environment at start. The values go
into the ``env`` of each kernel start (the kernel manager's own argument,
kept for restarts), not into the server's ``os.environ``: the server process
itself, and anything else it runs, sees none of them.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

StartKernel = Callable[..., Awaitable[str]]


class KernelEnvironment:
    """What every kernel of this server gets in its environment, unless the
    kernel's start (or the server's environment) already sets that name."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = dict(values)

    def apply(self, env: Mapping[str, str] | None) -> dict[str, str]:
        """The environment of one kernel start: `env` as given (the server's own
        environment when none is), plus the values it does not set."""
        merged = dict(os.environ if env is None else env)
        for name, value in self.values.items():
            merged.setdefault(name, value)
        return merged

    def install(self, kernel_manager: Any) -> None:
        """Route every kernel start of `kernel_manager` (the server's
        MappingKernelManager: REST API, sessions, extensions) through `apply`."""
        start: StartKernel = kernel_manager.start_kernel
        if getattr(start, "__gpuattach_env__", None) is not None:
            start = start.__gpuattach_env__  # type: ignore[attr-defined]

        async def start_kernel(*args: Any, **kwargs: Any) -> str:
            kwargs["env"] = self.apply(kwargs.get("env"))
            return await start(*args, **kwargs)

        start_kernel.__gpuattach_env__ = start  # type: ignore[attr-defined]
        kernel_manager.start_kernel = start_kernel

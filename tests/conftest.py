from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Kernel, KernelFactory, Stack, StackFactory


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[StackFactory]:
    stacks: list[Stack] = []

    def make(**kwargs: Any) -> Stack:
        stack = Stack(workdir=tmp_path / f"stack{len(stacks)}", **kwargs)
        stacks.append(stack)
        return stack.start()

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture
def stack(stack_factory: StackFactory) -> Stack:
    return stack_factory()


@pytest.fixture
def kernel_factory(tmp_path: Path) -> Iterator[KernelFactory]:
    kernels: list[Kernel] = []

    def make(stack: Stack, load: bool = True, token: str = "") -> Kernel:
        cwd = tmp_path / f"notebook{len(kernels)}"
        cwd.mkdir(exist_ok=True)
        kernel = Kernel(stack.user_env(token) if token else stack.env(), cwd)
        kernels.append(kernel)
        if load:
            kernel.ok("%load_ext jupyter_gpuattach")
        return kernel

    yield make
    for kernel in kernels:
        kernel.shutdown()


@pytest.fixture
def kernel(stack: Stack, kernel_factory: KernelFactory) -> Kernel:
    return kernel_factory(stack)

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Kernel, KernelFactory, Stack, StackFactory
from tests.pg import PostgresServer, PostgresUnavailable, broker_database


def pytest_configure(config: pytest.Config) -> None:
    # A kernel that loads the extension with no broker configured starts the
    # user's embedded broker in the background (GPUATTACH_PRESTART); in tests
    # that would leave a broker, agent and zygote running for their idle time
    # behind every such kernel. The tests of that start build their own
    # environment (tests/integration/test_embedded_broker.py).
    os.environ.setdefault("GPUATTACH_PRESTART", "0")
    # The state folder of whatever the tests start without one of their own
    # (the agent's process ledger, the user map, logs): one per test process.
    # The default (~/.local/state/gpuattach) is shared by every process on
    # the machine: two agents for one host there cannot both hold its process
    # ledger, so `pytest -n 2` (make test) or a second session would collide.
    os.environ["GPUATTACH_STATE_DIR"] = tempfile.mkdtemp(prefix="gpuattach-test-state-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.pop("GPUATTACH_STATE_DIR", ""), ignore_errors=True)


# Test files that run longest, started first: `make test` runs the files in
# parallel (pytest-xdist, --dist loadfile: a file's tests stay on one worker)
# and hands them out in collection order, so a long file collected last would
# run alone at the end. The longest by --durations (make test on 2 cores): the
# Binder install (~7 min), the Hub deployment (~2 min), the browser tests.
SLOW_FILES_FIRST = (
    "tests/server/test_binder.py",
    "tests/integration/test_jupyterhub_deployment.py",
    "tests/integration/test_cross_user.py",
    "tests/browser/test_glance.py",
    "tests/browser/test_lab.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return SLOW_FILES_FIRST.index(path) if path in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (tests/pg.py)."""
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh database on the session's server, dropped afterwards."""
    url = postgres.database()
    yield url
    postgres.drop(url)


@pytest.fixture(scope="session")
def broker_template(postgres: PostgresServer) -> str:
    """A database migrated to the broker's schema once per session: each
    broker's database is a copy of it, so a broker on PostgreSQL starts
    without running (and importing) the migrations again."""
    from gpuattach_broker.broker.store import open_store

    url = postgres.database("broker_template")
    open_store(url).close()
    return url.rsplit("/", 1)[1]


@pytest.fixture
def broker_db(request: pytest.FixtureRequest) -> Iterator[str]:
    """The broker's --db-url: "" (its SQLite file, the default) unless a test is
    parametrised with `tests.pg.both_stores`."""
    with broker_database(request, getattr(request, "param", "sqlite")) as url:
        yield url


@pytest.fixture
def stack_factory(tmp_path: Path, broker_db: str) -> Iterator[StackFactory]:
    stacks: list[Stack] = []

    def make(**kwargs: Any) -> Stack:
        kwargs.setdefault("db_url", broker_db)
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

"""A real PostgreSQL server that a test session starts and stops itself.

Debian's `postgresql` package (`make postgresql` installs it as root), no
system service: `initdb` in a temporary folder, `pg_ctl start` on a free
loopback port with its Unix socket in that folder, one fresh database per
test, `pg_ctl stop` at the end. PostgreSQL refuses to run as root, so as
root the server runs as the `postgres` user the package creates (or
`nobody`), and the folder is theirs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SUPERUSER = "gpu"

# Runs a test that starts a broker once on SQLite and once on PostgreSQL.
both_stores = pytest.mark.parametrize("broker_db", ["sqlite", "postgresql"], indirect=True)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here; the message says how to install them."""


def find_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin with initdb, else initdb on PATH."""

    def version(path: str) -> int:
        match = re.search(r"/postgresql/(\d+)/", path)
        return int(match.group(1)) if match else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl): run `make postgresql` as root, "
        "or apt-get install -y postgresql"
    )


def _run_as() -> list[str]:
    """The words that run a command as a user PostgreSQL accepts."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return ["runuser", "-u", name, "--"]
    raise PostgresUnavailable("running as root, and neither a postgres nor a nobody user exists")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One server in a temporary folder; `database()` gives each test its own."""

    def __init__(self) -> None:
        self.bin = find_bin_dir()
        self.prefix = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="gpuattach-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.started = False
        if self.prefix:
            owner = pwd.getpwnam(self.prefix[2])
            os.chown(self.root, owner.pw_uid, owner.pw_gid)

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr}\n{tail}"
            )

    def start(self) -> PostgresServer:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        # -w: returns once the server accepts connections.
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        self.started = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def database(self, prefix: str = "t", template: str = "") -> str:
        """A new database, empty or (with `template`) a copy of that one; its db_url.

        A copy is a file copy in the server, far cheaper than building the
        schema again: the broker's tests copy one migrated database."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        copy = f' TEMPLATE "{template}"' if template else ""
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"{copy}')
        return self.url(name)

    def count(self, db_url: str, query: str) -> int:
        """The first column of the first row of `query` in that database."""
        import psycopg

        with psycopg.connect(db_url) as connection:
            row = connection.execute(query).fetchone()
        return int(row[0]) if row else 0

    def drop(self, db_url: str) -> None:
        import psycopg

        name = db_url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            if self.started:
                self._run(
                    str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"
                )
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def broker_database(request: pytest.FixtureRequest, store: str) -> Iterator[str]:
    """The broker's --db-url for `store`: "" (its SQLite file, the default)
    or a fresh PostgreSQL database, dropped afterwards."""
    if store == "sqlite":
        yield ""
        return
    postgres: PostgresServer = request.getfixturevalue("postgres")
    url = postgres.database("broker", template=request.getfixturevalue("broker_template"))
    yield url
    # The broker kept its state there (not in a file of its own).
    assert postgres.count(url, "SELECT count(*) FROM events WHERE kind = 'broker-started'") > 0
    postgres.drop(url)

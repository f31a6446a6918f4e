"""Workers isolated per user, as an operating system isolates users.

A shared agent runs the workers of many users on one host. With
``--isolation uid`` (the default of a shared agent, ``auto``, when the agent
can switch users: root or CAP_SETUID) each lease's worker runs under its own
user's identity: another user's worker, blob cache, the agent and its key are
out of its reach the way another account's processes and files are. The
identity comes from the user map:

- ``system``: the OS account of the same name (as JupyterHub's
  LocalProcessSpawner); system accounts (uid < 1000, root) are refused.
- ``range:START-END``: a stable uid per broker user, allocated from the
  range and kept in ``<state dir>/agent/user-uids.json`` (root's, 0600);
  gid = uid. For users with no OS account.
- ``system-or-range`` (the default, range 200000-299999): the OS account
  when one exists, else a uid from the range.

``--isolation none`` runs every worker as the agent's own user: right for a
one-user host (the embedded broker's agent) and nowhere else.

The workers' environment is built from an allow-list (`worker_env`): nothing
of the agent's own (its broker key, TLS paths, tokens) reaches a worker.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import stat
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gpuattach_broker.paths import state_dir

MODES = ("auto", "uid", "none")
DEFAULT_USER_MAP = "system-or-range"
DEFAULT_RANGE = (200000, 299999)
MIN_USER_UID = 1000
NOBODY = 65534  # shared by daemons and NFS squashing: never one user's identity
MAP_FILE = "user-uids.json"

# What a worker's environment may take from the agent's: locale, Python, the
# GPU stack and thread pools. Everything else (the broker key, TLS paths,
# tokens, whatever an admin's shell exported) stays with the agent.
ENV_NAMES = frozenset(
    {"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX"}
)
ENV_PREFIXES = ("LC_", "PYTHON", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_")
# Never in a worker's environment, whatever the mode.
AGENT_SECRETS = ("GPUATTACH_BROKER_KEY", "GPUATTACH_TOKEN")


class IsolationError(RuntimeError):
    """Isolation cannot be had as configured; the message says what to do."""


def worker_env(
    source: Mapping[str, str], *, same_user: bool, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A worker's environment from `source` (the agent's), plus `extra`.

    Isolated (`same_user` false): the allow-list only. In one-user mode the
    worker runs as the agent's own user, who can read the agent's environment
    in /proc anyway: it keeps that environment, less the agent's secrets."""
    if same_user:
        env = {k: v for k, v in source.items() if k not in AGENT_SECRETS}
    else:
        env = {k: v for k, v in source.items() if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}
    env.update(extra or {})
    for name in AGENT_SECRETS:
        env.pop(name, None)
    return env


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    name: str  # the account name (the broker user's in range mode)
    source: str  # "system" or "range"


def parse_range(spec: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)-(\d+)", spec.strip())
    if not match:
        raise ValueError(f"--user-map range:{spec}: give range:START-END, e.g. range:200000-299999")
    start, end = int(match.group(1)), int(match.group(2))
    if start < MIN_USER_UID or end < start or end >= 2**31:
        raise ValueError(
            f"--user-map range:{spec}: START must be {MIN_USER_UID} or more and END at least START"
        )
    return start, end


class UserMap:
    """Broker user -> OS identity (see the module docstring)."""

    def __init__(self, spec: str = DEFAULT_USER_MAP, folder: Path | None = None) -> None:
        spec = spec.strip() or DEFAULT_USER_MAP
        self.spec = spec
        self.system = spec in ("system", "system-or-range") or spec.startswith("system-or-range:")
        self.range: tuple[int, int] | None = None
        if spec == "system-or-range":
            self.range = DEFAULT_RANGE
        elif spec.startswith("system-or-range:"):
            self.range = parse_range(spec.partition(":")[2])
        elif spec == "range":
            self.range = DEFAULT_RANGE
        elif spec.startswith("range:"):
            self.range = parse_range(spec.partition(":")[2])
        elif spec != "system":
            raise ValueError(
                f"--user-map {spec!r}: use system, range:START-END or system-or-range[:START-END]"
            )
        self.folder = folder if folder is not None else state_dir() / "agent"

    @property
    def path(self) -> Path:
        return self.folder / MAP_FILE

    def describe(self) -> str:
        if self.range is None:
            return "system (the OS account of the same name)"
        span = f"{self.range[0]}-{self.range[1]}"
        if self.system:
            return f"system-or-range (the OS account, else a uid from {span} kept in {self.path})"
        return f"range {span} (kept in {self.path})"

    def resolve(self, user: str) -> Identity:
        """The identity of `user`'s workers; IsolationError says why there is none."""
        if not user:
            raise IsolationError("the lease names no user: an isolated worker needs one")
        if self.system:
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                entry = None
            if entry is not None:
                if entry.pw_uid < MIN_USER_UID or entry.pw_uid == NOBODY or entry.pw_gid == 0:
                    raise IsolationError(
                        f"broker user {user!r} is the system account {entry.pw_name} "
                        f"(uid {entry.pw_uid}): workers never run as a system account "
                        f"(uid < {MIN_USER_UID}), nobody or root. Give this person another user "
                        "name, or run the agent with --user-map range:START-END"
                    )
                return Identity(entry.pw_uid, entry.pw_gid, entry.pw_name, "system")
            if self.range is None:
                raise IsolationError(
                    f"broker user {user!r} has no account on this host (--user-map system): "
                    "create one (useradd), or run the agent with --user-map system-or-range"
                )
        uid = self.allocate(user)
        return Identity(uid, uid, user, "range")

    def allocate(self, user: str) -> int:
        """The stable uid of `user` in the range, allocated on first use."""
        assert self.range is not None
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # agents on one host share the map
            os.fchmod(fd, 0o600)
            with os.fdopen(os.dup(fd), "r") as handle:
                text = handle.read()
            try:
                table = {str(k): int(v) for k, v in json.loads(text or "{}").items()}
            except (ValueError, AttributeError) as exc:
                raise IsolationError(
                    f"{self.path} is not a user map ({exc}); fix or remove it"
                ) from exc
            if user in table:
                return table[user]
            taken = set(table.values())
            start, end = self.range
            for uid in range(start, end + 1):
                if uid in taken or _uid_exists(uid):
                    continue
                table[user] = uid
                _write_atomic(self.path, json.dumps(table, indent=1, sort_keys=True))
                return uid
            raise IsolationError(
                f"no free uid left in {start}-{end} ({len(table)} users mapped in {self.path}): "
                "widen --user-map range:START-END"
            )
        finally:
            os.close(fd)


def _uid_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------ host checks ---

CAP_SETUID = 7
CAP_SETGID = 6


def can_switch_users() -> bool:
    """Whether this process may become another user (root, or CAP_SETUID+CAP_SETGID)."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps >> CAP_SETUID & 1 and caps >> CAP_SETGID & 1)
    except (OSError, ValueError):
        pass
    return False


def mount_namespaces() -> str:
    """ "" when a worker can have a private mount namespace here, else why not
    (tried in a throwaway child process)."""
    code = (
        "import sys\n"
        "from gpuattach_broker.worker import privileges as p\n"
        "s = p.enter_private_mounts()\n"
        "print(s.describe() if s.private else s.problem)\n"
        "sys.exit(0 if s.private else 1)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return ""
    return (done.stdout.strip() or done.stderr.strip().splitlines()[-1:] or ["failed"])[0]


def secret_file_problem(path: str, what: str) -> str:
    """ "" when only its owner can read `path`, else what is wrong and the fix."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{what} {path}: {exc.strerror}"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return (
            f"{what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):03o}): "
            f"run chmod 600 {path}"
        )
    if st.st_uid != os.geteuid():
        return f"{what} {path} belongs to uid {st.st_uid}, not to the agent (uid {os.geteuid()})"
    return ""


def resolve_mode(mode: str) -> str:
    """ "uid" or "none" for `--isolation MODE`; IsolationError when auto cannot isolate."""
    if mode not in MODES:
        raise ValueError(f"--isolation {mode!r}: use auto, uid or none")
    if mode == "none":
        return "none"
    if can_switch_users():
        return "uid"
    who = pwd.getpwuid(os.geteuid()).pw_name if _uid_exists(os.geteuid()) else os.geteuid()
    if mode == "uid":
        raise IsolationError(
            f"--isolation uid: the agent runs as {who} and cannot switch users; run it as "
            "root (or with CAP_SETUID and CAP_SETGID)"
        )
    raise IsolationError(
        f"a shared agent isolates each user's workers under that user's own identity, but it "
        f"runs as {who} and cannot switch users. Run the agent as root (or with CAP_SETUID and "
        "CAP_SETGID), or pass --isolation none if this host serves one user only"
    )


@dataclass
class Isolation:
    """How the agent's workers are isolated: `mode` "uid" or "none"."""

    mode: str = "none"
    user_map: UserMap | None = None

    @property
    def enabled(self) -> bool:
        return self.mode == "uid"

    def identity(self, user: str) -> Identity | None:
        """None in one-user mode; IsolationError when `user` cannot be mapped."""
        if not self.enabled:
            return None
        assert self.user_map is not None
        return self.user_map.resolve(user)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A worker's (and the zygote's) environment at start."""
        return worker_env(os.environ, same_user=not self.enabled, extra=extra)

    def describe(self) -> str:
        if not self.enabled:
            return "none (every worker runs as the agent's user: a one-user host)"
        assert self.user_map is not None
        return f"uid, user map {self.user_map.describe()}"

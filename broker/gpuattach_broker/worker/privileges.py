"""What an isolated worker does to itself: its own mounts, then its user's identity.

The agent runs as root when it isolates workers (``gpuattach-agent
--isolation uid``); a warm worker is started (forked from the zygote) as
root before anyone knows whose lease it will serve. Two steps make it
that user's process:

1. At start, single-threaded (`enter_private_mounts`, called first thing in
   the worker's ``main``): a mount namespace of its own, with a fresh tmpfs on
   ``/tmp`` and a procfs that shows only the processes of the same user
   (``hidepid=invisible``). Without the privilege to do so (no CAP_SYS_ADMIN,
   a container that forbids ``unshare``) the worker carries on with UID
   isolation alone and says so in its ready line.
2. At ``Assign``, before it accepts the lease's token (`drop_to`): the device
   nodes of GPUs outside the slice are covered with ``/dev/null`` (only in a
   private mount namespace), a private home folder and the user's blob cache
   folder are made and given to the user, then ``setgroups([])``,
   ``setresgid``, ``setresuid`` (glibc applies them to every thread), the
   process is made dumpable again (so its ``/proc`` entries belong to the user,
   and other users still cannot read or trace it) and ``no_new_privs`` is set
   (no setuid program regains root).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import os
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38

NVIDIA_NODE = re.compile(r"/dev/nvidia(\d+)$")


@dataclass
class MountState:
    """What `enter_private_mounts` achieved in this process."""

    private: bool = False  # in a mount namespace of its own
    done: list[str] = field(default_factory=list)  # e.g. "tmpfs /tmp"
    problem: str = ""  # why not (or what part failed)

    def describe(self) -> str:
        if self.private:
            what = ", ".join(self.done) or "no private mount"
            return what + (f" ({self.problem})" if self.problem else "")
        return f"no private mount namespace: {self.problem}"


STATE = MountState()


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def parent_death_signal() -> int:
    """The signal this process gets when its parent dies (0: none)."""
    sig = ctypes.c_int(0)
    _check(_libc().prctl(PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0), "prctl(PR_GET_PDEATHSIG)")
    return int(sig.value)


def die_with_parent(sig: int, parent_pid: int) -> bool:
    """Have the kernel send `sig` to this process when its parent dies
    (``PR_SET_PDEATHSIG``), then close the race with a parent that died
    before: if `parent_pid` is no longer the parent, send `sig` now. Returns
    whether the parent is still there. A forked child does not inherit the
    setting, and a change of credentials clears it (`drop_to` sets it again)."""
    _check(_libc().prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
        return False
    return True


def _mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    libc = _libc()
    _check(
        libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def enter_private_mounts() -> MountState:
    """A mount namespace of this process's own (see the module docstring).

    Needs a single thread (unshare of a mount namespace fails otherwise) and
    CAP_SYS_ADMIN. Never raises: what could not be done is in the state."""
    state = STATE
    if state.private:
        return state
    if _threads() > 1:
        state.problem = "the worker already runs threads (start it single-threaded)"
        return state
    libc = _libc()
    try:
        _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        # Nothing mounted here may reach the host (nor the host's mounts us).
        _mount("none", "/", "", MS_REC | MS_PRIVATE)
    except OSError as exc:
        state.problem = str(exc.strerror or exc)
        return state
    state.private = True
    problems = []
    try:
        kept = private_tmp(interpreter_paths())
        state.done.append("tmpfs /tmp" + (f" (keeping {', '.join(kept)})" if kept else ""))
    except OSError as exc:
        problems.append(f"/tmp: {exc.strerror}")
    try:
        # A procfs instance of its own (Linux 5.8+) that lists only the processes
        # this process's user may ptrace: not the agent's, nor other users' workers.
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
        state.done.append("/proc hidepid=invisible")
    except OSError as exc:
        problems.append(f"/proc: {exc.strerror}")
    try:
        exposed = expose(interpreter_paths())
        if exposed:
            state.done.append("Python under " + ", ".join(exposed))
    except OSError as exc:
        problems.append(f"Python files: {exc.strerror or exc}")
    state.problem = "; ".join(problems)
    return state


def private_tmp(keep: list[str]) -> list[str]:
    """Cover /tmp with a fresh tmpfs, except the folders of `keep` under it (a
    virtual environment in /tmp: its modules not imported yet must stay
    readable). The new tmpfs is filled beside the old /tmp, then moved over it.
    Returns the folders kept."""
    under = [p for p in keep if p.startswith("/tmp/")]
    outermost = [p for p in under if not any(p.startswith(q + os.sep) for q in under if q != p)]
    if not outermost:
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        return []
    old_tmp = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
    try:
        stage = tempfile.mkdtemp(prefix=".gpuattach-tmp-", dir="/tmp")
        _mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        for path in sorted(set(outermost)):
            target = os.path.join(stage, os.path.relpath(path, "/tmp"))
            os.makedirs(target, mode=0o755, exist_ok=True)
            _mount(path, target, "", MS_BIND | MS_REC)
        _mount(stage, "/tmp", "", MS_MOVE)
        # The empty staging folder, now under the new /tmp, leaves the host's /tmp.
        with contextlib.suppress(OSError):
            os.rmdir(os.path.basename(stage), dir_fd=old_tmp)
    finally:
        os.close(old_tmp)
    return sorted(set(outermost))


def interpreter_paths() -> list[str]:
    """The folders this interpreter reads modules from."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    paths += [p for p in sys.path if p and os.path.isdir(p)]
    return sorted({os.path.realpath(p) for p in paths})


def closed_ancestor(path: str) -> str:
    """The outermost folder above `path` that other users may not pass through
    (no o+x: a Python installed in /root, say); "" when there is none."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        folder = os.path.join(*parts[:i])
        try:
            if not os.stat(folder).st_mode & 0o001:
                return folder
        except OSError:
            return ""
    return ""


def unreachable(paths: list[str]) -> dict[str, list[str]]:
    """Closed folder -> the outermost of `paths` below it."""
    blocked: dict[str, list[str]] = {}
    for path in sorted(paths):
        closed = closed_ancestor(path)
        if not closed:
            continue
        kept = blocked.setdefault(closed, [])
        if not any(path == k or path.startswith(k + os.sep) for k in kept):
            kept.append(path)
    return blocked


def expose(paths: list[str]) -> list[str]:
    """In this (private) mount namespace, make `paths` reachable for a worker
    that will drop to another user although a folder above them is closed
    (the interpreter installed in /root): that folder is covered by an empty
    tmpfs and only `paths` are mounted back into it. The rest of it (root's
    files) is then hidden from the worker. Returns the folders covered."""
    if not STATE.private:
        return []
    covered = []
    for closed, subs in unreachable(paths).items():
        stage = tempfile.mkdtemp(prefix=".gpuattach-stage-", dir="/tmp")
        staged = []
        for i, sub in enumerate(subs):
            point = os.path.join(stage, str(i))
            os.mkdir(point)
            _mount(sub, point, "", MS_BIND | MS_REC)
            staged.append((point, sub))
        mode = stat.S_IMODE(os.stat(closed).st_mode) | 0o111
        _mount("tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode:o}")
        for point, sub in staged:
            os.makedirs(sub, mode=0o755, exist_ok=True)
            _mount(point, sub, "", MS_MOVE)
        shutil.rmtree(stage, ignore_errors=True)
        covered.append(closed)
    return covered


def gpu_minors(proc_root: str = "/proc/driver/nvidia/gpus") -> dict[str, int]:
    """GPU UUID -> minor number of its /dev/nvidia<N> node (from the driver's
    /proc files; empty without an NVIDIA driver)."""
    minors: dict[str, int] = {}
    for info in glob.glob(os.path.join(proc_root, "*", "information")):
        uuid, minor = "", -1
        with contextlib.suppress(OSError):
            for line in Path(info).read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "GPU UUID":
                    uuid = value.strip()
                elif key.strip() == "Device Minor":
                    with contextlib.suppress(ValueError):
                        minor = int(value.strip())
        if uuid and minor >= 0:
            minors[uuid] = minor
    return minors


def hide_other_gpus(keep_uuids: list[str]) -> list[str]:
    """Cover /dev/nvidia<N> of every GPU not in `keep_uuids` with /dev/null
    (nvidiactl and nvidia-uvm stay). Only in a private mount namespace: on the
    host's mounts this would take the GPUs from everyone. Returns the nodes hidden."""
    if not STATE.private:
        return []
    minors = gpu_minors()
    if any(u not in minors for u in keep_uuids):
        # A MIG instance (or an index): which node it needs is not in the driver's
        # /proc files, and hiding the wrong one would break the slice. Keep all.
        return []
    keep = {minors[u] for u in keep_uuids}
    hidden = []
    for node in sorted(glob.glob("/dev/nvidia[0-9]*")):
        match = NVIDIA_NODE.match(node)
        if match is None or int(match.group(1)) in keep:
            continue
        _mount("/dev/null", node, "", MS_BIND)
        hidden.append(node)
    return hidden


def give(path: Path, uid: int, gid: int, mode: int = 0o700) -> None:
    """Make `path` (a folder, made if missing) belong to uid:gid alone, with
    what it already holds. Refuses a symbolic link (never follow one as root)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode)
    if path.is_symlink() or not path.is_dir():
        raise OSError(errno.ENOTDIR, f"{path} is not a folder")
    st = path.lstat()
    if st.st_uid != uid or st.st_gid != gid:
        for entry in os.scandir(path):
            os.chown(entry.path, uid, gid, follow_symlinks=False)
        os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mode)


def blob_root(folder: Path) -> None:
    """The blob caches' common folder: root's, and others may pass through it
    to their own folder but not list whose folders it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    st = folder.lstat()
    if st.st_uid == 0 and not folder.is_symlink():
        os.chmod(folder, 0o711)


@dataclass(frozen=True)
class Dropped:
    home: str
    hidden_devices: list[str]


def drop_to(
    uid: int, gid: int, name: str, blob_cache: str = "", keep_gpus: list[str] | None = None
) -> Dropped:
    """Become uid:gid for good (see the module docstring). Call on the thread
    that runs the user's cells: no_new_privs is per thread and inherited."""
    if uid == 0 or gid == 0:
        raise PermissionError("an isolated worker never runs as root (uid or gid 0)")
    hidden = hide_other_gpus(keep_gpus or []) if keep_gpus is not None else []
    # The credential change below clears the parent-death signal: set it again
    # after, and if the parent died in between, the signal comes now.
    death_signal, parent = parent_death_signal(), os.getppid()
    home = tempfile.mkdtemp(prefix="gpuattach-home-", dir="/tmp")  # 0700, unguessable
    give(Path(home), uid, gid)
    if blob_cache:
        folder = Path(blob_cache)
        blob_root(folder.parent)
        give(folder, uid, gid)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError("the worker could not drop its privileges")
    libc = _libc()
    _check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if death_signal:
        die_with_parent(death_signal, parent)
    os.chdir(home)
    os.environ.update(HOME=home, TMPDIR=home, USER=name, LOGNAME=name)
    tempfile.tempdir = None  # the next tempfile call reads TMPDIR again
    return Dropped(home=home, hidden_devices=hidden)


def remove_home(home: str) -> None:
    """At the worker's exit: its private home (its own files) goes with it."""
    if home:
        shutil.rmtree(home, ignore_errors=True)

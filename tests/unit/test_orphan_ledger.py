"""No worker outlives its agent: the parent-death signal (set, and set again
after a worker drops to its user's uid) and the agent's process ledger, which
lets the next agent of a host kill what an earlier one left running. Real
processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpuattach_broker.agent.pool import LedgerBusy, ProcessLedger

pytestmark = pytest.mark.timeout(60)


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until `pid` has exited; AssertionError after `timeout`."""
    started = time.monotonic()
    while alive(pid):
        assert time.monotonic() - started < timeout, f"process {pid} still runs"
        time.sleep(0.005)
    return time.monotonic() - started


# A parent that starts a child which arms the parent-death signal, prints its
# pid and sleeps; the parent then sleeps too, until the test kills it.
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE)
print(child.stdout.readline().decode().strip(), flush=True)
import time
time.sleep(600)
"""
CHILD = """
import os, signal, time
from gpuattach_broker.worker.privileges import die_with_parent, parent_death_signal
assert die_with_parent(signal.SIGTERM, os.getppid())
assert parent_death_signal() == signal.SIGTERM
print(os.getpid(), flush=True)
time.sleep(600)
"""


def test_a_child_dies_with_its_parent_by_the_parent_death_signal() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT.format(child=textwrap.dedent(CHILD))],
        stdout=subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()  # nothing runs in the parent to pass anything on
        parent.wait()
        took = wait_gone(child, timeout=2.0)
        print(f"\nchild gone {1000 * took:.1f} ms after its parent's SIGKILL")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]


def test_die_with_parent_fires_at_once_when_the_parent_is_already_gone() -> None:
    code = (
        "import os, signal\n"
        "from gpuattach_broker.worker.privileges import die_with_parent\n"
        "die_with_parent(signal.SIGTERM, os.getppid() + 1000000)\n"
        "print('survived', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert result.returncode == -signal.SIGTERM, result
    assert b"survived" not in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_dropping_to_the_users_uid_keeps_the_parent_death_signal() -> None:
    """setresuid clears the parent-death signal; `drop_to` sets it again."""
    code = textwrap.dedent(
        """
        import os, signal
        from gpuattach_broker.worker import privileges
        assert privileges.die_with_parent(signal.SIGTERM, os.getppid())
        privileges.drop_to(65534, 65534, "nobody")
        print(os.getuid(), privileges.parent_death_signal(), flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["65534", str(int(signal.SIGTERM))]

    # The kernel does clear it: without the re-arm, a dropped worker would outlive its parent.
    bare = (
        "import os, signal\n"
        "from gpuattach_broker.worker import privileges\n"
        "privileges.die_with_parent(signal.SIGTERM, os.getppid())\n"
        "os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
        "print(privileges.parent_death_signal())\n"
    )
    result = subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True)
    assert result.stdout.split() == ["0"], result


def start_group() -> subprocess.Popen[bytes]:
    """A process leading a group of its own with a child in it (as the zygote
    and its workers)."""
    return subprocess.Popen(
        ["sh", "-c", "sleep 600 & echo $!; wait"],
        stdout=subprocess.PIPE,
        process_group=0,
    )


def test_the_next_agent_kills_what_the_ledger_lists_and_waits_for_its_exit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent" / "processes-host"
    first = ProcessLedger(path)
    first.acquire()
    leader = start_group()
    try:
        assert leader.stdout is not None
        member = int(leader.stdout.readline())  # in the leader's group, not in the ledger
        first.add(leader.pid)
        first.release()  # the agent died (its lock went with it)

        second = ProcessLedger(path)
        second.acquire()
        assert second.leftovers() == first.entries
        started = time.monotonic()
        killed = second.kill_leftovers(timeout=10)
        took = time.monotonic() - started
        assert killed == [leader.pid]
        assert not alive(member), "a process of the killed group still runs"
        assert leader.wait(1) == -signal.SIGKILL
        assert second.leftovers() == {}
        assert path.read_text() == ""
        print(f"\nleftovers killed and gone in {1000 * took:.1f} ms")
        second.release()
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()
        leader.stdout.close()  # type: ignore[union-attr]


def test_a_recycled_pid_is_never_killed(tmp_path: Path) -> None:
    path = tmp_path / "processes-host"
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        with open(f"/proc/{bystander.pid}/stat") as handle:
            start = int(handle.read().rsplit(")", 1)[1].split()[19])
        # Same pid, another start time: the ledger's process exited and the
        # pid now belongs to someone else.
        path.write_text(f"{bystander.pid} {start + 1}\n")
        ledger = ProcessLedger(path)
        assert ledger.leftovers() == {}
        assert ledger.kill_leftovers(timeout=1) == []
        assert bystander.poll() is None
        assert alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()


def test_a_second_live_agent_may_not_take_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "processes-host"
    first = ProcessLedger(path)
    first.acquire()
    with pytest.raises(LedgerBusy, match=f"pid {os.getpid()}"):
        ProcessLedger(path).acquire()
    first.release()
    again = ProcessLedger(path)
    again.acquire()
    again.release()

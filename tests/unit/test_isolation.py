"""Worker isolation: the user map, the workers' environment, the agent's checks."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gpuattach_broker.agent.check import isolation_report
from gpuattach_broker.agent.cli import AgentApp
from gpuattach_broker.agent.isolation import (
    IsolationError,
    UserMap,
    resolve_mode,
    secret_file_problem,
    worker_env,
)
from gpuattach_broker.worker.privileges import closed_ancestor, unreachable

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="runs as root (sessions and CI do)")


def test_range_map_gives_each_user_a_stable_uid_kept_in_a_private_file(tmp_path: Path) -> None:
    users = UserMap("range:300000-300009", tmp_path / "agent")
    alice, bob = users.resolve("alice"), users.resolve("bob")
    assert (alice.uid, alice.gid, alice.source) == (300000, 300000, "range")
    assert bob.uid == 300001
    assert alice.name == "alice"
    assert users.resolve("alice") == alice  # stable within one agent ...
    again = UserMap("range:300000-300009", tmp_path / "agent")
    assert again.resolve("bob") == bob  # ... and across restarts
    assert again.resolve("carol").uid == 300002
    st = os.stat(users.path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert json.loads(users.path.read_text()) == {"alice": 300000, "bob": 300001, "carol": 300002}


def test_range_map_skips_uids_of_os_accounts_and_says_when_full(tmp_path: Path) -> None:
    taken = pwd.getpwnam("nobody").pw_uid  # 65534 on Debian
    users = UserMap(f"range:{taken}-{taken + 1}", tmp_path)
    assert users.resolve("u1").uid == taken + 1
    with pytest.raises(IsolationError, match=r"no free uid left .*widen --user-map range"):
        users.resolve("u2")


def test_a_corrupt_map_is_named_not_overwritten(tmp_path: Path) -> None:
    users = UserMap("range:300000-300009", tmp_path)
    users.path.write_text("not json")
    with pytest.raises(IsolationError, match="is not a user map"):
        users.resolve("alice")
    assert users.path.read_text() == "not json"


@pytest.mark.parametrize("name", ["root", "daemon", "nobody"])
def test_system_map_refuses_system_accounts(tmp_path: Path, name: str) -> None:
    for spec in ("system", "system-or-range"):
        with pytest.raises(IsolationError, match=rf"system account {name} .*never run as"):
            UserMap(spec, tmp_path).resolve(name)
    assert not (tmp_path / "user-uids.json").exists()


def test_system_map_needs_an_account_and_system_or_range_falls_back(tmp_path: Path) -> None:
    with pytest.raises(IsolationError, match=r"no account on this host .*system-or-range"):
        UserMap("system", tmp_path).resolve("no-such-person-xyz")
    either = UserMap("system-or-range:250000-250009", tmp_path)
    assert either.resolve("no-such-person-xyz").uid == 250000
    assert UserMap("system-or-range", tmp_path).range == (200000, 299999)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("ldap", "use system, range"), ("range:10-20", "1000 or more"), ("range:5-x", "START-END")],
)
def test_bad_user_maps_are_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UserMap(spec)


def test_worker_env_keeps_the_allow_list_and_no_secret() -> None:
    agent = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": "/opt/lib",
        "CUDA_MPS_PIPE_DIRECTORY": "/tmp/mps",
        "OMP_NUM_THREADS": "4",
        "HOME": "/root",
        "GPUATTACH_BROKER_KEY": "secret",
        "GPUATTACH_TOKEN": "tok",
        "AWS_SECRET_ACCESS_KEY": "aws",
        "JUPYTERHUB_API_TOKEN": "hub",
        "SSH_AUTH_SOCK": "/tmp/ssh",
    }
    isolated = worker_env(agent, same_user=False, extra={"CUDA_VISIBLE_DEVICES": "GPU-1"})
    assert isolated == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": "/opt/lib",
        "CUDA_MPS_PIPE_DIRECTORY": "/tmp/mps",
        "OMP_NUM_THREADS": "4",
        "CUDA_VISIBLE_DEVICES": "GPU-1",
    }
    # One user: the worker is the agent's user (who reads the agent's /proc anyway);
    # it keeps the environment, less the agent's own credentials.
    one_user = worker_env(agent, same_user=True, extra={"GPUATTACH_BROKER_KEY": "never"})
    assert one_user["HOME"] == "/root"
    assert one_user["SSH_AUTH_SOCK"] == "/tmp/ssh"
    assert not {"GPUATTACH_BROKER_KEY", "GPUATTACH_TOKEN"} & set(one_user)


def test_secret_files_must_be_the_agents_alone(tmp_path: Path) -> None:
    key = tmp_path / "broker.key"
    key.write_text("k\n")
    key.chmod(0o644)
    assert "run chmod 600" in secret_file_problem(str(key), "--key-file")
    key.chmod(0o600)
    assert secret_file_problem(str(key), "--key-file") == ""
    assert "No such file" in secret_file_problem(str(tmp_path / "none"), "--key-file")


@root_only
def test_an_isolating_agent_refuses_a_readable_key(tmp_path: Path) -> None:
    key = tmp_path / "broker.key"
    key.write_text("k\n")
    key.chmod(0o640)
    argv = ["--key-file", str(key), "--user-map", "range:300000-300009"]
    for mode in (["--isolation", "uid"], []):  # auto isolates as root, so it refuses too
        with pytest.raises(ValueError, match=r"mode 640\): run chmod 600 .*must not read it"):
            AgentApp.configured([*mode, *argv]).isolation_options()
    key.chmod(0o600)
    assert AgentApp.configured(argv).isolation_options().enabled
    key.chmod(0o640)
    assert not AgentApp.configured(["--isolation", "none", *argv]).isolation_options().enabled


@root_only
def test_modes_and_the_check_report(tmp_path: Path) -> None:
    assert resolve_mode("auto") == resolve_mode("uid") == "uid"
    assert resolve_mode("none") == "none"
    with pytest.raises(ValueError, match="use auto, uid or none"):
        resolve_mode("bwrap")
    key = tmp_path / "broker.key"
    key.write_text("k\n")
    key.chmod(0o644)
    code, text = isolation_report("auto", UserMap("system-or-range"), [(str(key), "--key-file")])
    assert code == 1
    assert "switch users       yes" in text
    assert "mount namespaces" in text
    assert "user map           system-or-range" in text
    assert f"PROBLEM: --key-file {key} is readable by others" in text
    key.chmod(0o600)
    code, text = isolation_report("auto", UserMap("system"), [(str(key), "--key-file")])
    assert code == 0, text
    assert "readable by the agent alone" in text, text


def test_closed_folders_above_the_interpreter_are_found() -> None:
    # Under /dev/shm (1777): pytest's own tmp folder sits in root's closed one.
    base = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        base.chmod(0o755)
        home = base / "home"
        lib = home / "py" / "lib"
        lib.mkdir(parents=True)
        home.chmod(0o700)
        assert closed_ancestor(str(lib)) == str(home)
        nested = [str(lib), str(lib / "site"), str(home / "py")]
        assert unreachable(nested) == {str(home): [str(home / "py")]}
        home.chmod(0o711)  # others may pass through: nothing to expose
        assert closed_ancestor(str(lib)) == ""
        assert unreachable(nested) == {}
    finally:
        shutil.rmtree(base)


@root_only
def test_a_private_tmp_keeps_the_interpreter_folders_under_tmp(tmp_path: Path) -> None:
    """A virtual environment in /tmp stays readable behind the worker's fresh
    /tmp (its modules not imported yet still load); the rest of /tmp is gone."""
    assert str(tmp_path).startswith("/tmp/")
    lib = tmp_path / "venv" / "lib"
    lib.mkdir(parents=True)
    (lib / "late_module.py").write_text("VALUE = 42\n")
    other = tmp_path / "someone-elses-file"
    other.write_text("private")
    code = (
        "import json, os, sys\n"
        # The staging folders this process makes in the host's /tmp (other
        # tests' workers may be staging theirs there at the same time).
        "staged = []\n"
        "sys.addaudithook(lambda event, args: event == 'os.mkdir'\n"
        "    and os.path.dirname(args[0]) == '/tmp'\n"
        "    and os.path.basename(args[0]).startswith('.gpuattach-tmp-')\n"
        "    and staged.append(args[0]))\n"
        f"sys.path.insert(0, {str(lib)!r})\n"
        "from gpuattach_broker.worker.privileges import enter_private_mounts, interpreter_paths\n"
        "kept = {p.split('/')[2] for p in interpreter_paths() if p.startswith('/tmp/')}\n"
        "state = enter_private_mounts()\n"
        "import late_module\n"
        f"print(state.problem or 'ok', late_module.VALUE, os.path.exists({str(other)!r}))\n"
        "print(sorted(os.listdir('/tmp')) == sorted(kept))\n"
        "print(json.dumps(staged))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    first, only_kept, staged = done.stdout.splitlines()
    assert first == "ok 42 False"
    # Only the paths down to the kept folders exist in the new /tmp.
    assert only_kept == "True"
    (stage,) = json.loads(staged)
    assert not Path(stage).exists(), "the staging folder was left behind"

"""The scratch mirror's pieces without processes: folder walks, file streams,
changes and how they land in the notebook's folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpuattach_broker.client.worker_client import folder_marker, forwarded_env, kernel_hello
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.shared.blobcache import BlobCache
from gpuattach_broker.worker.scratch import (
    FileStreamError,
    Scratch,
    file_chunks,
    hash_file,
    receive_files,
    safe_relpath,
    walk,
)
from gpuattach_broker.worker.service import _marker_matches
from jupyter_gpuattach.file_mirror import Budget, FileMirror
from jupyter_gpuattach.namespace_sync import describe_modules, missing_modules, package_of


def entry(root: Path, path: str) -> pb.FileEntry:
    full = root / path
    return pb.FileEntry(path=path, size=full.stat().st_size, digest=hash_file(full))


def test_walk_skips_hidden_caches_and_venvs(tmp_path: Path) -> None:
    for name in ("data.csv", "pkg/mod.py", ".env", ".git/config", "__pycache__/u.pyc"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "venv2").mkdir()
    (tmp_path / "venv2" / "pyvenv.cfg").write_text("home = /usr")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a.ipynb").write_text("{}")
    assert sorted(path for path, _ in walk(tmp_path)) == ["data.csv", "pkg/mod.py"]


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b"])
def test_paths_that_leave_the_folder_are_refused(tmp_path: Path, path: str) -> None:
    assert not safe_relpath(path)
    chunks = [pb.FileChunk(file=pb.FileEntry(path=path, size=0, digest="0"))]
    with pytest.raises(FileStreamError):
        list(receive_files(chunks, tmp_path))


def test_content_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    bad = entry(tmp_path, "a.txt")
    bad.digest = hash_file(tmp_path / "a.txt").replace("a", "b", 1) + "0"
    with pytest.raises(FileStreamError, match="does not match its digest"):
        list(receive_files(file_chunks(tmp_path, [bad]), tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left


def test_seed_from_the_host_cache_then_changes_come_back(tmp_path: Path) -> None:
    notebook = tmp_path / "nb"
    notebook.mkdir()
    (notebook / "data.csv").write_text("a,b\n1,2\n")
    (notebook / "old.txt").write_text("old")
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    entries = [entry(notebook, "data.csv"), entry(notebook, "old.txt")]

    first = Scratch.create("nb", cache)
    assert first.folder.name == "nb"
    assert sorted(first.seed(entries)) == sorted(e.digest for e in entries)
    assert first.receive(file_chunks(notebook, entries)) == (2, 11)
    first.remove()
    assert not first.folder.exists()

    scratch = Scratch.create("nb", cache)  # the next lease on this host
    assert scratch.seed(entries) == []  # every content is in the cache: nothing to send
    assert (scratch.folder / "data.csv").read_text() == "a,b\n1,2\n"

    mirror = FileMirror(root=notebook)
    for e in entries:
        st = (notebook / e.path).stat()
        mirror.baseline[e.path] = (st.st_size, st.st_mtime_ns, e.digest)
    (scratch.folder / "out").mkdir()
    (scratch.folder / "out" / "model.pth").write_bytes(b"weights")
    (scratch.folder / "old.txt").unlink()
    (scratch.folder / "big.bin").write_bytes(b"x" * 100)
    (scratch.folder / "__pycache__").mkdir()
    (scratch.folder / "__pycache__" / "utils.pyc").write_bytes(b"pyc")

    left: dict[str, str] = {}
    applied = {
        e.path: mirror._apply(e, tmp, left)
        for e, tmp in receive_files(scratch.changes(1 << 20, 50), notebook)
    }
    assert applied == {"big.bin": "", "old.txt": "", "out/model.pth": ""}
    assert list(left) == ["big.bin"]  # over the 50-byte file limit: named, not sent
    assert (notebook / "out" / "model.pth").read_bytes() == b"weights"
    assert not (notebook / "old.txt").exists()
    assert not (notebook / "big.bin").exists()
    assert list(scratch.changes(1 << 20, 50)) == []  # reported once
    assert cache.has(hash_file(notebook / "out" / "model.pth"))  # a re-attach needs no bytes


def test_a_file_changed_on_both_sides_keeps_the_kernels_copy(tmp_path: Path) -> None:
    notebook = tmp_path / "nb"
    notebook.mkdir()
    (notebook / "notes.txt").write_text("v1")
    scratch = Scratch.create("nb", None)
    e = entry(notebook, "notes.txt")
    scratch.seed([e])
    scratch.receive(file_chunks(notebook, [e]))
    mirror = FileMirror(root=notebook)
    st = (notebook / "notes.txt").stat()
    mirror.baseline["notes.txt"] = (st.st_size, st.st_mtime_ns, e.digest)

    (notebook / "notes.txt").write_text("changed in the kernel's folder")
    (scratch.folder / "notes.txt").write_text("changed on the GPU host")
    why = [
        mirror._apply(x, tmp, {})
        for x, tmp in receive_files(scratch.changes(1 << 20, 1 << 20), notebook)
    ]
    assert why == ["changed both here and on the GPU host; the GPU's version was not copied"]
    assert (notebook / "notes.txt").read_text() == "changed in the kernel's folder"
    assert sorted(p.name for p in notebook.iterdir()) == ["notes.txt"]  # no temporary left
    scratch.remove()


def test_credentials_stay_home_unless_listed() -> None:
    env = {
        "JUPYTERHUB_API_TOKEN": "t",
        "GPUATTACH_TOKEN": "t",
        "AWS_SECRET_ACCESS_KEY": "s",
        "PGPASSWORD": "p",
        "HF_TOKEN": "h",
        "MY_SETTING": "1",
        "GPUATTACH_FORWARD_ENV": "HF_TOKEN, PGPASSWORD",
    }
    sent, kept = forwarded_env(env)
    assert kept == ["AWS_SECRET_ACCESS_KEY", "GPUATTACH_TOKEN", "JUPYTERHUB_API_TOKEN"]
    assert set(sent) == {"HF_TOKEN", "PGPASSWORD", "MY_SETTING", "GPUATTACH_FORWARD_ENV"}
    assert "JUPYTERHUB_API_TOKEN" not in kernel_hello("/x", [], env).env


def test_marker_is_checked_by_content_and_removed(tmp_path: Path) -> None:
    with folder_marker(str(tmp_path)) as (path, content):
        assert os.path.dirname(path) == str(tmp_path)
        assert _marker_matches(path, content, str(tmp_path))
        assert not _marker_matches(path, content[::-1], str(tmp_path))
        assert not _marker_matches(path, content, str(tmp_path / "elsewhere"))
    assert not os.path.exists(path)
    assert not _marker_matches(path, content, str(tmp_path))


def test_policy_list_limits_what_forward_env_may_name() -> None:
    env = {
        "HF_TOKEN": "h",
        "PGPASSWORD": "p",
        "MY_SETTING": "1",
        "GPUATTACH_FORWARD_ENV": "HF_TOKEN,PGPASSWORD",
    }
    sent, kept = forwarded_env(env, ["HF_TOKEN"])
    assert kept == ["PGPASSWORD"]  # named by the kernel, not allowed by the policy
    assert set(sent) == {"HF_TOKEN", "MY_SETTING", "GPUATTACH_FORWARD_ENV"}
    assert forwarded_env(env, [])[1] == ["HF_TOKEN", "PGPASSWORD"]  # [] forwards none
    hello = kernel_hello("/x", [], env, forward_policy=["HF_TOKEN"], mirror=(100, 10))
    assert "PGPASSWORD" not in hello.env
    assert hello.env["HF_TOKEN"] == "h"
    assert (hello.mirror_bytes, hello.mirror_file_bytes) == (100, 10)


def test_the_kernel_may_lower_the_lease_budget_never_raise_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Budget.for_lease() == Budget(2 << 30, 1 << 30)
    monkeypatch.setenv("GPUATTACH_MIRROR_BYTES", "10GiB")
    monkeypatch.setenv("GPUATTACH_MIRROR_FILE_BYTES", "1KiB")
    assert Budget.for_lease(4 << 20, 1 << 20) == Budget(4 << 20, 1024)


def test_the_worker_refuses_mirror_bytes_beyond_the_lease_budget(tmp_path: Path) -> None:
    notebook = tmp_path / "nb"
    notebook.mkdir()
    (notebook / "a.bin").write_bytes(b"a" * 60)
    (notebook / "b.bin").write_bytes(b"b" * 60)
    entries = [entry(notebook, "a.bin"), entry(notebook, "b.bin")]
    scratch = Scratch.create("nb", None)
    scratch.limit(100, 50)
    scratch.limit(0, 1000)  # 0 keeps it; a limit only goes down
    with pytest.raises(FileStreamError, match=r"a.bin \(60 B\) is over .*mirror_file_bytes"):
        scratch.seed(entries)
    scratch.limit(100, 80)
    assert scratch.file_limit_bytes == 50  # never raised
    scratch.file_limit_bytes = 80
    with pytest.raises(FileStreamError, match=r"over this lease's 100 B mirror budget"):
        scratch.seed(entries)
    scratch.seed(entries[:1])
    scratch.receive(file_chunks(notebook, entries[:1]))
    # What comes home is capped by the lease's budget whatever the kernel asks.
    (scratch.folder / "new.bin").write_bytes(b"n" * 70)
    (scratch.folder / "more.bin").write_bytes(b"m" * 40)
    sent = [c.file for c in scratch.changes(1 << 30, 1 << 30) if c.WhichOneof("msg") == "file"]
    assert {e.path: e.over_limit for e in sent} == {"more.bin": False, "new.bin": True}
    scratch.remove()


def test_missing_modules_are_named_with_their_package() -> None:
    imports = {"np": "numpy", "sk": "sklearn.svm", "u": "utils", "os": "os"}
    problems = {
        "sk": "module 'sklearn.svm' cannot be imported here (...)",
        "u": "module 'utils' cannot be imported here (...)",
        "x": "an open file",
    }
    missing = missing_modules(imports, problems)
    assert set(missing) == {"sklearn.svm", "utils"}
    assert missing["utils"] == ""
    assert describe_modules({"sklearn": "scikit-learn", "utils": ""}) == (
        "sklearn (scikit-learn), utils"
    )
    assert package_of("xxhash") == "xxhash"
    assert package_of("yaml.nodes") in ("PyYAML", "")

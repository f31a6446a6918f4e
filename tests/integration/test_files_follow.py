"""A notebook's files follow it to a GPU host that is another machine.

The agent runs as another host: its own UTS namespace with another hostname
(`unshare --uts`, root only). With the same file system the worker must find
the kernel's marker and run in the notebook's folder; with a mount namespace
that hides the notebook's folder (an empty tmpfs over its parent) it must
run in a scratch mirror whose changes come back. Both run the PyTorch
Quickstart's shape: read data next to the notebook, import a local module,
train, `torch.save`, release, `torch.load` in the kernel.
"""

from __future__ import annotations

import ast
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Kernel, Stack, other_host_prefix, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="emulating another host needs root and unshare",
    ),
]

OTHER_HOST = "gpu-host-2"
CSV = "x1,x2,y\n" + "".join(f"{i % 7},{i % 5},{(i % 7) + 2 * (i % 5)}\n" for i in range(200))
UTILS = """
import csv
import torch

def load(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    X = torch.tensor([[float(r["x1"]), float(r["x2"])] for r in rows])
    y = torch.tensor([[float(r["y"])] for r in rows])
    return X, y

def train(model, X, y, steps=50):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), y)
        loss.backward()
        opt.step()
    return loss.item()
"""
SECRETS = {
    "JUPYTERHUB_API_TOKEN": "hub-secret-4c1d",
    "MY_DB_PASSWORD": "db-secret-77aa",
    "WANDB_API_KEY": "wandb-allowed-9f",  # listed in GPUATTACH_FORWARD_ENV
}
QUICKSTART = """
import os, socket
from utils import load, train
X, y = load('data.csv')
torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
loss = train(model, X, y)
torch.save(model.state_dict(), 'model.pth')
print(repr((socket.gethostname(), os.getcwd(), len(X), loss)))
"""
ENV_SEEN = (
    "import os\n"
    "print(repr(sorted((k, v) for k, v in os.environ.items()\n"
    "    if k in {keys!r} or any(s in v for s in {values!r}))))"
)


def notebook_folder(root: Path) -> Path:
    folder = root / "nb"
    folder.mkdir(parents=True)
    (folder / "data.csv").write_text(CSV)
    (folder / "utils.py").write_text(UTILS)
    return folder


@pytest.fixture
def kernels() -> Iterator[list[Kernel]]:
    started: list[Kernel] = []
    yield started
    for kernel in started:
        kernel.shutdown()


def start_kernel(stack: Stack, cwd: Path, kernels: list[Kernel], **env: str) -> Kernel:
    kernel_env = {**stack.env(), **SECRETS, "GPUATTACH_FORWARD_ENV": "WANDB_API_KEY", **env}
    kernel = Kernel(kernel_env, cwd)
    kernels.append(kernel)
    kernel.ok("%load_ext jupyter_gpuattach")
    return kernel


def last_line(result: Any) -> Any:
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def check_credentials(kernel: Kernel) -> None:
    seen = last_line(kernel.ok(ENV_SEEN.format(keys=set(SECRETS), values=set(SECRETS.values()))))
    assert seen == [("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])], seen
    failed = kernel.run("os.environ['JUPYTERHUB_API_TOKEN']")
    assert failed.status == "error"
    assert failed.error is not None
    assert "GPUATTACH_FORWARD_ENV" in failed.error["evalue"], failed.error


def file_transfers(kernel: Kernel) -> list[tuple[str, int, int]]:
    shown = kernel.ok(  # %%local: the kernel's own session, attached or not
        "%%local\nprint(repr([(t.kind, t.files, t.content_bytes) for t in "
        "get_ipython()._gpuattach_session.file_transfers]))"
    )
    transfers: list[tuple[str, int, int]] = last_line(shown)
    return transfers


def test_shared_folder_on_another_host_is_detected(
    stack_factory: Any, kernels: list[Kernel], tmp_path: Path
) -> None:
    stack = stack_factory(agent_prefix=other_host_prefix(OTHER_HOST))
    folder = notebook_folder(tmp_path / "home")
    kernel = start_kernel(stack, folder, kernels)
    kernel.ok("import torch")
    attached = kernel.ok("%gpu attach").stdout
    assert "GPU attached" in attached, attached
    assert "mirrored" not in attached, attached
    assert not list(folder.glob(".gpuattach-marker-*")), "the marker is removed after the check"

    host, cwd, rows, loss = last_line(kernel.ok(QUICKSTART))
    assert host == OTHER_HOST  # really another host, by name
    assert cwd == str(folder)  # and yet in the notebook's folder: the marker matched
    assert rows == 200
    assert loss < 1.0
    check_credentials(kernel)
    assert "GPU released" in kernel.ok("%gpu release").stdout
    same = kernel.value(
        "all(torch.equal(a, b) for a, b in zip(torch.load('model.pth').values(), "
        "model.state_dict().values()))"
    )
    assert same is True
    assert file_transfers(kernel) == []  # nothing was copied: the folder is shared


def test_unshared_folder_is_mirrored_and_comes_home(
    stack_factory: Any, kernels: list[Kernel], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    folder = notebook_folder(home)
    stack = stack_factory(
        agent_prefix=other_host_prefix(OTHER_HOST, hide=home),
        agent_args=["--blob-cache", str(tmp_path / "blobs")],
    )
    (folder / "big.bin").write_bytes(os.urandom(100_000))  # over the test's per-file limit
    (folder / "notes.txt").write_text("first notes\n")
    (folder / "old.txt").write_text("a remote cell deletes this\n")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "nb-checkpoint.ipynb").write_text("{}")
    kernel = start_kernel(stack, folder, kernels, GPUATTACH_MIRROR_FILE_BYTES="64KiB")
    kernel.ok("import torch")

    attached = kernel.ok("%gpu attach").stdout
    assert "mirrored 4 files" in attached, attached
    assert "big.bin (97.7 KiB, over the 64.0 KiB per-file limit)" in attached, attached
    sizes = sum((folder / n).stat().st_size for n in ("data.csv", "utils.py", "notes.txt"))
    sizes += (folder / "old.txt").stat().st_size
    assert file_transfers(kernel) == [("seed", 4, sizes)]

    host, cwd, rows, loss = last_line(kernel.ok(QUICKSTART))
    assert host == OTHER_HOST
    assert cwd != str(folder)
    assert cwd.endswith("/nb")
    assert rows == 200
    assert loss < 1.0
    assert kernel.value(f"os.path.exists({str(folder)!r})") is False  # really not shared
    check_credentials(kernel)

    # Files come home after each remote cell, deletions too.
    kernel.ok("os.makedirs('out', exist_ok=True)\nopen('out/log.txt', 'w').write('epoch 1\\n')")
    kernel.ok("os.remove('old.txt')")
    wait_for(lambda: (folder / "out" / "log.txt").exists(), what="a new file to come home")
    wait_for(lambda: not (folder / "old.txt").exists(), what="a remote deletion to come home")
    assert (folder / "out" / "log.txt").read_text() == "epoch 1\n"
    assert (folder / "model.pth").exists()

    # A file the user changed here meanwhile is not overwritten: a note says so.
    (folder / "notes.txt").write_text("edited in the kernel's folder\n")
    kernel.ok("open('notes.txt', 'w').write('written on the GPU host\\n')")
    shown = kernel.ok("print('next cell')")
    notes = shown.stdout + "".join(str(o["data"].get("text/plain", "")) for o in shown.outputs)
    assert "GPU: kept your copy of notes.txt (changed both here and on the GPU host" in notes
    assert (folder / "notes.txt").read_text() == "edited in the kernel's folder\n"

    # A file that was not mirrored gets an error that says why and what to do.
    missing = kernel.run("open('big.bin', 'rb').read()")
    assert missing.status == "error"
    assert missing.error is not None
    assert "not mirrored" in missing.error["evalue"], missing.error
    assert "mirror_file_bytes" in missing.error["evalue"], missing.error

    released = kernel.ok("%gpu release").stdout
    assert "GPU released" in released, released
    same = kernel.value(
        "all(torch.equal(a, b) for a, b in zip(torch.load('model.pth').values(), "
        "model.state_dict().values()))"
    )
    assert same is True

    # A re-attach sends only the file the user changed: none of the bytes of
    # unchanged files (the files that came home are cached on the GPU host too).
    kernel.ok("%gpu attach")
    seed = [t for t in file_transfers(kernel) if t[0] == "seed"]
    assert len(seed) == 2, seed
    assert seed[1] == ("seed", 1, (folder / "notes.txt").stat().st_size), seed
    back = last_line(
        kernel.ok("print(repr((len(open('data.csv').read()), sorted(torch.load('model.pth')))))")
    )
    assert back == (len(CSV), ["bias", "weight"])
    kernel.ok("%gpu release")
    # Nothing changed since: a re-attach sends no file bytes at all.
    kernel.ok("%gpu attach")
    assert file_transfers(kernel)[-1] == ("seed", 0, 0)
    kernel.ok("%gpu release")

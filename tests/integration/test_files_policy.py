"""The admin's policy sets a notebook's files budget and which credentials may
leave the kernel; modules the GPU host lacks are named at attach.

A real broker with a policy file, the agent on an emulated other host whose
mount namespace hides the notebook's folder (see test_files_follow.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.harness import Kernel, other_host_prefix
from tests.integration.test_files_follow import (
    OTHER_HOST,
    SECRETS,
    file_transfers,
    kernels,
    last_line,
    notebook_folder,
    pytestmark,  # noqa: F401  (root and unshare)
    start_kernel,
)

__all__ = ["kernels"]  # the fixture, shared with test_files_follow

POLICY = """
[defaults]
mirror_bytes = "1MiB"
mirror_file_bytes = "64KiB"
forward_env = ["WANDB_API_KEY"]
"""
FAKE_DIST = "fake-gpu-extras"


def fake_package(site: Path) -> None:
    """A package installed only in the kernel's folder `site` (hidden on the GPU host)."""
    (site / "fakeextras").mkdir(parents=True)
    (site / "fakeextras" / "__init__.py").write_text("VALUE = 1\n")
    info = site / "fake_gpu_extras-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {FAKE_DIST}\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("fakeextras\n")


def test_policy_sets_the_budget_the_credentials_and_missing_modules_are_named(
    stack_factory: Any, kernels: list[Kernel], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    folder = notebook_folder(home)
    fake_package(home / "site")
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    stack = stack_factory(
        serve_args=["--policy", str(policy)],
        agent_prefix=other_host_prefix(OTHER_HOST, hide=home),
        agent_args=["--blob-cache", str(tmp_path / "blobs")],
    )
    (folder / "big.bin").write_bytes(os.urandom(100_000))  # over the policy's 64 KiB per file
    # The kernel asks for more than the policy gives: budgets may only go down,
    # and a credential outside the policy's forward_env stays home.
    kernel = start_kernel(
        stack,
        folder,
        kernels,
        GPUATTACH_MIRROR_FILE_BYTES="10MiB",
        GPUATTACH_FORWARD_ENV="WANDB_API_KEY,MY_DB_PASSWORD",
    )
    kernel.ok(f"import sys\nsys.path.insert(0, {str(home / 'site')!r})\nimport fakeextras")
    kernel.ok("import torch")

    attached = kernel.ok("%gpu attach").stdout
    assert "mirrored 2 files" in attached, attached
    assert "big.bin (97.7 KiB, over the 64.0 KiB per-file limit)" in attached, attached
    assert f"not installed on the GPU host: fakeextras ({FAKE_DIST})" in attached, attached
    assert f"pip install {FAKE_DIST}" in attached, attached
    assert "stays in the kernel" not in attached, attached  # named once, as a module
    assert "policy's forward_env does not allow them): MY_DB_PASSWORD" in attached, attached
    assert file_transfers(kernel)[0][:2] == ("seed", 2)

    seen = last_line(
        kernel.ok(
            "import os\nprint(repr(sorted(k for k, v in os.environ.items() "
            f"if any(s in v for s in {set(SECRETS.values())!r}))))"
        )
    )
    assert seen == ["WANDB_API_KEY"], seen
    refused = kernel.run("os.environ['MY_DB_PASSWORD']")
    assert refused.status == "error", refused.error
    assert refused.error is not None
    assert "forward_env" in refused.error["evalue"], refused.error

    missing = kernel.run("open('big.bin', 'rb').read()")
    assert missing.status == "error"
    assert missing.error is not None
    assert "mirror_file_bytes" in missing.error["evalue"], missing.error
    kernel.ok("%gpu release")


def test_the_worker_enforces_the_lease_budget_against_a_kernel_that_ignores_it(
    stack_factory: Any, kernels: list[Kernel], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    folder = notebook_folder(home)
    policy = tmp_path / "policy.toml"
    policy.write_text('[defaults]\nmirror_file_bytes = "64KiB"\n')
    stack = stack_factory(
        serve_args=["--policy", str(policy)],
        agent_prefix=other_host_prefix(OTHER_HOST, hide=home),
    )
    (folder / "big.bin").write_bytes(os.urandom(100_000))
    kernel = start_kernel(stack, folder, kernels)
    kernel.ok("import torch")
    kernel.ok("%gpu attach")
    # The kernel's own mirror, told a larger budget, sends it anyway: refused.
    refused = kernel.run(
        "%%local\n"
        "import os\nfrom jupyter_gpuattach.file_mirror import Budget\n"
        "s = get_ipython()._gpuattach_session\n"
        "try:\n"
        "    s.files.seed(s.worker, os.getcwd(), Budget(1 << 30, 1 << 30))\n"
        "except Exception as exc:\n"
        "    print(repr(str(exc)))\n"
    )
    text = refused.stdout
    assert "big.bin" in text, (refused.stdout, refused.error)
    assert "mirror_file_bytes" in text, (refused.stdout, refused.error)
    kernel.ok("%gpu release")


def test_a_kernel_that_lies_in_its_hello_still_meets_the_policys_budget(
    stack_factory: Any, kernels: list[Kernel], tmp_path: Path
) -> None:
    """The worker takes the lease's budget from the agent (the broker's policy),
    not from the kernel: a kernel that claims a larger one is still refused."""
    home = tmp_path / "home"
    folder = notebook_folder(home)
    policy = tmp_path / "policy.toml"
    policy.write_text('[defaults]\nmirror_file_bytes = "64KiB"\n')
    stack = stack_factory(
        serve_args=["--policy", str(policy)],
        agent_prefix=other_host_prefix(OTHER_HOST, hide=home),
    )
    (folder / "big.bin").write_bytes(os.urandom(100_000))
    kernel = start_kernel(stack, folder, kernels)
    kernel.ok("import torch")
    kernel.ok(
        "%%local\n"
        "import jupyter_gpuattach.session as session_module\n"
        "from jupyter_gpuattach.file_mirror import Budget\n"
        "session_module.Budget = type('Lying', (Budget,), {\n"
        "    'for_lease': staticmethod(lambda total, per_file: Budget(1 << 40, 1 << 40))})\n"
    )
    refused = kernel.run("%gpu attach")
    text = refused.stdout + refused.stderr + str(refused.error)
    assert "big.bin" in text, text
    assert "mirror_file_bytes" in text, text
    assert not [lease for lease in stack.leases() if lease.state == "active"]

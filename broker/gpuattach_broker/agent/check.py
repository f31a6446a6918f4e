"""``gpuattach-agent check``: what this host offers, which slice kinds work, and why not.

An admin runs it after installing a GPU host (or when leases fail there):
it prints the NVML inventory, then one line per slice kind with a yes/no
and the reason or the command that fixes it. Exit codes: 0 when the host
can serve (a host with no NVIDIA GPU at all serves with the CPU backend,
and the report says so), 1 when something needs an admin (a GPU the driver
cannot reach, a GPU NVML cannot read, nothing to offer, or ``--devices
nvml`` on a host without GPUs).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpuattach_broker.agent.backends import DEFAULT_CPU_SPEC, BackendError, CpuBackend
from gpuattach_broker.agent.backends.nvml import NoGpuError, init_nvml, load_pynvml
from gpuattach_broker.agent.backends.nvml_inventory import (
    GpuRecord,
    Inventory,
    nvml_error_name,
    read_inventory,
)
from gpuattach_broker.agent.mps import MpsState
from gpuattach_broker.units import format_size


@dataclass(frozen=True)
class TorchInfo:
    version: str  # "" when torch is not installed
    cuda: str  # torch.version.cuda; "" for a CPU build
    devices: int  # torch.cuda.device_count(); 0 when CUDA is not usable


def probe_torch() -> TorchInfo:
    """What the workers' torch can do here (same interpreter as the workers)."""
    try:
        import torch
    except ImportError:
        return TorchInfo("", "", 0)
    cuda = str(torch.version.cuda or "")
    try:
        count = int(torch.cuda.device_count()) if cuda else 0
    except Exception:  # noqa: BLE001 - a broken driver or CUDA install raises any type; report 0
        count = 0
    return TorchInfo(str(torch.__version__), cuda, count)


@dataclass
class Probe:
    """Per-GPU answers to the questions the slice kinds depend on."""

    process_memory: dict[str, str] = field(default_factory=dict)  # uuid -> "" ok, else why not
    process_sm: dict[str, str] = field(default_factory=dict)
    xid: dict[str, str] = field(default_factory=dict)


def probe_gpus(nvml: Any, inventory: Inventory) -> Probe:
    probe = Probe()
    for gpu in inventory.gpus:
        if gpu.error:
            continue
        targets = [m.uuid for m in gpu.migs] if gpu.mig == "on" and gpu.migs else [gpu.uuid]
        for uuid in targets:
            probe.process_memory[uuid] = _why_not(nvml, uuid, "memory")
            probe.process_sm[uuid] = _why_not(nvml, uuid, "sm")
        probe.xid[gpu.uuid] = _why_not(nvml, gpu.uuid, "xid")
    return probe


def _why_not(nvml: Any, uuid: str, what: str) -> str:
    """ "" when NVML answers the question for this device, else the error's name."""
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        if what == "memory":
            nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        elif what == "sm":
            nvml.nvmlDeviceGetProcessUtilization(handle, 0)
        elif not int(nvml.nvmlDeviceGetSupportedEventTypes(handle)) & (
            nvml.nvmlEventTypeXidCriticalError
        ):
            return "Xid events not supported"
    except nvml.NVMLError_NotFound:
        return ""  # process utilisation: supported, no sample yet
    except nvml.NVMLError as exc:
        return nvml_error_name(nvml, exc)
    return ""


@dataclass
class Report:
    out: io.StringIO = field(default_factory=io.StringIO)
    problems: list[str] = field(default_factory=list)  # need an admin: exit 1
    warnings: list[str] = field(default_factory=list)

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")


def slice_kinds(
    inventory: Inventory, probe: Probe, mps: MpsState, only_offered: int
) -> list[tuple[str, str]]:
    """(slice kind, "yes: ..." / "no: ...") for every kind a lease can ask for."""
    gpus = [g for g in inventory.gpus if not g.error]
    whole = [g for g in gpus if g.mig != "on" and g.compute_mode != "Prohibited"]
    mig_on = [g for g in gpus if g.mig == "on"]
    mig_off = [g for g in gpus if g.mig == "off"]
    kinds: list[tuple[str, str]] = []
    kinds.append(
        ("whole GPU", f"yes: {_names(whole)}" if whole else "no: every GPU is in MIG mode")
    )
    kinds.append(
        (
            "several GPUs",
            f"yes: up to {len(whole)} whole GPUs in one lease (--gpus N)"
            if len(whole) > 1
            else "no: this host has fewer than two whole GPUs",
        )
    )
    if mig_on:
        parts = [f"GPU {g.index}: {', '.join(m.profile for m in g.migs) or 'none'}" for g in mig_on]
        empty = [g for g in mig_on if not g.migs]
        text = "yes: " + "; ".join(parts)
        if empty:
            text += " (create instances: nvidia-smi mig -i N -cgi <profiles> -C)"
        kinds.append(("MIG instance", text))
    elif mig_off:
        kinds.append(
            (
                "MIG instance",
                f"no: MIG mode is off on {_names(mig_off)} "
                "(nvidia-smi -i N -mig 1, a GPU reset, then create instances)",
            )
        )
    else:
        kinds.append(("MIG instance", "no: no GPU here supports MIG (A100/A30/H100 and newer do)"))
    blocked = [u for u, why in probe.process_memory.items() if why]
    exclusive = [g for g in gpus if g.compute_mode == "Exclusive_Process"]
    if exclusive and not mps.active:
        text = (
            f"no: {_names(exclusive)} in compute mode Exclusive_Process allow one process "
            "per GPU; use MPS or set Default mode (nvidia-smi -i N -c DEFAULT)"
        )
    elif blocked:
        text = (
            "partly: torch's allocator cap applies, but NVML cannot report per-process memory on "
            + ", ".join(f"{u} ({probe.process_memory[u]})" for u in blocked)
            + ", so the agent cannot end a lease that goes past its cap"
        )
    else:
        text = "yes: torch per-process memory cap, and the agent ends a lease over its cap (NVML)"
    kinds.append(("memory fraction", text))
    if mps.active:
        kinds.append(("compute share", f"yes: MPS active-thread percentage ({mps.reason})"))
    else:
        kinds.append(("compute share", f"time-sliced, not enforced: {mps.reason}"))
    no_sm = [u for u, why in probe.process_sm.items() if why]
    mig_no_sm = [u for u in no_sm if u.startswith("MIG-")]
    gpu_no_sm = [u for u in no_sm if not u.startswith("MIG-")]
    if not no_sm:
        kinds.append(("per-process SM use", "yes"))
    else:
        parts = []
        if gpu_no_sm:
            parts.append(
                "not on "
                + ", ".join(f"{u} ({probe.process_sm[u]})" for u in gpu_no_sm)
                + " (device-wide use is counted for a lease alone on its GPU)"
            )
        if mig_no_sm:
            parts.append(
                f"not on the {len(mig_no_sm)} MIG instances (NVML reports no SM use per "
                "instance): their leases get memory samples only"
            )
        kinds.append(("per-process SM use", "partly: " + "; ".join(parts)))
    no_xid = [u for u, why in probe.xid.items() if why]
    kinds.append(
        (
            "Xid watch",
            "yes" if not no_xid else "no on " + ", ".join(f"{u} ({probe.xid[u]})" for u in no_xid),
        )
    )
    kinds.append(("devices offered", str(only_offered)))
    return kinds


def _names(gpus: list[GpuRecord]) -> str:
    return ", ".join(f"GPU {g.index}" for g in gpus)


def render_inventory(report: Report, inventory: Inventory) -> None:
    driver = inventory.driver_version or "unknown"
    cuda = inventory.cuda_version or "unknown"
    report.line(f"NVML: driver {driver}, CUDA {cuda} (what the driver supports)")
    for problem in inventory.problems:
        report.problems.append(f"NVML could not read the {problem}")
    for gpu in inventory.gpus:
        if gpu.error:
            report.line(f"GPU {gpu.index}: UNREADABLE: {gpu.error}")
            report.problems.append(gpu.error)
            continue
        pending = f" (changes to {gpu.mig_pending} after a GPU reset)" if gpu.mig_pending else ""
        report.line(
            f"GPU {gpu.index}: {gpu.name}, {gpu.uuid}, {format_size(gpu.memory_bytes)}, "
            f"compute capability {gpu.compute_capability or '?'}, "
            f"compute mode {gpu.compute_mode or '?'}, MIG {gpu.mig}{pending}"
        )
        if gpu.mig_pending:
            report.warnings.append(f"GPU {gpu.index}: a MIG mode change waits for a GPU reset")
        for mig in gpu.migs:
            report.line(
                f"    MIG {mig.profile}: {mig.uuid}, {format_size(mig.memory_bytes)}, "
                f"{mig.multiprocessors} SMs, GPU instance {mig.gpu_instance_id}, "
                f"compute instance {mig.compute_instance_id}"
            )
        if gpu.compute_mode == "Prohibited":
            report.problems.append(f"GPU {gpu.index} is in compute mode Prohibited: no CUDA work")


def render_torch(report: Report, torch: TorchInfo) -> None:
    if not torch.version:
        report.line("workers: torch is not installed; cells run, but see no GPU")
        report.warnings.append("install torch with CUDA in the agent's environment")
    elif not torch.cuda:
        report.line(f"workers: torch {torch.version} is a CPU build; cells will not see the GPU")
        report.warnings.append("torch is a CPU build: install a CUDA build of torch")
    elif torch.devices == 0:
        report.line(f"workers: torch {torch.version} (CUDA {torch.cuda}) sees no CUDA device")
        report.warnings.append("torch cannot use the GPUs NVML sees (driver/CUDA mismatch?)")
    else:
        report.line(
            f"workers: torch {torch.version} with CUDA {torch.cuda}; warm workers make their "
            "CUDA context on their device ahead of attach"
        )


def run_check(
    spec: str,
    mps: MpsState,
    *,
    nvml: Any = None,
    torch: Callable[[], TorchInfo] = probe_torch,
    pci_root: str | None = None,
) -> tuple[int, str]:
    """The report and its exit code; `nvml`, `torch` and `pci_root` are for tests."""
    report = Report()
    try:
        nvml = nvml if nvml is not None else load_pynvml()
        init_nvml(nvml, pci_root)
        inventory = read_inventory(nvml)
    except NoGpuError as exc:
        return _no_gpu(report, spec, str(exc))
    except BackendError as exc:
        report.line(f"NVML: {exc}")
        report.line("BROKEN: the GPU driver needs attention before this host can serve GPUs")
        return 1, report.out.getvalue()
    if not inventory.gpus:
        return _no_gpu(report, spec, "NVML works but lists no GPU")
    try:
        render_inventory(report, inventory)
        probe = probe_gpus(nvml, inventory)
        offered = len(inventory.devices())
        report.line(f"backend: nvml, devices offered: {offered}")
        report.line("slice kinds:")
        for kind, verdict in slice_kinds(inventory, probe, mps, offered):
            report.line(f"  {kind:<20} {verdict}")
        if offered == 0:
            report.problems.append("no device to offer (see the GPUs above)")
        render_torch(report, torch())
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    for warning in report.warnings:
        report.line(f"warning: {warning}")
    for problem in report.problems:
        report.line(f"PROBLEM: {problem}")
    return (1 if report.problems else 0), report.out.getvalue()


def _no_gpu(report: Report, spec: str, why: str) -> tuple[int, str]:
    report.line(f"NVML: {why}")
    report.line("No NVML device is present on this host.")
    if spec == "nvml" or spec.startswith("nvml:"):
        report.line(
            "--devices nvml: the agent would refuse to start; use --devices auto or cpu:NxSIZE"
        )
        return 1, report.out.getvalue()
    cpu_spec = spec if spec.startswith("cpu:") else DEFAULT_CPU_SPEC
    try:
        backend = CpuBackend.from_spec(cpu_spec)
    except BackendError as exc:
        report.line(f"backend: {exc}")
        return 1, report.out.getvalue()
    report.line(f"backend: cpu ({cpu_spec}), the CPU device backend (cells run on CPU workers)")
    for device in backend.devices():
        report.line(f"  {device.local_id}: {device.name}, {format_size(device.memory_bytes)}")
    report.line(
        "slice kinds: whole devices and memory slices, packed by the broker; no MIG, MPS or "
        "NVML enforcement without a GPU"
    )
    return 0, report.out.getvalue()


def isolation_report(mode: str, user_map: Any, secrets: list[tuple[str, str]]) -> tuple[int, str]:
    """What isolation of users' workers this host provides with `--isolation
    mode`: user switching, mount namespaces, the user map, and whether the
    agent's secret files are its own. Exit code 1 when the agent would refuse
    to start (or would start with a secret others can read)."""
    from gpuattach_broker.agent.isolation import (
        can_switch_users,
        mount_namespaces,
        secret_file_problem,
    )

    report = Report()
    report.line("worker isolation:")
    switch = can_switch_users()
    report.line(
        "  switch users       "
        + ("yes: the agent runs as root or with CAP_SETUID" if switch else "no: not root")
    )
    mounts = mount_namespaces()
    report.line(
        "  mount namespaces   "
        + (
            "yes: private /tmp, /proc of the user, only the slice's GPU nodes"
            if not mounts
            else f"no ({mounts}): workers get UID isolation only"
        )
    )
    report.line(f"  user map           {user_map.describe()}")
    effective = "uid" if mode == "uid" or (mode == "auto" and switch) else mode
    if mode == "none":
        report.line("  mode               none: every worker runs as the agent's user (one user)")
    elif switch:
        report.line(f"  mode               uid ({mode}): each user's workers run as that user")
    else:
        report.problems.append(
            f"--isolation {mode}: the agent cannot switch users; run it as root, or pass "
            "--isolation none on a host that serves one user"
        )
    for path, what in secrets:
        problem = secret_file_problem(path, what)
        report.line(f"  {what:<18} {problem or 'readable by the agent alone'}")
        if problem and effective == "uid":
            report.problems.append(problem)
        elif problem:
            report.warnings.append(problem)
    for warning in report.warnings:
        report.line(f"warning: {warning}")
    for problem in report.problems:
        report.line(f"PROBLEM: {problem}")
    return (1 if report.problems else 0), report.out.getvalue()

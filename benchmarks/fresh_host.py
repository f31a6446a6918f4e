"""First attach on a fresh host: ``import torch`` alone, against a notebook
that loads the extension, imports torch, attaches and runs its first remote
cell, with no broker running before (the embedded default, zero settings).

    .venv/bin/python benchmarks/fresh_host.py [--reps 3]

Each repetition is a fresh Python (an IPython shell, as a kernel runs the
cells) with its own empty state and runtime folders, so nothing is warm but
the operating system's file cache; the embedded broker it started is
stopped after it. The target: load → first remote cell ≤ import torch + 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stats import latency

TARGET_EXTRA_S = 0.5

IMPORT_TORCH = """
import time
started = time.perf_counter()
import torch
print(time.perf_counter() - started)
"""

# CPU seconds that this notebook and the embedded stack (broker, agent,
# zygote, worker: the broker's process tree) had used when the first remote
# cell answered. On a machine with few cores their sum, over the cores, is a
# floor for the wall time, whatever the start-up order.
CPU_SECONDS = r"""
import glob, json, os
def _cpu_seconds():
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = open(path).read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        used = sum(int(x) for x in fields[11:15])  # its own and its reaped children's
        stats[int(path.split("/")[2])] = (int(fields[1]), used / tick)
    runtime = os.environ["JUPYTER_RUNTIME_DIR"]
    roots = [json.load(open(p))["pid"] for p in glob.glob(runtime + "/gpuattach-embedded-*.json")]
    tree, changed = set(roots), True
    while changed:
        grown = tree | {pid for pid, (ppid, _) in stats.items() if ppid in tree}
        changed, tree = grown != tree, grown
    times = os.times()
    return {
        "kernel": times.user + times.system,
        "stack": sum(stats[pid][1] for pid in tree if pid in stats),
        "stack_processes": len(tree),
        "cores": os.cpu_count(),
    }
"""

NOTEBOOK = (
    CPU_SECONDS
    + r"""
import json, time
started = time.perf_counter()
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
marks = {"shell": time.perf_counter() - started}
def cell(code, name):
    result = shell.run_cell(code)
    if not result.success:
        error = result.error_in_exec or result.error_before_exec
        raise SystemExit(f"cell {name!r} failed: {error}")
    marks[name] = time.perf_counter() - started
cell("%load_ext jupyter_gpuattach", "load_ext")
cell("import torch", "import_torch")
cell("%gpu attach", "attach")
cell("x = torch.ones(3).sum().item()", "first_remote_cell")
cpu_at_first_cell = _cpu_seconds()
cell("%gpu release", "release")
marks["cpu"] = cpu_at_first_cell
print("MARKS " + json.dumps(marks), flush=True)
"""
)


def _run(code: str, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr[-2000:]}{done.stdout[-2000:]}")
    return done.stdout


def _stop_embedded(runtime: Path) -> None:
    for path in runtime.glob("gpuattach-embedded-*.json"):
        try:
            pid = int(json.loads(path.read_text())["pid"])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            continue
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


def measure(workdir: Path, reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Per repetition: import torch alone, then the notebook with the embedded
    broker started at `%load_ext` (the default) and, for comparison, at the
    first attach (GPUATTACH_PRESTART=0)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUATTACH_")}
    torch_s: list[float] = []
    variants: dict[str, dict[str, list[float]]] = {
        name: {
            "cell": [],
            "load": [],
            "attach": [],
            "cpu_floor": [],
            "kernel_cpu": [],
            "stack_cpu": [],
        }
        for name in ("prestart", "at_attach")
    }
    for rep in range(reps):
        folder = workdir / f"rep{rep}"
        (folder / "nb").mkdir(parents=True)
        torch_s.append(float(_run(IMPORT_TORCH, base, folder / "nb").strip().splitlines()[-1]))
        for name, figs in variants.items():
            env = dict(
                base,
                GPUATTACH_STATE_DIR=str(folder / name / "state"),
                JUPYTER_RUNTIME_DIR=str(folder / name / "runtime"),
                GPUATTACH_EMBEDDED_DEVICES="cpu:1x8GiB",
                GPUATTACH_PRESTART="1" if name == "prestart" else "0",
            )
            try:
                out = _run(NOTEBOOK, env, folder / "nb")
            finally:
                _stop_embedded(folder / name / "runtime")
            line = next(x for x in out.splitlines() if x.startswith("MARKS "))
            marks = json.loads(line[len("MARKS ") :])
            figs["cell"].append(marks["first_remote_cell"] - marks["shell"])
            figs["load"].append(marks["load_ext"] - marks["shell"])
            figs["attach"].append(marks["attach"] - marks["import_torch"])
            cpu = marks["cpu"]
            figs["kernel_cpu"].append(cpu["kernel"])
            figs["stack_cpu"].append(cpu["stack"])
            figs["cpu_floor"].append((cpu["kernel"] + cpu["stack"]) / cpu["cores"])
            log(
                f"  fresh host {rep + 1}/{reps} ({name}): import torch alone "
                f"{torch_s[-1]:.2f} s; notebook from %load_ext: loaded {figs['load'][-1]:.2f} s, "
                f"torch imported {marks['import_torch'] - marks['shell']:.2f} s, attached "
                f"{marks['attach'] - marks['shell']:.2f} s, first remote cell "
                f"{figs['cell'][-1]:.2f} s; CPU used by then: notebook {cpu['kernel']:.2f} s, "
                f"embedded stack {cpu['stack']:.2f} s ({cpu['stack_processes']} processes)"
            )
    figures: dict[str, Any] = {"import_torch": latency(torch_s), "target_extra_s": TARGET_EXTRA_S}
    for name, figs in variants.items():
        figures[name] = {
            # From `%load_ext` to the first remote cell's result (the shell's
            # own start-up, the same with or without the extension, left out).
            "first_remote_cell": latency(figs["cell"]),
            "load_ext": latency(figs["load"]),
            "attach_after_import": latency(figs["attach"]),
            # CPU seconds spent by the notebook and by the embedded stack until the
            # first remote cell answered, and their sum over the cores: the wall
            # time cannot go below it on this machine.
            "kernel_cpu": latency(figs["kernel_cpu"]),
            "stack_cpu": latency(figs["stack_cpu"]),
            "cpu_floor": latency(figs["cpu_floor"]),
        }
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="gpuattach-fresh-"))
    try:
        figures = measure(workdir, args.reps, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

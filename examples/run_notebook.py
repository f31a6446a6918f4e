"""Run an example notebook headless, end to end, and print the lease timeline.

    python examples/run_notebook.py examples/quickstart.ipynb

The notebook's first ``%gpu attach`` starts the embedded broker and agent
(no configuration; the CPU backend on a machine without a GPU). Their state
lives in ``.demo/`` so the timeline printed at the end is this run's alone.
Afterwards the embedded broker is stopped so nothing is left running.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from gpuattach_broker.broker.store import open_store
from gpuattach_broker.client.embedded import runtime_file
from gpuattach_broker.paths import embedded_db

ROOT = Path(__file__).resolve().parent.parent


def _text_outputs(cell: dict) -> str:
    lines = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            lines.append(output["text"].rstrip("\n"))
        elif output["output_type"] in ("execute_result", "display_data"):
            data = output.get("data", {})
            if "image/png" in data:
                lines.append("[figure]")
            elif "text/plain" in data:
                lines.append(str(data["text/plain"]))
        elif output["output_type"] == "error":
            lines.append(f"{output['ename']}: {output['evalue']}")
    return "\n".join(lines)


def _stop_embedded_broker(runtime_dir: Path) -> None:
    path = runtime_file(runtime_dir)
    try:
        pid = json.loads(path.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and path.exists():
        time.sleep(0.1)


def print_timeline(db: Path, since: float) -> None:
    if not db.exists():
        print("(no broker state found)")
        return
    store = open_store(db, readonly=True)
    print("\nLease timeline (embedded broker):")
    for event in store.events(since=since):
        offset = event.ts - since
        lease = event.lease_id[:8] or "-"
        print(f"  +{offset:7.2f}s  {event.kind:<16} {lease:<9} {event.detail}")
    store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / ".demo" / "executed.ipynb")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args()

    demo = ROOT / ".demo"
    os.environ.setdefault("GPUATTACH_STATE_DIR", str(demo / "state"))
    os.environ.setdefault("JUPYTER_RUNTIME_DIR", str(demo / "runtime"))
    runtime_dir = Path(os.environ["JUPYTER_RUNTIME_DIR"])
    os.environ.pop("GPUATTACH_BROKER", None)  # the demo shows the embedded default

    notebook = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=args.timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(args.notebook.resolve().parent)}},
    )
    started = time.time()
    failed = False
    try:
        client.execute()
    except CellExecutionError as exc:
        failed = True
        print(f"notebook failed: {exc}", file=sys.stderr)
    finally:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, args.out)
        code_cells = [c for c in notebook.cells if c.cell_type == "code"]
        for number, cell in enumerate(code_cells, 1):
            first_line = cell.source.splitlines()[0] if cell.source else ""
            print(f"[{number}] {first_line}")
            text = _text_outputs(cell)
            if text:
                print("    " + text.replace("\n", "\n    "))
        print_timeline(embedded_db(), started)
        _stop_embedded_broker(runtime_dir)
    print(f"\nexecuted notebook written to {args.out}")
    print(
        "FAILED"
        if failed
        else f"OK: {args.notebook} ran to completion in {time.time() - started:.1f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""A live GPU status widget in the notebook: ``%gpu status`` and ``%gpu attach`` show it.

Plain ipywidgets (no custom JavaScript). A background thread refreshes it
once a second from ``GPUSession.snapshot()``, so it keeps counting while a
cell runs: the kernel's iopub channel carries widget updates from any thread.

The release button is different. Widget clicks reach the kernel on its
shell channel, which is not read while a cell runs, so a click mid-cell is
only acted on when the cell ends. The kernel does not know the Jupyter
server's URL and token in general, so the widget cannot call the server's
REST API itself; it releases through the kernel's own session (names come
back, as with ``%gpu release``) once the kernel is idle. While a cell runs
the widget says so and points to the JupyterLab GPU panel (status bar
item "GPU"), whose release goes through the server extension's REST API and
acts at once.
"""

from __future__ import annotations

import socket
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.units import format_duration, format_size

REFRESH_SECONDS = 1.0

try:
    import ipywidgets as widgets
except ImportError:  # pragma: no cover - the jupyter extra installs it
    widgets = None

# The newest widget of each session is the live one; older ones freeze.
_LIVE: weakref.WeakKeyDictionary[Any, GPUStatusWidget] = weakref.WeakKeyDictionary()


@dataclass
class View:
    """What the widget shows, as data (tested without a kernel)."""

    state: str  # detached | queued | attached | idle | released
    headline: str
    detail: str = ""
    times: str = ""
    can_release: bool = False

    @property
    def text(self) -> str:
        """One line, for frontends that cannot show widgets."""
        return " · ".join(part for part in (self.headline, self.detail, self.times) if part)


def slice_text(snapshot: dict[str, Any]) -> str:
    spec = snapshot["slice"]
    if 0 < spec["fraction"] < 1:
        return f"{spec['fraction']:g} of the device"
    if spec["memory_bytes"]:
        return f"{format_size(spec['memory_bytes'])} slice"
    if spec["gpus"] > 1:
        return f"{spec['gpus']} whole devices"
    return "whole device"


def render(
    snapshot: dict[str, Any],
    queued: pb.QueuePosition | None = None,
    released: str = "",
    memory_used: int | None = None,
) -> View:
    """The view of one snapshot; `released` is set once a lease seen here has ended."""
    if snapshot["attached"]:
        held, busy = snapshot["held_seconds"], snapshot["busy_seconds"]
        share = f" ({100 * min(busy, held) / held:.0f} %)" if held > 0 else ""
        cap = format_size(snapshot["memory_bytes"]) if snapshot["memory_bytes"] else "-"
        memory = f"{format_size(memory_used)} of {cap}" if memory_used is not None else cap
        detail = f"{snapshot['device']} · {slice_text(snapshot)} · memory {memory}"
        times = f"held {format_duration(held)}, busy {format_duration(busy)}{share}"
        if snapshot["lost"]:
            return View("released", f"GPU lost: {snapshot['lost']}", detail, times)
        idle_in = snapshot["idle_release_in"]
        if idle_in is not None and snapshot["running_cell"] is None:
            headline = f"GPU idle: releasing in {format_duration(idle_in)}"
            return View("idle", headline, detail, times, can_release=True)
        return View("attached", "GPU ● attached", detail, times, can_release=True)
    if queued is not None:
        headline = f"GPU queued #{queued.position} of {queued.queue_length}"
        if queued.estimated_wait_seconds >= 0:
            headline += f", about {format_duration(queued.estimated_wait_seconds)} to wait"
        return View("queued", headline, queued.reason)
    if released:
        return View("released", "GPU released", released)
    hint = "attaches on the next GPU cell" if snapshot["auto"] else "run %gpu attach"
    return View("detached", "GPU not attached", hint)


def memory_used(snapshot: dict[str, Any]) -> int | None:
    """Memory the lease's worker uses, when it runs on this host (else None).

    GPU devices: the worker's memory on the device, from NVML. The CPU
    backend: the worker's resident memory.
    """
    pid = snapshot.get("worker_pid")
    if not pid or not _same_host(snapshot):
        return None
    if snapshot.get("device_name", "").upper() != "CPU":
        return _nvml_used(pid)
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _same_host(snapshot: dict[str, Any]) -> bool:
    """The worker runs here: reached over loopback, or reports this host's name."""
    endpoint = str(snapshot.get("worker_endpoint", ""))
    if endpoint.startswith("unix:"):
        return True
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or snapshot.get("worker_host") == (
        socket.gethostname()
    )


def _nvml_used(pid: int) -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        total = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    total += int(proc.usedGpuMemory)
        return total
    except Exception:
        return None


def can_show_widgets(shell: Any) -> bool:
    """ipywidgets is installed and this is a kernel (comms reach a frontend)."""
    return widgets is not None and getattr(shell, "kernel", None) is not None


class GPUStatusWidget(widgets.VBox if widgets is not None else object):  # type: ignore[misc]
    """The status of one kernel's GPU session, refreshed in the background."""

    def __init__(self, session: Any, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.session = session
        self.headline = widgets.HTML()
        self.detail = widgets.HTML()
        self.message = widgets.HTML()
        self.button = widgets.Button(
            description="Release",
            button_style="warning",
            icon="eject",
            tooltip="Give the GPU slice back; the kernel's names come back first",
            layout=widgets.Layout(width="auto"),
        )
        self.button.on_click(self._on_release)
        text = widgets.VBox([self.headline, self.detail], layout=widgets.Layout(flex="1 1 auto"))
        row = widgets.HBox([text, self.button], layout=widgets.Layout(align_items="center"))
        super().__init__([row, self.message])
        self.add_class("jp-gpuattach-widget")
        self.queued: pb.QueuePosition | None = None
        self.released = ""
        self.view = View("detached", "")
        self._shown_state = "detached"
        self._seen_lease = ""
        self._handle: Any = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.refresh()
        self._thread = threading.Thread(
            target=self._run, args=(refresh_seconds,), daemon=True, name="gpuattach-widget"
        )

    # ------------------------------------------------------------ life ---

    def show(self) -> GPUStatusWidget:
        """Display it and make it the session's live widget (the previous one freezes)."""
        from IPython.display import display

        previous = _LIVE.get(self.session)
        if previous is not None and previous is not self:
            previous.stop()
        _LIVE[self.session] = self
        self._handle = display(self, display_id=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.button.disabled = True

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except Exception:  # never let a refresh error reach the user's cell
                continue

    # --------------------------------------------------------- updates ---

    def __call__(self, position: pb.QueuePosition) -> None:
        """Queue positions while an attach waits (the magics' show_queue hook)."""
        self.queued = position
        self.refresh()

    def refresh(self) -> View:
        with self._lock:
            snapshot = self.session.snapshot()
            if snapshot["attached"]:
                self.queued = None
                self.released = ""
                self._seen_lease = snapshot["lease_id"]
            elif self._seen_lease and not self.released:
                self.released = f"lease {self._seen_lease[:8]} ended" + (
                    f": {snapshot['lost']}" if snapshot["lost"] else ""
                )
            used = memory_used(snapshot) if snapshot["attached"] else None
            view = render(snapshot, self.queued, self.released, used)
            changed_state = view.state != self.view.state
            self.view = view
            self.headline.value = f"<b>{_escape(view.headline)}</b>" + (
                f" &nbsp;<span style='opacity:0.8'>{_escape(view.detail)}</span>"
                if view.detail
                else ""
            )
            self.detail.value = _escape(view.times)
            self.button.disabled = self._stop.is_set() or not view.can_release
            if view.can_release and snapshot["running_cell"] is not None:
                self.message.value = (
                    "<small>A cell is running: Release acts when it ends. To free the GPU now "
                    "use the GPU panel (status bar item <b>GPU</b> in JupyterLab).</small>"
                )
            elif self.message.value.startswith("<small>A cell is running"):
                self.message.value = ""
            self.remove_class(f"jp-gpuattach-{self._shown_state}")
            self.add_class(f"jp-gpuattach-{view.state}")
            self._shown_state = view.state
            if changed_state and self._handle is not None:
                self._handle.update(self)  # keeps the text fallback in step
            return view

    def _on_release(self, button: Any) -> None:
        """Runs when the kernel is idle (the click waited for the cell to end)."""
        from jupyter_gpuattach.session import GPUError

        try:
            line = self.session.release(reason="released from the status widget")
        except GPUError as exc:
            self.message.value = _escape(str(exc))
        else:
            self.message.value = _escape(line)
        self.refresh()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):
            bundle["text/plain"] = self.view.text
        return bundle


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=False)


def show_status(session: Any) -> GPUStatusWidget | None:
    """Show the live widget if this kernel can; None where only text works."""
    if not can_show_widgets(session.shell):
        return None
    return GPUStatusWidget(session).show()

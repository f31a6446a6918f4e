"""A live GPU status widget in the notebook: ``%gpu status`` and ``%gpu attach`` show it.

Plain ipywidgets (no custom JavaScript). One background thread per session
(a `Refresher`) looks at ``GPUSession.snapshot()`` once a second and updates
every status widget of the session that is on display, so an earlier widget
never goes on saying "attached" after a release.

Quiet when nothing happens. Every widget message goes over the kernel's
iopub channel, and jupyter_server counts each one as kernel and server
activity: a widget that ticked once a second would keep a server alive
forever, out of reach of the server's culler and jupyterhub-idle-culler.
So a widget sends a message only when what it shows changes, and what it
shows changes only at events (attach, a cell's start and end, release)
while the slice is held idle: "held since 14:02:20", "releases at
14:03:20 UTC if idle" as wall-clock times, never counting down. Only while
a remote cell runs do the held and busy figures tick (a running cell is
activity anyway).

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

import html
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.units import format_size
from jupyter_gpuattach.figures import (
    busy_text,
    duration_text,
    held_busy_text,
    memory_text,
    queue_text,
)
from jupyter_gpuattach.worker_memory import memory_used as worker_memory_used

REFRESH_SECONDS = 1.0
# Widgets of one session that follow the live state; an older one says it is
# superseded (Run All on a long notebook would otherwise multiply messages).
MAX_FOLLOWED = 10
# A deadline that moves by less than this is not shown again (the snapshot's
# wall-clock figures jitter by microseconds between looks).
DEADLINE_JITTER = 1.0

RUNNING_HINT = (
    "<small>A cell is running: Release acts when it ends. To free the GPU now "
    "use the GPU panel (status bar item <b>GPU</b> in JupyterLab).</small>"
)

try:
    import ipywidgets as widgets
except ImportError:  # pragma: no cover - the jupyter extra installs it
    widgets = None


@dataclass
class View:
    """What the widget shows, as data (tested without a kernel)."""

    # detached | attaching | queued | attached | idle | released | revoked |
    # preempted | expired | lost | superseded
    state: str
    headline: str
    detail: str = ""
    times: str = ""
    can_release: bool = False
    running: bool = False

    @property
    def text(self) -> str:
        """One line, for frontends that cannot show widgets."""
        return " · ".join(part for part in (self.headline, self.detail, self.times) if part)


SUPERSEDED = View(
    "superseded",
    "GPU status: superseded by a newer status widget",
    "run %gpu status for the current state",
)


def clock_text(epoch: float, now: float | None = None) -> str:
    """A wall-clock time as a user reads it: ``14:03:20 UTC``, with the day
    when it is not today (``Tue 04 Mar 14:03:20 UTC``)."""
    moment = time.localtime(epoch)
    today = time.localtime(time.time() if now is None else now)
    same_day = (moment.tm_year, moment.tm_yday) == (today.tm_year, today.tm_yday)
    text = time.strftime("%H:%M:%S" if same_day else "%a %d %b %H:%M:%S", moment)
    zone = time.strftime("%Z", moment)
    return f"{text} {zone}" if zone else text


def slice_text(snapshot: dict[str, Any]) -> str:
    spec = snapshot["slice"]
    if 0 < spec["fraction"] < 1:
        return f"{spec['fraction']:g} of the device"
    if spec["memory_bytes"]:
        return f"{format_size(spec['memory_bytes'])} slice"
    if spec["gpus"] > 1:
        return f"{spec['gpus']} whole devices"
    return "whole device"


def idle_release_at(snapshot: dict[str, Any]) -> float | None:
    """When auto mode gives the slice back if no GPU cell starts (wall clock)."""
    at = snapshot.get("idle_release_at")
    if at is not None:
        return float(at)
    idle_in = snapshot.get("idle_release_in")
    return time.time() + idle_in if idle_in is not None else None


def times_text(snapshot: dict[str, Any], clock: Callable[[float], str] = clock_text) -> str:
    """Held and busy time: counting while a cell runs, else fixed until the next event."""
    held, busy = snapshot["held_seconds"], snapshot["busy_seconds"]
    if snapshot["running_cell"] is not None:
        return held_busy_text(held, busy)
    granted = snapshot.get("granted_at")
    if granted is None:
        granted = time.time() - held
    text = f"held since {clock(granted)}, {busy_text(busy)}"
    idle = snapshot.get("idle_seconds")
    if snapshot.get("auto") and idle is not None:
        text += f" · auto release after {duration_text(idle)} idle"
    return text


_PREFIXES = {
    "revoked": re.compile(r"^revoked(?: by [\w.@+-]+)?:?\s*"),
    "preempted": re.compile(r"^preempted:?\s*"),
}


def ended_view(ended: dict[str, Any], hint: str) -> View:
    """A lease that ended: someone's choice (released, revoked, preempted,
    expired) is said as such; only a worker or host that died is "lost"."""
    state = str(ended.get("state") or "")
    reason = str(ended.get("reason") or "").strip()
    by = str(ended.get("by") or "")
    pattern = _PREFIXES.get(state)
    why = pattern.sub("", reason) if pattern is not None else reason
    if state == "released":
        detail = reason or "released"
        if by and f"by {by}" not in detail:
            detail += f" by {by}"
        return View("released", "GPU released", f"{detail} · {hint}")
    if state == "revoked":
        headline = "GPU revoked by admin" + (f": {why}" if why else "")
        who = f"revoked by {by} · " if by else ""
        return View("revoked", headline, f"{who}{hint}")
    if state == "preempted":
        headline = "GPU preempted" + (f": {why}" if why else "")
        return View("preempted", headline, hint)
    if state == "lost":
        return View("lost", f"GPU lost: {reason or 'the worker is gone'}", hint)
    return View(state or "released", f"GPU lease ended: {reason or state}", hint)


def render(
    snapshot: dict[str, Any],
    queued: pb.QueuePosition | None = None,
    released: str = "",
    memory_used: int | None = None,
    clock: Callable[[float], str] = clock_text,
    attaching: bool = False,
) -> View:
    """The view of one snapshot.

    `released` is what to say when the snapshot has no ``ended`` (a session
    that does not report it) but a lease seen here has ended.
    """
    lost = snapshot.get("lost") or ""
    if snapshot["attached"]:
        memory = memory_text(memory_used, int(snapshot["memory_bytes"] or 0)) or "-"
        detail = f"{snapshot['device']} · {slice_text(snapshot)} · memory {memory}"
        times = times_text(snapshot, clock)
        if lost:
            return View("lost", f"GPU lost: {lost}", detail, times)
        running = snapshot["running_cell"] is not None
        deadline = idle_release_at(snapshot)
        if deadline is not None and not running:
            headline = f"GPU ● attached · releases at {clock(deadline)} if idle"
            return View("idle", headline, detail, times, can_release=True)
        return View("attached", "GPU ● attached", detail, times, can_release=True, running=running)
    if queued is not None:
        headline = "GPU " + queue_text(
            queued.position, queued.queue_length, queued.estimated_wait_seconds
        )
        return View("queued", headline, queued.reason)
    if attaching:
        return View("attaching", "GPU attaching…", "asking the broker for a slice")
    hint = "attaches on the next GPU cell" if snapshot["auto"] else "run %gpu attach"
    ended = snapshot.get("ended")
    if ended:
        return ended_view(ended, hint)
    if lost:
        return View("lost", f"GPU lost: {lost}", hint)
    if released:
        return View("released", "GPU released", f"{released} · {hint}")
    return View("detached", "GPU not attached", hint)


def memory_used(snapshot: dict[str, Any]) -> int | None:
    """Memory the lease's worker uses, when it runs on this host (else None).

    GPU devices: the worker's memory on the device, from NVML. The CPU
    backend: the worker's resident memory.
    """
    return worker_memory_used(
        snapshot.get("worker_pid"),
        str(snapshot.get("device_name", "")),
        str(snapshot.get("worker_endpoint", "")),
        str(snapshot.get("worker_host", "")),
    )


def can_show_widgets(shell: Any) -> bool:
    """ipywidgets is installed and this is a kernel (comms reach a frontend)."""
    return widgets is not None and getattr(shell, "kernel", None) is not None


# ------------------------------------------------------------ refresher ---


class Refresher:
    """One per session: reads the session's snapshot and updates every widget
    of the session on display, each sending only what changed."""

    def __init__(self, session: Any, interval: float = REFRESH_SECONDS) -> None:
        self.session = session
        self.interval = interval
        self.widgets: list[GPUStatusWidget] = []
        self.queued: pb.QueuePosition | None = None
        self.view: View | None = None
        self.attaching = False  # an attach is under way (before the first queue place)
        self.lock = threading.RLock()
        self._base: View | None = None  # the last view without the memory figure
        self._memory: int | None = None
        self._lease = ""  # the lease last seen attached
        self._granted: float | None = None  # its grant time, as first seen
        self._deadline: float | None = None  # the idle deadline shown
        self._clocks: dict[int, str] = {}  # wall-clock texts, fixed once written
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------ life ---

    def follow(self, widget: GPUStatusWidget) -> None:
        with self.lock:
            self.widgets.append(widget)
            while len(self.widgets) > MAX_FOLLOWED:
                self.widgets.pop(0).supersede()
            if self.view is not None:
                widget.apply(self.view)

    def unfollow(self, widget: GPUStatusWidget) -> None:
        with self.lock:
            if widget in self.widgets:
                self.widgets.remove(widget)

    def start(self) -> None:
        with self.lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="gpuattach-widget"
                )
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - never let a refresh error reach the user's cell
                continue

    # --------------------------------------------------------- updates ---

    def _clock(self, epoch: float) -> str:
        """`clock_text`, the same text for the same second as long as it is shown
        (a date that appears at midnight would be a message with no event)."""
        key = round(epoch)
        text = self._clocks.get(key)
        if text is None:
            if len(self._clocks) > 64:
                self._clocks.clear()
            text = self._clocks[key] = clock_text(key)
        return text

    def _steady(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        """The snapshot with its wall-clock figures held steady between events."""
        snapshot = dict(snapshot)
        lease = snapshot.get("lease_id", "") if snapshot["attached"] else ""
        if lease and lease != self._lease:
            self._lease, self._granted, self._deadline = lease, None, None
            self.queued = None
            for widget in self.widgets:
                widget.note = ""
        if snapshot["attached"]:
            if self._granted is None:
                granted = snapshot.get("granted_at")
                self._granted = (
                    time.time() - snapshot["held_seconds"] if granted is None else granted
                )
            snapshot["granted_at"] = self._granted
            deadline = idle_release_at(snapshot)
            if deadline is None or snapshot["running_cell"] is not None:
                self._deadline = None
            elif self._deadline is None or abs(deadline - self._deadline) >= DEADLINE_JITTER:
                self._deadline = deadline
            snapshot["idle_release_at"] = self._deadline
        return snapshot

    def _fallback_released(self, snapshot: dict[str, Any]) -> str:
        if snapshot["attached"] or snapshot.get("ended") or not self._lease:
            return ""
        lost = snapshot.get("lost") or ""
        return f"lease {self._lease[:8]} ended" + (f": {lost}" if lost else "")

    def refresh(self, sample: bool = False) -> View:
        """Look once; update the widgets where their view changed. `sample`:
        measure the worker's memory now (a new widget, an action just done), so
        the figure agrees with the line printed beside it."""
        with self.lock:
            snapshot = self._steady(self.session.snapshot())
            released = self._fallback_released(snapshot)
            attaching = self.attaching and not snapshot["attached"]
            base = render(snapshot, self.queued, released, None, self._clock, attaching)
            if snapshot["attached"] and (sample or base.running or base != self._base):
                # Sampled at events and while a cell runs, not while idle: a
                # resident size that moves by a page is no reason for a message.
                self._memory = memory_used(snapshot)
            memory = self._memory if snapshot["attached"] else None
            view = render(snapshot, self.queued, released, memory, self._clock, attaching)
            self._base = base
            before, self.view = self.view, view
            self.widgets = [w for w in self.widgets if w.comm is not None]
            for widget in self.widgets:
                widget.apply(view)
            if before is not None and before.state != view.state:
                for widget in list(self.widgets):
                    widget.update_display()  # the text fallback follows the state
            return view


_REFRESHERS: dict[int, Refresher] = {}
_REFRESHERS_LOCK = threading.Lock()


def refresh_widgets(session: Any) -> None:
    """Bring every status widget of `session` up to date now (after an action
    whose line is printed next to them), if the session has any."""
    with _REFRESHERS_LOCK:
        refresher = _REFRESHERS.get(id(session))
    if refresher is not None and refresher.session is session:
        refresher.refresh(sample=True)


def refresher_for(session: Any, interval: float = REFRESH_SECONDS) -> Refresher:
    """The session's refresher (one per session, made on first use)."""
    with _REFRESHERS_LOCK:
        refresher = _REFRESHERS.get(id(session))
        if refresher is None or refresher.session is not session:
            refresher = _REFRESHERS[id(session)] = Refresher(session, interval)
        return refresher


# --------------------------------------------------------------- widget ---


class GPUStatusWidget(widgets.VBox if widgets is not None else object):  # type: ignore[misc]
    """The status of one kernel's GPU session; its session's refresher keeps it current."""

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
            # Never narrower than its label: a narrow notebook wraps the row instead.
            layout=widgets.Layout(width="auto", min_width="max-content", flex="0 0 auto"),
        )
        self.button.on_click(self._on_release)
        text = widgets.VBox(
            [self.headline, self.detail], layout=widgets.Layout(flex="1 1 16em", min_width="0")
        )
        row = widgets.HBox(
            [text, self.button],
            layout=widgets.Layout(align_items="center", flex_flow="row wrap", grid_gap="4px"),
        )
        super().__init__([row, self.message])
        self.add_class("jp-gpuattach-widget")
        self.view = View("detached", "")
        self.note = ""  # what the last click on this widget's button did
        self.superseded = False
        self._handle: Any = None
        self.refresher = refresher_for(session, refresh_seconds)
        self.refresher.follow(self)
        self.refresher.refresh(sample=True)

    # ------------------------------------------------------------ life ---

    def show(self) -> GPUStatusWidget:
        """Display it; it follows the session's state with its earlier widgets."""
        from IPython.display import display

        show: Any = display  # untyped in IPython
        self._handle = show(self, display_id=True)
        self.refresher.start()
        return self

    def stop(self) -> None:
        """Stop following the session (the widget then says it is superseded)."""
        self.refresher.unfollow(self)
        self.supersede()

    def supersede(self) -> None:
        self.superseded = True
        self.apply(SUPERSEDED)
        self.update_display()

    # --------------------------------------------------------- updates ---

    def __call__(self, position: pb.QueuePosition) -> None:
        """Queue positions while an attach waits (the magics' show_queue hook)."""
        self.refresher.queued = position
        self.refresher.refresh()

    def refresh(self) -> View:
        return self.view if self.superseded else self.refresher.refresh()

    def apply(self, view: View) -> None:
        """Show `view`; traits that keep their value send nothing."""
        self.view = view
        self.headline.value = f"<b>{_phrases(view.headline)}</b>" + (
            f" &nbsp;<span style='opacity:0.8'>{_phrases(view.detail)}</span>"
            if view.detail
            else ""
        )
        self.detail.value = _phrases(view.times)
        self.button.disabled = self.superseded or not view.can_release
        self.message.value = RUNNING_HINT if view.can_release and view.running else self.note
        state = f"jp-gpuattach-{view.state}"
        classes: tuple[str, ...] = tuple(self._dom_classes)  # type: ignore[has-type]
        if state not in classes:
            kept = [c for c in classes if not c.startswith("jp-gpuattach-")]
            self._dom_classes = (*kept, "jp-gpuattach-widget", state)  # one message

    def update_display(self) -> None:
        if self._handle is not None and self.comm is not None:
            try:
                self._handle.update(self)
            except Exception:  # noqa: BLE001 - a closed frontend must not fail the kernel's cell
                pass

    def _on_release(self, button: Any) -> None:
        """Runs when the kernel is idle (the click waited for the cell to end)."""
        from jupyter_gpuattach.session import GPUError

        try:
            line = self.session.release(reason="released from the status widget")
        except GPUError as exc:
            self.note = _escape(str(exc))
        else:
            self.note = _escape(line)
        self.refresher.refresh()  # every widget of the session, this one with its note

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        if not self.superseded:
            try:
                self.refresher.refresh()  # the text is the state at the moment it is written
            except Exception:  # noqa: BLE001 - show the last known state rather than nothing
                pass
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):
            bundle["text/plain"] = self.view.text
        return bundle


def _escape(text: str) -> str:
    return html.escape(text, quote=False)


# ipywidgets' HTML does not wrap by default and clips what does not fit;
# here lines wrap between words, never inside one (a lease id, a figure).
_WRAP = "white-space:normal;word-break:normal;overflow-wrap:normal;line-height:1.5"


def _phrases(text: str) -> str:
    """Escaped HTML that wraps between words in a narrow notebook, the
    `` · `` separators staying with the phrase before them."""
    parts = [_escape(p) for p in text.split(" · ")]
    return f"<span style='{_WRAP}'>" + "&nbsp;· ".join(parts) + "</span>"


def show_status(session: Any) -> GPUStatusWidget | None:
    """Show the live widget if this kernel can; None where only text works."""
    if not can_show_widgets(session.shell):
        return None
    return GPUStatusWidget(session).show()

"""An IPython shell whose every output goes to the cell that is running.

The worker runs cells with the same machinery as ipykernel (magics,
last-expression display, display hooks, matplotlib's inline backend), but
instead of publishing on ZMQ it hands each output to the running cell's
sink, which the Execute RPC streams back to the kernel while the cell runs.
"""

from __future__ import annotations

import base64
import builtins
import json
import queue
import sys
import threading
from collections.abc import Callable
from types import CodeType, TracebackType
from typing import Any

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

from gpuattach_broker.protos import gpuattach_pb2 as pb


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    return repr(value)


def to_json(value: Any) -> str:
    return json.dumps(value or {}, default=_json_default)


class CellSink:
    """Outputs of one running cell, consumed by the Execute RPC."""

    def __init__(self) -> None:
        # Text as (stream name, text): cheap to make on the cell's thread; the
        # Execute RPC joins runs of it into one message.
        self.outputs: queue.Queue[pb.ExecuteOutput | tuple[str, str] | None] = queue.Queue()
        self.input_replies: queue.Queue[str | None] = queue.Queue()

    def put(self, output: pb.ExecuteOutput) -> None:
        self.outputs.put(output)

    def stream(self, name: str, text: str) -> None:
        if text:
            self.outputs.put((name, text))

    def request_input(self, prompt: str, password: bool = False) -> str:
        self.put(pb.ExecuteOutput(input_request=pb.InputRequest(prompt=prompt, password=password)))
        reply = self.input_replies.get()
        if reply is None:
            raise EOFError("the kernel closed the input stream")
        return reply

    def close(self) -> None:
        self.outputs.put(None)


class _SinkRouter:
    """Where output goes right now: the running cell's sink, else nowhere."""

    def __init__(self) -> None:
        self._sink: CellSink | None = None
        self._lock = threading.Lock()

    @property
    def sink(self) -> CellSink | None:
        return self._sink

    def set(self, sink: CellSink | None) -> None:
        with self._lock:
            self._sink = sink


ROUTER = _SinkRouter()


class SinkStream:
    """A text stream (stdout/stderr) that forwards writes to the running cell."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, name: str, fallback: Any) -> None:
        self.name = name
        self._fallback = fallback

    def write(self, text: str) -> int:
        sink = ROUTER.sink
        if sink is None:
            return int(self._fallback.write(text))
        sink.stream(self.name, text)
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if ROUTER.sink is None:
            self._fallback.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return int(self._fallback.fileno())

    @property
    def closed(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class SinkDisplayHook(DisplayHook):
    """The last expression's value becomes the cell's execute_result."""

    def start_displayhook(self) -> None:
        self._format: tuple[dict[str, Any], dict[str, Any]] | None = None

    def write_output_prompt(self) -> None:
        pass

    def write_format_data(self, format_dict: dict[str, Any], md_dict: Any = None) -> None:
        self._format = (format_dict, md_dict or {})

    def finish_displayhook(self) -> None:
        sink = ROUTER.sink
        if sink is not None and self._format is not None:
            data, metadata = self._format
            sink.put(
                pb.ExecuteOutput(
                    execute_result=pb.DisplayData(
                        data_json=to_json(data), metadata_json=to_json(metadata)
                    )
                )
            )
        self._format = None


class SinkDisplayPublisher(DisplayPublisher):
    """display(), figures and rich reprs become display_data messages."""

    def publish(
        self,
        data: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        source: Any = None,
        *,
        transient: dict[str, Any] | None = None,
        update: bool = False,
        **kwargs: Any,
    ) -> None:
        sink = ROUTER.sink
        if sink is None:
            return
        display_id = (transient or {}).get("display_id", "")
        sink.put(
            pb.ExecuteOutput(
                display=pb.DisplayData(
                    data_json=to_json(data),
                    metadata_json=to_json(metadata),
                    display_id=str(display_id or ""),
                    update=update,
                )
            )
        )

    def clear_output(self, wait: bool = False) -> None:
        sink = ROUTER.sink
        if sink is not None:
            sink.put(pb.ExecuteOutput(clear_output=pb.ClearOutput(wait=wait)))


# Code that raises into a cell on the worker's behalf (the interrupt handler):
# not the user's, so not in their traceback.
_HIDDEN_CODE: set[CodeType] = set()


def hide_from_tracebacks(fn: Callable[..., Any]) -> None:
    """Leave `fn`'s frame out of the tracebacks cells show."""
    _HIDDEN_CODE.add(fn.__code__)


def _drop_hidden_tail(tb: TracebackType | None) -> None:
    """Cut the innermost frames that are ours, in place (the exception's own
    `__traceback__` is the same chain, so IPython's history copy agrees)."""
    last_kept = None
    entry = tb
    while entry is not None:
        if entry.tb_frame.f_code in _HIDDEN_CODE:
            if last_kept is not None:
                last_kept.tb_next = None
            return
        last_kept = entry
        entry = entry.tb_next


class WorkerShell(InteractiveShell):
    """IPython semantics with outputs routed to the running cell's sink."""

    displayhook_class = SinkDisplayHook
    display_pub_class = SinkDisplayPublisher

    def init_io(self) -> None:
        super().init_io()  # type: ignore[no-untyped-call]  # IPython's, unannotated
        sys.stdout = SinkStream("stdout", sys.__stdout__)
        sys.stderr = SinkStream("stderr", sys.__stderr__)

    def showtraceback(self, exc_tuple: Any = None, *args: Any, **kwargs: Any) -> None:
        """As IPython's, without the interrupt handler's frame: a local Ctrl-C
        shows only the cell's frames, and formatting ours would parse this
        package's source (a second on a busy host) before the error reaches
        the notebook."""
        _drop_hidden_tail(exc_tuple[2] if exc_tuple is not None else sys.exc_info()[2])
        super().showtraceback(exc_tuple, *args, **kwargs)

    def _showtraceback(self, etype: Any, evalue: Any, stb: list[str]) -> None:
        sink = ROUTER.sink
        if sink is None:
            print(self.InteractiveTB.stb2text(stb), file=sys.__stderr__)
            return
        sink.put(
            pb.ExecuteOutput(
                error=pb.ErrorInfo(
                    ename=getattr(etype, "__name__", str(etype)),
                    evalue=str(evalue),
                    traceback=list(stb),
                )
            )
        )


def make_shell() -> WorkerShell:
    """The worker's shell: IPython semantics, inline figures, remote input()."""
    from traitlets.config import Config

    config = Config()
    # The kernel keeps the user's history; the worker must not write it too.
    config.HistoryManager.enabled = False
    shell = WorkerShell.instance(config=config)
    builtins.input = _remote_input
    try:
        import matplotlib  # noqa: F401

        shell.enable_matplotlib("inline")  # type: ignore[no-untyped-call]  # IPython's
    except Exception:  # noqa: BLE001 - inline figures are a nicety: a broken matplotlib still runs
        pass
    return shell


def _remote_input(prompt: Any = "") -> str:
    sink = ROUTER.sink
    if sink is None:
        raise EOFError("input() outside a running cell")
    return sink.request_input(str(prompt))


def run_in_sink(sink: CellSink, fn: Callable[[], Any]) -> Any:
    ROUTER.set(sink)
    try:
        return fn()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            ROUTER.set(None)

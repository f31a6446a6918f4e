"""Showing a remote cell's output in the notebook exactly as a local cell would.

Streams go to the kernel's stdout/stderr, rich data through its display
publisher, the last expression through its display hook (so it shows as
``Out[n]``), and a remote exception becomes a local one whose traceback is
the remote traceback and whose name is the remote exception's name.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from gpuattach_broker.protos import gpuattach_pb2 as pb


class RemoteCellError(Exception):
    """An exception raised by a cell on the GPU worker."""

    def __init__(self, ename: str, evalue: str, traceback: list[str]) -> None:
        super().__init__(evalue)
        self.ename = ename
        self.evalue = evalue
        self.remote_traceback = traceback

    def __str__(self) -> str:
        return self.evalue

    def _render_traceback_(self) -> list[str]:
        """IPython's hook for an exception that renders its own traceback.

        Besides showing it, IPython 9 formats every cell's error again for its
        history; without this it would format the kernel's own frames (our
        magic's), parsing their source files: seconds on a busy machine, added
        to every remote error, and a traceback the user never sees."""
        return self.remote_traceback or [f"{self.ename}: {self.evalue}"]


_ERROR_TYPES: dict[str, type[RemoteCellError]] = {}


def remote_error(info: pb.ErrorInfo) -> RemoteCellError:
    """An exception instance whose class carries the remote exception's name."""
    name = info.ename or "RemoteError"
    cls = _ERROR_TYPES.get(name)
    if cls is None:
        cls = _ERROR_TYPES[name] = type(name, (RemoteCellError,), {"__module__": "builtins"})
    return cls(info.ename, info.evalue, list(info.traceback))


def show_remote_traceback(
    shell: Any, etype: Any, value: BaseException, tb: Any, tb_offset: Any = None
) -> None:
    """IPython custom exception handler: show the remote traceback, not ours.

    IPython ignores the handler's return value, so it publishes the traceback
    itself, through the same path as any error (``error`` message in ipykernel).
    """
    assert isinstance(value, RemoteCellError)
    shell._showtraceback(etype, value, value._render_traceback_())
    return None


class OutputRenderer:
    """Publishes remote outputs in the kernel; remembers the remote error."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.error: pb.ErrorInfo | None = None

    def __call__(self, output: pb.ExecuteOutput) -> None:
        kind = output.WhichOneof("msg")
        if kind == "stream":
            stream = sys.stderr if output.stream.name == "stderr" else sys.stdout
            stream.write(output.stream.text)
            stream.flush()
        elif kind == "display":
            self._display(output.display)
        elif kind == "execute_result":
            self._execute_result(output.execute_result)
        elif kind == "clear_output":
            self.shell.display_pub.clear_output(wait=output.clear_output.wait)
        elif kind == "error":
            self.error = output.error

    def _display(self, display: pb.DisplayData) -> None:
        transient = {"display_id": display.display_id} if display.display_id else None
        sys.stdout.flush()
        sys.stderr.flush()
        self.shell.display_pub.publish(
            data=json.loads(display.data_json),
            metadata=json.loads(display.metadata_json or "{}"),
            transient=transient,
            update=display.update,
        )

    def _execute_result(self, result: pb.DisplayData) -> None:
        hook = self.shell.displayhook
        sys.stdout.flush()
        hook.start_displayhook()
        hook.write_output_prompt()
        hook.write_format_data(
            json.loads(result.data_json), json.loads(result.metadata_json or "{}")
        )
        hook.finish_displayhook()


def answer_input(request: pb.InputRequest) -> str:
    """input() in a remote cell prompts in the notebook."""
    if request.password:
        import getpass

        return getpass.getpass(request.prompt)
    return input(request.prompt)

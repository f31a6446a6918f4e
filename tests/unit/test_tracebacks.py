"""Tracebacks show the user's frames only, and cost no parsing of ours.

IPython formats a cell's error twice: to show it, and (IPython 9) again for
its history. Both copies of a remote error must be the remote traceback, and
an interrupted cell on the worker must not carry the interrupt handler's
frame: formatting it parses our source files, which took seconds on a busy
host before the error reached the notebook.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

import pytest
from IPython.core.interactiveshell import InteractiveShell

from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.worker.service import install_interrupt_handler
from gpuattach_broker.worker.shell import WorkerShell
from jupyter_gpuattach.output import remote_error


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    yield shell
    InteractiveShell.clear_instance()


def test_a_remote_error_renders_its_remote_traceback_in_history_too(
    shell: InteractiveShell,
) -> None:
    remote = ["KeyError  Traceback (most recent call last)", "Cell In[3], line 1", "KeyError: 'x'"]
    shell.user_ns["boom"] = remote_error(
        pb.ErrorInfo(ename="KeyError", evalue="'x'", traceback=remote)
    )
    result = shell.run_cell("raise boom", store_history=True)
    assert result.error_in_exec is not None
    assert type(result.error_in_exec).__name__ == "KeyError"
    exceptions = getattr(shell.history_manager, "exceptions", None)
    if exceptions is not None:  # IPython 9 keeps a formatted copy per cell
        stored = exceptions[result.execution_count]
        assert stored["traceback"] == remote


def test_an_interrupted_worker_cell_shows_only_the_cells_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Executor:
        running_cell = True

    previous = signal.getsignal(signal.SIGINT)
    install_interrupt_handler(Executor())  # type: ignore[arg-type]  # only running_cell is read
    shown: list[list[str]] = []
    shell = WorkerShell.instance()
    try:
        monkeypatch.setattr(shell, "_showtraceback", lambda etype, value, stb: shown.append(stb))
        code = f"import os, signal\nos.kill({os.getpid()}, signal.SIGINT)\nwhile True:\n    pass"
        result = shell.run_cell(code, store_history=True)  # type: ignore[no-untyped-call]  # IPython's, unannotated
    finally:
        signal.signal(signal.SIGINT, previous)
        WorkerShell.clear_instance()
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    text = "\n".join(shown[0])
    assert "KeyboardInterrupt" in text
    assert "install_interrupt_handler" not in text
    assert "gpuattach_broker" not in text
    frames = []
    tb = result.error_in_exec.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert frames[-1] == "<module>", frames
    assert sys.exc_info() == (None, None, None)

"""``%gpu`` and ``%%gpu``: the notebook user's handle on a GPU slice.

While attached, every cell runs on the worker. That is done with an input
transformer that rewrites the cell into a ``%%gpu`` call, so the history,
``In[n]`` and the execution count stay the kernel's own, and the cell's
output and errors are the remote ones. Cells that manage the slice
(``%gpu ...``) and ``%%local`` cells stay in the kernel.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display as _display

from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.units import parse_duration, parse_size
from jupyter_gpuattach.figures import queue_text
from jupyter_gpuattach.gpu_cells import names_loaded, needs_gpu
from jupyter_gpuattach.magic_help import ACTIONS as HELP_ACTIONS
from jupyter_gpuattach.magic_help import (
    check_line,
    did_you_mean,
    help_text,
    install_completer,
    usage,
    wants_help,
)
from jupyter_gpuattach.session import AttachOptions, GPUError, GPUSession, LeaseEnded

USAGE = usage()  # the forms, one per line (%gpu --help prints them)
SEE_HELP = "; %gpu --help for usage"  # errors stay one line
ACTIONS = tuple(HELP_ACTIONS)
# Cells starting with these run in the kernel even while attached.
LOCAL_PREFIXES = ("%gpu", "%%gpu", "%load_ext", "%reload_ext", "%unload_ext")
DEFAULT_IDLE = "60s"
display: Any = _display  # IPython's display, untyped


def routed(source: str, gpu: bool) -> list[str]:
    """The cell as a call of ``%%gpu``; `gpu` says whether it counts as GPU work."""
    kind = "gpu" if gpu else "other"
    return [f"get_ipython().run_cell_magic('gpu', '--routed {kind}', {source!r})\n"]


class RemoteCellRouter:
    """Input transformer deciding where a cell runs.

    Manual ``%gpu attach``: every cell runs on the worker. Auto mode: only a
    cell that needs the GPU (see gpu_cells) runs there, attaching first if
    no slice is held; the others run here on the kernel's synced copy, so
    they neither hold the slice nor count as busy. ``%%local`` always runs
    here; what it changes goes to the worker before the next GPU cell.
    """

    # Routing waits for syncs and applies lease ends: keep it out of
    # IPython's is-complete checks, which run transformers without a cell.
    has_side_effects = True

    def __init__(self, session: GPUSession) -> None:
        self.session = session

    def __call__(self, lines: list[str]) -> list[str]:
        first = next((i for i, line in enumerate(lines) if line.strip()), None)
        if first is None:
            return lines
        session = self.session
        notes = [note for note in [*session.take_notes(), session.settle()] if note]
        if notes:
            # Shown as output of this cell, apart from what the cell itself prints.
            display({"text/plain": "\n".join(notes)}, raw=True)
        head = lines[first].lstrip()
        if head.startswith("%%local"):
            session.begin_local_cell()
            return lines[first + 1 :]
        if head.startswith(LOCAL_PREFIXES):
            return lines
        source = "".join(lines)
        auto = session.auto
        if session.attached and (auto is None or auto.by_policy):
            return routed(source, True)
        if auto is not None and (
            needs_gpu(source, session.shell.user_ns)[0] or _uses_worker_only(source, session)
        ):
            return routed(source, True)
        session.begin_local_cell()
        return lines


def _uses_worker_only(source: str, session: GPUSession) -> bool:
    """The cell names something that lives only on the worker (it could not
    come home, e.g. an iterator over a DataLoader with workers): run it there."""
    if not session.attached:
        return False
    session.wait_for_sync()
    remote_only = session.sync.remote_only
    if not remote_only:
        return False
    return bool(names_loaded(source) & set(remote_only))


class QueueDisplay:
    """One line that updates in place while the request waits in the queue."""

    def __init__(self) -> None:
        self.handle: Any = None

    def __call__(self, position: pb.QueuePosition) -> None:
        text = "GPU " + queue_text(
            position.position, position.queue_length, position.estimated_wait_seconds
        )
        if position.reason:
            text += f" ({position.reason})"
        text += " · interrupt the kernel to give up"
        bundle = {"text/plain": text}
        if self.handle is None:
            self.handle = display(bundle, raw=True, display_id=True)
        else:
            self.handle.update(bundle, raw=True)


def _attach_options(args: Any) -> AttachOptions:
    if args.mem and args.fraction is not None:
        raise UsageError("%gpu attach: give --mem or --fraction, not both")
    options = AttachOptions()
    try:
        if args.mem:
            options.memory_bytes = parse_size(args.mem)
        if args.wait:
            options.wait_seconds = parse_duration(args.wait)
    except ValueError as exc:
        raise UsageError(f"%gpu attach: {exc}") from None
    if args.fraction is not None:
        if not 0 < args.fraction <= 1:
            raise UsageError(f"%gpu attach: --fraction must be in (0, 1], got {args.fraction}")
        options.fraction = args.fraction
    if args.gpus is not None:
        if args.gpus < 1:
            raise UsageError(f"%gpu attach: --gpus must be at least 1, got {args.gpus}")
        options.gpus = args.gpus
    return options


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as a UsageError (one line) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    """The options of %gpu / %%gpu (magic_help.ACTIONS says which action takes which;
    %gpu --help prints them)."""
    parser = _Parser(prog="%gpu", add_help=False)
    parser.add_argument("action", nargs="?", default=None)
    parser.add_argument("switch", nargs="?", default=None)
    parser.add_argument("--idle", default="")
    parser.add_argument("--routed", default="")
    parser.add_argument("--mem", default="")
    parser.add_argument("--fraction", type=float, default=None)
    parser.add_argument("--gpus", type=int, default=None)
    parser.add_argument("--wait", default="")
    parser.add_argument("--force", action="store_true")
    return parser


PARSER = _parser()


@magics_class
class GPUMagics(Magics):
    def __init__(self, shell: Any, session: GPUSession) -> None:
        super().__init__(shell)
        self.session = session
        install_completer(shell)

    def _parse(self, line: str) -> argparse.Namespace:
        try:
            return PARSER.parse_args(shlex.split(line))
        except ValueError as exc:  # shlex: an unclosed quote
            raise UsageError(f"%gpu: {exc}{SEE_HELP}") from None
        except UsageError as exc:
            raise UsageError(f"%gpu: {exc}{SEE_HELP}") from None

    @line_cell_magic
    def gpu(self, line: str, cell: str | None = None) -> None:
        """Attach a GPU slice to this kernel, run cells on it, release it.

        %gpu attach [--mem SIZE | --fraction F] [--gpus N] [--wait DURATION]
        %gpu auto [--idle DURATION] [--mem SIZE | --fraction F]   (attach on demand)
        %gpu auto off
        %gpu release [--force]
        %gpu status
        %%gpu [--mem SIZE | --fraction F] [--wait DURATION]   (one cell on the GPU)
        %%local   (one cell in the kernel while attached)
        """
        asked = wants_help(line)
        if asked is not None:
            print(help_text(asked or None, cell=cell is not None))
            return
        mistake = check_line(line, cell=cell is not None)
        if mistake:
            raise UsageError(mistake)
        args = self._parse(line)
        try:
            if cell is not None:
                self._run_cell(args, cell)
                return
            action = args.action or "status"
            if action not in ACTIONS:
                hint = did_you_mean(action, ACTIONS)
                raise UsageError(f"%gpu: unknown action {action!r}{hint}{SEE_HELP}")
            if args.switch is not None and action != "auto":
                raise UsageError(f"%gpu {action}: unexpected {args.switch!r}{SEE_HELP}")
            if action == "attach":
                options = _attach_options(args)
                print(self._attach(options))
            elif action == "release":
                print(self.session.release(force=args.force))
                self._refresh_widgets()
            elif action == "auto":
                print(self._auto(args))
                self._refresh_widgets()
            else:
                print(self.session.status())
                self._show_widget()
        except GPUError as exc:
            raise UsageError(str(exc)) from None

    def _auto(self, args: Any) -> str:
        if args.switch == "off":
            return self.session.disable_auto()
        if args.switch not in (None, "on"):
            raise UsageError(f"%gpu auto: expected 'off' or options, got {args.switch!r}{SEE_HELP}")
        try:
            idle = parse_duration(args.idle or DEFAULT_IDLE)
        except ValueError as exc:
            raise UsageError(f"%gpu auto: {exc}") from None
        if idle < 0:
            raise UsageError("%gpu auto: --idle must be a duration such as 60s")
        return self.session.enable_auto(_attach_options(args), idle, default_idle=not args.idle)

    def _run_cell(self, args: Any, cell: str) -> None:
        if args.action is not None:
            raise UsageError(f"%%gpu takes options only, not {args.action!r}{SEE_HELP}")
        session = self.session
        gpu = args.routed != "other"
        if session.attached:
            try:
                session.run_cell(cell, gpu=gpu)
                return
            except LeaseEnded as ended:
                # Released from the panel, revoked, preempted: not a failure.
                print(ended)
            if session.auto is None and args.routed:
                # Manual mode, now detached: the cell runs in the kernel, as after
                # %gpu release.
                shell: Any = self.shell
                shell.run_cell(cell, store_history=False)
                return
        if session.auto is not None:
            # Auto mode: attach on demand and keep the slice until it is idle.
            options = session.auto.options if args.routed else _attach_options(args)
            print(self._attach(options))
            session.run_cell(cell, gpu=True)
            return
        # Not attached: attach for this one cell, then bring everything back.
        print(self._attach(_attach_options(args)))
        try:
            session.run_cell(cell)
        finally:
            if session.attached:
                print(session.release())
                self._refresh_widgets()

    def _show_widget(self) -> Any:
        """The live status widget where this kernel can show one (see widget.py), else None."""
        try:
            from jupyter_gpuattach.widget import show_status

            return show_status(self.session)
        except Exception:  # noqa: BLE001 - a frontend without widgets still gets the text lines
            return None

    def _status_display(self) -> Any:
        """What shows queue positions during an attach: the widget, or a text line."""
        return self._show_widget() or QueueDisplay()

    def _attach(self, options: AttachOptions) -> str:
        """Attach, the widget saying "attaching" until the line below it says how it went."""
        display_ = self._status_display()
        refresher = getattr(display_, "refresher", None)
        if refresher is not None:
            refresher.attaching = True
            refresher.refresh()
        try:
            return self.session.attach(options, show_queue=display_)
        finally:
            if refresher is not None:
                refresher.attaching = False
                refresher.refresh()  # "attached" before the attach line is printed

    def _refresh_widgets(self) -> None:
        """Every status widget of the session shows the state the line just printed."""
        try:
            from jupyter_gpuattach.widget import refresh_widgets

            refresh_widgets(self.session)
        except ImportError:  # no ipywidgets: text lines only
            pass

    def after_cell(self, result: Any = None) -> None:
        """post_run_cell: a kernel cell is over (its changes reach the worker
        before the next GPU cell)."""
        self.session.end_local_cell()

"""jupyter-gpuattach: a GPU slice for a notebook kernel only while its cells train.

``%load_ext jupyter_gpuattach`` adds the ``%gpu`` magics to a kernel.
"""

from __future__ import annotations

import atexit
from typing import Any

__version__ = "0.1.0"

_SESSION_ATTR = "_gpuattach_session"


def load_ipython_extension(ipython: Any) -> None:
    from jupyter_gpuattach.magics import GPUMagics, RemoteCellRouter
    from jupyter_gpuattach.output import RemoteCellError, show_remote_traceback
    from jupyter_gpuattach.session import GPUSession

    if getattr(ipython, _SESSION_ATTR, None) is not None:
        return
    session = GPUSession(ipython)
    setattr(ipython, _SESSION_ATTR, session)
    magics = GPUMagics(ipython, session)
    ipython.register_magics(magics)
    ipython.events.register("post_run_cell", magics.after_cell)
    session.magics = magics  # type: ignore[attr-defined]
    router = RemoteCellRouter(session)
    ipython.input_transformers_cleanup.insert(0, router)
    session.router = router  # type: ignore[attr-defined]
    _add_custom_exception(ipython, RemoteCellError, show_remote_traceback)
    atexit.register(session.shutdown)
    # No broker configured: the embedded one starts now, in the background,
    # while the notebook's first cells run (``import torch``), not at the
    # first attach.
    session.link.prestart()


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """The Jupyter server extension (REST API for the JupyterLab GPU item and panel)."""
    from jupyter_gpuattach.server.app import GPUAttachApp

    return [{"module": "jupyter_gpuattach", "app": GPUAttachApp}]


def unload_ipython_extension(ipython: Any) -> None:
    session = getattr(ipython, _SESSION_ATTR, None)
    if session is None:
        return
    if session.attached:
        print(session.release())
    session.disable_auto()
    magics = getattr(session, "magics", None)
    if magics is not None:
        ipython.events.unregister("post_run_cell", magics.after_cell)
    router = getattr(session, "router", None)
    if router in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.remove(router)
    atexit.unregister(session.shutdown)
    setattr(ipython, _SESSION_ATTR, None)


def _add_custom_exception(ipython: Any, exc_type: type, handler: Any) -> None:
    """Add a handler next to any custom exception handler already installed."""
    previous_types = tuple(getattr(ipython, "custom_exceptions", ()) or ())
    if exc_type in previous_types:
        return
    previous_handler = ipython.CustomTB if previous_types else None

    def dispatch(shell: Any, etype: Any, value: Any, tb: Any, tb_offset: Any = None) -> Any:
        if isinstance(value, exc_type):
            return handler(shell, etype, value, tb, tb_offset)
        return previous_handler(etype, value, tb, tb_offset) if previous_handler else None

    ipython.set_custom_exc((*previous_types, exc_type), dispatch)

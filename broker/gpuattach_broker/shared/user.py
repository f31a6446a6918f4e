"""Who the current user is, as the kernel, the Jupyter server and the broker tools name them.

Under JupyterHub the Hub's user name (``$JUPYTERHUB_USER``), which the
single-user server and every kernel it starts inherit; otherwise the
operating-system account. One definition, so a kernel's lease and the
server's GPU panel always speak of the same user.
"""

from __future__ import annotations

import getpass
import os


def current_user() -> str:
    return os.environ.get("JUPYTERHUB_USER") or getpass.getuser()

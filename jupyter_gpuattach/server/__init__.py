"""The Jupyter server extension: a REST API for the GPU UI, and the identity bridge.

Endpoints (all under ``<base_url>gpuattach/api/``, all authenticated):

========================================  ==========================================
``GET  pool``                             hosts, devices, free/used memory, queue
``GET  leases[?all=1][&kernel_id=ID]``    the user's leases (an admin: every user's)
``POST leases/<lease_id>/release``        give a lease back (only one's own)
``PUT  kernels/<kernel_id>/idle``         ``{"seconds": N}``: the kernel's idle timeout
========================================  ==========================================

Identity. The broker knows a lease's user as the kernel's credential says:
under JupyterHub the Hub user of the server's token, else the static token's
user (or, on the user's embedded broker, the OS user). Every kernel of a
Jupyter server runs as that server's owner, so the server maps whoever it
authenticated onto that one user (``GPUAttachApp.lease_user``). That grants
nothing new: anyone the server lets in can already run code as its owner.

With a shared broker the server talks to it as that user, with the user's
own token (the server's ``JUPYTERHUB_API_TOKEN`` under JupyterHub, else
``GPUAttachApp.token``/``$GPUATTACH_TOKEN``), and may do exactly what the
user may: the broker lists and releases only the user's own leases, and
answers the admin view only for a GPU admin. A shared broker's key is
refused at start: every user can read their server's configuration, so a
key there would make every user an admin. Only the embedded broker, where
the user is the only user, is called with its per-user key.
"""

from __future__ import annotations

from jupyter_gpuattach.server.app import GPUAttachApp

__all__ = ["GPUAttachApp"]

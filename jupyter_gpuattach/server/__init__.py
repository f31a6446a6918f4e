"""The Jupyter server extension: a REST API for the GPU UI, and the identity bridge.

Endpoints (all under ``<base_url>gpuattach/api/``, all authenticated):

========================================  ==========================================
``GET  pool``                             hosts, devices, free/used memory, queue
``GET  leases[?all=1][&kernel_id=ID]``    the user's leases (an admin: every user's)
``POST leases/<lease_id>/release``        give a lease back (only one's own)
``PUT  kernels/<kernel_id>/idle``         ``{"seconds": N}``: the kernel's idle timeout
========================================  ==========================================

Identity. The broker knows a lease's user as the kernel reported it:
``JUPYTERHUB_USER`` or, without JupyterHub, the OS user the kernel runs as
(``session.current_user``). Every kernel of a Jupyter server runs as that
server's owner, so the server maps whoever it authenticated onto that one
user (``GPUAttachApp.lease_user``, by default worked out the same way as the
kernels do). That grants nothing new: anyone the server lets in can already
run code as its owner. Behind JupyterHub a user the hub lets into someone
else's server (an admin, a shared server) therefore acts on that server's
leases, never on their own. The server talks to the broker with the broker
key and asks it to act *on behalf of* that user, and the broker refuses a
lease of any other user.
"""

from __future__ import annotations

from jupyter_gpuattach.server.app import GPUAttachApp

__all__ = ["GPUAttachApp"]

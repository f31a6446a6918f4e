"""JupyterHub with jupyter-gpuattach: the broker as a Hub service, the GPU scopes,
and single-user servers whose own token carries them.

Checked against JupyterHub 6.1 (tests/integration/test_jupyterhub_deployment.py
starts a real Hub from this file and attaches from a spawned server's kernel).
Load it from your own jupyterhub_config.py (``load_subconfig(...)``) or copy
what you need. The settings a site changes are read from the environment of
the Hub here, with defaults:

- ``GPUATTACH_BROKER``: host:port of the broker, as kernels and servers reach it
- ``GPUATTACH_TLS_CA``: path, on the single-user hosts, of the CA that signed
  the broker's certificate (empty: a plaintext broker on a trusted network)
- ``GPUATTACH_HUB_SERVICE_TOKEN`` (or the file ``GPUATTACH_HUB_SERVICE_TOKEN_FILE``,
  default /etc/gpuattach/hub-service-token): the broker's Hub API token
- ``GPUATTACH_CULL_TIMEOUT``: idle seconds before jupyterhub-idle-culler stops
  a server (0: no culler); ``GPUATTACH_CULL_EVERY``; ``GPUATTACH_ACTIVITY_INTERVAL``

Who holds what (README "Trust model"): the broker key stays with the broker,
its agents and the admin CLI; this file never names it. The broker holds its
Hub service token. Each user's server and kernels hold only that user's own
``JUPYTERHUB_API_TOKEN``, issued by the spawner.

The broker runs as::

    gpuattach-broker serve --hub-api-url http://HUB:8081/hub/api --key-file KEY ...

It identifies a caller by asking ``GET /hub/api/user`` with the caller's own
token, which every Hub token may do (JupyterHub adds the ``read:users:name``
and ``read:users:groups`` "identify" scopes for its owner); the answer has the
user's name, groups, admin flag and the token's ``scopes``.
"""

import os
import sys
from pathlib import Path

c = get_config()  # type: ignore[name-defined]  # noqa: F821 - given by JupyterHub

ATTACH_SCOPE = "custom:gpuattach:attach"
ADMIN_SCOPE = "custom:gpuattach:admin"

BROKER = os.environ.get("GPUATTACH_BROKER", "gpu-broker.example.org:50051")
BROKER_TLS_CA = os.environ.get("GPUATTACH_TLS_CA", "")
CULL_TIMEOUT = int(os.environ.get("GPUATTACH_CULL_TIMEOUT", "3600"))
CULL_EVERY = int(os.environ.get("GPUATTACH_CULL_EVERY", "0")) or max(1, CULL_TIMEOUT // 6)
# How often a single-user server reports its last activity to the Hub (the
# culler reads that; JupyterHub's default is 300 s). The server extension moves
# it while a remote GPU cell runs, and checks at half this interval.
ACTIVITY_INTERVAL = int(os.environ.get("GPUATTACH_ACTIVITY_INTERVAL", "60"))


def _service_token() -> str:
    token = os.environ.get("GPUATTACH_HUB_SERVICE_TOKEN", "")
    path = Path(
        os.environ.get("GPUATTACH_HUB_SERVICE_TOKEN_FILE", "/etc/gpuattach/hub-service-token")
    )
    if not token and path.exists():
        token = path.read_text().strip()
    if not token:
        raise SystemExit(
            "jupyterhub_config: set GPUATTACH_HUB_SERVICE_TOKEN or write the broker's Hub "
            f"API token to {path} (openssl rand -hex 32); give the broker the same token"
        )
    return token


# 1. The broker as a Hub service, external (it is not an HTTP service: no url,
#    no proxy route). Its token is its Hub identity, with read-only rights on
#    users and groups; identifying the users' tokens needs no scope of its own.
#    To let the Hub start it instead (a managed service, which also gets
#    JUPYTERHUB_API_URL, the broker's default --hub-api-url), add e.g.
#    "command": ["gpuattach-broker", "serve", "--config", "/etc/gpuattach/broker_config.py"].
c.JupyterHub.services = [
    {"name": "gpuattach-broker", "api_token": _service_token()},
]

# 2. The GPU scopes, and who holds them.
c.JupyterHub.custom_scopes = {
    ATTACH_SCOPE: {"description": "Attach GPU slices to notebook kernels (jupyter-gpuattach)."},
    ADMIN_SCOPE: {
        "description": "See every user's GPU leases, revoke leases, drain hosts, read the "
        "GPU audit log (jupyter-gpuattach).",
    },
}
# Members are added here, on the Hub's admin page or with the Hub API
# (POST /hub/api/groups/gpu-users/users).
c.JupyterHub.load_groups = {
    "gpu-users": {"users": []},
    "gpu-admins": {"users": []},
}
c.JupyterHub.load_roles = [
    {
        "name": "gpu-users",
        "description": "May attach GPUs",
        "scopes": [ATTACH_SCOPE],
        "groups": ["gpu-users"],
    },
    {
        "name": "gpu-admins",
        "description": "GPU admins",
        "scopes": [ATTACH_SCOPE, ADMIN_SCOPE],
        "groups": ["gpu-admins"],
    },
    {
        "name": "gpuattach-broker",
        "description": "Read users and groups (policy groups, the admin CLI)",
        "scopes": ["read:users:name", "read:users:groups", "read:groups"],
        "services": ["gpuattach-broker"],
    },
]

# 3. The spawned server's own token (JUPYTERHUB_API_TOKEN, which its kernels
#    inherit) carries the GPU scopes its user holds: a role alone does not put
#    them there. The first two are the default `server` role's.
c.Spawner.server_token_scopes = [
    "users:activity!user",
    "access:servers!server",
    ATTACH_SCOPE,
    ADMIN_SCOPE,
]

# 4. Point the single-user server and its kernels at the broker. Never the
#    broker key: the server extension refuses one.
environment = {
    "GPUATTACH_BROKER": BROKER,
    "JUPYTERHUB_ACTIVITY_INTERVAL": str(ACTIVITY_INTERVAL),
}
if BROKER_TLS_CA:
    environment["GPUATTACH_TLS_CA"] = BROKER_TLS_CA
c.Spawner.environment = environment

# 5. Idle culling: a server idle past the timeout stops, and its kernels' leases
#    end with it; a remote GPU cell that is still running counts as activity.
if CULL_TIMEOUT > 0:
    c.JupyterHub.services.append(
        {
            "name": "idle-culler",
            "command": [
                sys.executable,
                "-m",
                "jupyterhub_idle_culler",
                f"--timeout={CULL_TIMEOUT}",
                f"--cull-every={CULL_EVERY}",
            ],
        }
    )
    c.JupyterHub.load_roles.append(
        {
            "name": "idle-culler",
            "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
            "services": ["idle-culler"],
        }
    )

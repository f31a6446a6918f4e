"""Where the project keeps its state when nobody says otherwise (XDG rules)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    explicit = os.environ.get("GPUATTACH_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "gpuattach"


def default_db() -> Path:
    return state_dir() / "broker.sqlite"


def embedded_db() -> Path:
    return state_dir() / "embedded-broker.sqlite"

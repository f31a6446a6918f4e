"""``python -m gpuattach_broker.simulator``."""

from __future__ import annotations

import sys

from gpuattach_broker.simulator.cli import main

if __name__ == "__main__":
    sys.exit(main())

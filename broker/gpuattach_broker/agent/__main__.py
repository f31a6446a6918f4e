import sys

from gpuattach_broker.agent.cli import main

sys.exit(main())

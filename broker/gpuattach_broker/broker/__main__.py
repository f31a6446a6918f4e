import sys

from gpuattach_broker.broker.cli import main

sys.exit(main())

"""``python -m agentrl``: the ``agentrl`` command, e.g. under ``torchrun --nproc_per_node 2 -m agentrl train``."""

import sys

from agentrl.cli import main

sys.exit(main())

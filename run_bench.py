#!/usr/bin/env python
"""Entry point: ``python run_bench.py --help``."""

import os
import sys

# `efficiency --profile` runs torch.profiler; keep its kineto start/stop lines off stderr.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

from harness.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

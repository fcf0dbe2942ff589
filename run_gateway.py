#!/usr/bin/env python3
"""Entry point: ``python run_gateway.py [serve|migrate|token|device] [flags]``."""

import sys

from gateway.cli import main

if __name__ == "__main__":
    sys.exit(main())

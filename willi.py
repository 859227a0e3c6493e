#!/usr/bin/env python3
"""Run Willi from a checkout: `./willi.py -c willi.toml.example -f`."""

import sys

from willi.cli import main

if __name__ == "__main__":
    sys.exit(main())

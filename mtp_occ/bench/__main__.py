"""`python -m mtp_occ.bench [--quick] [--out PATH] ...`: see `mtp_occ.bench` and `--help`."""

import sys

from mtp_occ.bench.cli import main

if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""The `apreqeld` entry point (being built)."""

import sys


def main() -> None:
    print("apreqeld: the daemon is not built yet", file=sys.stderr)
    sys.exit(1)

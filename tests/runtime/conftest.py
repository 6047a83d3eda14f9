"""The daemon's fixtures live in `daemon_support.py` (importable by a unique name); pytest finds
them through this file."""

from daemon_support import *  # noqa: F403

"""The session fixtures of the integration tests live in `support.py` (so that test modules can
import its constants and helpers by a name no other conftest.py shadows); pytest finds them
through this file."""

from support import *  # noqa: F403

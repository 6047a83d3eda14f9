"""systemd's sd_notify protocol (READY=1, STATUS=, WATCHDOG=1) and socket activation, without
libsystemd: datagrams to $NOTIFY_SOCKET, inherited listening sockets from $LISTEN_FDS."""

from __future__ import annotations

import os
import socket

LISTEN_FDS_START = 3


def notify(*lines: str, env: dict[str, str] | None = None) -> bool:
    """Send `KEY=value` lines to the service manager; False when there is none."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(address)
            s.sendall("\n".join(lines).encode("utf-8"))
        except OSError:
            return False
    return True


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), None when not asked for."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


def listen_sockets(env: dict[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_PID, LISTEN_FDS), usually none."""
    env = os.environ if env is None else env
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    found = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        found.append(socket.socket(fileno=fd))
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return found

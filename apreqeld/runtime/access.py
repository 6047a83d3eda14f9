"""Who may do what on the daemon's socket: roles from the peer's credentials (SO_PEERCRED).

Inference (generate, chat, status, plans, events) for the socket's group; control
(set_priority, pin, unpin, reload) for root, the service user and the configured admin group.
"""

from __future__ import annotations

import grp
import os
import socket
import struct
from dataclasses import dataclass

from apreqeld.errors import InputError

INFERENCE, CONTROL = "inference", "control"
CONTROL_METHODS = frozenset({"set_priority", "pin", "unpin", "reload"})


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of(sock: socket.socket) -> Peer | None:
    """The peer's credentials (None where SO_PEERCRED is not available)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, frozenset({gid}) | _supplementary(pid))


def _supplementary(pid: int) -> frozenset[int]:
    """The peer's supplementary groups from /proc (empty when it has already gone)."""
    try:
        with open(f"/proc/{int(pid)}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def group_id(name: str | None) -> int | None:
    """A group name or number -> gid (InputError when unknown)."""
    if name is None or name == "":
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise InputError(f"admin_group: no group named '{name}'") from None


@dataclass(frozen=True)
class Access:
    """The rules: the service user and group, and the optional admin group."""

    uid: int
    gid: int
    admin_gid: int | None = None

    def for_socket(self, sock: socket.socket) -> Access:
        """The same rules with the listening socket file's group as the service group."""
        try:
            gid = os.stat(sock.getsockname()).st_gid
        except (OSError, TypeError, ValueError):
            return self
        return Access(self.uid, gid, self.admin_gid)

    def role(self, peer: Peer | None) -> str | None:
        """CONTROL, INFERENCE or None (not allowed at all); no credentials: this user only."""
        if peer is None:
            return CONTROL
        if peer.uid in (0, self.uid) or (self.admin_gid is not None
                                          and self.admin_gid in peer.groups):
            return CONTROL
        return INFERENCE if self.gid in peer.groups else None

    @staticmethod
    def allows(role: str | None, method: str) -> bool:
        if role is None:
            return False
        return role == CONTROL or method not in CONTROL_METHODS

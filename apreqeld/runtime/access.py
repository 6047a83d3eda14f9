"""Who may do what on the daemon's socket: roles from the peer's credentials, as the kernel
recorded them at connect time (SO_PEERCRED for uid and gid, SO_PEERGROUPS for the
supplementary groups; never /proc, which races with the peer and hidepid hides).

Inference (generate, chat, cancel, status, plans, events) for the socket's group; control
(set_priority, pin, unpin, reload) for root, the service user and the configured admin group.
No credentials, no access: every doubt is refused.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import struct
import sys
from dataclasses import dataclass

from apreqeld.errors import InputError

INFERENCE, CONTROL = "inference", "control"
CONTROL_METHODS = frozenset({"set_priority", "pin", "unpin", "reload"})
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59 if sys.platform.startswith("linux") else None)
NGROUPS_MAX = 65536


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of(sock: socket.socket) -> Peer | None:
    """The peer's credentials; None when the kernel cannot say (then nothing is allowed)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, frozenset({gid}) | peer_groups(sock))


def peer_groups(sock: socket.socket) -> frozenset[int]:
    """The peer's supplementary groups from SO_PEERGROUPS (empty where the kernel lacks it:
    fewer rights, never more)."""
    if SO_PEERGROUPS is None:
        return frozenset()
    for count in (256, NGROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return frozenset()
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4]))
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
        """CONTROL, INFERENCE or None (not allowed at all, also without credentials)."""
        if peer is None:
            return None
        if peer.uid in (0, self.uid) or (self.admin_gid is not None
                                          and self.admin_gid in peer.groups):
            return CONTROL
        return INFERENCE if self.gid in peer.groups else None

    @staticmethod
    def allows(role: str | None, method: str) -> bool:
        if role is None:
            return False
        return role == CONTROL or method not in CONTROL_METHODS

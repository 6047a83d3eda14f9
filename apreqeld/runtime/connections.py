"""The daemon's connections: admission within limits, timeouts that fire, bounded output.

Admission (`admit`, pure): at most `max_connections` open, plus `control_reserve` more that
only control peers may take, and at most `per_uid` for one uid. At a limit, the connection
idle the longest (no request in progress, no subscription, no message begun) makes room for
the newcomer; only when none is idle is the newcomer refused `busy`. A connection idle for
`idle_timeout_s` is closed (`idle`); a message begun must be finished within
`frame_timeout_s`; a declared length over the frame bound is refused as its header arrives.
A client that leaves more than `send_limit` bytes unread (or the daemon's clients together
more than `send_total`) is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgpack

from apreqeld.runtime import wire
from apreqeld.runtime.access import CONTROL
from apreqeld.runtime.workers import Job

_KEYS = itertools.count(1)
SMALL = 64 * 1024  # buffered bytes below which the total is not looked at


@dataclass(frozen=True)
class Limits:
    max_connections: int = 128
    control_reserve: int = 8
    per_uid: int = 64
    idle_timeout_s: float = 300.0
    frame_timeout_s: float = 5.0
    max_pending: int = 32  # requests in progress on one connection
    send_limit: int = wire.MAX_FRAME + SMALL
    send_total: int = 32 * 1024**2


@dataclass(frozen=True)
class Seat:
    """An open connection as admission sees it."""

    key: int
    uid: int
    control: bool
    idle: bool
    last_active: float


@dataclass(frozen=True)
class Admission:
    accept: bool
    evict: int | None = None  # the key of the idle connection that makes room
    reason: str = ""


def admit(uid: int, control: bool, seats: Sequence[Seat], limits: Limits, /) -> Admission:
    """Pure: may a connection from `uid` (a control peer or not) open now, and at whose cost."""
    def oldest_idle(among: Sequence[Seat]) -> int | None:
        idle = [s for s in among if s.idle]
        return min(idle, key=lambda s: s.last_active).key if idle else None

    mine = [s for s in seats if s.uid == uid]
    if len(mine) >= limits.per_uid:
        victim = oldest_idle(mine)
        if victim is None:
            return Admission(False, reason=f"busy: uid {uid} has {len(mine)} connections "
                             "open, none idle")
        return Admission(True, victim, "per-uid limit")
    room = limits.max_connections + (limits.control_reserve if control else 0)
    if len(seats) < room:
        return Admission(True)
    victim = oldest_idle(seats)
    if victim is None:
        return Admission(False, reason=f"busy: {len(seats)} connections are open, none idle")
    return Admission(True, victim, "connection limit")


class Conn:
    """One client connection: who, what it has in progress, its frames and its timers."""

    def __init__(self, owner: Connections, writer: asyncio.StreamWriter, uid: int,
                 role: str) -> None:
        self.key = next(_KEYS)
        self.owner, self.writer, self.uid, self.role = owner, writer, uid, role
        self.frames = wire.FrameReader()
        self.tasks: set[asyncio.Task] = set()
        self.jobs: dict[int, Job] = {}  # generate/chat in progress, by request id
        self.last_active = time.monotonic()
        self.partial_since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        return not self.tasks and not self.frames.partial

    def seat(self) -> Seat:
        return Seat(self.key, self.uid, self.role == CONTROL, self.idle, self.last_active)

    def touch(self) -> None:
        """Something happened: the idle clock starts again (armed while idle)."""
        self.last_active = time.monotonic()
        if self.idle and self._timer is None and not self.writer.is_closing():
            self._timer = asyncio.get_running_loop().call_later(
                self.owner.limits.idle_timeout_s, self._idle_check)

    def _idle_check(self) -> None:
        self._timer = None
        if not self.idle or self.writer.is_closing():
            return
        left = self.last_active + self.owner.limits.idle_timeout_s - time.monotonic()
        if left > 0:
            self._timer = asyncio.get_running_loop().call_later(left, self._idle_check)
            return
        self.owner.count("idle")
        self.close_with(wire.IDLE, f"closed: idle for {self.owner.limits.idle_timeout_s:g} s")

    def track(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.touch()

    def send(self, data: bytes) -> None:
        """Queue bytes; a client that lets too much pile up unread is dropped."""
        if self.writer.is_closing():
            return
        self.writer.write(data)
        size = self.writer.transport.get_write_buffer_size()
        limits = self.owner.limits
        if size > limits.send_limit or (size > SMALL and
                                        self.owner.buffered() > limits.send_total):
            self.owner.count("slow")
            self.writer.transport.abort()

    def close_with(self, code: str, message: str) -> None:
        """An error notification, then the connection ends (after it is written)."""
        self.send(wire.notification("error", wire.error(code, message)))
        self.writer.close()

    def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for job in self.jobs.values():
            job.cancelled = True
        for task in self.tasks:
            if task.get_name() == "events":
                task.cancel()
        self.writer.close()


class Connections:
    """The open connections and their limits; `serve` runs one connection to its end."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open: dict[int, Conn] = {}
        self.refused: dict[str, int] = {}  # connections refused, evicted or dropped, by reason

    def __len__(self) -> int:
        return sum(not c.writer.is_closing() for c in self.open.values())

    def count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def buffered(self) -> int:
        return sum(c.writer.transport.get_write_buffer_size() for c in self.open.values()
                   if not c.writer.is_closing())

    def refuse(self, writer: asyncio.StreamWriter, code: str, message: str) -> None:
        self.count(code)
        if not writer.is_closing():
            writer.write(wire.notification("error", wire.error(code, message)))
        writer.close()

    def view(self) -> dict:
        live = [c for c in self.open.values() if not c.writer.is_closing()]
        by_role = {"control": 0, "inference": 0}
        for c in live:
            by_role[c.role] = by_role.get(c.role, 0) + 1
        return {"open": len(live), **by_role, "idle": sum(c.idle for c in live),
                "uids": len({c.uid for c in live}),
                "limits": {"max_connections": self.limits.max_connections,
                           "control_reserve": self.limits.control_reserve,
                           "per_uid": self.limits.per_uid,
                           "idle_timeout_s": self.limits.idle_timeout_s,
                           "frame_timeout_s": self.limits.frame_timeout_s}}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    uid: int, role: str, on_message: Callable[[Conn, object], None]) -> None:
        """Admit the connection (or refuse it), then read its frames until it ends."""
        seats = [c.seat() for c in self.open.values() if not c.writer.is_closing()]
        admission = admit(uid, role == CONTROL, seats, self.limits)
        if not admission.accept:
            self.refuse(writer, wire.BUSY, admission.reason)
            return
        if admission.evict is not None:
            self.count("evicted")
            self.open[admission.evict].close_with(
                wire.BUSY, f"closed: an idle connection made room for another "
                f"({admission.reason})")
        conn = Conn(self, writer, uid, role)
        self.open[conn.key] = conn
        conn.touch()
        try:
            await self._read(reader, conn, on_message)
        except (ConnectionError, OSError):
            pass
        finally:
            self.open.pop(conn.key, None)
            conn.release()

    async def _read(self, reader: asyncio.StreamReader, conn: Conn,
                    on_message: Callable[[Conn, object], None]) -> None:
        limit = self.limits.frame_timeout_s
        while not conn.writer.is_closing():
            timeout = None
            if conn.frames.partial:
                timeout = max(0.0, conn.partial_since + limit - time.monotonic())
            try:
                data = await asyncio.wait_for(reader.read(65536), timeout)
            except TimeoutError:
                self.count("partial")
                conn.close_with(wire.INVALID, f"an incomplete message for {limit:g} s")
                return
            if not data:
                if conn.frames.partial:
                    conn.close_with(wire.INVALID, "truncated message")
                return
            was_partial = conn.frames.partial
            try:
                frames = conn.frames.feed(data)
            except wire.FrameError as exc:
                self.count(exc.code)
                conn.close_with(exc.code, exc.message)
                return
            if conn.frames.partial and (frames or not was_partial):
                conn.partial_since = time.monotonic()
            conn.touch()
            for frame in frames:
                try:
                    message = wire.decode(frame)
                except (msgpack.UnpackException, ValueError) as exc:
                    conn.close_with(wire.INVALID, f"not MessagePack: {exc}")
                    return
                on_message(conn, message)

"""The daemon's front door without workers: admission (pure), frame cutting (pure), and the
real connection code on a stub scheduler: idle and partial-frame timeouts that fire, declared
lengths over the bound refused at once, the client's reconnect and its full-backlog retry."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from pathlib import Path

import msgpack
import pytest

from apreqeld.client import BACKLOG_RETRY_S, Client
from apreqeld.errors import BusyError
from apreqeld.runtime import wire
from apreqeld.runtime.config import DaemonConfig
from apreqeld.runtime.connections import Limits, Seat, admit
from apreqeld.runtime.server import Daemon
from test_wire import StubScheduler

LIMITS = Limits(max_connections=4, control_reserve=2, per_uid=3)


def seat(key: int, uid: int, *, idle: bool = True, control: bool = False,
         at: float = 0.0) -> Seat:
    return Seat(key, uid, control, idle, at or float(key))


def test_admission_keeps_room_for_control_and_per_uid() -> None:
    a = [seat(1, 1000), seat(2, 1000, idle=False), seat(3, 1001, idle=False)]
    assert admit(1002, False, a, LIMITS).accept and admit(1002, False, a, LIMITS).evict is None
    # a uid at its limit: its own longest-idle connection makes room, never another uid's
    mine = [seat(1, 1000, at=5), seat(2, 1000, at=3), seat(3, 1000, idle=False, at=1)]
    assert admit(1000, False, mine, LIMITS).evict == 2
    busy = [seat(k, 1000, idle=False) for k in (1, 2, 3)]
    refused = admit(1000, False, busy, LIMITS)
    assert not refused.accept and "uid 1000 has 3 connections open, none idle" in refused.reason
    # the total: inference stops at max_connections; control has the reserve beyond it
    full = [seat(k, 2000 + k, idle=False) for k in range(4)]
    assert not admit(3000, False, full, LIMITS).accept
    assert admit(0, True, full, LIMITS) == admit(0, True, full, LIMITS)
    assert admit(0, True, full, LIMITS).accept and admit(0, True, full, LIMITS).evict is None
    fuller = full + [seat(9, 0, idle=False, control=True), seat(10, 0, idle=False,
                                                               control=True)]
    assert not admit(0, True, fuller, LIMITS).accept
    # at the total limit an idle connection of anyone makes room
    some_idle = full[:3] + [seat(7, 5000, at=0.5)]
    assert admit(3000, False, some_idle, LIMITS).evict == 7


def test_frames_are_cut_by_their_headers() -> None:
    messages = [[0, 1, "status", []], [0, 2, "generate", [{"prompt": "x" * 70_000}]],
                {"a": [1, 2.5, None, True, b"xx", msgpack.ExtType(3, b"abc"), 2**64 - 1]},
                [], 5, -3, "s", {}]
    data = b"".join(msgpack.packb(m, use_bin_type=True) for m in messages)
    for seed in range(30):
        rng, reader, frames, i = random.Random(seed), wire.FrameReader(), [], 0
        while i < len(data):
            n = rng.randint(1, 300)
            frames += reader.feed(data[i:i + n])
            i += n
        assert [wire.decode(f) for f in frames] == messages and not reader.partial


@pytest.mark.parametrize("data, code", [
    (b"\xc6" + struct.pack(">I", 2**31), wire.TOO_LARGE),  # bin32 of 2 GiB
    (b"\xdb" + struct.pack(">I", 2**32 - 1), wire.TOO_LARGE),  # str32 of 4 GiB
    (b"\xdd" + struct.pack(">I", 2**32 - 1), wire.TOO_LARGE),  # array32 of 4G values
    (b"\x94\x00\x01\xc9" + struct.pack(">I", 2**30) + b"\x01", wire.TOO_LARGE),  # ext32 inside
    (b"\xc1", wire.INVALID),
    (b"\x91" * (wire.MAX_DEPTH + 1), wire.INVALID),
])
def test_a_header_over_the_bound_is_refused_before_its_data(data: bytes, code: str) -> None:
    with pytest.raises(wire.FrameError) as err:
        wire.FrameReader().feed(data)
    assert err.value.code == code


def test_a_begun_frame_is_partial() -> None:
    for begun in (b"\x84\xa1a", b"\x94\x00\x01", b"\xc4\x10abc", b"\xcb\x00"):
        reader = wire.FrameReader()
        assert reader.feed(begun) == [] and reader.partial, begun


@pytest.fixture
def front(tmp_path: Path):
    """The daemon's real connection handling on a stub scheduler; `make(**config)`."""
    loops: list = []

    def make(**config) -> Path:
        path = tmp_path / f"front{len(loops)}.sock"
        daemon = Daemon(DaemonConfig(plans=tmp_path, socket=path, **config), StubScheduler())
        loop = asyncio.new_event_loop()
        ready, stop = threading.Event(), asyncio.Event()

        async def serve() -> None:
            srv = await asyncio.start_unix_server(daemon.handle, path=str(path))
            ready.set()
            async with srv:
                await stop.wait()

        thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
        thread.start()
        assert ready.wait(10)
        loops.append((loop, stop, thread))
        return path

    yield make
    for loop, stop, thread in loops:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def _read_all(sock: socket.socket, timeout: float) -> tuple[list, float]:
    """Every message until the daemon closes; how long that took."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    unpacker, out = msgpack.Unpacker(raw=False), []
    while True:
        data = sock.recv(65536)
        if not data:
            return out, time.monotonic() - t0
        unpacker.feed(data)
        out.extend(unpacker)


@pytest.mark.timeout(30)
def test_partial_frames_time_out_and_long_declarations_are_refused_at_once(front) -> None:
    path = front(frame_timeout_s=0.5)
    for begun in (b"\x84\xa1a", b"\x94\x00\x01"):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        sock.sendall(begun)
        messages, took = _read_all(sock, 5)
        assert messages[0][2][0]["code"] == wire.INVALID and 0.4 < took < 2.5, (begun, took)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    sock.sendall(b"\xc6" + struct.pack(">I", 2**31))
    messages, took = _read_all(sock, 5)
    assert messages[0][2][0]["code"] == wire.TOO_LARGE and took < 0.4


@pytest.mark.timeout(30)
def test_idle_connections_are_closed_and_the_client_connects_again(front) -> None:
    path = front(idle_timeout_s=0.3)
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(path))
    messages, took = _read_all(raw, 5)
    assert messages[0][2][0]["code"] == wire.IDLE and 0.2 < took < 2.5
    with Client(path, timeout=10) as c:
        assert c.status()["plan"] == "p1"
        deadline = time.monotonic() + 5
        while c._sock is not None and time.monotonic() < deadline:
            c._drop_if_closed()  # what the next call does first
            time.sleep(0.05)
        assert c._sock is None  # the daemon said goodbye: forgotten
        assert c.status()["plan"] == "p1"  # and the next call simply connects again


@pytest.mark.timeout(30)
def test_a_busy_connection_is_not_idle(front) -> None:
    path = front(idle_timeout_s=0.3)
    with Client(path, timeout=10) as c:
        events = c.events()  # a subscription: in progress
        time.sleep(1.0)
        assert c._sock is not None
    del events


@pytest.mark.timeout(30)
def test_a_full_listen_backlog_is_retried_then_busy(tmp_path: Path) -> None:
    path = tmp_path / "backlog.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(0)
    queued = []
    try:
        while True:  # fill the backlog: nobody accepts
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
        t0 = time.monotonic()
        with pytest.raises(BusyError, match="listen backlog"):
            Client(path, timeout=5).status()
        assert BACKLOG_RETRY_S - 0.3 < time.monotonic() - t0 < BACKLOG_RETRY_S + 2
        # room comes back while the client retries: it connects
        threading.Timer(0.3, lambda: server.accept()[0].close()).start()
        c = Client(path, timeout=5)
        c.connect()
        assert c._sock is not None
        c.close()
    finally:
        for s in queued:
            s.close()
        server.close()

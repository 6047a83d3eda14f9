"""The wire protocol and the Python client against the real server code on a stub scheduler
(no workers): validation, errors that keep the connection usable, bounded frames, streaming."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import msgpack
import pytest

from apreqeld.client import Client
from apreqeld.errors import BusyError, DaemonError
from apreqeld.runtime import wire
from apreqeld.runtime.config import DaemonConfig
from apreqeld.runtime.server import Daemon
from apreqeld.runtime.workers import Job


class StubScheduler:
    """Answers like the scheduler: tokens "a", "b", then a result; busy on demand."""

    def __init__(self) -> None:
        self.busy = False
        self.submitted: list[dict] = []

    def status(self) -> dict:
        return {"plan": "p1", "swapping": False, "queue": 0}

    def plans(self) -> dict:
        return {"members": []}

    def subscribe(self) -> asyncio.Queue:
        return asyncio.Queue()

    def unsubscribe(self, _queue: asyncio.Queue) -> None:
        pass

    def submit(self, kind: str, params: dict, on_token) -> Job:
        if self.busy:
            raise BusyError("busy: the request queue is full (1 waiting); try again")
        self.submitted.append(params)
        loop = asyncio.get_running_loop()
        job = Job(len(self.submitted), kind, params, on_token, loop.create_future())

        def finish() -> None:
            on_token("a")
            on_token("b")
            job.answer({"text": "ab", "plan": "p1", "usage": {"completion_tokens": 2}})

        loop.call_soon(finish)
        return job


@pytest.fixture
def server(tmp_path: Path):
    """The Daemon's connection handler on a real socket, in a background event loop."""
    path = tmp_path / "wire.sock"
    stub = StubScheduler()
    daemon = Daemon(DaemonConfig(plans=tmp_path, socket=path), stub)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        srv = await asyncio.start_unix_server(daemon.handle, path=str(path))
        ready.set()
        async with srv:
            await stop.wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield path, stub
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)


class Raw:
    """A raw MessagePack peer."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.unpacker = msgpack.Unpacker(raw=False)

    def send(self, message: object) -> None:
        self.sock.sendall(msgpack.packb(message))

    def next(self) -> object:
        while True:
            for message in self.unpacker:
                return message
            data = self.sock.recv(65536)
            if not data:
                return None
            self.unpacker.feed(data)


def test_parse_request_validates_shape_method_and_params() -> None:
    msgid, method, params = wire.parse_request([0, 7, "generate", [{"prompt": "hi"}]])
    assert (msgid, method, params.max_tokens, params.temperature) == (7, "generate", 128, 0.8)
    assert wire.parse_request([0, 1, "status", []])[1] == "status"
    for bad, code in (([1, 2, 3], "invalid"), ([0, -1, "status", []], "invalid"),
                      ([0, 3, "explode", []], "unknown_method"),
                      ([0, 4, "generate", [{"prompt": "x", "max_tokens": 0}]], "invalid"),
                      ([0, 5, "generate", [{"prompt": "x", "bogus": 1}]], "invalid"),
                      ([0, 6, "status", [{"v": 2}]], "invalid"),
                      ([0, 8, "set_priority", [{}]], "invalid"),
                      ([0, 9, "chat", [{"messages": [{"role": "robot", "content": ""}]}]],
                       "invalid")):
        with pytest.raises(wire.BadMessage) as err:
            wire.parse_request(bad)
        assert err.value.code == code, bad
    with pytest.raises(wire.BadMessage, match=r"^generate: max_tokens: Input should be"):
        wire.parse_request([0, 4, "generate", [{"prompt": "x", "max_tokens": 0}]])


def test_frames_are_bounded_when_packing() -> None:
    with pytest.raises(Exception, match="exceeds the frame bound"):
        wire.request(1, "generate", {"prompt": "x" * wire.MAX_FRAME})


@pytest.mark.timeout(30)
def test_errors_keep_the_connection_usable(server) -> None:
    path, _stub = server
    peer = Raw(path)
    peer.send([0, 1, "explode", []])
    assert peer.next()[:3] == [1, 1, {"code": "unknown_method", "message":
                                      peer_message("explode")}]
    peer.send([0, 2, "generate", [{"prompt": ""}]])
    reply = peer.next()
    assert reply[2]["code"] == "invalid" and reply[2]["message"].startswith("generate: prompt:")
    peer.send(["not", "a", "request"])
    note = peer.next()
    assert note[0] == 2 and note[1] == "error" and note[2][0]["code"] == "invalid"
    peer.send([0, 3, "hello", []])
    assert peer.next() == [1, 3, None, {"protocol": 1, "daemon": peer_daemon(),
                                        "methods": list(wire.METHODS),
                                        "max_frame": wire.MAX_FRAME}]


def peer_message(method: str) -> str:
    return f"unknown method {method!r} (methods: {', '.join(wire.METHODS)})"


def peer_daemon() -> str:
    from apreqeld import __version__

    return f"apreqeld {__version__}"


@pytest.mark.timeout(30)
def test_an_oversized_frame_is_answered_then_the_connection_closed(server) -> None:
    path, _stub = server
    peer = Raw(path)
    big = msgpack.packb([0, 1, "generate", [{"prompt": "x" * (wire.MAX_FRAME + 10)}]])
    try:
        peer.sock.sendall(big)
    except (BrokenPipeError, ConnectionResetError):
        pass
    note = peer.next()
    assert note[0] == 2 and note[2][0]["code"] == "too_large"
    assert peer.next() is None
    with Client(path) as c:  # the daemon itself is fine
        assert c.status()["plan"] == "p1"


@pytest.mark.timeout(30)
def test_client_streams_and_maps_errors(server) -> None:
    path, stub = server
    with Client(path, timeout=10) as c:
        stream = c.generate_stream("hi", max_tokens=2, seed=3)
        assert list(stream) == ["a", "b"]
        assert stream.result == {"text": "ab", "plan": "p1", "usage": {"completion_tokens": 2}}
        assert stub.submitted[-1] == {"prompt": "hi", "max_tokens": 2, "temperature": 0.8,
                                      "stop": [], "seed": 3, "top_p": None,
                                      "presence_penalty": 0.0, "frequency_penalty": 0.0,
                                      "response_format": None}
        c.generate("hi", max_tokens=2, top_p=0.9, response_format={"type": "json_object"})
        assert stub.submitted[-1]["top_p"] == 0.9
        assert stub.submitted[-1]["response_format"] == {"type": "json_object",
                                                         "json_schema": None}
        assert c.chat([{"role": "user", "content": "hi"}])["text"] == "ab"
        stub.busy = True
        with pytest.raises(BusyError, match="queue is full"):
            c.generate("hi")
        with pytest.raises(DaemonError) as err:
            c.call("generate", {"prompt": "x", "temperature": 9})
        assert err.value.code == "invalid"
        assert c.status()["plan"] == "p1"


def test_client_says_when_no_daemon_runs(tmp_path: Path) -> None:
    with pytest.raises(DaemonError, match=r"^daemon not running \(nothing listens on "):
        Client(tmp_path / "none.sock").status()

"""Bad input on the wire, against the real daemon: thousands of seeded random frames,
truncated, oversized and deeply nested MessagePack, invalid UTF-8, huge prompts, clients that
leave mid-stream or never read, hundreds of idle connections. Every case gets an error answer
or a clean close, the daemon's memory stays bounded and a well-behaved client is unaffected;
with 300 idle connections open, `apreqelctl status` is still answered."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from pathlib import Path

import msgpack
import psutil
import pytest

from apreqeld.client import Client
from apreqeld.errors import DaemonError
from apreqeld.runtime import wire
from apreqeld.runtime.config import DaemonConfig
from daemon_support import ctl

pytestmark = pytest.mark.integration
SEED = 11
KNOWN = list(wire.METHODS)
DEFAULTS = DaemonConfig(plans=Path("."))
STREAMED = ("event", "token")  # notifications that stream, not answers


def connect(path: Path, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    for _ in range(500):
        try:
            sock.connect(str(path))
            return sock
        except BlockingIOError:  # the listen backlog is full for a moment
            time.sleep(0.01)
    raise AssertionError("could not connect")


def read_until(sock: socket.socket, count: int | None, timeout: float = 20) -> tuple[list, bool]:
    """Decoded messages until `count` arrived or the daemon closed (True) or the timeout."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    messages: list = []
    deadline = time.monotonic() + timeout
    while count is None or len(messages) < count:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            return messages, False
        except ConnectionResetError:
            return messages, True
        if not data:
            return messages, True
        unpacker.feed(data)
        messages.extend(m for m in unpacker if not (isinstance(m, list) and len(m) == 3 and
                                                    m[0] == wire.NOTIFICATION and
                                                    m[1] in STREAMED))
    return messages, False


class Polite:
    """A well-behaved client asking status and a short generation in a loop."""

    def __init__(self, path: Path) -> None:
        self.path, self.stop = path, threading.Event()
        self.answers, self.errors, self.worst_s = 0, [], 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client(self.path, timeout=60) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    c.status()
                    c.generate("Hi", max_tokens=2, seed=1)
                    self.answers += 1
                except DaemonError as exc:
                    self.errors.append(exc)
                self.worst_s = max(self.worst_s, time.monotonic() - t0)

    def __enter__(self) -> Polite:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        self.thread.join(60)


def value(rng: random.Random, depth: int = 0) -> object:
    """A random MessagePack-encodable value (str keys, valid UTF-8)."""
    kind = rng.choice(["int", "int", "big", "float", "str", "bytes", "bool", "none"]
                      + (["list", "map"] if depth < 4 else []))
    if kind == "int":
        return rng.randint(-5, 300)
    if kind == "big":
        return rng.choice([2**32, 2**64 - 1, -(2**63), 2**31 - 1])
    if kind == "float":
        return rng.choice([0.5, -1.0, float("nan"), float("inf"), 1e308])
    if kind == "str":
        return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0xD7FF)]))
                       for _ in range(rng.randint(0, 12)))
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 16))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {str(value(rng, 4)): value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def frame(rng: random.Random, msgid: int) -> list | object:
    """A random message the daemon must answer (never a valid generation or control call)."""
    shape = rng.random()
    if shape < 0.1:
        return value(rng)
    if shape < 0.2:
        parts = [rng.choice([0, 1, 2, 3, -1]), value(rng), value(rng), value(rng)]
        return parts[:rng.randint(0, 4)]
    method = rng.choice(KNOWN + ["", "shutdown", "__init__", "../../bin/sh", "generate\x00"])
    params = rng.choice([{}, value(rng), [value(rng)], [{}], [{"v": value(rng)}]])
    if method in ("status", "hello", "plans") and rng.random() < 0.3:
        params = []  # valid: a real answer
    elif isinstance(params, list) and params and isinstance(params[0], dict):
        params[0]["zz_not_a_field"] = value(rng)  # extra keys are refused
    elif isinstance(params, dict):
        params["zz_not_a_field"] = 1
    return [0, msgid if rng.random() < 0.9 else value(rng), method, params]


@pytest.mark.timeout(240)
def test_the_wire_survives_bad_input(daemon_factory, tiny_plans) -> None:
    d = daemon_factory("--priority", "memory", "--ctx", "256")
    rng = random.Random(SEED)
    proc = psutil.Process(d.proc.pid)
    counts: dict[str, int] = {}

    def tally(kind: str, n: int = 1) -> None:
        counts[kind] = counts.get(kind, 0) + n

    with Polite(d.socket) as polite:
        time.sleep(0.5)
        rss0 = proc.memory_info().rss
        # 1. random well-formed frames: exactly one answer each, the connection stays usable
        for _ in range(40):
            sock = connect(d.socket)
            frames = [frame(rng, i) for i in range(100)]
            sock.sendall(b"".join(msgpack.packb(f, use_bin_type=True) for f in frames))
            answers, closed = read_until(sock, len(frames))
            sock.close()
            assert not closed and len(answers) == len(frames)
            for a in answers:
                assert a[0] in (wire.RESPONSE, wire.NOTIFICATION), a
                if a[0] == wire.NOTIFICATION:
                    assert a[1] == "error" and a[2][0]["code"] in (wire.INVALID,), a
            tally("random frames", len(frames))
        # 2. byte-level garbage and truncated frames: an error and/or a clean close
        for _ in range(300):
            good = msgpack.packb(frame(rng, 1), use_bin_type=True)
            data = rng.choice([rng.randbytes(rng.randint(1, 64)), good[:max(1, len(good) // 2)],
                               good[:-1] + b"\xc1", b"\xc1" + good])
            sock = connect(d.socket)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            answers, closed = read_until(sock, None, timeout=10)
            sock.close()
            assert closed, f"not closed after {data!r}"
            tally("garbage/truncated")
        # 3. deep nesting, oversized frames, lying length headers, invalid UTF-8
        specials = {
            "nested 100k": b"\x91" * 100_000 + b"\xc0",
            "nested 1k in params": msgpack.packb([0, 1, "status", []])[:-1]
            + b"\x91" + b"\x91" * 1000 + b"\xc0",
            "oversized 2 MiB": msgpack.packb([0, 1, "generate", [{"prompt": "x" * (2 << 20)}]]),
            "str32 header 4 GiB": b"\x94\x00\x01\xdb" + struct.pack(">I", 2**32 - 1) + b"ab",
            "array32 header 4G": b"\xdd" + struct.pack(">I", 2**32 - 1) + b"\x00",
            "invalid UTF-8 method": b"\x94\x00\x01\xa4\xff\xfe\xfd\xfc\x90",
            "invalid UTF-8 prompt": b"\x94\x00\x01\xa8generate\x91\x81\xa6prompt\xa2\xc3\x28",
        }
        for name, data in specials.items():
            for _ in range(5):
                sock = connect(d.socket)
                try:
                    sock.sendall(data)
                    if "header" in name:  # the client gives up: the daemon closes too
                        sock.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # closed before it was all sent: fine
                if name.startswith("nested 1k"):  # decodes: an answer, the connection stays
                    answers, _ = read_until(sock, 1, timeout=10)
                    sock.close()
                    assert answers[0][:3] == [wire.RESPONSE, 1, answers[0][2]], answers
                    assert answers[0][2]["code"] == wire.INVALID
                    tally(name)
                    continue
                answers, closed = read_until(sock, None, timeout=10)
                sock.close()
                assert closed, name
                errors = [a for a in answers if a[0] == wire.NOTIFICATION and a[1] == "error"]
                assert errors, (name, answers)
                tally(name)
        # a message begun and never finished is closed within the frame timeout; a declared
        # length over the frame bound is refused as soon as its header arrives
        limit = DEFAULTS.frame_timeout_s
        for begun in (b"\x84\xa1a", b"\x94\x00\x01", b"\xc4\x10abc"):
            stalled = connect(d.socket)
            stalled.sendall(begun)
            t0 = time.monotonic()
            answers, closed = read_until(stalled, None, timeout=limit + 5)
            stalled.close()
            assert closed and answers[0][2][0]["code"] == wire.INVALID, (begun, answers)
            assert limit - 0.5 < time.monotonic() - t0 < limit + 2, begun
            tally("stalled partial frame")
        for header in (b"\xc6" + struct.pack(">I", 2**31), b"\xdb" + struct.pack(">I", 2**31),
                       b"\x94\x00\x01\xc6" + struct.pack(">I", 2**31)):
            over = connect(d.socket)
            over.sendall(header)  # and nothing more: the answer cannot wait for the data
            t0 = time.monotonic()
            answers, closed = read_until(over, None, timeout=limit + 5)
            over.close()
            assert closed and answers[0][2][0]["code"] == wire.TOO_LARGE, (header, answers)
            assert time.monotonic() - t0 < 1.0, header
            tally("declared over the bound")
        # 4. huge prompts and max_tokens (invalid: one error; valid: one answer)
        with Client(d.socket, timeout=60) as c:
            for kwargs, code in [({"prompt": "x" * 300_000}, wire.INVALID),
                                 ({"prompt": "hi", "max_tokens": 10**9}, wire.INVALID),
                                 ({"prompt": "hi", "max_tokens": -1}, wire.INVALID),
                                 ({"prompt": "hi", "temperature": "hot"}, wire.INVALID),
                                 ({"prompt": "word " * 40_000}, wire.INVALID)]:  # context
                with pytest.raises(DaemonError) as err:
                    c.call("generate", kwargs)
                assert err.value.code == code, (kwargs.keys(), err.value)
                tally("huge/wrong-typed generate")
            long = c.generate("Count:", max_tokens=8192, temperature=0.0)
            assert long["usage"]["completion_tokens"] >= 1
            tally("max_tokens 8192 within a 256 context")
        # 5. clients that leave mid-stream
        for i in range(10):
            sock = connect(d.socket)
            sock.sendall(wire.request(1, "generate", {"prompt": "Tell me a story", "seed": i,
                                                      "max_tokens": 200}))
            read_until(sock, 1)
            sock.close()
            tally("disconnect mid-stream")
        # 6. a client that never reads: dropped, nobody else waits for it
        hog = connect(d.socket)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.settimeout(0.5)
        batch = b"".join(wire.request(i, "plans") for i in range(200))
        sent = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                hog.sendall(batch)
                sent += 200
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                break
        _, closed = read_until(hog, None, timeout=30)
        hog.close()
        assert closed, "a client that never reads was not dropped"
        tally("never-reading client (plans requests sent)", sent)
        # 7. hundreds of idle connections (one uid): the longest idle make room for newcomers
        # (a busy notice, then closed), and control is still answered
        idle = [connect(d.socket) for _ in range(300)]
        run = ctl("status", "--json", socket=d.socket, timeout=60)
        assert run.returncode == 0, run.stderr
        with Client(d.socket, timeout=30) as c:
            status = c.status()
        evicted = 0
        for sock in idle:
            sock.settimeout(0.05)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            message = msgpack.unpackb(data, raw=False) if data else None
            assert message is None or message[2][0]["code"] == wire.BUSY, message
            evicted += 1
        for sock in idle:
            sock.close()
        per_uid = DEFAULTS.max_connections_per_uid
        assert evicted >= 300 - per_uid, evicted
        assert status["connection_limits"]["open"] <= per_uid  # this uid's cap
        tally("idle connections (the oldest evicted)", 300)
        time.sleep(0.5)
        with Client(d.socket, timeout=30) as c:
            status = c.status()
        rss1 = proc.memory_info().rss
    assert not polite.errors, polite.errors
    assert polite.answers >= 5 and polite.worst_s < 20, (polite.answers, polite.worst_s)
    assert status["refused"].get("slow", 0) >= 1
    assert status["refused"].get("evicted", 0) >= 300 - DEFAULTS.max_connections_per_uid
    assert status["counts"]["failed"] <= 2  # the over-long prompt
    assert rss1 - rss0 < 64 * 1024**2, (rss0, rss1)
    print(f"\nfuzz: {counts}; polite answers {polite.answers}, worst {polite.worst_s:.2f} s; "
          f"rss {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB; refused {status['refused']}; "
          f"counts {status['counts']}")


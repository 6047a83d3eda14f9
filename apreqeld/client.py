"""The Python client of apreqeld (sync): what embedded applications and `apreqelctl` use.

    with Client() as c:                       # $APREQELD_SOCKET or the default socket
        for piece in (s := c.generate_stream("Once upon a time", max_tokens=32)):
            print(piece, end="")
        print(s.result["plan"], s.result["usage"])

A full listen backlog is retried for BACKLOG_RETRY_S, then reported as busy; a connection the
daemon closed while idle is opened again by the next request; `Stream.close()` cancels.
"""

from __future__ import annotations

import errno
import itertools
import select
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from apreqeld.errors import BusyError, DaemonError
from apreqeld.runtime import wire
from apreqeld.runtime.config import default_socket

NOT_RUNNING = "not_running"
PERMISSION = "permission"
BACKLOG_RETRY_S = 2.0  # how long a full listen backlog is retried before "busy"


def remote_error(error: object) -> DaemonError:
    """The exception for a wire error object."""
    if isinstance(error, dict):
        code, message = str(error.get("code", wire.FAILED)), str(error.get("message", error))
    else:
        code, message = wire.FAILED, str(error)
    return BusyError(message) if code == wire.BUSY else DaemonError(message, code=code)


def _goodbye(message: object) -> bool:
    """The daemon's notice that it closes the connection (idle, or room made for another)."""
    return (isinstance(message, list) and len(message) == 3 and message[0] == wire.NOTIFICATION
            and message[1] == "error" and isinstance(message[2], list) and bool(message[2])
            and isinstance(message[2][0], dict)
            and message[2][0].get("code") in (wire.IDLE, wire.BUSY))


class Stream:
    """Iterates over the streamed text pieces; `result` holds the final response afterwards."""

    def __init__(self, client: Client, msgid: int) -> None:
        self._client, self._id = client, msgid
        self.result: dict | None = None

    def __iter__(self) -> Iterator[str]:
        while self.result is None:
            kind, payload = self._client._next(self._id)
            if kind == "token":
                yield payload["text"]
            else:
                self.result = payload

    def text(self) -> str:
        """Consume the stream; the whole text."""
        return "".join(self)

    def close(self) -> None:
        """Cancel the generation: the worker stops at once, `result` holds what was made
        (finish "cancelled"; None when it had not started), the connection stays usable."""
        if self.result is None:
            self.result = self._client._cancel(self._id)


class Client:
    """One connection to the daemon; one request at a time."""

    def __init__(self, socket_path: str | Path | None = None, *,
                 timeout: float | None = None) -> None:
        self.path = Path(socket_path) if socket_path else default_socket()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._unpacker = wire.unpacker()
        self._ids = itertools.count(1)

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect; a full listen backlog is retried briefly, then BusyError."""
        if self._sock is not None:
            return
        deadline = time.monotonic() + BACKLOG_RETRY_S
        pause = 0.005
        while True:
            try:
                self._sock = self._connect_once()
                return
            except BlockingIOError:
                if time.monotonic() + pause > deadline:
                    raise BusyError(f"busy: the daemon on {self.path} accepts no connection "
                                    f"(its listen backlog stayed full for "
                                    f"{BACKLOG_RETRY_S:g} s); try again") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.2)

    def _connect_once(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            if isinstance(exc, BlockingIOError) or exc.errno in (errno.EAGAIN,
                                                                  errno.EWOULDBLOCK):
                raise BlockingIOError(exc.errno, exc.strerror) from None
            raise self._connect_error(exc) from None
        return sock

    def _connect_error(self, exc: OSError) -> DaemonError:
        if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
            return DaemonError(f"daemon not running (nothing listens on {self.path})",
                               code=NOT_RUNNING)
        if isinstance(exc, PermissionError):
            return DaemonError(f"permission denied on {self.path} (are you in the socket's "
                               "group?)", code=PERMISSION)
        return DaemonError(f"cannot connect to {self.path}: {exc.strerror}", code=NOT_RUNNING)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------------ transport

    def _drop_if_closed(self) -> None:
        """Between requests: when the daemon has closed this connection, forget it so that
        the next request connects again."""
        sock = self._sock
        if sock is None or not select.select([sock], [], [], 0)[0]:
            return  # nothing pending: still open
        try:
            data = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            probe = wire.unpacker()
            probe.feed(data)
            try:
                if not any(_goodbye(m) for m in probe):
                    return
            except ValueError:
                return
        self.close()
        self._unpacker = wire.unpacker()

    def _send(self, method: str, params: dict | None) -> int:
        self._drop_if_closed()
        self.connect()
        msgid = next(self._ids)
        try:
            self._sock.sendall(wire.request(msgid, method, params))
        except OSError as exc:
            self.close()
            raise DaemonError(f"lost the daemon: {exc.strerror or exc}",
                              code=NOT_RUNNING) from None
        return msgid

    def _messages(self) -> Iterator[object]:
        """Decoded messages: those already buffered first, then what arrives."""
        while True:
            yield from self._unpacker
            sock = self._sock
            if sock is None:  # closed here, e.g. by another thread
                raise DaemonError("the connection is closed", code=NOT_RUNNING)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise DaemonError("the daemon did not answer in time", code="timeout") from None
            except OSError as exc:
                data, err = b"", exc
            else:
                err = None
            if not data:
                self.close()
                raise DaemonError(f"the daemon closed the connection{f' ({err})' if err else ''}",
                                  code=NOT_RUNNING)
            self._unpacker.feed(data)

    def _next(self, msgid: int) -> tuple[str, dict]:
        """The next token/event notification for `msgid` or its final response."""
        for message in self._messages():
            if not isinstance(message, list) or not message:
                continue
            if message[0] == wire.RESPONSE and message[1] == msgid:
                if message[2] is not None:
                    raise remote_error(message[2])
                return "result", message[3]
            if message[0] == wire.NOTIFICATION:
                method, params = message[1], (message[2] or [None])[0]
                if method == "error":
                    self.close()
                    raise remote_error(params)
                if method == "token" and params.get("id") == msgid:
                    return "token", params
                if method == "event":
                    return "event", params
        raise AssertionError("unreachable")

    def _cancel(self, msgid: int) -> dict | None:
        """Cancel request `msgid`, then read on to its final response and the cancel's own
        (None: it ended with an error, e.g. cancelled before it started)."""
        cid = self._send("cancel", {"id": msgid})
        final: dict | None = None
        waiting = {cid, msgid}
        for message in self._messages():
            if not isinstance(message, list) or not message:
                continue
            if message[0] == wire.NOTIFICATION and message[1] == "error":
                self.close()
                raise remote_error((message[2] or [None])[0])
            if message[0] == wire.RESPONSE and message[1] in waiting:
                waiting.discard(message[1])
                if message[1] == msgid and message[2] is None:
                    final = message[3]
                if not waiting:
                    return final
        raise AssertionError("unreachable")

    def call(self, method: str, params: dict | None = None) -> object:
        """One request, its result (tokens and events in between are skipped)."""
        msgid = self._send(method, params)
        while True:
            kind, payload = self._next(msgid)
            if kind == "result":
                return payload

    # ------------------------------------------------------------------ methods

    def hello(self) -> dict:
        return self.call("hello")

    def status(self) -> dict:
        return self.call("status")

    def plans(self) -> dict:
        return self.call("plans")

    def set_priority(self, priority: str | Sequence[float], *, wait: bool = False,
                     max_latency_ms: float | None = None, max_accuracy: float | None = None,
                     max_memory_bytes: float | None = None) -> dict:
        """A preset name or three (memory, latency, accuracy) weights, plus service levels."""
        params: dict = {"wait": wait}
        if isinstance(priority, str):
            params["preset"] = priority
        else:
            params["weights"] = [float(w) for w in priority]
        for key, value in (("max_latency_ms", max_latency_ms), ("max_accuracy", max_accuracy),
                           ("max_memory_bytes", max_memory_bytes)):
            if value is not None:
                params[key] = value
        return self.call("set_priority", params)

    def compose(self, *, budget_bytes: float | None = None,
                priority: str | Sequence[float] | None = None,
                max_latency_ms: float | None = None,
                max_memory_bytes: float | None = None) -> dict:
        """What the daemon would compose under this budget and priority (nothing served)."""
        params: dict = {}
        if isinstance(priority, str):
            params["preset"] = priority
        elif priority is not None:
            params["weights"] = [float(w) for w in priority]
        for key, value in (("budget_bytes", budget_bytes), ("max_latency_ms", max_latency_ms),
                           ("max_memory_bytes", max_memory_bytes)):
            if value is not None:
                params[key] = value
        return self.call("compose", params)

    def pin(self, plan: str, *, wait: bool = False) -> dict:
        return self.call("pin", {"id": plan, "wait": wait})

    def unpin(self, *, wait: bool = False) -> dict:
        return self.call("unpin", {"wait": wait})

    def reload(self) -> dict:
        return self.call("reload")

    def cancel(self, msgid: int) -> dict:
        """Cancel a request of this connection by id ({"cancelled": False}: none such)."""
        return self.call("cancel", {"id": msgid})

    @staticmethod
    def _sampling(max_tokens: int, temperature: float, stop: Sequence[str], seed: int | None,
                  top_p: float | None = None, presence_penalty: float | None = None,
                  frequency_penalty: float | None = None,
                  response_format: dict | None = None) -> dict:
        params = {"max_tokens": max_tokens, "temperature": temperature, "stop": list(stop)}
        for key, value in (("seed", seed), ("top_p", top_p),
                           ("presence_penalty", presence_penalty),
                           ("frequency_penalty", frequency_penalty),
                           ("response_format", response_format)):
            if value is not None:
                params[key] = value
        return params

    def generate_stream(self, prompt: str, *, max_tokens: int = 128, temperature: float = 0.8,
                        stop: Sequence[str] = (), seed: int | None = None,
                        **sampling: object) -> Stream:
        """Stream a completion. `sampling`: top_p, presence_penalty, frequency_penalty and
        response_format ({"type": "json_object"} or {"type": "json_schema", "json_schema":
        SCHEMA}, enforced by llama.cpp's grammar)."""
        params = {"prompt": prompt} | self._sampling(max_tokens, temperature, stop, seed,
                                                     **sampling)
        return Stream(self, self._send("generate", params))

    def chat_stream(self, messages: Sequence[dict], *, max_tokens: int = 128,
                    temperature: float = 0.8, stop: Sequence[str] = (),
                    seed: int | None = None, **sampling: object) -> Stream:
        params = {"messages": [dict(m) for m in messages]} | self._sampling(
            max_tokens, temperature, stop, seed, **sampling)
        return Stream(self, self._send("chat", params))

    def generate(self, prompt: str, **options: object) -> dict:
        """The whole response: text, plan, usage (tokens, ms/token)."""
        stream = self.generate_stream(prompt, **options)
        stream.text()
        return stream.result

    def chat(self, messages: Sequence[dict], **options: object) -> dict:
        stream = self.chat_stream(messages, **options)
        stream.text()
        return stream.result

    def events(self) -> Iterator[dict]:
        """Subscribe (every event after this call returns is delivered), then follow the
        daemon's events (swaps, decisions, reloads) until the connection ends."""
        msgid = self._send("events", None)
        while self._next(msgid)[0] != "result":
            pass
        return self._follow(msgid)

    def _follow(self, msgid: int) -> Iterator[dict]:
        while True:
            kind, payload = self._next(msgid)
            if kind == "event":
                yield payload

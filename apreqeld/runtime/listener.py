"""The HTTP listener's connections, below the application: a bound on open connections (a
503 and close beyond it), aiohttp's protocol errors (malformed requests, header lines beyond
the bound) answered as OpenAI error objects, and aiohttp's log kept to one line per error."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from apreqeld.runtime.openai import RETRY_AFTER_S, OpenAIError


def error_response(err: OpenAIError, **extra: object) -> web.Response:
    resp = web.json_response(err.body() | extra, status=err.status, headers=err.headers)
    if err.headers.get("Connection") == "close":
        resp.force_close()
    return resp


class OneLine(logging.Filter):
    """aiohttp logs a malformed request with its traceback: keep one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


class Handler(RequestHandler):
    """aiohttp's per-connection handler, with its own protocol errors (a malformed request,
    a header line beyond MAX_LINE) answered as OpenAI's error object too."""

    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if sent already
        text = "internal error" if status >= 500 else (message or str(exc or "bad request"))
        err = OpenAIError(status, text.splitlines()[0][:200] if text else "bad request",
                          type="server_error" if status >= 500 else "invalid_request_error",
                          code="bad_request" if status < 500 else "internal_error")
        resp = error_response(err)
        resp.force_close()
        return resp


class Counted(asyncio.Protocol):
    """aiohttp's request handler, counted while its connection is open."""

    def __init__(self, inner: asyncio.Protocol, door) -> None:
        self.inner, self.door = inner, door

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.open -= 1
        self.inner.connection_lost(exc)


class Refuse(asyncio.Protocol):
    """Beyond the connection bound: a 503, then the connection closes (after the client's
    request has been read and dropped, so that it sees the answer rather than a reset)."""

    def __init__(self, body: bytes) -> None:
        self.body, self.transport, self.timer = body, None, None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                        b"\r\nRetry-After: " + RETRY_AFTER_S.encode() + b"\r\nConnection: close"
                        b"\r\nContent-Length: " + str(len(self.body)).encode() + b"\r\n\r\n"
                        + self.body)
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(2.0, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

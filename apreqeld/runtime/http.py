"""The OpenAI-compatible HTTP front door: a second way into the same scheduler and queue as the
msgpack socket (aiohttp). Control methods stay on the Unix socket.

Routes: POST /v1/chat/completions and /v1/completions (streaming as server-sent events or
whole), GET /v1/models, /health (200 when a variant serves, 503 while loading, broken or
shutting down) and /metrics (Prometheus text). A request is `Metrics.submit` (= the
scheduler's `submit`), then its job's future, as on the msgpack socket: accepted requests are
answered exactly once, a full queue is a 429 with Retry-After, and a client that goes away
marks its job cancelled (the worker stops generating at the next token).

Bounds: request bodies (`http_max_body_bytes`, 413), header lines and counts (aiohttp's parser,
400), open connections (`http_max_connections`; beyond, a 503 and close), and time: a client
must send its headers and body within `http_timeout_s`, an idle keep-alive connection closes
after it, and a stream the client stops reading for that long is cut and its job cancelled.
With a token file every route but /health needs `Authorization: Bearer TOKEN` (401).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import sys
from pathlib import Path

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from apreqeld.errors import DaemonError, InputError
from apreqeld.runtime import listener, openai, wire
from apreqeld.runtime.config import DaemonConfig
from apreqeld.runtime.listener import error_response
from apreqeld.runtime.metrics import CONTENT_TYPE, Metrics
from apreqeld.runtime.openai import RETRY_AFTER_S, OpenAIError, daemon_error

MAX_LINE = 8190  # bytes of the request line and of one header line
MAX_HEADERS = 64
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def read_token(path: Path) -> str:
    """The bearer token in `path` (one word; surrounding whitespace ignored)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the HTTP token file {path}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if not token or any(c.isspace() for c in token):
        raise InputError(f"the HTTP token file {path} must hold one token (no spaces)")
    return token


def sse(obj: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


class HttpFrontDoor:
    """The aiohttp application and its listener."""

    def __init__(self, config: DaemonConfig, scheduler, metrics: Metrics) -> None:
        self.config, self.scheduler, self.metrics = config, scheduler, metrics
        self.address = config.http_address
        self.token: str | None = None
        self.open = 0  # connections
        self.refused = {"connections": 0, "unauthorized": 0, "slow": 0}
        self.url: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._runner: web.AppRunner | None = None
        self._bound: Path | None = None  # the Unix socket file this listener made
        app = web.Application(client_max_size=config.http_max_body_bytes,
                              middlewares=[self._errors])
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        self.app = app
        metrics.registry.register(self)  # a collector: collect() below

    # ------------------------------------------------------------------ listening

    async def start(self) -> None:
        """Read the token, bind the listener and start accepting (before the first variant
        has loaded: /health says 503 until it serves)."""
        if self.config.http_token_file is not None:
            self.token = read_token(self.config.http_token_file)
        server_log = logging.getLogger("aiohttp.server")
        if not any(isinstance(f, listener.OneLine) for f in server_log.filters):
            server_log.addFilter(listener.OneLine())
        self._handler_kw = {"keepalive_timeout": self.config.http_timeout_s,
                            "max_line_size": MAX_LINE, "max_field_size": MAX_LINE,
                            "max_headers": MAX_HEADERS, "access_log": None,
                            "lingering_time": self.config.http_timeout_s}  # unread bodies
        self._runner = web.AppRunner(self.app, handle_signals=False, handler_cancellation=True,
                                     shutdown_timeout=2.0, **self._handler_kw)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        backlog = min(1024, 2 * self.config.http_max_connections)
        a = self.address
        try:
            if a.path is not None:
                from apreqeld.runtime.server import bind_socket  # the msgpack socket's rules

                sock = bind_socket(a.path)
                self._bound = a.path
                self._server = await loop.create_unix_server(self._protocol, sock=sock,
                                                             backlog=backlog)
                self.url = f"unix:{a.path}"
            else:
                self._server = await loop.create_server(self._protocol, host=a.host,
                                                        port=a.port, backlog=backlog,
                                                        reuse_address=True)
                port = self._server.sockets[0].getsockname()[1]
                self.url = f"http://{a.host if ':' not in a.host else f'[{a.host}]'}:{port}"
        except OSError as exc:
            await self.stop()
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio rewords it
            raise InputError(f"cannot listen for HTTP on {a}: {why}") from None
        print(f"apreqeld: HTTP on {self.url} (OpenAI API at {self.url}/v1"
              f"{', bearer token required' if self.token else ''})", file=sys.stderr,
              flush=True)

    def _protocol(self) -> asyncio.Protocol:
        if self.open >= self.config.http_max_connections:
            self.refused["connections"] += 1
            err = OpenAIError(503, f"busy: {self.config.http_max_connections} HTTP connections "
                              "are open", type="server_error", code="too_many_connections")
            return listener.Refuse(json.dumps(err.body()).encode())
        self.open += 1
        handler = listener.Handler(self._runner.server, loop=asyncio.get_running_loop(),
                                   **self._handler_kw)
        return listener.Counted(handler, self)

    def close_listener(self) -> None:
        """Stop accepting connections (open ones keep being served)."""
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        """Close every connection (after the scheduler has answered every job)."""
        self.close_listener()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._bound is not None:
            self._bound.unlink(missing_ok=True)
            self._bound = None

    # ------------------------------------------------------------------ middleware

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Authorization, then every error as OpenAI's error object (never a traceback)."""
        try:
            if self.token is not None and request.path != "/health":
                self._authorize(request)
            return await handler(request)
        except OpenAIError as err:
            return error_response(err)
        except web.HTTPException as exc:  # aiohttp's own: no route, wrong method
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
            message = (f"{request.method} {request.path}: {exc.reason}" if exc.status != 405
                       else f"{request.method} is not allowed on {request.path}")
            return error_response(OpenAIError(exc.status, message, code=code),)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001 - one line in the journal, an answer on the wire
            print(f"apreqeld: internal error in {request.method} {request.path}: {exc!r}",
                  file=sys.stderr, flush=True)
            return error_response(OpenAIError(500, f"internal error: {exc}",
                                              type="server_error", code="internal_error"))

    def _authorize(self, request: web.Request) -> None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                  self.token.encode()):
            self.refused["unauthorized"] += 1
            raise OpenAIError(401, "missing or wrong bearer token (send Authorization: Bearer "
                              "TOKEN)", type="authentication_error", code="invalid_api_key",
                              headers={"WWW-Authenticate": 'Bearer realm="apreqeld"'})

    def _unavailable(self, *, broken: bool = True) -> OpenAIError | None:
        """Why nothing can be served now (the same states /health reports), or None."""
        s = self.scheduler
        if s.closing:
            return OpenAIError(503, "the daemon is shutting down", type="server_error",
                               code=wire.SHUTTING_DOWN, headers={"Retry-After": RETRY_AFTER_S})
        if s.serving is None:
            return OpenAIError(503, "loading: no variant serves yet", type="server_error",
                               code="loading", headers={"Retry-After": RETRY_AFTER_S})
        if broken and s.broken:
            return OpenAIError(503, f"no variant can serve: {s.broken}", type="server_error",
                               code=wire.UNAVAILABLE, headers={"Retry-After": RETRY_AFTER_S})
        return None

    async def _body(self, request: web.Request) -> object:
        limit = self.config.http_max_body_bytes
        try:
            raw = await asyncio.wait_for(request.read(), self.config.http_timeout_s)
        except TimeoutError:
            self.refused["slow"] += 1
            raise OpenAIError(408, f"the request body did not arrive within "
                              f"{self.config.http_timeout_s:g} s", code="timeout",
                              headers={"Connection": "close"}) from None
        except web.HTTPRequestEntityTooLarge:
            raise OpenAIError(413, f"the request body exceeds {limit} bytes",
                              code="request_too_large") from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise OpenAIError(400, f"the body is not JSON: {str(exc)[:200]}",
                              code="invalid_json") from None

    # ------------------------------------------------------------------ routes

    async def health(self, request: web.Request) -> web.Response:
        s = self.scheduler
        err = self._unavailable()
        body = {"status": "ok" if err is None else err.code, "member": s.serving,
                "swapping": s.swap is not None, "target": s.target}
        if err is not None:
            return error_response(err, **body)
        return web.json_response(body)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(openai.model_list(self.scheduler.planset,
                                                   self.scheduler.serving))

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        self._model(name)
        return web.json_response(openai.model_entry(self.scheduler.planset,
                                                    self.scheduler.serving))

    def _model(self, name: str) -> None:
        served = self.scheduler.planset.name
        if name != served:
            raise OpenAIError(404, f"model {name!r} is not served here; this daemon serves "
                              f"{served!r} (see GET /v1/models)", param="model",
                              code="model_not_found")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "generate")

    async def _complete(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        body = await self._body(request)
        req = openai.parse(endpoint, body)
        self._model(req.model)
        if (err := self._unavailable(broken=False)) is not None:
            raise err  # a broken worker is tried again by the dispatcher: no early refusal
        kind, params = openai.wire_params(req, n_ctx=self.scheduler.spawn.n_ctx)
        reply = openai.Reply(kind, self.scheduler.planset.name)
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        first: list[str | None] = []  # the member serving at the first token

        def on_token(text: str) -> None:
            if not first:  # the dispatcher holds the slot: `serving` runs this job
                first.append(self.scheduler.serving)
            pieces.put_nowait(text)

        try:
            job = self.metrics.submit("http", kind, params, on_token)
        except DaemonError as exc:
            raise daemon_error(exc) from None
        job.future.add_done_callback(lambda _f: pieces.put_nowait(None))
        try:
            if req.stream:
                return await self._stream(request, job, reply, pieces, first,
                                          include_usage=req.include_usage)
            try:
                result = await asyncio.shield(job.future)
            except DaemonError as exc:
                raise daemon_error(exc) from None
            return web.json_response(reply.whole(result))
        finally:
            if not job.future.done():  # the client went away (aiohttp cancels the handler)
                job.cancelled = True

    async def _stream(self, request: web.Request, job, reply: openai.Reply,
                      pieces: asyncio.Queue, first: list, *,
                      include_usage: bool) -> web.StreamResponse:
        """Chunks as server-sent events from the first token on; an error before it is an
        ordinary error response, one after it an `error` event."""
        resp: web.StreamResponse | None = None
        chat = reply.kind == "chat"
        ended = False
        while not ended:
            texts = [await pieces.get()]
            while not pieces.empty():
                texts.append(pieces.get_nowait())
            if texts[-1] is None:
                texts.pop()
                ended = True
            if not texts:
                continue
            events = []
            if resp is None:
                resp = await self._open(request)
                if chat:
                    events.append(sse(reply.chunk(first[0], first=True)))
            events += [sse(reply.chunk(first[0], t)) for t in texts]
            if not await self._send(request, job, resp, events):
                return resp
        try:
            result = job.future.result()
        except DaemonError as exc:
            err = daemon_error(exc)
            if resp is None:
                raise err from None
            await self._send(request, job, resp, [sse(err.body(), "error"), DONE])
            return resp
        events = []
        if resp is None:  # nothing generated
            resp = await self._open(request)
            if chat:
                events.append(sse(reply.chunk(result.get("plan"), first=True)))
        events += [sse(c) for c in reply.last(result, include_usage=include_usage)] + [DONE]
        if await self._send(request, job, resp, events):
            await resp.write_eof()
        return resp

    async def _open(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await resp.prepare(request)
        return resp

    async def _send(self, request: web.Request, job, resp: web.StreamResponse,
                    events: list[bytes]) -> bool:
        """Write; False when the client is gone or stopped reading (its job is cancelled)."""
        try:
            await asyncio.wait_for(resp.write(b"".join(events)), self.config.http_timeout_s)
            return True
        except TimeoutError:
            self.refused["slow"] += 1
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionError, RuntimeError):  # reset, or closing
            pass
        job.cancelled = True
        return False

    # ------------------------------------------------------------------ metrics

    def describe(self) -> list:
        return []

    def collect(self):
        """The listener's own figures (a prometheus_client collector)."""
        yield GaugeMetricFamily("apreqeld_http_connections", "Open HTTP connections",
                                value=self.open)
        refused = CounterMetricFamily("apreqeld_http_refused", "HTTP connections or requests "
                                      "refused before reaching the queue", labels=["reason"])
        for reason, n in self.refused.items():
            refused.add_metric([reason], n)
        yield refused

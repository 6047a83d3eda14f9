"""The daemon process: the Unix socket, one task per request, the plan-set watcher, systemd
notifications, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import msgpack

from apreqeld import __version__
from apreqeld.core.selection import ServiceLevels, priority_from
from apreqeld.errors import ApreqelError, DaemonError, InputError
from apreqeld.manifest import load_planset, manifest_path
from apreqeld.runtime import access, notify, wire
from apreqeld.runtime.access import Access
from apreqeld.runtime.config import DaemonConfig
from apreqeld.runtime.metrics import Metrics
from apreqeld.runtime.monitor import open_source
from apreqeld.runtime.scheduler import Scheduler
from apreqeld.store.shards import ShardStore

RELOAD_DEBOUNCE_S = 0.3
MAX_CONNECTIONS = 128  # beyond: refused with a "busy" error and closed
MAX_PENDING = 32  # requests in progress on one connection; beyond: "busy" answers
FRAME_TIMEOUT_S = 5.0  # a message begun must be finished within this time
SEND_LIMIT = 4 * wire.MAX_FRAME  # bytes queued unread for one client before it is dropped


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path` (mode 0660); a stale socket file is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise InputError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise DaemonError(f"another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {path}: {exc.strerror}") from None
    os.chmod(path, 0o660)
    sock.listen(64)
    return sock


class Daemon:
    """Serves the wire protocol on top of a Scheduler."""

    def __init__(self, config: DaemonConfig, scheduler: Scheduler) -> None:
        self.config = config
        self.scheduler = scheduler
        self.stopping = asyncio.Event()
        self._connections: set[asyncio.StreamWriter] = set()
        self.access = Access(os.geteuid(), os.getegid(), access.group_id(config.admin_group))
        self.refused: dict[str, int] = {}  # connections refused or dropped, by reason
        self._manifest_sha: str | None = None
        self._reload_timer: asyncio.TimerHandle | None = None
        # With HTTP on, requests of both front doors are counted for its /metrics.
        self.metrics = Metrics(scheduler) if config.http is not None else None

    def submit(self, frontend: str, kind: str, params: dict, on_token: Callable[[str], None]):
        """The scheduler's `submit`, counted for /metrics when HTTP is on."""
        if self.metrics is not None:
            return self.metrics.submit(frontend, kind, params, on_token)
        return self.scheduler.submit(kind, params, on_token)

    # ------------------------------------------------------------------ connections

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: decode frames, check each request, run it in its own task."""
        sock = writer.get_extra_info("socket")
        role = self.access.role(access.peer_of(sock) if sock is not None else None)
        if role is None or len(self._connections) >= MAX_CONNECTIONS:
            code, why = ((wire.PERMISSION, "permission denied: not in the socket's group")
                         if role is None else
                         (wire.BUSY, f"busy: {MAX_CONNECTIONS} connections are open"))
            self.refused[code] = self.refused.get(code, 0) + 1
            self._send(writer, wire.notification("error", wire.error(code, why)))
            writer.close()
            return
        self._connections.add(writer)
        unpacker = wire.unpacker()
        tasks: set[asyncio.Task] = set()
        jobs: set = set()
        fed = 0
        try:
            while not writer.is_closing():
                partial = fed > unpacker.tell()  # a frame begun and not finished
                try:
                    data = await asyncio.wait_for(reader.read(65536),
                                                  FRAME_TIMEOUT_S if partial else None)
                except TimeoutError:
                    self._close_with(writer, wire.INVALID, "an incomplete message for "
                                     f"{FRAME_TIMEOUT_S:g} s")
                    break
                if not data:
                    if partial:
                        self._close_with(writer, wire.INVALID, "truncated message")
                    break
                fed += len(data)
                try:
                    unpacker.feed(data)
                    for message in unpacker:
                        self._admit(writer, message, role, tasks, jobs)
                except msgpack.BufferFull:
                    self._close_with(writer, wire.TOO_LARGE,
                                     f"message exceeds the frame bound {wire.MAX_FRAME}")
                except (msgpack.UnpackException, ValueError) as exc:
                    self._close_with(writer, wire.INVALID, f"not MessagePack: {exc}")
        except (ConnectionError, OSError):
            pass
        finally:
            for job in jobs:
                job.cancelled = True
            for task in tasks:
                if task.get_name() == "events":
                    task.cancel()
            self._connections.discard(writer)
            writer.close()

    def _close_with(self, writer: asyncio.StreamWriter, code: str, message: str) -> None:
        """An error notification, then the connection ends (after it is written)."""
        self._send(writer, wire.notification("error", wire.error(code, message)))
        writer.close()

    def _admit(self, writer: asyncio.StreamWriter, message: object, role: str,
               tasks: set[asyncio.Task], jobs: set) -> None:
        """Validate one decoded message and start serving it, or answer its error at once."""
        try:
            msgid, method, params = wire.parse_request(message)
        except wire.BadMessage as bad:
            if bad.msgid is None:
                self._send(writer, wire.notification("error", wire.error(bad.code, bad.message)))
            else:
                self._send(writer, wire.response(bad.msgid, wire.error(bad.code, bad.message)))
            return
        if not self.access.allows(role, method):
            self._send(writer, wire.response(msgid, wire.error(
                wire.PERMISSION, f"permission denied: {method} needs the control role (root, "
                "the service user or the admin group)")))
            return
        if len(tasks) >= MAX_PENDING:
            self._send(writer, wire.response(msgid, wire.error(
                wire.BUSY, f"busy: {MAX_PENDING} requests pending on this connection")))
            return
        task = asyncio.create_task(self._request(writer, msgid, method, params, jobs),
                                   name="events" if method == "events" else method)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Queue bytes for a client; one that lets SEND_LIMIT pile up unread is dropped."""
        if writer.is_closing():
            return
        writer.write(data)
        if writer.transport.get_write_buffer_size() > SEND_LIMIT:
            self.refused["slow"] = self.refused.get("slow", 0) + 1
            writer.transport.abort()

    async def _request(self, writer: asyncio.StreamWriter, msgid: int, method: str, params,
                       jobs: set) -> None:
        try:
            if method == "events":
                await self._events(writer, msgid)
                return
            result = await self._call(writer, msgid, method, params, jobs)
            reply = wire.response(msgid, None, result)
        except DaemonError as exc:
            reply = wire.response(msgid, wire.error(exc.code, str(exc)))
        except ApreqelError as exc:
            reply = wire.response(msgid, wire.error(wire.INVALID, str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the daemon answers and lives on
            print(f"apreqeld: internal error in {method}: {exc!r}", file=sys.stderr)
            reply = wire.response(msgid, wire.error(wire.FAILED, f"internal error: {exc}"))
        self._send(writer, reply)

    async def _call(self, writer, msgid: int, method: str, params, jobs: set) -> object:
        s = self.scheduler
        if method == "hello":
            return {"protocol": wire.PROTOCOL, "daemon": f"apreqeld {__version__}",
                    "methods": list(wire.METHODS), "max_frame": wire.MAX_FRAME}
        if method == "status":
            return s.status() | {"connections": len(self._connections),
                                 "refused": dict(self.refused)}
        if method == "plans":
            return s.plans()
        if method in ("generate", "chat"):
            def on_token(text: str) -> None:
                self._send(writer, wire.notification("token", {"id": msgid, "text": text}))

            job = self.submit("msgpack", method, params.model_dump(exclude={"v"}), on_token)
            jobs.add(job)
            try:
                return await job.future
            finally:
                jobs.discard(job)
        if method == "set_priority":
            levels = ServiceLevels(params.max_latency_ms, params.max_accuracy,
                                   params.max_memory_bytes)
            priority = priority_from(params.preset if params.preset is not None
                                     else params.weights, levels=levels)
            return await s.set_priority(priority, wait=params.wait)
        if method == "pin":
            return await s.pin(params.id, wait=params.wait)
        if method == "unpin":
            return await s.unpin(wait=params.wait)
        if method == "reload":
            return await self.reload()
        raise DaemonError(f"method {method} is not served", code=wire.UNKNOWN_METHOD)

    async def _events(self, writer: asyncio.StreamWriter, msgid: int) -> None:
        queue = self.scheduler.subscribe()
        try:
            self._send(writer, wire.response(msgid, None, {"subscribed": True}))
            while not writer.is_closing():
                event = await queue.get()
                self._send(writer, wire.notification("event", event))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.scheduler.unsubscribe(queue)

    # ------------------------------------------------------------------ plan-set watch

    def _read_sha(self) -> str | None:
        try:
            return hashlib.sha256(manifest_path(self.config.plans).read_bytes()).hexdigest()
        except OSError:
            return None

    async def reload(self) -> dict:
        """Load the plan set again; refused (event, old set kept) when the manifest is invalid
        or has no shard table."""
        self._manifest_sha = self._read_sha()
        return await self.scheduler.reload()

    def _changed(self) -> None:
        """(event loop) the manifest may have changed: reload after a short quiet time."""
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        loop = asyncio.get_running_loop()
        self._reload_timer = loop.call_later(RELOAD_DEBOUNCE_S,
                                             lambda: loop.create_task(self._auto_reload()))

    async def _auto_reload(self) -> None:
        sha = self._read_sha()
        if sha is None or sha == self._manifest_sha:
            return
        with contextlib.suppress(DaemonError):
            await self.reload()

    def watch(self, loop: asyncio.AbstractEventLoop):
        """A watchdog observer on the plan-set directory (stopped by the caller)."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        manifest = manifest_path(self.config.plans)
        daemon = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                paths = {str(event.src_path), str(getattr(event, "dest_path", "") or "")}
                if any(Path(p).name == manifest.name for p in paths if p):
                    loop.call_soon_threadsafe(daemon._changed)

        observer = Observer()
        observer.schedule(Handler(), str(manifest.parent), recursive=False)
        observer.daemon = True
        observer.start()
        return observer

    # ------------------------------------------------------------------ life

    async def run(self) -> None:
        """Listen, start serving, and stop cleanly on SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        inherited = notify.listen_sockets()
        sock = inherited[0] if inherited else bind_socket(Path(self.config.socket))
        owned = None if inherited else Path(self.config.socket)
        self.access = self.access.for_socket(sock)
        server = await asyncio.start_unix_server(self.handle, sock=sock,
                                                 backlog=2 * MAX_CONNECTIONS)
        observer = None
        pinger = None
        http = None
        try:
            if self.metrics is not None:
                from apreqeld.runtime.http import HttpFrontDoor

                self.metrics.start()
                http = HttpFrontDoor(self.config, self.scheduler, self.metrics)
                await http.start()  # /health answers 503 while the first plan loads
            notify.notify("STATUS=loading the first plan")
            self._manifest_sha = self._read_sha()
            start = asyncio.create_task(self.scheduler.start())
            stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not start.done():
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError, DaemonError):
                    await start
            else:
                start.result()  # a DaemonError here: nothing can serve
                plan = self.scheduler.serving
                notify.notify("READY=1", f"STATUS=serving {plan} on {self.config.socket}")
                print(f"apreqeld: serving {plan} on {self.config.socket}", file=sys.stderr,
                      flush=True)
                if self.config.watch:
                    observer = self.watch(loop)
                interval = notify.watchdog_interval()
                if interval:
                    pinger = asyncio.create_task(self._ping(interval))
                await stop
        finally:
            notify.notify("STOPPING=1", "STATUS=stopping")
            server.close()
            if http is not None:
                http.close_listener()
            if observer is not None:
                observer.stop()
            if pinger is not None:
                pinger.cancel()
            await self.scheduler.shutdown(self.config.grace_s)
            if http is not None:
                await http.stop()
            if self.metrics is not None:
                await self.metrics.stop()
            for writer in list(self._connections):
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.drain()
                writer.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)
            if owned is not None:
                with contextlib.suppress(FileNotFoundError):
                    owned.unlink()

    async def _ping(self, interval: float) -> None:
        while True:
            s = self.scheduler
            state = f"swapping to {s.swap['to']}" if s.swap else f"serving {s.serving}"
            notify.notify("WATCHDOG=1", f"STATUS={state}, queue {s.status()['queue']}")
            await asyncio.sleep(interval)


def run_daemon(config: DaemonConfig) -> None:
    """Load and check the plan set, then serve until stopped (blocking)."""
    planset = load_planset(config.plans)
    priority = priority_from(config.priority)
    ShardStore(Path(config.state_dir))  # a state dir others could write is refused here
    monitor = open_source(config.monitor)  # auto: jtop, else procfs (said once)

    async def main() -> None:
        scheduler = Scheduler(config, planset, priority, monitor=monitor)
        await Daemon(config, scheduler).run()

    asyncio.run(main())

"""The daemon process: the Unix socket and its connections, one task per request, the
plan-set watcher, systemd notifications, a reload on SIGHUP and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from apreqeld import __version__
from apreqeld.core.selection import ServiceLevels, priority_from
from apreqeld.errors import ApreqelError, DaemonError
from apreqeld.manifest import load_planset, manifest_path
from apreqeld.runtime import access, notify, wire
from apreqeld.runtime.access import Access
from apreqeld.runtime.config import DaemonConfig
from apreqeld.runtime.connections import Conn, Connections, Limits
from apreqeld.runtime.metrics import Metrics
from apreqeld.runtime.monitor import open_source
from apreqeld.runtime.scheduler import Scheduler
from apreqeld.runtime.sockets import bind_socket
from apreqeld.store.shards import ShardStore

RELOAD_DEBOUNCE_S = 0.3
BACKLOG = 256  # pending connects the kernel queues before the daemon accepts them
EXIT_FAILED = 70  # a loop could not be kept running (EX_SOFTWARE): systemd restarts us

__all__ = ["Daemon", "bind_socket", "run_daemon"]


def limits_of(config: DaemonConfig) -> Limits:
    return Limits(max_connections=config.max_connections,
                  control_reserve=config.control_reserve,
                  per_uid=config.max_connections_per_uid, idle_timeout_s=config.idle_timeout_s,
                  frame_timeout_s=config.frame_timeout_s)


class Daemon:
    """Serves the wire protocol on top of a Scheduler."""

    def __init__(self, config: DaemonConfig, scheduler: Scheduler) -> None:
        self.config = config
        self.scheduler = scheduler
        self.stopping = asyncio.Event()
        self.connections = Connections(limits_of(config))
        self.access = Access(os.geteuid(), os.getegid(), access.group_id(config.admin_group))
        self.exit_code = 0
        self._manifest_sha: str | None = None
        self._reload_timer: asyncio.TimerHandle | None = None
        self._reloading: asyncio.Task | None = None
        # With HTTP on, requests of both front doors are counted for its /metrics.
        self.metrics = Metrics(scheduler) if config.http is not None else None

    @property
    def refused(self) -> dict[str, int]:
        return self.connections.refused

    def submit(self, frontend: str, kind: str, params: dict, on_token: Callable[[str], None]):
        """The scheduler's `submit`, counted for /metrics when HTTP is on."""
        if self.metrics is not None:
            return self.metrics.submit(frontend, kind, params, on_token)
        return self.scheduler.submit(kind, params, on_token)

    # ------------------------------------------------------------------ connections

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: its role from the kernel's credentials, then its frames."""
        sock = writer.get_extra_info("socket")
        peer = access.peer_of(sock) if sock is not None else None
        role = self.access.role(peer)
        if peer is None or role is None:
            self.connections.refuse(writer, wire.PERMISSION, "permission denied: not in the "
                                    "socket's group" if peer else "permission denied: the "
                                    "peer's credentials are unknown")
            return
        await self.connections.serve(reader, writer, peer.uid, role, self._admit)

    def _admit(self, conn: Conn, message: object) -> None:
        """Validate one decoded message and start serving it, or answer its error at once."""
        try:
            msgid, method, params = wire.parse_request(message)
        except wire.BadMessage as bad:
            if bad.msgid is None:
                conn.send(wire.notification("error", wire.error(bad.code, bad.message)))
            else:
                conn.send(wire.response(bad.msgid, wire.error(bad.code, bad.message)))
            return
        if not self.access.allows(conn.role, method):
            conn.send(wire.response(msgid, wire.error(
                wire.PERMISSION, f"permission denied: {method} needs the control role (root, "
                "the service user or the admin group)")))
            return
        if len(conn.tasks) >= self.connections.limits.max_pending:
            conn.send(wire.response(msgid, wire.error(
                wire.BUSY, f"busy: {self.connections.limits.max_pending} requests pending on "
                "this connection")))
            return
        conn.track(asyncio.create_task(self._request(conn, msgid, method, params),
                                       name="events" if method == "events" else method))

    async def _request(self, conn: Conn, msgid: int, method: str, params) -> None:
        try:
            if method == "events":
                await self._events(conn, msgid)
                return
            result = await self._call(conn, msgid, method, params)
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
        conn.send(reply)

    async def _call(self, conn: Conn, msgid: int, method: str, params) -> object:
        s = self.scheduler
        if method == "hello":
            return {"protocol": wire.PROTOCOL, "daemon": f"apreqeld {__version__}",
                    "methods": list(wire.METHODS), "max_frame": wire.MAX_FRAME}
        if method == "status":
            return s.status() | {"connections": len(self.connections),
                                 "connection_limits": self.connections.view(),
                                 "refused": dict(self.refused)}
        if method == "plans":
            return s.plans()
        if method == "compose":
            spec = params.preset if params.preset is not None else params.weights
            priority = s.priority
            levels = ServiceLevels(params.max_latency_ms, None, params.max_memory_bytes)
            if spec is not None or params.max_latency_ms or params.max_memory_bytes:
                priority = priority_from(spec if spec is not None else priority.weights,
                                         levels=levels)
            budget = params.budget_bytes if params.budget_bytes is not None else \
                s.adapter.budget_bytes()
            return s.adapter.preview(priority, budget_bytes=budget)
        if method in ("generate", "chat"):
            def on_token(text: str) -> None:
                conn.send(wire.notification("token", {"id": msgid, "text": text}))

            if msgid in conn.jobs:
                raise DaemonError(f"request id {msgid} is already in progress on this "
                                  "connection", code=wire.INVALID)
            job = self.submit("msgpack", method, params.model_dump(exclude={"v"}), on_token)
            conn.jobs[msgid] = job
            try:
                return await job.future
            finally:
                conn.jobs.pop(msgid, None)
        if method == "cancel":
            job = conn.jobs.get(params.id)
            if job is not None:
                job.cancelled = True
            return {"cancelled": job is not None}
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

    async def _events(self, conn: Conn, msgid: int) -> None:
        queue = self.scheduler.subscribe()
        writer = conn.writer
        try:
            conn.send(wire.response(msgid, None, {"subscribed": True}))
            while not writer.is_closing():
                event = await queue.get()
                conn.send(wire.notification("event", event))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.scheduler.unsubscribe(queue)

    # ------------------------------------------------------------------ plan-set reloads

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
        self._reload_timer = loop.call_later(RELOAD_DEBOUNCE_S, self._start_reload, False)

    def _start_reload(self, forced: bool) -> None:
        """One background reload at a time (the watcher's, or SIGHUP's when `forced`)."""
        if self._reloading is not None and not self._reloading.done():
            if not forced:
                return
        self._reloading = asyncio.get_running_loop().create_task(self._background_reload(
            forced), name="reload")

    async def _background_reload(self, forced: bool) -> None:
        if forced:
            self.scheduler.emit("reload", reason="SIGHUP")
        else:
            sha = self._read_sha()
            if sha is None or sha == self._manifest_sha:
                return
        try:
            await self.reload()
        except ApreqelError:
            pass  # refused: the event says why, the old plan set serves on
        except Exception as exc:  # noqa: BLE001 - a reload must never take the daemon down
            self.scheduler.emit("planset_rejected", reason=f"internal error: {exc!r}")

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

    async def run(self) -> int:
        """Listen, start serving, reload on SIGHUP, stop cleanly on SIGTERM/SIGINT; the exit
        code (EXIT_FAILED when a loop could not be kept running)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._start_reload, True)
        inherited = notify.listen_sockets()
        sock = inherited[0] if inherited else bind_socket(Path(self.config.socket),
                                                          backlog=BACKLOG)
        owned = None if inherited else Path(self.config.socket)
        self.access = self.access.for_socket(sock)
        server = await asyncio.start_unix_server(self.handle, sock=sock, backlog=BACKLOG)
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
                failed = asyncio.create_task(self.scheduler.failed.wait())
                await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
                failed.cancel()
                if self.scheduler.failed.is_set():
                    reason = self.scheduler.supervisor.reason
                    print(f"apreqeld: stopping: {reason}", file=sys.stderr, flush=True)
                    notify.notify(f"STATUS=failed: {reason}")
                    self.exit_code = EXIT_FAILED
            stop.cancel()
        finally:
            notify.notify("STOPPING=1", "STATUS=stopping")
            loop.remove_signal_handler(signal.SIGHUP)
            server.close()
            if http is not None:
                http.close_listener()
            if observer is not None:
                observer.stop()
            if pinger is not None:
                pinger.cancel()
            if self._reloading is not None:
                self._reloading.cancel()
            await self.scheduler.shutdown(self.config.grace_s)
            if http is not None:
                await http.stop()
            if self.metrics is not None:
                await self.metrics.stop()
            for conn in list(self.connections.open.values()):
                with contextlib.suppress(ConnectionError, OSError):
                    await conn.writer.drain()
                conn.writer.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)
            if owned is not None:
                with contextlib.suppress(FileNotFoundError):
                    owned.unlink()
        return self.exit_code

    async def _ping(self, interval: float) -> None:
        """WATCHDOG=1 only while every loop makes progress: a stuck daemon gets restarted."""
        while True:
            s = self.scheduler
            state = f"swapping to {s.swapper.swap['to']}" if s.swapper.swap else \
                f"serving {s.serving}"
            if s.healthy():
                notify.notify("WATCHDOG=1", f"STATUS={state}, queue {s.dispatcher.queued}")
            else:
                stuck = ", ".join(s.supervisor.progress.stuck()) or s.supervisor.reason
                notify.notify(f"STATUS=stuck: {stuck}")
            await asyncio.sleep(interval)


def run_daemon(config: DaemonConfig) -> None:
    """Load and check the plan set, then serve until stopped (blocking)."""
    planset = load_planset(config.plans)
    priority = priority_from(config.priority)
    ShardStore(Path(config.state_dir))  # a state dir others could write is refused here
    monitor = open_source(config.monitor)  # auto: jtop, else procfs (said once)

    async def main() -> int:
        scheduler = Scheduler(config, planset, priority, monitor=monitor)
        return await Daemon(config, scheduler).run()

    code = asyncio.run(main())
    if code:
        raise DaemonError("a loop of the daemon failed repeatedly; stopped (see above)",
                          code=wire.FAILED)

"""The supervisor's side of a worker process: start it, wait for `ready`, run requests on it,
stop it. One request at a time per worker (the scheduler guarantees it)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack

from apreqeld.errors import DaemonError
from apreqeld.runtime import wire


class Job:
    """One accepted request: answered exactly once through `future`.

    Front doors set `job.cancelled = True` when their client goes away (or asks to cancel);
    the worker serving it is told at once.
    """

    def __init__(self, seq: int, kind: str, params: dict, on_token: Callable[[str], None],
                 future: asyncio.Future) -> None:
        self.seq, self.kind, self.params, self.on_token = seq, kind, params, on_token
        self.future = future
        self.accepted = time.monotonic()
        self._cancelled = False
        self._on_cancel: Callable[[], None] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        if value and not self._cancelled:
            self._cancelled = True
            if self._on_cancel is not None:
                self._on_cancel()

    def answer(self, result: dict | None = None, *, error: DaemonError | None = None) -> bool:
        """Resolve once; False when it was already answered."""
        if self.future.done():
            return False
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)
        return True


@dataclass
class Spawn:
    """How workers are started (the serving context)."""

    n_ctx: int
    threads: int
    gpu_layers: int = 0
    timeout_s: float = 120.0  # load and warm-up
    stall_s: float = 60.0  # a request whose worker says nothing this long: the worker is killed


INBOX = 256  # worker messages decoded and not yet consumed; beyond, the socket is not read


class Worker:
    """A running worker process and its message channel."""

    def __init__(self, plan: str, path: Path, proc: asyncio.subprocess.Process,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.plan, self.path, self.proc = plan, path, proc
        self.reader, self.writer = reader, writer
        self.unpacker = msgpack.Unpacker(raw=False)
        self.rss = 0
        self.load_ms = 0.0
        self.stopping = False  # stop() was asked: its exit is no failure
        self.killed = False  # killed for stalling: dead from now on, whatever the kernel says
        self.reported = False  # its unasked death was counted (once)
        self.started = time.monotonic()
        self.stall_s = 60.0
        self._inbox: asyncio.Queue = asyncio.Queue(maxsize=INBOX)
        self._pump: asyncio.Task | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return (not self.killed and self.proc.returncode is None
                and not (self._pump and self._pump.done()))

    @classmethod
    async def start(cls, plan: str, path: Path, spawn: Spawn) -> Worker:
        """Start a worker on `path` and wait until it has loaded and warmed up; a process that
        cannot be started (fork, pipes, fds) is a DaemonError like a failed load."""
        try:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise DaemonError(f"cannot start a worker for {plan}: {exc}",
                              code=wire.UNAVAILABLE) from None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "apreqeld.runtime.worker", "--fd", str(child.fileno()),
                "--model", str(path), "--plan", plan, "--n-ctx", str(spawn.n_ctx),
                "--threads", str(spawn.threads), "--gpu-layers", str(spawn.gpu_layers),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            parent.close()
            raise DaemonError(f"cannot start a worker for {plan}: {exc}",
                              code=wire.UNAVAILABLE) from None
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        worker = cls(plan, path, proc, reader, writer)
        worker.stall_s = spawn.stall_s
        worker._pump = asyncio.create_task(worker._read_loop())
        try:
            first = await asyncio.wait_for(worker._inbox.get(), spawn.timeout_s)
        except TimeoutError:
            await worker.stop()
            raise DaemonError(f"worker for {plan} did not load within {spawn.timeout_s:g} s",
                              code=wire.UNAVAILABLE) from None
        except asyncio.CancelledError:  # nobody will own it: it must not outlive the start
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            worker.writer.close()
            worker._pump.cancel()
            raise
        if first.get("t") != "ready":
            await worker.stop()
            detail = first.get("message") or f"exited with code {proc.returncode}"
            raise DaemonError(f"worker for {plan} failed to load: {detail}",
                              code=wire.UNAVAILABLE)
        worker.rss = int(first.get("rss", 0))
        worker.load_ms = float(first.get("load_ms", 0)) + float(first.get("warm_ms", 0))
        return worker

    async def _read_loop(self) -> None:
        """Move decoded messages into the inbox; an EOF message at the end."""
        try:
            while data := await self.reader.read(65536):
                self.unpacker.feed(data)
                for message in self.unpacker:
                    await self._inbox.put(message)
        except (ConnectionError, OSError):
            pass
        await self._inbox.put({"t": "eof"})

    def _send(self, message: dict) -> None:
        self.writer.write(msgpack.packb(message, use_bin_type=True))

    async def run(self, job: Job, on_message: Callable[[], None] = lambda: None) -> dict:
        """Generate for `job`, streaming tokens to it; the final response (text, usage).
        A cancel reaches the worker at once; a worker silent for `stall_s` is killed."""
        if not self.alive:
            raise DaemonError(f"the worker for {self.plan} is not running",
                              code=wire.WORKER_FAILED)
        pieces: list[str] = []
        try:
            self._send({"t": "run", "id": job.seq, "kind": job.kind, "params": job.params})
            await self.writer.drain()
        except (ConnectionError, OSError):
            raise DaemonError(f"the worker for {self.plan} went away",
                              code=wire.WORKER_FAILED) from None
        job._on_cancel = self._wake
        cancel_sent = False
        try:
            while True:
                if job.cancelled and not cancel_sent:
                    with contextlib.suppress(ConnectionError, OSError):
                        self._send({"t": "cancel"})
                    cancel_sent = True
                try:
                    message = await asyncio.wait_for(self._inbox.get(), self.stall_s)
                except TimeoutError:
                    self.killed = True
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                    raise DaemonError(f"the worker serving {self.plan} said nothing for "
                                      f"{self.stall_s:g} s and was killed",
                                      code=wire.WORKER_FAILED) from None
                on_message()
                kind = message.get("t")
                if kind == "tok" and message.get("id") == job.seq:
                    pieces.append(message["text"])
                    if not job.cancelled:
                        job.on_token(message["text"])
                elif kind == "done" and message.get("id") == job.seq:
                    return {"text": "".join(pieces), "finish": message.get("finish"),
                            "usage": message.get("usage", {})}
                elif kind == "fail" and message.get("id") == job.seq:
                    if message.get("code") == wire.INVALID:  # the request, not the worker
                        raise DaemonError(str(message.get("message")), code=wire.INVALID)
                    raise DaemonError(f"generation failed on {self.plan}: "
                                      f"{message.get('message')}", code=wire.FAILED)
                elif kind == "eof":
                    with contextlib.suppress(asyncio.QueueFull):
                        self._inbox.put_nowait(message)  # later readers see the end too
                    raise DaemonError(f"the worker serving {self.plan} died during the "
                                      "request", code=wire.WORKER_FAILED)
        finally:
            job._on_cancel = None

    def _wake(self) -> None:
        """A cancel arrived: wake run() (a full inbox wakes it anyway)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait({"t": "wake"})

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit; kill it if it does not within `timeout`."""
        self.stopping = True
        if self.proc.returncode is None:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                self._send({"t": "stop"})
                self.writer.close()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        self.writer.close()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    def describe(self) -> dict:
        return {"plan": self.plan, "pid": self.pid, "rss": self.rss,
                "alive": self.alive, "load_ms": self.load_ms}

"""The supervisor's side of a worker process: start it, wait for `ready`, run requests on it,
stop it. One request at a time per worker (the scheduler guarantees it)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from apreqeld.errors import DaemonError
from apreqeld.runtime import wire


@dataclass(eq=False)
class Job:
    """One accepted request: answered exactly once through `future`."""

    seq: int
    kind: str  # "generate" or "chat"
    params: dict
    on_token: Callable[[str], None]
    future: asyncio.Future
    accepted: float = field(default_factory=time.monotonic)
    cancelled: bool = False

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
    timeout_s: float = 120.0


class Worker:
    """A running worker process and its message channel."""

    def __init__(self, plan: str, path: Path, proc: asyncio.subprocess.Process,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.plan, self.path, self.proc = plan, path, proc
        self.reader, self.writer = reader, writer
        self.unpacker = msgpack.Unpacker(raw=False)
        self.rss = 0
        self.load_ms = 0.0
        self.stopping = False
        self.started = time.monotonic()
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._pump: asyncio.Task | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not (self._pump and self._pump.done())

    @classmethod
    async def start(cls, plan: str, path: Path, spawn: Spawn) -> Worker:
        """Start a worker on `path` and wait until it has loaded and warmed up."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "apreqeld.runtime.worker", "--fd", str(child.fileno()),
                "--model", str(path), "--plan", plan, "--n-ctx", str(spawn.n_ctx),
                "--threads", str(spawn.threads), "--gpu-layers", str(spawn.gpu_layers),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        worker = cls(plan, path, proc, reader, writer)
        worker._pump = asyncio.create_task(worker._read_loop())
        try:
            first = await asyncio.wait_for(worker._inbox.get(), spawn.timeout_s)
        except TimeoutError:
            await worker.stop()
            raise DaemonError(f"worker for {plan} did not load within {spawn.timeout_s:g} s",
                              code=wire.UNAVAILABLE) from None
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

    async def run(self, job: Job) -> dict:
        """Generate for `job`, streaming tokens to it; the final response (text, usage)."""
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
        cancel_sent = False
        while True:
            if job.cancelled and not cancel_sent:
                with contextlib.suppress(ConnectionError, OSError):
                    self._send({"t": "cancel"})
                cancel_sent = True
            message = await self._inbox.get()
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
                raise DaemonError(f"generation failed on {self.plan}: {message.get('message')}",
                                  code=wire.FAILED)
            elif kind == "eof":
                await self._inbox.put(message)  # later readers see the end too
                raise DaemonError(f"the worker serving {self.plan} died during the request",
                                  code=wire.WORKER_FAILED)

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

"""A worker: one child process serving one loaded variant (`python -m apreqeld.runtime.worker`).

It talks msgpack maps over an inherited socket (`--fd`): it loads the GGUF, warms up with one
decode, reports `ready` with its resident memory, then serves one request at a time, streaming
`tok` messages and ending each with `done` or `fail`. It exits on `stop`, on EOF, and (Linux)
when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

import msgpack
import psutil

from apreqeld.errors import InputError

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent exits (Linux only)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass


class Channel:
    """Blocking msgpack messages over a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False)
        self.pending: list = []

    def send(self, message: dict) -> None:
        self.sock.sendall(msgpack.packb(message, use_bin_type=True))

    def _fill(self, timeout: float | None) -> bool:
        """Read what is available; False at EOF."""
        try:
            if timeout == 0:  # between tokens: one non-blocking read, no select
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            elif timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
                return True
            else:
                data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.unpacker.feed(data)
        self.pending.extend(self.unpacker)
        return True

    def receive(self, timeout: float | None = None) -> dict | None:
        """The next message; None at EOF or when nothing came within `timeout`."""
        while not self.pending:
            if not self._fill(timeout):
                return {"t": "eof"}
            if timeout is not None and not self.pending:
                return None
        return self.pending.pop(0)


def serve(channel: Channel, model, plan: str) -> None:
    """Answer requests until told to stop or the supervisor goes away."""
    while True:
        msg = channel.receive()
        kind = msg.get("t")
        if kind in ("stop", "eof"):
            return
        if kind != "run":
            continue
        run(channel, model, plan, msg)


def run(channel: Channel, model, plan: str, msg: dict) -> None:
    """Generate for one request, streaming tokens; stop early on `cancel`."""
    from apreqeld.engine import SamplingOptions  # loaded with the model already

    rid, p = msg["id"], msg["params"]
    t0 = time.perf_counter()
    first = None
    finish = "stop"
    try:
        opts = SamplingOptions(
            max_tokens=p["max_tokens"], temperature=p["temperature"], stop=p.get("stop") or (),
            seed=p.get("seed"), top_p=p.get("top_p"),
            presence_penalty=p.get("presence_penalty") or 0.0,
            frequency_penalty=p.get("frequency_penalty") or 0.0,
            response_format=p.get("response_format"))
        if msg["kind"] == "chat":
            stream = model.chat(p["messages"], options=opts)
        else:
            stream = model.complete(p["prompt"], options=opts)
        for piece in stream:
            if piece.text:
                if first is None:
                    first = time.perf_counter()
                channel.send({"t": "tok", "id": rid, "text": piece.text})
            if piece.finish:
                finish = piece.finish
            control = channel.receive(timeout=0)
            if control is not None and control.get("t") in ("cancel", "stop", "eof"):
                finish = "cancelled"
                if control["t"] != "cancel":
                    channel.pending.insert(0, control)
                break
    except InputError as exc:  # the request asked for what cannot be done (wire.INVALID)
        channel.send({"t": "fail", "id": rid, "code": "invalid", "message": str(exc)})
        return
    except Exception as exc:  # noqa: BLE001 - the request fails, the worker lives on
        channel.send({"t": "fail", "id": rid, "message": f"{type(exc).__name__}: {exc}"})
        return
    end = time.perf_counter()
    n = model.generated
    gen_ms = (end - first) * 1000 if first is not None else 0.0
    channel.send({"t": "done", "id": rid, "finish": finish, "usage": {
        "prompt_tokens": model.prompted, "completion_tokens": n, "plan": plan,
        "ttft_ms": round(((first or end) - t0) * 1000, 3),
        "ms_per_token": round(gen_ms / (n - 1), 3) if n > 1 else None,
        "total_ms": round((end - t0) * 1000, 3)}})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="apreqeld-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpu-layers", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when a worker stops
    channel = Channel(socket.socket(fileno=args.fd))
    t0 = time.perf_counter()
    try:
        from apreqeld.engine import ServingModel
        from apreqeld.evidence.footprint import drop_mapped_pages

        model = ServingModel(args.model, n_ctx=args.n_ctx, threads=args.threads,
                             gpu_layers=args.gpu_layers)
        loaded = time.perf_counter()
        model.warm_up()
        # The pages of weights llama.cpp repacked (or offloaded) were read once at load and
        # are never read again: unmapped, so that what stays resident is what decoding reads,
        # as the footprint was measured, and what a second worker on the same shards shares.
        drop_mapped_pages(args.model)
        model.warm_up()
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor as one line
        channel.send({"t": "error", "message": f"{exc}"})
        sys.exit(1)
    ready = time.perf_counter()
    channel.send({"t": "ready", "pid": os.getpid(), "rss": psutil.Process().memory_info().rss,
                  "load_ms": round((loaded - t0) * 1000, 1),
                  "warm_ms": round((ready - loaded) * 1000, 1)})
    try:
        serve(channel, model, args.plan)
    except (BrokenPipeError, ConnectionResetError):
        pass
    model.close()


if __name__ == "__main__":
    main()

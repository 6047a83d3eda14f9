"""A tiny real plan set for the daemon's integration tests (made once per session), and
helpers to run a real `apreqeld` on it in temporary directories."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import tensor_recipe
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import read_model
from apreqeld.manifest import PlanSet
from apreqeld.planset import planset_from_recipes
from apreqeld.resources import default_model_path
from apreqeld.runtime import wire

THREADS = 1
PROTOCOL = Protocol(n_ctx=512, chunks=1, n_gen=4, reps=2, threads=THREADS)
SERVING_CTX = 256
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TinyPlans:
    """A saved plan set (`plans_dir/planset.json`), the state dir whose shard store its
    members are assembled from, and the work dir holding its F16 reference."""

    plans_dir: Path
    state_dir: Path
    work_dir: Path
    planset: PlanSet
    by_label: dict[str, str]  # "q4_0", "q8_0", "mix" -> member id


@pytest.fixture(scope="session")
def tiny_plans(tmp_path_factory: pytest.TempPathFactory) -> TinyPlans:
    """Uniform q4_0, uniform q8_0 and a half-and-half mix of the default model, built and
    measured by apreqeld.planset with a tiny protocol (one chunk, tg4 x 2, one thread)."""
    root = tmp_path_factory.mktemp("tiny-plans")
    source = default_model_path()
    view = read_model(source)
    n = len(view.sublayers)
    recipes = {
        "uniform q4_0": tensor_recipe(view, [qtype("q4_0")] * n, outside=qtype("q8_0")),
        "uniform q8_0": tensor_recipe(view, [qtype("q8_0")] * n, outside=qtype("q8_0")),
        "mix q8_0/q4_0": tensor_recipe(
            view, [qtype("q8_0")] * (n // 2) + [qtype("q4_0")] * (n - n // 2),
            outside=qtype("q8_0")),
    }
    plans_dir, state_dir, work_dir = root / "plans", root / "state", root / "work"
    planset = planset_from_recipes(source, recipes, plans_dir,
                                   workspace=Workspace(work_dir, state_dir=state_dir),
                                   protocol=PROTOCOL, serving_ctx=SERVING_CTX, name="tiny")
    short = {"uniform q4_0": "q4_0", "uniform q8_0": "q8_0", "mix q8_0/q4_0": "mix"}
    by_label = {short[m.label]: m.id for m in planset.members}
    assert all(m.pareto for m in planset.members)  # the daemon serves the front
    return TinyPlans(plans_dir, state_dir, work_dir, planset, by_label)


# --------------------------------------------------------------------------- running a daemon


@dataclass
class RunningDaemon:
    proc: subprocess.Popen
    socket: Path
    plans_dir: Path
    log: Path

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def start_daemon(tiny: TinyPlans, tmp: Path, *extra: str, env: dict | None = None,
                 wait: bool = True, copy_plans: bool = True) -> RunningDaemon:
    """Run `apreqeld` in the foreground on a socket in `tmp`; wait until it serves."""
    plans = tmp / "plans"
    if copy_plans:
        shutil.copytree(tiny.plans_dir, plans)
    sock = tmp / "run" / "apreqeld.sock"
    log = tmp / "apreqeld.log"
    cmd = [sys.executable, "-m", "apreqeld.cli.daemon", "--plans", str(plans), "--socket",
           str(sock), "--state-dir", str(tiny.state_dir), "--threads", str(THREADS), *extra]
    full_env = dict(os.environ) | {"APREQEL_HOME": str(tiny.work_dir)} | (env or {})
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                cwd=REPO)
    daemon = RunningDaemon(proc, sock, plans, log)
    if wait:
        wait_serving(daemon)
    return daemon


def wait_serving(daemon: RunningDaemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "apreqeld: serving" not in daemon.stderr():
        if daemon.proc.poll() is not None:
            raise AssertionError(f"apreqeld exited: {daemon.stderr()}")
        if time.monotonic() > deadline:
            daemon.stop()
            raise AssertionError(f"apreqeld did not serve in {timeout} s: {daemon.stderr()}")
        time.sleep(0.05)


@pytest.fixture
def daemon_factory(tiny_plans: TinyPlans, tmp_path: Path) -> Iterator:
    """Start daemons for one test; all are stopped afterwards."""
    started: list[RunningDaemon] = []

    def make(*extra: str, name: str = "d", **kw) -> RunningDaemon:
        folder = tmp_path / name
        folder.mkdir()
        d = start_daemon(tiny_plans, folder, *extra, **kw)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def ctl(*args: str, socket: Path | None = None, timeout: float = 60,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run apreqelctl; returns the completed process (text)."""
    cmd = [sys.executable, "-m", "apreqeld.cli.ctl"]
    if socket is not None:
        cmd += ["--socket", str(socket)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=dict(os.environ) | (env or {}))


# --------------------------------------------------------------------------- counting answers


class RawClient:
    """One wire connection that counts, from the client's side, the final responses of every
    request id it sent (exactly once: `finals[id] == 1`), never trusting the daemon's count."""

    def __init__(self, path: Path, *, timeout: float = 120) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.unpacker = wire.unpacker()
        self.next_id = 0
        self.finals: Counter[int] = Counter()
        self.results: dict[int, tuple[dict | None, object]] = {}  # id -> (error, result)
        self.tokens: Counter[int] = Counter()
        self.stray: list[object] = []  # responses to ids never sent
        self.closed = False

    def send(self, method: str, params: dict | None = None) -> int:
        self.next_id += 1
        self.sock.sendall(wire.request(self.next_id, method, params))
        return self.next_id

    def pump(self, until) -> None:
        """Read messages until `until()` holds (AssertionError when the daemon closes)."""
        while not until():
            for message in self.unpacker:
                self._note(message)
                if until():
                    return
            data = self.sock.recv(65536)
            if not data:
                self.closed = True
                raise AssertionError("the daemon closed the connection")
            self.unpacker.feed(data)

    def _note(self, message: object) -> None:
        if not isinstance(message, list) or not message:
            return
        if message[0] == wire.NOTIFICATION and message[1] == "token":
            self.tokens[message[2][0]["id"]] += 1
        if message[0] == wire.NOTIFICATION and message[1] == "error":
            raise AssertionError(f"connection-level error: {message}")
        if message[0] != wire.RESPONSE:
            return
        rid = message[1]
        if not isinstance(rid, int) or not 1 <= rid <= self.next_id:
            self.stray.append(message)
            return
        self.finals[rid] += 1
        self.results[rid] = (message[2], message[3])

    def call(self, method: str, params: dict | None = None) -> tuple[dict | None, object]:
        """(error, result) of one request; notifications in between are counted."""
        msgid = self.send(method, params)
        self.pump(lambda: msgid in self.results)
        return self.results[msgid]

    def unanswered(self) -> list[int]:
        return [i for i in range(1, self.next_id + 1) if self.finals[i] == 0]

    def duplicated(self) -> int:
        return sum(n - 1 for n in self.finals.values() if n > 1)

    def close(self) -> None:
        self.sock.close()


def workers_of(daemon: RunningDaemon) -> list[int]:
    """The supervisor's worker processes (pids), zombies left out."""
    try:
        return [p.pid for p in psutil.Process(daemon.proc.pid).children()
                if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def wait_until(condition, timeout: float = 30, what: str = "the condition") -> None:
    """Poll a state (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.01)

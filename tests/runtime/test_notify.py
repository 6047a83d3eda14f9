"""sd_notify against a real datagram listener, the watchdog interval, socket activation;
and the real daemon's READY/STATUS/WATCHDOG/STOPPING sequence under a fake service manager."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apreqeld.client import Client
from apreqeld.runtime import notify
from daemon_support import REPO, THREADS, RunningDaemon, start_daemon, wait_serving


@pytest.fixture
def listener(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(10)
    yield sock, path
    sock.close()


def received(sock: socket.socket, until: str, timeout: float = 30) -> list[str]:
    """Datagrams (as text) until one contains `until`."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in got[-1]:
            return got
    raise AssertionError(f"no {until!r} in {got}")


def test_notify_sends_one_datagram_per_call(listener) -> None:
    sock, path = listener
    assert notify.notify("READY=1", "STATUS=serving x", env={"NOTIFY_SOCKET": str(path)})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving x"
    assert not notify.notify("READY=1", env={})
    assert not notify.notify("READY=1", env={"NOTIFY_SOCKET": str(path) + ".missing"})


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "1000000",
                                     "WATCHDOG_PID": str(os.getpid())}) == 0.5
    assert notify.watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_interval({}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_no_listen_sockets_without_matching_pid() -> None:
    assert notify.listen_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []
    assert notify.listen_sockets({}) == []


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_daemon_speaks_the_notify_protocol(tiny_plans, tmp_path: Path, listener) -> None:
    sock, path = listener
    d = start_daemon(tiny_plans, tmp_path, "--priority", "memory",
                     env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}, wait=False)
    try:
        first = received(sock, "READY=1")
        assert first[0] == "STATUS=loading the first plan"
        assert first[-1].startswith("READY=1\nSTATUS=serving ")
        pings = received(sock, "WATCHDOG=1")
        pings += received(sock, "WATCHDOG=1")  # at least two, 0.2 s apart
        assert pings[-1].startswith("WATCHDOG=1\nSTATUS=serving ")
        d.proc.terminate()
        assert "STOPPING=1\nSTATUS=stopping" in received(sock, "STOPPING=1")
        assert d.proc.wait(30) == 0
    finally:
        d.stop()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_daemon_serves_an_inherited_socket(tiny_plans, tmp_path: Path) -> None:
    """Socket activation: the socket is bound by the "service manager" (this test) and passed
    as fd 3 with LISTEN_PID/LISTEN_FDS; the daemon must not remove it on exit."""
    path = tmp_path / "activated.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    fd = server.fileno()
    log = tmp_path / "apreqeld.log"
    wrapper = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
               "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
               "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
    daemon = ["-m", "apreqeld.cli.daemon", "--plans", str(tiny_plans.plans_dir), "--socket",
              str(path), "--state-dir", str(tiny_plans.state_dir), "--threads", str(THREADS),
              "--priority", "memory", "--no-watch"]
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", wrapper, str(fd), *daemon],
                                pass_fds=(fd,), stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    d = RunningDaemon(proc, path, tiny_plans.plans_dir, log)
    try:
        wait_serving(d)
        with Client(path, timeout=30) as c:
            assert c.generate("Hi", max_tokens=4)["usage"]["completion_tokens"] == 4
        assert d.stop() == 0
        assert path.exists()  # the manager's socket, not the daemon's to remove
    finally:
        d.stop()
        server.close()

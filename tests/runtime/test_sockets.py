"""The socket file fails closed: a folder someone else controls is refused, a stale socket is
replaced only when nobody listens, the mode is 0660 from the bind on, and the real daemon
refuses to start in a foreign-owned or world-writable runtime folder (one line, exit 1)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from apreqeld.errors import DaemonError, InputError
from apreqeld.runtime import sockets
from apreqeld.runtime.sockets import bind_socket, remove_stale, secure_dir
from daemon_support import REPO, THREADS

NOBODY = 65534
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another user")


def test_missing_folders_are_made_private_and_checked(tmp_path: Path) -> None:
    run = tmp_path / "a" / "b"
    secure_dir(run)
    assert stat.S_IMODE(run.stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o750


@pytest.mark.parametrize("mode, why", [(0o777, "writable by others"),
                                       (0o770, "writable by its group"),
                                       (0o1777, "writable by others")])
def test_a_folder_others_may_write_is_refused(tmp_path: Path, mode: int, why: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(mode)
    with pytest.raises(InputError, match=f"refusing the socket folder {run}: {why}"):
        secure_dir(run)
    # as an ancestor, a sticky world-writable folder (like /tmp) is fine
    if mode & stat.S_ISVTX:
        inner = run / "mine"
        secure_dir(inner)
        assert inner.is_dir()


@ROOT
def test_a_folder_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chown(run, NOBODY, NOBODY)
    with pytest.raises(InputError, match=f"owned by uid {NOBODY}"):
        secure_dir(run)
    with pytest.raises(InputError, match=f"owned by uid {NOBODY}"):
        secure_dir(run / "inside")  # also from below: the owner could swap the folder


def test_a_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    remove_stale(path)
    assert not path.exists()
    live = bind_socket(path)
    try:
        with pytest.raises(DaemonError, match="another daemon is listening"):
            remove_stale(path)
        assert path.exists()
    finally:
        live.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(InputError, match="is not a socket"):
        remove_stale(path)


def test_a_socket_that_cannot_be_probed_is_kept(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES (or any error but ECONNREFUSED) does not prove the socket stale."""
    path = tmp_path / "s.sock"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))

    def denied(self, address):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", denied)
    with pytest.raises(InputError, match="cannot tell whether .* is in use"):
        remove_stale(path)
    assert path.exists()
    other.close()


def test_the_socket_is_0660_from_its_creation(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Bound under a umask: correct even if nothing chmods it afterwards."""
    monkeypatch.setattr(sockets.os, "chmod", lambda *_a, **_k: None)
    old = os.umask(0)
    try:
        sock = bind_socket(tmp_path / "run" / "s.sock")
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE((tmp_path / "run" / "s.sock").stat().st_mode) == 0o660
        assert os.umask(old) == old  # the process umask is back
    finally:
        sock.close()


def _daemon(tiny_plans, sock: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apreqeld.cli.daemon", "--plans",
                           str(tiny_plans.plans_dir), "--state-dir", str(tiny_plans.state_dir),
                           "--socket", str(sock), "--threads", str(THREADS), "--no-watch",
                           "--monitor", "procfs"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_daemon_refuses_a_runtime_folder_it_does_not_control(tiny_plans,
                                                                 tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    run = _daemon(tiny_plans, shared / "apreqeld.sock")
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr == f"apreqeld: refusing the socket folder {shared}: writable by others " \
                         "(mode 0777)\n"
    assert not (shared / "apreqeld.sock").exists()
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o755)
        os.chown(foreign, NOBODY, NOBODY)
        run = _daemon(tiny_plans, foreign / "apreqeld" / "apreqeld.sock")
        assert run.returncode == 1 and f"owned by uid {NOBODY}" in run.stderr, run.stderr
        assert not (foreign / "apreqeld").exists()

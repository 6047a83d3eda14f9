"""Access to the real daemon from processes under other uids: the socket is 0660 with the
service group; SO_PEERCRED gives inference to the group and control to root, the service user
and the admin group, with the supplementary groups the kernel recorded at connect time
(SO_PEERGROUPS). Connection limits per uid and in total keep room for control. Nothing from
the wire reaches a file path."""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import msgpack
import pytest

from apreqeld.client import Client
from apreqeld.errors import DaemonError
from apreqeld.runtime import wire
from apreqeld.runtime.access import CONTROL, INFERENCE, Access, Peer, peer_of
from daemon_support import ctl, start_daemon

pytestmark = pytest.mark.integration
NOBODY = 65534


def _calls(plan: str) -> dict:
    return {"status": lambda c: c.status(), "plans": lambda c: c.plans(),
            "generate": lambda c: c.generate("Hi", max_tokens=2, seed=1),
            "pin": lambda c: c.pin(plan, wait=True), "unpin": lambda c: c.unpin(wait=True),
            "set_priority": lambda c: c.set_priority("memory", wait=True),
            "reload": lambda c: c.reload()}


def test_roles_from_credentials() -> None:
    rules = Access(uid=990, gid=990, admin_gid=4)
    assert rules.role(Peer(1, 0, 0, frozenset({0}))) == CONTROL
    assert rules.role(Peer(1, 990, 990, frozenset({990}))) == CONTROL
    assert rules.role(Peer(1, 1000, 1000, frozenset({1000, 4, 990}))) == CONTROL
    assert rules.role(Peer(1, 1000, 1000, frozenset({1000, 990}))) == INFERENCE
    assert rules.role(Peer(1, 1000, 1000, frozenset({1000}))) is None
    assert Access.allows(INFERENCE, "generate") and not Access.allows(INFERENCE, "pin")
    assert Access.allows(CONTROL, "reload") and not Access.allows(None, "status")
    assert rules.role(None) is None  # no credentials: no access (it was CONTROL)


def test_peer_groups_come_from_the_kernel_not_proc() -> None:
    a, b = socket.socketpair()
    try:
        peer = peer_of(a)
        assert peer is not None and peer.pid == os.getpid() and peer.uid == os.geteuid()
        assert peer.groups == frozenset(os.getgroups()) | {os.getegid()}
    finally:
        a.close()
        b.close()


def probe(sock: Path, plan: str, *, uid: int, groups: list[int]) -> dict:
    """Every method from a forked process running as `uid` with exactly `groups` (a fork,
    not a new interpreter: the interpreter under /root is not readable by other users)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid/groups, call, report, exit without cleanup
        code = 1
        try:
            os.close(read)
            os.setgroups(groups)
            os.setgid(groups[0] if groups else NOBODY)
            os.setuid(uid)
            out = {}
            for name, call in _calls(plan).items():
                try:
                    with Client(sock, timeout=30) as c:
                        call(c)
                    out[name] = "ok"
                except DaemonError as exc:
                    out[name] = exc.code
            os.write(write, json.dumps(out | {"uid": os.getuid()}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data
    out = json.loads(data)
    assert out.pop("uid") == uid
    return out


@pytest.fixture
def admin_group() -> str:
    name = f"apq{uuid.uuid4().hex[:8]}"
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    yield name
    subprocess.run(["groupdel", name], check=False, capture_output=True)


@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("groupadd") is None,
                    reason="needs root (to run clients under other uids) and groupadd")
def test_roles_with_real_processes_under_other_uids(tiny_plans, admin_group) -> None:
    folder = Path(tempfile.mkdtemp(prefix="apreqeld-access-"))  # /tmp: reachable by nobody
    folder.chmod(0o755)
    config = folder / "apreqeld.toml"
    config.write_text(f'admin_group = "{admin_group}"\n')
    d = start_daemon(tiny_plans, folder, "--priority", "memory", "--config", str(config))
    try:
        plan = tiny_plans.by_label["q4_0"]
        st = d.socket.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getegid()
        service, admin = st.st_gid, grp.getgrnam(admin_group).gr_gid
        stranger = probe(d.socket, plan, uid=NOBODY, groups=[])
        member = probe(d.socket, plan, uid=NOBODY, groups=[service])
        admin_member = probe(d.socket, plan, uid=NOBODY, groups=[service, admin])
        root = probe(d.socket, plan, uid=0, groups=[0])
        with Client(d.socket, timeout=30) as c:
            for bad in ("../../etc/passwd", "/etc/passwd", "..%2f..%2fetc", "abcd;rm -rf /",
                        "$(id)", "abcd\x00ef", "ABCD"):
                with pytest.raises(DaemonError) as err:
                    c.pin(bad)
                assert err.value.code == "invalid", bad
            with pytest.raises(DaemonError) as err:
                c.pin("abcdef0123")  # well-formed, not in the loaded set
            assert err.value.code == "invalid" and "no single plan-set member" in str(err.value)
            status = c.status()
    finally:
        d.stop()
        shutil.rmtree(folder, ignore_errors=True)
    control = {"pin", "unpin", "set_priority", "reload"}
    assert set(stranger.values()) == {"permission"}, stranger
    assert {k: v for k, v in member.items() if k not in control} == {
        "status": "ok", "plans": "ok", "generate": "ok"}, member
    assert {member[k] for k in control} == {"permission"}, member
    assert set(admin_member.values()) == {"ok"}, admin_member
    assert set(root.values()) == {"ok"}, root
    assert status["plan"] == plan and status["pinned"] is None
    print(f"\naccess: stranger {stranger}\n  group member {member}\n  admin {admin_member}\n"
          f"  root {root}")


def _first(sock: socket.socket, timeout: float = 20) -> object:
    """The first message on `sock`, or "closed"."""
    sock.settimeout(timeout)
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return "closed"
        unpacker.feed(data)
        for message in unpacker:
            return message


def _outcome(message: object) -> str:
    if message == "closed":
        return "closed"
    if message[0] == wire.RESPONSE:
        return "ok" if message[2] is None else message[2]["code"]
    return message[2][0]["code"]  # an error notification


class Holder:
    """A forked process under `uid` (in the socket's group) holding `n` connections: each
    subscribed to events (busy) or idle; `outcomes` says what each got."""

    def __init__(self, sock: Path, uid: int, gid: int, n: int, *, subscribe: bool) -> None:
        report_r, report_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(report_r)
                os.setgroups([gid])
                os.setgid(gid)
                os.setuid(uid)
                conns, out = [], []
                for _ in range(n):
                    c = socket.socket(socket.AF_UNIX)
                    c.connect(str(sock))
                    conns.append(c)
                    if subscribe:
                        try:
                            c.sendall(wire.request(1, "events"))
                        except OSError:
                            pass  # refused and closed already: its notice is still there
                        out.append(_outcome(_first(c)))
                if not subscribe:  # each answers, or was closed to make room
                    for c in conns:
                        try:
                            c.sendall(wire.request(1, "hello"))
                        except OSError:
                            pass
                        out.append(_outcome(_first(c)))
                os.write(report_w, json.dumps(out).encode())
                os.close(report_w)
                signal.pause()  # keep the connections until released (killed)
                code = 0
            finally:
                os._exit(code)
        os.close(report_w)
        with os.fdopen(report_r, "rb") as f:  # EOF: the child wrote and closed its end
            self.outcomes = json.loads(f.read() or b"null")
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


def _strict_daemon(tiny_plans, text: str):
    folder = Path(tempfile.mkdtemp(prefix="apreqeld-limits-"))  # /tmp: reachable by nobody
    folder.chmod(0o755)
    config = folder / "apreqeld.toml"
    config.write_text(text)
    return folder, start_daemon(tiny_plans, folder, "--priority", "memory", "--config",
                                str(config), "--monitor", "procfs")


@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients under other uids")
def test_connection_limits_per_uid_keep_room_for_others_and_for_control(tiny_plans) -> None:
    folder, d = _strict_daemon(tiny_plans, "max_connections = 4\ncontrol_reserve = 2\n"
                                           "max_connections_per_uid = 2\n")
    holders: list[Holder] = []
    try:
        service = d.socket.stat().st_gid
        # idle connections of one uid never lock others out: its own oldest make room
        idle = Holder(d.socket, NOBODY, service, 20, subscribe=False)
        holders.append(idle)
        assert idle.outcomes.count("ok") == 2 and set(idle.outcomes) <= {"ok", "busy", "closed"}
        other = Holder(d.socket, NOBODY - 1, service, 1, subscribe=False)
        holders.append(other)
        assert other.outcomes == ["ok"]
        assert ctl("status", socket=d.socket).returncode == 0
        idle.release()
        other.release()
        holders.clear()
        # busy connections: two per uid, four in all for inference, control still gets in
        a = Holder(d.socket, NOBODY, service, 3, subscribe=True)
        b = Holder(d.socket, NOBODY - 1, service, 3, subscribe=True)
        holders += [a, b]
        assert a.outcomes == b.outcomes == ["ok", "ok", "busy"]
        c = Holder(d.socket, NOBODY - 2, service, 1, subscribe=True)
        holders.append(c)
        assert c.outcomes == ["busy"]
        run = ctl("status", "--json", socket=d.socket)  # root: the control reserve
        assert run.returncode == 0, run.stderr
        limits = json.loads(run.stdout)["connection_limits"]
        assert limits["inference"] == 4 and limits["control"] == 1
    finally:
        for h in holders:
            h.release()
        d.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("groupadd") is None,
                    reason="needs root (to run clients under other uids) and groupadd")
def test_roles_use_the_groups_the_peer_had_when_it_connected(tiny_plans, admin_group) -> None:
    """The peer is gone (and /proc/<pid> with it) before the daemon accepts: the kernel's
    record of its groups still says admin; reading /proc after accept did not."""
    folder, d = _strict_daemon(tiny_plans, f'admin_group = "{admin_group}"\n')
    try:
        service, admin = d.socket.stat().st_gid, grp.getgrnam(admin_group).gr_gid
        plan = tiny_plans.by_label["q4_0"]
        here, there = socket.socketpair()
        os.kill(d.proc.pid, signal.SIGSTOP)  # nothing is accepted meanwhile
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    os.setgroups([service, admin])
                    os.setgid(service)
                    os.setuid(NOBODY)
                    c = socket.socket(socket.AF_UNIX)
                    c.connect(str(d.socket))  # queued in the listen backlog
                    c.sendall(wire.request(1, "pin", {"id": plan, "wait": True}))
                    socket.send_fds(there, [b"fd"], [c.fileno()])
                finally:
                    os._exit(0)
            _, fds, _, _ = socket.recv_fds(here, 16, 1)
            os.waitpid(pid, 0)
            assert not Path(f"/proc/{pid}").exists()
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        conn = socket.socket(fileno=fds[0])
        reply = _first(conn)
        conn.close()
        assert reply[:3] == [wire.RESPONSE, 1, None], reply  # control: the pin is done
    finally:
        d.stop()
        shutil.rmtree(folder, ignore_errors=True)

"""Access to the real daemon from processes under other uids: the socket is 0660 with the
service group; SO_PEERCRED gives inference to the group and control to root, the service user
and the admin group. Nothing from the wire reaches a file path."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from apreqeld.client import Client
from apreqeld.errors import DaemonError
from apreqeld.runtime.access import CONTROL, INFERENCE, Access, Peer
from daemon_support import start_daemon

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

"""Faults on the real daemon: workers killed mid-generation, mid-load and mid-swap; the daemon
killed mid-swap and restarted; corrupt shards rebuilt and bad manifests refused; a full state
directory; the workspace lock shared with `apreqel`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from apreqeld.client import Client
from apreqeld.errors import DaemonError
from apreqeld.manifest import member_shards
from apreqeld.store.shards import ShardStore
from daemon_support import REPO, start_daemon, wait_until
from test_daemon import Events, Load

pytestmark = pytest.mark.integration


def workers(d) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(d.proc.pid).children()]
    except psutil.NoSuchProcess:
        return []


def wait_new_worker(d, old: set[int], timeout: float = 20) -> int:
    """The pid of a worker started after `old` (polled fast: it is still loading)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [p for p in workers(d) if p not in old]
        if new:
            return new[0]
        time.sleep(0.002)
    raise AssertionError("no new worker started")


def gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.05)
    return False


def own_state(tiny, tmp: Path) -> Path:
    """A state dir with a copy of the session's shard store (its shards to corrupt; copied
    with their stamps), no member assembled yet."""
    state = tmp / "state"
    state.mkdir()
    shutil.copytree(tiny.state_dir / "store", state / "store")
    return state


def shard_of(state: Path, tiny, label: str, *, tensor: str = "blk.3.ffn_up.weight") -> Path:
    """The file in `state`'s store holding `tensor` of member `label`."""
    planset = tiny.planset
    member = planset.member(tiny.by_label[label])
    sha = planset.store.shards[tensor][member.recipe[tensor]]
    return ShardStore(state).shard_path(sha)


def leftovers(state: Path) -> list[str]:
    """Anything half-made in a state dir: temp files of the store, temp member folders,
    member folders with a link that leads nowhere."""
    store = ShardStore(state)
    found = [p.name for p in (store.root / "tmp").iterdir()]
    for folder in store.members.iterdir():
        if folder.name.startswith(".") or any(not (folder / n).exists()
                                              for n in os.listdir(folder)):
            found.append(folder.name)
    return found


@pytest.mark.timeout(120)
def test_worker_killed_mid_generation_fails_only_its_request(daemon_factory) -> None:
    d = daemon_factory("--priority", "memory", "--ctx", "1024")
    with Client(d.socket, timeout=60) as a, Client(d.socket, timeout=60) as b, \
            Client(d.socket, timeout=60) as c:
        (pid,) = workers(d)
        pieces = iter(a.generate_stream("Tell me a long story.", max_tokens=300, seed=1))
        next(pieces)
        queued = [b.generate_stream("Hello", max_tokens=4), c.generate_stream("Hi", max_tokens=4)]
        with Client(d.socket, timeout=60) as watcher:
            wait_until(lambda: watcher.status()["queue"] == 2, what="both requests queued")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(DaemonError) as err:
            list(pieces)
        assert err.value.code == "worker_failed"
        for s in queued:
            assert s.text() and s.result["usage"]["completion_tokens"] == 4
        counts = a.status()["counts"]
    assert counts["accepted"] == 3 and counts["failed"] == 1 and counts["served"] == 2


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["make-before-break", "break-before-make"])
def test_worker_killed_while_loading_in_a_swap(daemon_factory, tiny_plans, mode) -> None:
    d = daemon_factory("--priority", "memory", "--swap-mode", mode)
    ids = tiny_plans.by_label
    events = Events(d.socket)
    with Client(d.socket, timeout=60) as c, Load(d.socket) as load:
        old = set(workers(d))
        c.pin(ids["q8_0"])
        os.kill(wait_new_worker(d, old), signal.SIGKILL)  # mid-load
        failed = events.wait_for("swap_failed")[0]
        wait_until(lambda: not c.status()["swapping"], what="the swap given up")
        status = c.status()
        assert status["plan"] == ids["q4_0"] and not status["swapping"]
        # the next swap goes through; the serving worker killed mid-swap is restarted
        old = set(workers(d))
        c.unpin()
        c.pin(ids["mix"])
        if mode == "make-before-break":
            wait_new_worker(d, old)
            for pid in old:
                os.kill(pid, signal.SIGKILL)  # the old worker, serving, mid-swap
        events.wait_for("swap_done", timeout=60)
        wait_until(lambda: not c.status()["swapping"] and len(c.status()["workers"]) == 1,
                   what="the old worker gone")
    status_after = Client(d.socket, timeout=30).status()
    events.close()
    assert failed["to"] == ids["q8_0"] and "failed to load" in failed["reason"]
    assert len(load.results) + len(load.errors) == load.sent  # each answered once
    assert load.unanswered() == 0 and load.duplicated() == 0  # counted by the clients
    assert all(e.code == "worker_failed" for e in load.errors), load.errors
    assert len(load.errors) <= (1 if mode == "make-before-break" else 0), load.errors
    assert status_after["plan"] == ids["mix"] and len(status_after["workers"]) == 1
    counts = status_after["counts"]
    assert counts["accepted"] == counts["served"] + counts["failed"] == load.sent


@pytest.mark.timeout(150)
def test_daemon_killed_mid_swap_comes_back_clean(tiny_plans, tmp_path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    ids = tiny_plans.by_label
    state = own_state(tiny_plans, tmp_path)
    d = start_daemon(tiny_plans, folder, "--priority", "memory", "--swap-mode",
                     "break-before-make", "--state-dir", str(state))
    try:
        before = set(workers(d))
        with Client(d.socket, timeout=30) as c:
            c.pin(ids["q8_0"])
        new = wait_new_worker(d, before)
        d.proc.kill()
        d.proc.wait(10)
        assert gone(list(before) + [new]), "a worker outlived its supervisor"
        assert d.socket.exists()  # stale: the restart must replace it
        d = start_daemon(tiny_plans, folder, "--priority", "memory", "--state-dir",
                         str(state), copy_plans=False)
        with Client(d.socket, timeout=30) as c:
            status = c.status()
            assert c.generate("Hi", max_tokens=2)["plan"] == status["plan"]
        assert status["plan"] in ids.values() and len(status["workers"]) == 1
        assert leftovers(state) == []  # nothing half-made
    finally:
        d.stop()


@pytest.mark.timeout(240)
def test_corrupt_shards_are_rebuilt_and_bad_manifests_refused(tiny_plans, tmp_path) -> None:
    """A shard overwritten in place or truncated is found by its sha256 when its member is
    next assembled, and rebuilt by a child process from the reference (the member then
    serves); a manifest whose member identity is wrong, or invalid JSON, is refused on reload
    and the old plan set kept."""
    ids = tiny_plans.by_label
    state = own_state(tiny_plans, tmp_path)
    folder = tmp_path / "d"
    folder.mkdir()
    d = start_daemon(tiny_plans, folder, "--priority", "memory", "--state-dir", str(state))
    manifest = d.plans_dir / "planset.json"
    good = manifest.read_text()
    events = Events(d.socket)
    outcomes = {}
    try:
        with Client(d.socket, timeout=120) as c:
            for label, damage in (("q8_0", "overwritten"), ("mix", "truncated")):
                shard = shard_of(state, tiny_plans, label)
                shard.chmod(0o644)
                if damage == "overwritten":  # the right size, the wrong bytes
                    with shard.open("r+b") as f:
                        f.seek(shard.stat().st_size // 2)
                        f.write(b"\xff" * 4096)
                else:
                    os.truncate(shard, shard.stat().st_size // 2)
                n = len([e for e in events.events if e["kind"] == "build_done"])
                c.pin(ids[label], wait=True)
                built = events.wait_for("build_done", count=n + 1)
                start = [e for e in events.events if e["kind"] == "build_start"][-1]
                assert start["plan"] == ids[label] and "failed their sha256" in start["reason"]
                outcomes[damage] = start["reason"]
                assert built[-1]["plan"] == ids[label]
                assert c.status()["plan"] == ids[label]
                assert c.generate("Hi", max_tokens=2)["plan"] == ids[label]
                assert ShardStore(state).has(shard.stem, deep=True)  # rebuilt, intact
            c.unpin(wait=True)
            for case in ("member identity wrong", "invalid JSON"):
                if case == "member identity wrong":
                    data = json.loads(good)
                    data["members"][0]["assembly_sha256"] = "0" * 64
                    manifest.write_text(json.dumps(data))
                if case == "invalid JSON":
                    manifest.write_text('{"kind": "apreqeld.planset", "members": [')
                n = len([e for e in events.events if e["kind"] == "planset_rejected"])
                with pytest.raises(DaemonError) as err:
                    c.reload()
                assert err.value.code == "invalid"
                rejected = events.wait_for("planset_rejected", count=n + 1)[-1]
                outcomes[case] = rejected["reason"][:90]
                status = c.status()
                assert status["plan"] == ids["q4_0"] and status["planset"]["members"] == 3
                assert c.generate("Hi", max_tokens=2)["plan"] == ids["q4_0"]
            manifest.write_text(good)
            assert c.reload()["members"] == 3  # repaired: accepted again
    finally:
        events.close()
        d.stop()
    assert leftovers(state) == []
    print("\nfaults:", json.dumps(outcomes, indent=1))


@pytest.mark.timeout(150)
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_state_dir_refuses_the_member_and_keeps_serving(tiny_plans, tmp_path) -> None:
    """The store on a file system with room for q4_0's shards and 4 MiB: building q8_0's
    fails (no space) in the child, the swap fails with that reason, q4_0 keeps serving, and
    nothing half-written is left."""
    ids = tiny_plans.by_label
    planset = tiny_plans.planset
    q4 = planset.member(ids["q4_0"])
    src = ShardStore(tiny_plans.state_dir)
    shards = set(member_shards(planset, q4))
    room = sum(src.shard_path(s).stat().st_size for s in shards) + 4 * 1024**2
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room},mode=0755", "tmpfs",
                    str(state)], check=True)
    folder = tmp_path / "d"
    folder.mkdir()
    d = None
    try:
        store = ShardStore(state)
        for sha in shards:
            store.shard_path(sha).parent.mkdir(exist_ok=True)
            shutil.copy2(src.shard_path(sha), store.shard_path(sha))
        d = start_daemon(tiny_plans, folder, "--priority", "memory", "--state-dir", str(state))
        with Client(d.socket, timeout=120) as c:
            with pytest.raises(DaemonError, match="cannot build the shards"):
                c.pin(ids["q8_0"], wait=True)  # a failed pin is reported and cleared
            status = c.status()
            assert status["plan"] == ids["q4_0"] and status["pinned"] is None
            assert c.generate("Hi", max_tokens=2)["plan"] == ids["q4_0"]
        failed = [line for line in d.stderr().splitlines() if "swap_failed" in line]
        assert failed and "cannot build the shards" in failed[-1], d.stderr()[-2000:]
        assert "No space left" in failed[-1], failed[-1]
        assert leftovers(state) == []
        print("\nstate dir full:", failed[-1][:200])
    finally:
        if d is not None:
            d.stop()
        subprocess.run(["umount", "-l", str(state)], check=False)


@pytest.mark.timeout(60)
def test_the_workspace_lock_holds_between_apreqel_and_apreqeld(tmp_path) -> None:
    """A process holding the workspace as the daemon does while materializing (shared lock)
    and `apreqel cache --clear` in the same work directory: the clear is refused."""
    work = tmp_path / "work"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom apreqeld.evidence.workspace import "
         f"Workspace\nw = Workspace({str(work)!r})\nprint('held', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        (work / "measurements").mkdir(exist_ok=True)
        (work / "measurements" / "x.json").write_text("{}")
        run = subprocess.run([sys.executable, "-m", "apreqeld.cli.apreqel", "cache", "--clear",
                              "--workdir", str(work)], capture_output=True, text=True,
                             timeout=30, cwd=REPO)
        assert run.returncode == 1 and "in use" in run.stderr, run.stderr
        assert (work / "measurements" / "x.json").exists()
    finally:
        holder.kill()
        holder.wait()
    run = subprocess.run([sys.executable, "-m", "apreqeld.cli.apreqel", "cache", "--clear",
                          "--workdir", str(work)], capture_output=True, text=True, timeout=30,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert not (work / "measurements").exists()

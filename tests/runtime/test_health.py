"""Pure pieces of the daemon's core, tested synchronously with a fake clock: backoff and
quarantine, loop progress and supervision, the swap mode, the pin rule; and the watchdog ping,
sent only while the loops make progress."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from apreqeld.core.selection import Decision
from apreqeld.runtime import notify
from apreqeld.runtime.adapter import pin_target
from apreqeld.runtime.backoff import Health
from apreqeld.runtime.config import DaemonConfig
from apreqeld.runtime.swapper import BREAK, MAKE, swap_mode
from apreqeld.runtime.tasks import Progress, Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_up_to_the_cap_then_quarantines() -> None:
    clock = Clock()
    h = Health(base_s=1.0, cap_s=4.0, quarantine_after=5, quarantine_s=60.0, clock=clock)
    waits = []
    for _ in range(4):
        h.failed("m", "boom")
        waits.append(h.wait_s("m"))
        assert not h.quarantined("m")
    assert waits == [0.0, 1.0, 2.0, 4.0]  # the first failure is retried at once
    h.failed("m", "boom again")
    assert h.quarantined("m") and not h.available("m")
    assert h.view()["m"] | {"retry_in_s": 0} == {
        "failures": 5, "retry_in_s": 0, "quarantined": True, "quarantined_for_s": 60.0,
        "reason": "boom again"}
    clock.now += 61  # the quarantine ends: one more try, and one more failure is enough
    assert not h.quarantined("m") and h.available("m")
    h.failed("m", "still broken")
    assert h.quarantined("m")
    assert h.succeeded("m") and h.available("m") and h.view() == {}
    h.failed("other", "x")
    h.keep(["m"])
    assert h.view() == {}


def test_progress_is_stuck_only_when_busy_past_its_deadline() -> None:
    clock = Clock()
    p = Progress(clock)
    p.idle("dispatcher")
    p.busy("swapper", 10.0, "loading")
    clock.now += 9
    assert p.stuck() == []
    clock.now += 2
    assert p.stuck() == ["swapper (loading for 11 s)"]
    p.beat("swapper")
    assert p.stuck() == []
    clock.now += 1000
    p.idle("swapper")
    assert p.stuck() == []  # waiting for work is never stuck


def test_supervision_restarts_a_failing_loop_and_gives_up_after_too_many() -> None:
    async def main() -> None:
        events: list[dict] = []
        sup = Supervisor(lambda kind, **f: events.append({"kind": kind} | f), max_restarts=2,
                         window_s=60, restart_s=0.001)
        runs = []

        async def flaky() -> None:
            runs.append(1)
            if len(runs) < 3:
                raise RuntimeError(f"bug {len(runs)}")
            await asyncio.Event().wait()

        sup.start("loop", flaky)
        while len(runs) < 3:
            await asyncio.sleep(0.01)
        assert [e["restart"] for e in events] == [True, True] and not sup.failed.is_set()
        assert sup.running() == ["loop"] and sup.healthy()

        async def broken() -> None:
            raise RuntimeError("always")

        sup.start("other", broken)
        await asyncio.wait_for(sup.failed.wait(), 10)
        assert "the other loop failed 3 times" in sup.reason and not sup.healthy()
        await sup.stop()
        assert sup.running() == []

    asyncio.run(main())


def test_swap_mode_needs_room_for_both_variants() -> None:
    assert swap_mode("auto", need=100, free=150) == MAKE
    assert swap_mode("auto", need=100, free=99) == BREAK
    assert swap_mode("auto", need=100, free=None) == BREAK  # no memory signal: the safe one
    assert swap_mode(MAKE, need=100, free=0) == MAKE


def test_the_pin_serves_while_it_fits() -> None:
    d = Decision("small", True, "small fits", ("small",), {"small": 1.0}, 10.0)
    assert pin_target(None, None, d).target == "small"
    kept = pin_target("big", None, d)
    assert kept.target == "big" and not kept.pin_held
    held = pin_target("big", "footprint 2 GiB exceeds the budget", d)
    assert held.target == "small" and held.pin_held and "does not fit" in held.reason


class StuckScheduler:
    """What the ping reads: serving, not swapping, and a healthy flag the test sets."""

    def __init__(self) -> None:
        self.ok = True
        self.serving = "p1"
        self.swapper = type("S", (), {"swap": None})()
        self.dispatcher = type("D", (), {"queued": 0})()
        self.supervisor = type("V", (), {"reason": None, "progress": Progress()})()

    def healthy(self) -> bool:
        return self.ok


@pytest.mark.timeout(30)
def test_the_watchdog_is_pinged_only_while_the_loops_make_progress(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from apreqeld.runtime.server import Daemon

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    listener.bind(str(path))
    listener.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    stub = StuckScheduler()
    daemon = Daemon(DaemonConfig(plans=tmp_path, socket=tmp_path / "s"), stub)

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()

        async def recv() -> str:
            return (await asyncio.wait_for(loop.sock_recv(listener, 4096), 5)).decode()

        ping = asyncio.create_task(daemon._ping(0.02))
        got = [await recv()]
        stub.ok = False
        got += [await recv() for _ in range(3)]
        stub.ok = True
        got += [await recv() for _ in range(3)]
        ping.cancel()
        return got

    got = asyncio.run(main())
    listener.close()
    assert got[0].startswith("WATCHDOG=1")
    stuck = [g for g in got if g.startswith("STATUS=stuck")]
    assert stuck and all("WATCHDOG" not in g for g in stuck)
    assert got[-1].startswith("WATCHDOG=1")  # progress again: pinged again
    assert notify.watchdog_interval({"WATCHDOG_USEC": "40000"}) == 0.02

"""The real daemon following a replayed machine: memory falls below the largest plan and
recovers under a steady client; downgrade at once, upgrade after the dwell, no flapping; a
pinned plan that no longer fits is left for the best one that does, and served again when it
fits. Assertions are on the order of events and of answers, and on bounds the daemon itself
guarantees (nothing before the trace says so, nothing back before the dwell), not on how fast
this machine happens to be."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from apreqeld.client import Client
from apreqeld.errors import DaemonError
from daemon_support import REPO, ctl
from test_daemon import Events

pytestmark = pytest.mark.integration
MIB = 1024**2
RESERVE, SLACK, DWELL, INTERVAL = 64 * MIB, 4 * MIB, 4.0, 0.25
PHASES = (0.0, 6.0, 9.0, 20.0)  # plenty, tight (between mix and q8_0), plenty again, end


def write_trace(path: Path, footprints: dict[str, float], phases=PHASES) -> None:
    """A scenario (no model counted): the tight phase's budget holds mix, not q8_0."""
    tight = RESERVE + footprints["mix"] + SLACK + 2 * MIB
    assert tight - RESERVE < footprints["q8_0"], footprints
    plenty = 4 * 1024**3
    rows = [{"t": phases[0], "mem_available_bytes": plenty, "power_mode": "MAXN"},
            {"t": phases[1], "mem_available_bytes": tight, "power_mode": "MAXN"},
            {"t": phases[2], "mem_available_bytes": plenty, "power_mode": "MAXN"},
            {"t": phases[3], "mem_available_bytes": plenty, "power_mode": "MAXN"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def runs(plans: list[str]) -> list[str]:
    """The plans in the order they served, each run of one plan once."""
    return [p for i, p in enumerate(plans) if i == 0 or plans[i - 1] != p]


class SteadyClient:
    """One client sending short requests back to back; each outcome with its wall time."""

    def __init__(self, socket: Path) -> None:
        self.socket, self.stop = socket, threading.Event()
        self.results: list[tuple[float, dict]] = []
        self.errors: list[Exception] = []
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with Client(self.socket, timeout=60) as c:
            while not self.stop.is_set():
                self.sent += 1
                try:
                    r = c.generate("Once upon a time", max_tokens=4, seed=1)
                    self.results.append((time.time(), r))
                except DaemonError as exc:
                    self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


@pytest.mark.timeout(90)
def test_trace_replay_downgrades_at_once_and_upgrades_after_dwell(daemon_factory, tiny_plans,
                                                                  tmp_path: Path) -> None:
    ids = tiny_plans.by_label
    fp = {label: float(tiny_plans.planset.member(i).measured.footprint_bytes)
          for label, i in ids.items()}
    trace = tmp_path / "scenario.jsonl"
    write_trace(trace, fp)
    record = tmp_path / "seen.jsonl"
    d = daemon_factory("--priority", "accuracy", "--monitor", f"trace:{trace}",
                       "--monitor-interval", str(INTERVAL), "--dwell", str(DWELL),
                       "--reserve", "64MiB", "--slack", "4MiB", "--record", str(record))
    events = subprocess.Popen([sys.executable, "-m", "apreqeld.cli.ctl", "--socket",
                               str(d.socket), "events", "--json"], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    with Client(d.socket, timeout=30) as c:
        started = c.status()["monitor"]["started"]
        assert c.status()["plan"] == ids["q8_0"]
        load = SteadyClient(d.socket)
        while time.time() - started < PHASES[3] - 2:
            time.sleep(0.2)
        load.close()
        status = c.status()
    text = ctl("status", socket=d.socket).stdout
    events.send_signal(signal.SIGINT)
    lines = events.communicate(timeout=30)[0].splitlines()
    seen = [json.loads(line) for line in lines]

    # every request answered once, none failed
    assert not load.errors and len(load.results) == load.sent > 10
    counts = status["counts"]
    assert counts["accepted"] == counts["served"] + counts["cancelled"] >= load.sent

    # one swap per change of the machine: down at once, up after the dwell
    done = [e for e in seen if e["kind"] == "swap_done"]
    assert [(e["from"], e["to"]) for e in done] == [(ids["q8_0"], ids["mix"]),
                                                    (ids["mix"], ids["q8_0"])], done
    start = [e for e in seen if e["kind"] == "swap_start"]
    down_at, up_at = (e["time"] - started for e in start)
    assert down_at >= PHASES[1], down_at  # not before the trace said so
    assert up_at >= PHASES[2] and up_at - (done[0]["time"] - started) >= DWELL - 0.1, up_at
    assert start[0]["mode"] == "break-before-make"  # no room for both
    assert start[0]["state"]["mem_available_bytes"] < 4 * 1024**3
    assert "no longer fits" in start[0]["reason"]  # at once: no margin, no dwell
    # the first reading of the tight phase decided the downgrade: no decision kept q8_0 then
    tight = [e for e in seen if e["kind"] == "decision" and e.get("state") and
             e["state"]["mem_available_bytes"] < 4 * 1024**3]
    assert tight and tight[0]["switch"] and tight[0]["to"] == ids["mix"], tight[:1]
    for e in seen:
        assert {"kind", "from", "to", "reason"} <= e.keys() or e["kind"] not in (
            "decision", "swap_start", "swap_done")

    # the plans that served, in the order the answers came: q8_0, then mix, then q8_0
    assert runs([r["plan"] for _, r in load.results]) == [ids["q8_0"], ids["mix"],
                                                          ids["q8_0"]]

    # decisions are events when they change, not at every reading
    decisions = [e for e in seen if e["kind"] == "decision"]
    assert 2 <= len(decisions) <= 8, decisions
    assert status["monitor"]["ticks"] > len(decisions) * 3
    assert status["monitor"]["decide_ms_p50"] < 1
    assert status["monitor"]["cpu_percent"] < 5

    # status shows the machine, the budget and each plan's fit; the live trace is recorded
    assert {p["id"] for p in status["plans"]} == set(ids.values())
    assert all(p["fits"] and p["closeness"] is not None for p in status["plans"])
    assert "budget" in text and "closeness" in text
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) > 20 and all("model_bytes" in r for r in rows)
    assert min(r["mem_available_bytes"] for r in rows) < 256 * MIB


@pytest.mark.timeout(60)
def test_monitor_flags_are_checked_in_one_line(tmp_path: Path, tiny_plans) -> None:
    base = [sys.executable, "-m", "apreqeld.cli.daemon", "--plans", str(tiny_plans.plans_dir),
            "--socket", str(tmp_path / "s.sock")]
    for extra, message in ((["--monitor", "nvml"], "unknown monitor 'nvml'"),
                           (["--reserve", "lots"], "size 'lots' is not a size"),
                           (["--monitor", f"trace:{tmp_path / 'none.jsonl'}"],
                            "cannot read trace")):
        run = subprocess.run(base + extra, capture_output=True, text=True, timeout=60)
        assert run.returncode == 1 and message in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1
    help_text = subprocess.run([sys.executable, "-m", "apreqeld.cli.daemon", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "default 256MiB" in help_text and "trace:FILE" in help_text


PIN_PHASES = (0.0, 8.0, 18.0, 60.0)  # plenty, tight, plenty again, end


@pytest.mark.timeout(120)
def test_a_pinned_plan_is_left_while_it_does_not_fit_and_served_again_after(
        daemon_factory, tiny_plans, tmp_path: Path) -> None:
    ids = tiny_plans.by_label
    fp = {label: float(tiny_plans.planset.member(i).measured.footprint_bytes)
          for label, i in ids.items()}
    trace = tmp_path / "pinned.jsonl"
    write_trace(trace, fp, PIN_PHASES)
    d = daemon_factory("--priority", "memory", "--monitor", f"trace:{trace}",
                       "--monitor-interval", str(INTERVAL), "--dwell", str(DWELL),
                       "--reserve", "64MiB", "--slack", "4MiB")
    events = Events(d.socket)
    with Client(d.socket, timeout=60) as c:
        pinned = c.pin(ids["q8_0"], wait=True)
        load = SteadyClient(d.socket)
        restored = events.wait_for("pin_restored", timeout=90)[0]
        events.wait_for("swap_done", count=3, timeout=60)
        load.close()
        status = c.status()
    events.close()
    assert pinned["plan"] == ids["q8_0"], pinned  # it fitted when pinned (the plenty phase)
    suspended = events.wait_for("pin_suspended")[0]
    assert suspended["plan"] == ids["q8_0"] and suspended["to"] == ids["q4_0"]
    assert "does not fit" in suspended["reason"]
    swaps = [(e["from"], e["to"]) for e in events.events if e["kind"] == "swap_done"]
    assert swaps == [(ids["q4_0"], ids["q8_0"]), (ids["q8_0"], ids["q4_0"]),
                     (ids["q4_0"], ids["q8_0"])], swaps
    order = [e["kind"] for e in events.events if e["kind"] in ("pin_suspended", "pin_restored",
                                                                "swap_done")]
    assert order == ["swap_done", "pin_suspended", "swap_done", "pin_restored", "swap_done"]
    assert restored["plan"] == ids["q8_0"]
    assert status["pinned"] == ids["q8_0"] and status["plan"] == ids["q8_0"]
    assert status["pin_held"] is False
    assert not load.errors and len(load.results) == load.sent
    assert runs([r["plan"] for _, r in load.results]) == [ids["q8_0"], ids["q4_0"],
                                                          ids["q8_0"]]


SHED_PHASES = ((4.0, 6.5, {"psi_memory_some_recent": 35.0}),  # stalls while q8_0 "fits"
               (20.0, 22.5, {"swapin_per_s": 5000.0}))  # swapping in: 20 MiB/s
SHED_END = 36.0


@pytest.mark.timeout(120)
def test_thrashing_with_the_member_still_fitting_sheds_and_comes_back(
        daemon_factory, tiny_plans, tmp_path: Path) -> None:
    """MemAvailable stays plenty the whole time, so the old budget always held q8_0; stall and
    swap-in phases shed at the first reading, and q8_0 comes back only after the calm."""
    ids = tiny_plans.by_label
    plenty = {"mem_available_bytes": 4 * 1024**3, "power_mode": "MAXN"}
    rows = [{"t": 0.0, **plenty}]
    for start, end, signals in SHED_PHASES:
        rows += [{"t": start, **plenty, **signals}, {"t": end, **plenty}]
    rows.append({"t": SHED_END, **plenty})
    trace = tmp_path / "thrashing.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = daemon_factory("--priority", "accuracy", "--monitor", f"trace:{trace}",
                       "--monitor-interval", str(INTERVAL), "--dwell", str(DWELL),
                       "--reserve", "0", "--slack", "4MiB")
    events = Events(d.socket)
    with Client(d.socket, timeout=60) as c:
        started = c.status()["monitor"]["started"]
        assert c.status()["plan"] == ids["q8_0"]
        load = SteadyClient(d.socket)
        events.wait_for("swap_done", count=4, timeout=SHED_END + 60)
        load.close()
    events.close()
    done = [e for e in events.events if e["kind"] == "swap_done"]
    assert [e["from"] for e in done[::2]] == [ids["q8_0"]] * 2, done
    assert [e["to"] for e in done[1::2]] == [ids["q8_0"]] * 2, done
    assert all(e["to"] in (ids["mix"], ids["q4_0"]) for e in done[::2]), done
    starts = [e for e in events.events if e["kind"] == "swap_start"]
    for (onset, end, _), down, up in zip(SHED_PHASES, starts[::2], starts[1::2], strict=True):
        at = down["time"] - started
        assert onset <= at < onset + 3.0, (onset, at)  # the first readings of the phase
        assert "shedding memory" in down["reason"], down
        assert up["time"] - started >= end + 9.0, (end, up)  # CLEAR_S after the last stall
    assert not load.errors and len(load.results) == load.sent
    assert runs([r["plan"] for _, r in load.results])[::2] == [ids["q8_0"]] * 3

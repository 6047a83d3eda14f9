"""The real daemon following a replayed machine: memory falls below the largest plan and
recovers under a steady client; downgrade at once, upgrade after the dwell, no flapping."""

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

pytestmark = pytest.mark.integration
MIB = 1024**2
RESERVE, SLACK, DWELL, INTERVAL = 64 * MIB, 4 * MIB, 4.0, 0.25
PHASES = (0.0, 6.0, 9.0, 20.0)  # plenty, tight (between mix and q8_0), plenty again, end


def write_trace(path: Path, footprints: dict[str, float]) -> None:
    """A scenario (no model counted): the tight phase's budget holds mix, not q8_0."""
    tight = RESERVE + footprints["mix"] + SLACK + 2 * MIB
    assert tight - RESERVE < footprints["q8_0"], footprints
    plenty = 4 * 1024**3
    rows = [{"t": PHASES[0], "mem_available_bytes": plenty, "power_mode": "MAXN"},
            {"t": PHASES[1], "mem_available_bytes": tight, "power_mode": "MAXN"},
            {"t": PHASES[2], "mem_available_bytes": plenty, "power_mode": "MAXN"},
            {"t": PHASES[3], "mem_available_bytes": plenty, "power_mode": "MAXN"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


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
    assert PHASES[1] <= down_at <= PHASES[1] + 4 * INTERVAL + 0.5, down_at
    assert up_at >= PHASES[2] and up_at - (done[0]["time"] - started) >= DWELL - 0.1, up_at
    assert start[0]["mode"] == "break-before-make"  # no room for both
    assert start[0]["state"]["mem_available_bytes"] < 4 * 1024**3
    for e in seen:
        assert {"kind", "from", "to", "reason"} <= e.keys() or e["kind"] not in (
            "decision", "swap_start", "swap_done")

    # which plan served each phase (requests finished well inside it)
    def served(t0: float, t1: float) -> set[str]:
        return {r["plan"] for t, r in load.results if t0 < t - started < t1}

    assert served(0.5, PHASES[1]) == {ids["q8_0"]}
    assert served(done[0]["time"] - started + 0.1, PHASES[2]) == {ids["mix"]}
    assert served(done[1]["time"] - started + 0.1, PHASES[3]) == {ids["q8_0"]}

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

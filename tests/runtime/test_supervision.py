"""The daemon's core under failure, on the real daemon with real llama.cpp workers: a spawn
that raises OSError (file descriptors exhausted), shutdown while a request waits for the
slot, a worker that dies on every request (backed off, then quarantined), a worker that stalls,
SIGHUP, and a cancelled stream. Answers are counted from the client's side (ids sent vs ids
answered), and every wait is for a state, not a time."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from apreqeld.client import Client
from apreqeld.errors import DaemonError
from apreqeld.runtime import wire
from daemon_support import RawClient, wait_until, workers_of
from test_daemon import Events

pytestmark = pytest.mark.integration


def status(d) -> dict:
    with Client(d.socket, timeout=60) as c:
        return c.status()


def serving_pid(d) -> int:
    alive = [w for w in status(d)["workers"] if w["alive"]]
    assert len(alive) == 1, alive
    return alive[0]["pid"]


@pytest.fixture
def calm(tmp_path) -> tuple[str, str]:
    """Daemon options that replay a machine with plenty of memory and no pressure: a pin to
    the larger member must not be suspended because an earlier test (test_psi's hogs) left
    PSI high (a CI run's pin was held at a 0.06 GiB budget and never spawned)."""
    trace = tmp_path / "calm.jsonl"
    trace.write_text("".join(json.dumps({"t": t, "mem_available_bytes": 4 * 1024**3,
                                         "power_mode": "MAXN"}) + "\n" for t in (0, 3600)))
    return "--monitor", f"trace:{trace}"


@pytest.mark.timeout(180)
def test_an_oserror_from_spawning_a_worker_fails_the_swap_and_swapping_goes_on(
        daemon_factory, tiny_plans, calm) -> None:
    d = daemon_factory("--priority", "memory", *calm)
    ids = tiny_plans.by_label
    supervisor = psutil.Process(d.proc.pid)
    with Client(d.socket, timeout=60) as c:
        c.pin(ids["q8_0"], wait=True)  # both files checked once: no file is opened again
        c.pin(ids["q4_0"], wait=True)
        # No new fd at all (RLIMIT_NOFILE bounds fd numbers: a limit above 0 may leave holes
        # below it that closed fds left)
        wait_until(lambda: len([w for w in c.status()["workers"] if w["alive"]]) == 1,
                   what="the old worker stopped")
        wait_until(lambda: len(workers_of(d)) == 1, what="one worker process")
        soft, hard = supervisor.rlimit(psutil.RLIMIT_NOFILE)
        supervisor.rlimit(psutil.RLIMIT_NOFILE, (0, hard))
        try:  # the worker's socketpair fails with EMFILE
            with pytest.raises(DaemonError) as err:
                got = c.pin(ids["q8_0"], wait=True)
                print(f"pinned with no fd to spare: {got}\n{d.stderr()[-3000:]}")
        finally:
            supervisor.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
        assert "Too many open files" in str(err.value), (err.value, d.stderr()[-3000:])
        assert err.value.code == "unavailable"
        after = c.status()
        assert after["plan"] == ids["q4_0"]
        assert {"dispatcher", "monitor", "swapper"} <= set(after["loops"]["running"])
        assert c.pin(ids["q8_0"], wait=True)["plan"] == ids["q8_0"]  # the swapper lives on
        assert c.generate("Hi", max_tokens=2)["plan"] == ids["q8_0"]
    assert "swap_failed" in d.stderr()


@pytest.mark.timeout(180)
def test_shutdown_answers_a_request_waiting_for_the_slot(daemon_factory, tiny_plans,
                                                         calm) -> None:
    d = daemon_factory("--priority", "memory", "--swap-mode", "break-before-make",
                       "--grace", "0", *calm)
    ids = tiny_plans.by_label
    raw = RawClient(d.socket)
    with Client(d.socket, timeout=60) as c:
        old = set(workers_of(d))
        c.pin(ids["q8_0"])  # break-before-make: the slot is held while q8_0 loads
        wait_until(lambda: set(workers_of(d)) - old, what="a new worker")
        (loading,) = set(workers_of(d)) - old
        os.kill(loading, signal.SIGSTOP)  # it never finishes loading
        rid = raw.send("generate", {"prompt": "Hi", "max_tokens": 4})

        def waiting_for_the_slot() -> bool:
            s = c.status()
            return s["counts"]["accepted"] == 1 and s["queue"] == 0 and s["swapping"]

        wait_until(waiting_for_the_slot, what="the request off the queue, the swap holding on")
    d.proc.send_signal(signal.SIGTERM)
    raw.pump(lambda: rid in raw.results)  # answered, not dropped with the connection
    error, _ = raw.results[rid]
    assert error is not None and error["code"] == wire.SHUTTING_DOWN, error
    assert raw.finals[rid] == 1 and not raw.stray
    assert d.proc.wait(60) == 0
    raw.close()


@pytest.mark.timeout(240)
def test_a_worker_that_dies_on_every_request_is_backed_off_then_quarantined(
        daemon_factory, tiny_plans) -> None:
    d = daemon_factory("--priority", "memory", "--ctx", "1024")
    ids = tiny_plans.by_label
    events = Events(d.socket)
    raw = RawClient(d.socket)
    outcomes, restarts = [], []
    for _ in range(3):  # each request kills its worker, as a crashing llama.cpp would
        rid = raw.send("generate", {"prompt": "Tell me a story.", "max_tokens": 200,
                                    "seed": 1})
        raw.pump(lambda rid=rid: raw.tokens[rid] >= 1)
        pid = serving_pid(d)
        os.kill(pid, signal.SIGKILL)
        raw.pump(lambda rid=rid: rid in raw.results)
        outcomes.append(raw.results[rid][0]["code"])
        restarts.append(time.monotonic())
    error, result = raw.call("generate", {"prompt": "Hi", "max_tokens": 4})
    assert error is None, error
    after = status(d)
    events.close()
    assert outcomes == ["worker_failed"] * 3
    assert after["quarantined"] == [ids["q4_0"]]
    assert after["health"][ids["q4_0"]]["failures"] == 3
    assert result["plan"] == after["plan"] != ids["q4_0"]  # the next best plan serves
    kinds = [e["kind"] for e in events.events]
    assert kinds.count("worker_died") == 3 and "quarantined" in kinds
    row = next(p for p in after["plans"] if p["id"] == ids["q4_0"])
    assert not row["fits"] and row["why"] == "quarantined"
    assert [raw.finals[i] for i in range(1, raw.next_id + 1)] == [1] * raw.next_id
    with Client(d.socket) as c:
        assert c.status()["quarantined"] == [ids["q4_0"]]


@pytest.mark.timeout(180)
def test_a_stalled_worker_is_killed_and_only_its_request_fails(daemon_factory, tmp_path) -> None:
    config = tmp_path / "stall.toml"
    config.write_text("stall_timeout_s = 2\n")
    d = daemon_factory("--priority", "memory", "--ctx", "1024", "--config", str(config))
    raw = RawClient(d.socket)
    rid = raw.send("generate", {"prompt": "Tell me a story.", "max_tokens": 300, "seed": 1})
    raw.pump(lambda: raw.tokens[rid] >= 1)
    pid = serving_pid(d)
    os.kill(pid, signal.SIGSTOP)  # alive, silent
    t0 = time.monotonic()
    raw.pump(lambda: rid in raw.results)
    took = time.monotonic() - t0
    error, _ = raw.results[rid]
    assert error["code"] == wire.WORKER_FAILED and "said nothing for 2 s" in error["message"]
    assert 1.5 < took < 15, took
    error, result = raw.call("generate", {"prompt": "Hi", "max_tokens": 4})
    assert error is None and result["usage"]["completion_tokens"] == 4
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert raw.finals == {rid: 1, rid + 1: 1}


@pytest.mark.timeout(180)
def test_sighup_reloads_the_plan_set_instead_of_killing_the_daemon(daemon_factory,
                                                                   tiny_plans) -> None:
    d = daemon_factory("--priority", "memory", "--no-watch")
    ids = tiny_plans.by_label
    manifest = d.plans_dir / "planset.json"
    data = json.loads(manifest.read_text())
    data["members"] = [m for m in data["members"] if m["id"] != ids["q4_0"]]
    manifest.write_text(json.dumps(data))  # not watched: only SIGHUP reloads it
    events = Events(d.socket)
    d.proc.send_signal(signal.SIGHUP)
    reloaded = events.wait_for("planset_reloaded")[0]
    swap = events.wait_for("swap_done")[0]
    events.close()
    assert d.proc.poll() is None
    assert reloaded["removed"] == [ids["q4_0"]] and swap["from"] == ids["q4_0"]
    after = status(d)
    assert after["planset"]["members"] == 2 and after["plan"] == swap["to"]
    assert d.stop() == 0


@pytest.mark.timeout(180)
def test_a_cancelled_stream_frees_the_worker_at_once(daemon_factory) -> None:
    d = daemon_factory("--priority", "memory", "--ctx", "1024")
    with Client(d.socket, timeout=60) as c, Client(d.socket, timeout=60) as other:
        stream = c.generate_stream("Tell me a long story.", max_tokens=900, seed=1)
        pieces = iter(stream)
        next(pieces)
        t0 = time.monotonic()
        stream.close()  # 900 tokens would take about 9 s on one thread
        took = time.monotonic() - t0
        after = other.status()
        assert stream.result["finish"] == "cancelled" and took < 2.0, took
        assert after["in_flight"] is False and after["counts"]["cancelled"] == 1
        quick = other.generate("Hello", max_tokens=4)
        assert quick["queued_ms"] < 1000
        assert c.generate("Hi", max_tokens=2)["usage"]["completion_tokens"] == 2  # usable
        assert c.cancel(12345) == {"cancelled": False}

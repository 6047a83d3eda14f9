"""The real daemon with real workers on the default model: streaming, concurrent clients,
swaps under load, a killed worker, plan-set reload, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time

import psutil
import pytest

from apreqeld.client import Client, remote_error
from apreqeld.errors import DaemonError
from daemon_support import RawClient, wait_until

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_generate_streams_tokens_with_usage(daemon_factory) -> None:
    d = daemon_factory("--priority", "memory")
    with Client(d.socket, timeout=30) as c:
        stream = c.generate_stream("The capital of France is", max_tokens=6, temperature=0.0)
        pieces = list(stream)
        status = c.status()
    assert len(pieces) >= 2
    result = stream.result
    assert result["text"] == "".join(pieces)
    assert result["plan"] == status["plan"]
    assert result["usage"]["completion_tokens"] == 6
    assert result["usage"]["plan"] == status["plan"]
    assert status["swapping"] is False and status["queue"] == 0
    assert stat.S_IMODE(d.socket.stat().st_mode) == 0o660


def _worker_pid(c: Client) -> int:
    workers = [w for w in c.status()["workers"] if w["alive"]]
    assert len(workers) == 1, workers
    return workers[0]["pid"]


@pytest.mark.timeout(120)
def test_concurrent_clients_are_all_served(daemon_factory) -> None:
    d = daemon_factory("--priority", "memory")
    results, errors = [], []

    def one(i: int) -> None:
        try:
            with Client(d.socket, timeout=60) as c:
                results.append(c.generate(f"Story {i}:", max_tokens=4, seed=i))
        except DaemonError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(results) == 4
    assert all(r["usage"]["completion_tokens"] == 4 for r in results)
    with Client(d.socket) as c:
        counts = c.status()["counts"]
    assert counts["accepted"] == counts["served"] == 4


class Load:
    """Clients sending requests back to back until stopped, each on its own wire connection
    that counts the answers per request id (client side: sent vs answered, duplicates)."""

    def __init__(self, socket, n: int = 2) -> None:
        self.socket, self.stop_flag = socket, threading.Event()
        self.results: list[dict] = []
        self.errors: list[DaemonError] = []
        self.raws: list[RawClient] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        raw = RawClient(self.socket, timeout=60)
        with self.lock:
            self.raws.append(raw)
        while not self.stop_flag.is_set():
            error, result = raw.call("generate", {"prompt": "Once upon a time",
                                                  "max_tokens": 4, "seed": i})
            with self.lock:
                if error is None:
                    self.results.append(result)
                else:
                    self.errors.append(remote_error(error))
        raw.close()

    @property
    def sent(self) -> int:
        return sum(raw.next_id for raw in self.raws)

    def unanswered(self) -> int:
        return sum(len(raw.unanswered()) for raw in self.raws)

    def duplicated(self) -> int:
        return sum(raw.duplicated() + len(raw.stray) for raw in self.raws)

    def wait_served_by(self, plan: str, timeout: float = 60) -> None:
        """Until an answer served by `plan` arrived (after a swap to it)."""
        wait_until(lambda: any(r["plan"] == plan for r in list(self.results)), timeout,
                   f"an answer from {plan}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        wait_until(lambda: len(self.results) + len(self.errors) >= 1, what="a first answer")
        return self

    def __exit__(self, *_exc) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)


class Events:
    """A client following the daemon's events in a thread."""

    def __init__(self, socket) -> None:
        self.events: list[dict] = []
        self.client = Client(socket)
        self.stream = self.client.events()  # subscribed once this returns
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.stream:
                self.events.append(event)
        except (DaemonError, OSError):
            pass

    def wait_for(self, kind: str, count: int = 1, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if e["kind"] == kind]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count} {kind} events in {self.events}")

    def close(self) -> None:
        self.client.close()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["make-before-break", "break-before-make"])
def test_swap_under_load_answers_every_request_once(daemon_factory, tiny_plans, mode) -> None:
    d = daemon_factory("--priority", "memory", "--swap-mode", mode)
    ids = tiny_plans.by_label
    events = Events(d.socket)
    with Client(d.socket, timeout=60) as c:
        assert c.status()["plan"] == ids["q4_0"]
        with Load(d.socket) as load:
            for plan in (ids["q8_0"], ids["mix"]):
                assert c.pin(plan, wait=True)["plan"] == plan
                load.wait_served_by(plan)
            assert c.unpin(wait=True)["plan"] == ids["q4_0"]
            load.wait_served_by(ids["q4_0"])
        status = c.status()
    events.close()
    assert not load.errors, load.errors
    assert load.unanswered() == 0 and load.duplicated() == 0  # counted by the clients
    assert len(load.results) == load.sent
    counts = status["counts"]
    assert counts["accepted"] == counts["served"] == load.sent
    assert counts["failed"] == 0 and counts["swaps"] == 3
    served_by = {r["plan"] for r in load.results}
    assert served_by == set(ids.values()), served_by
    swaps = [e for e in events.events if e["kind"] == "swap_done"]
    assert [(e["from"], e["to"]) for e in swaps] == [
        (ids["q4_0"], ids["q8_0"]), (ids["q8_0"], ids["mix"]), (ids["mix"], ids["q4_0"])]
    assert {e["mode"] for e in swaps} == {mode}
    assert status["swapping"] is False and len(status["workers"]) == 1


@pytest.mark.timeout(120)
def test_killed_worker_is_restarted_and_its_request_gets_one_error(daemon_factory) -> None:
    d = daemon_factory("--priority", "memory")
    with Client(d.socket, timeout=60) as c, Client(d.socket, timeout=60) as observer:
        pid = _worker_pid(observer)
        stream = c.generate_stream("Tell me a long story.", max_tokens=200, seed=1)
        pieces = iter(stream)
        next(pieces)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(DaemonError) as err:
            for _ in pieces:
                pass
        assert err.value.code == "worker_failed"
        after = c.generate("Hello", max_tokens=4)
        assert after["usage"]["completion_tokens"] == 4
        status = observer.status()
        assert _worker_pid(observer) != pid
    assert status["counts"]["failed"] == 1 and status["counts"]["restarts"] == 1
    assert status["counts"]["served"] == 1


@pytest.mark.timeout(120)
def test_planset_changes_are_loaded_or_refused(daemon_factory, tiny_plans) -> None:
    d = daemon_factory("--priority", "memory")
    ids = tiny_plans.by_label
    manifest = d.plans_dir / "planset.json"
    good = json.loads(manifest.read_text())
    events = Events(d.socket)
    with Client(d.socket, timeout=60) as c:
        manifest.write_text('{"kind": "apreqeld.planset", "members": []}')
        rejected = events.wait_for("planset_rejected")
        assert "invalid" in rejected[0]["reason"]
        assert c.status()["plan"] == ids["q4_0"]
        good["members"] = [m for m in good["members"] if m["id"] != ids["q4_0"]]
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(good))
        tmp.rename(manifest)
        events.wait_for("planset_reloaded")
        swap = events.wait_for("swap_done")[0]
        assert swap["from"] == ids["q4_0"] and swap["to"] in (ids["q8_0"], ids["mix"])
        status = c.status()
        assert status["planset"]["members"] == 2 and status["plan"] == swap["to"]
        assert c.generate("Hi", max_tokens=4)["plan"] == swap["to"]
    events.close()


@pytest.mark.timeout(120)
def test_sigterm_finishes_in_flight_work_and_cleans_up(daemon_factory) -> None:
    d = daemon_factory("--priority", "memory")
    with Client(d.socket, timeout=60) as c:
        pid = _worker_pid(c)
        stream = c.generate_stream("Once upon a time", max_tokens=40, seed=3)
        pieces = iter(stream)
        next(pieces)
        d.proc.send_signal(signal.SIGTERM)
        rest = list(pieces)
    assert stream.result["usage"]["completion_tokens"] == 40 and rest
    assert d.proc.wait(30) == 0
    assert not d.socket.exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(120)
def test_a_full_queue_answers_busy_at_once(daemon_factory) -> None:
    from daemon_support import ctl

    d = daemon_factory("--priority", "memory", "--queue", "1", "--ctx", "1024")
    with Client(d.socket, timeout=60) as a, Client(d.socket, timeout=60) as b:
        running = a.generate_stream("Tell me a long story.", max_tokens=600, seed=1)
        pieces = iter(running)
        next(pieces)  # in flight
        waiting = b.generate_stream("Hello", max_tokens=4)  # queued
        with Client(d.socket, timeout=60) as watcher:
            wait_until(lambda: watcher.status()["queue"] == 1, what="the request queued")
        t0 = time.monotonic()
        run = ctl("generate", "Hi", "--max-tokens", "4", socket=d.socket)
        assert run.returncode == 1
        assert run.stderr == "apreqelctl: busy: the request queue is full (1 waiting); " \
                             "try again\n"
        assert time.monotonic() - t0 < 10
        assert len("".join(pieces)) > 0 and running.result["usage"]["completion_tokens"] > 1
        assert waiting.text() and waiting.result["usage"]["completion_tokens"] == 4


@pytest.mark.timeout(120)
def test_a_client_that_goes_away_cancels_its_generation(daemon_factory) -> None:
    d = daemon_factory("--priority", "memory", "--ctx", "1024")
    c = Client(d.socket, timeout=60)
    pieces = iter(c.generate_stream("Tell me a long story.", max_tokens=900, seed=1))
    next(pieces)
    c.close()
    with Client(d.socket, timeout=60) as other:
        result = other.generate("Hello", max_tokens=4)
        counts = other.status()["counts"]
    assert result["usage"]["completion_tokens"] == 4
    assert counts["cancelled"] == 1 and counts["served"] == 1
    assert result["queued_ms"] < 5000  # not behind 900 tokens (about 9 s on one thread)


@pytest.mark.timeout(60)
def test_workers_die_with_a_killed_supervisor(daemon_factory) -> None:
    d = daemon_factory("--priority", "memory")
    with Client(d.socket, timeout=30) as c:
        pid = _worker_pid(c)
    d.proc.kill()
    d.proc.wait(10)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the worker outlived its supervisor"
        time.sleep(0.05)

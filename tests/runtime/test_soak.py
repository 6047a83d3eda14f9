"""A long soak of the real daemon (issue 11, "long soaks behind a flag"): 8 clients for
`APREQELD_SOAK_S` seconds (default 600) with a swap every `APREQELD_SOAK_SWAP_S` seconds
(default 3; pin alternating members). Skipped unless `APREQELD_SOAK=1`.

Checks: every accepted request answered exactly once (each client speaks the wire itself and
counts every final response per request id, then a last `status` on the same connection
flushes any late duplicate), nothing failed besides "busy", the supervisor's RSS grows < 10 %
from the first to the last quarter of the run, and no worker process is left after SIGTERM.
The figures are printed (run with `-s`).

    APREQELD_SOAK=1 APREQELD_SOAK_S=120 .venv/bin/python -m pytest -s tests/runtime/test_soak.py
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import Counter

import psutil
import pytest

from apreqeld.client import Client
from apreqeld.runtime import wire
from daemon_support import RawClient

SOAK = os.environ.get("APREQELD_SOAK") == "1"
SOAK_S = float(os.environ.get("APREQELD_SOAK_S", "600"))
SWAP_EVERY_S = float(os.environ.get("APREQELD_SOAK_SWAP_S", "3"))
CLIENTS = 8
TOKENS = 4

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SOAK, reason="long soak (minutes): set APREQELD_SOAK=1 to run it "
                                        "(APREQELD_SOAK_S seconds, default 600)"),
]


def _live(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.timeout(SOAK_S + 600)
def test_soak_many_clients_and_swaps(daemon_factory, tiny_plans) -> None:
    d = daemon_factory("--priority", "memory")
    ids = list(tiny_plans.by_label.values())
    supervisor = psutil.Process(d.proc.pid)
    stop_at = time.monotonic() + SOAK_S
    lock = threading.Lock()
    tally = Counter()
    errors: list[str] = []
    clients: list[RawClient] = []
    worker_pids: set[int] = set()
    swaps_asked = [0]

    def client(i: int) -> None:
        try:
            run_client(i)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            with lock:
                tally["crashed"] += 1
                errors.append(f"client {i} crashed: {type(exc).__name__}: {exc}")

    def run_client(i: int) -> None:
        raw = RawClient(d.socket)
        with lock:
            clients.append(raw)
        while time.monotonic() < stop_at:
            err, result = raw.call("generate", {"prompt": f"Soak {i}:", "max_tokens": TOKENS,
                                                "seed": i})
            with lock:
                tally["sent"] += 1
                if err is None and isinstance(result, dict) and result.get("plan") in ids:
                    tally["answered"] += 1
                elif err is not None and err.get("code") == wire.BUSY:
                    tally["busy"] += 1
                else:
                    tally["failed"] += 1
                    errors.append(f"client {i}: {err or result}")
            if err is not None and err.get("code") == wire.BUSY:
                time.sleep(0.05)
        err, _ = raw.call("status")  # flushes a late duplicate of the last answer
        if err is not None:
            raise AssertionError(f"status: {err}")

    def swapper() -> None:
        with Client(d.socket, timeout=120) as c:
            k = 0
            while time.monotonic() + SWAP_EVERY_S < stop_at:
                time.sleep(SWAP_EVERY_S)
                k += 1
                c.pin(ids[k % len(ids)])
                swaps_asked[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    threads.append(threading.Thread(target=swapper))
    for t in threads:
        t.start()
    supervisor.cpu_percent()
    rss: list[float] = []
    cpu: list[float] = []
    while time.monotonic() < stop_at:
        time.sleep(1.0)
        rss.append(supervisor.memory_info().rss / 2**20)
        cpu.append(supervisor.cpu_percent())
        worker_pids.update(p.pid for p in supervisor.children(recursive=True))
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a client or the swapper hung"
    with Client(d.socket, timeout=60) as c:
        c.unpin(wait=True)
        status = c.status()
    worker_pids.update(p.pid for p in supervisor.children(recursive=True))
    for raw in clients:
        raw.close()
    assert d.stop() == 0, d.stderr()[-2000:]

    counts = status["counts"]
    quarter = max(1, len(rss) // 4)
    first, last = statistics.fmean(rss[:quarter]), statistics.fmean(rss[-quarter:])
    duplicated = sum(n - 1 for raw in clients for n in raw.finals.values() if n > 1)
    unanswered = sum(1 for raw in clients for rid in range(1, raw.next_id + 1)
                     if raw.finals[rid] == 0)
    stray = sum(len(raw.stray) for raw in clients)
    print(f"\nsoak: {SOAK_S:g} s, {CLIENTS} clients, {TOKENS}-token requests, swap every "
          f"{SWAP_EVERY_S:g} s ({swaps_asked[0]} pins, {counts['swaps']} swaps done)\n"
          f"  requests sent {tally['sent']}, answered {tally['answered']}, busy {tally['busy']}"
          f", failed {tally['failed']}; duplicated {duplicated}, unanswered {unanswered}, "
          f"stray {stray}\n"
          f"  daemon accepted / served / failed / cancelled / busy: {counts['accepted']} / "
          f"{counts['served']} / {counts['failed']} / {counts['cancelled']} / "
          f"{counts['busy']}; worker restarts {counts['restarts']}\n"
          f"  supervisor RSS MiB first / last quarter {first:.1f} / {last:.1f} "
          f"({(last / first - 1) * 100:+.1f} %), max {max(rss):.1f}; CPU % mean "
          f"{statistics.fmean(cpu):.1f}, max {max(cpu):.1f}\n"
          f"  worker processes seen {len(worker_pids)}, left after SIGTERM "
          f"{len(_live(worker_pids))}")
    for e in errors[:5]:
        print(f"  error: {e}")

    assert tally["failed"] == 0 and tally["crashed"] == 0, errors[:5]
    assert duplicated == 0 and unanswered == 0 and stray == 0
    assert tally["answered"] + tally["busy"] == tally["sent"]
    assert counts["busy"] == tally["busy"]
    # every accepted request answered exactly once (the status calls are not queued jobs)
    assert counts["accepted"] == counts["served"] == tally["answered"]
    assert counts["failed"] == 0 and counts["restarts"] == 0
    assert counts["swaps"] >= max(1, swaps_asked[0] // 2), (counts["swaps"], swaps_asked[0])
    assert last < first * 1.10, f"supervisor RSS grew {first:.1f} -> {last:.1f} MiB"
    deadline = time.monotonic() + 10
    while _live(worker_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _live(worker_pids), f"workers left: {_live(worker_pids)}"

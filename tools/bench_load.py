"""apreqeld under load: N concurrent clients for a bounded time with swaps forced every few
seconds (pin alternating members).

Run: .venv/bin/python tools/bench_load.py [--clients 16] [--seconds 60 | --quick]
                                          [--swap-every 3] [--tokens 4] [--threads 1]
Builds the two-member plan set of tools/bench_daemon.py in a temp folder, starts apreqeld
(queue bound 64), and prints: requests answered, failed (besides "busy"), busy; p50/p99 of
the queueing latency (`queued_ms` of each answer); swaps done; the supervisor's CPU and RSS
sampled every second (first and last quarter, to show growth).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apreqeld.client import Client  # noqa: E402
from apreqeld.errors import BusyError, DaemonError  # noqa: E402
from bench_daemon import build_planset, start, stop  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(sock: Path, ids: dict[str, str], clients: int, seconds: float, swap_every: float,
        tokens: int, pid: int) -> dict:
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()
    out = {"answered": 0, "failed": 0, "busy": 0, "sent": 0, "queued_ms": [], "errors": []}

    def client(i: int) -> None:
        with Client(sock, timeout=120) as c:
            while time.monotonic() < stop_at:
                with lock:
                    out["sent"] += 1
                try:
                    r = c.generate(f"Request {i}:", max_tokens=tokens, seed=i)
                    with lock:
                        out["answered"] += 1
                        out["queued_ms"].append(r["queued_ms"])
                except BusyError:
                    with lock:
                        out["busy"] += 1
                    time.sleep(0.05)
                except DaemonError as exc:
                    with lock:
                        out["failed"] += 1
                        out["errors"].append(f"{exc.code}: {exc}")

    def swapper() -> None:
        names, k = list(ids), 0
        with Client(sock, timeout=120) as c:
            while time.monotonic() + swap_every < stop_at:
                time.sleep(swap_every)
                k += 1
                c.pin(ids[names[k % len(names)]])

    proc = psutil.Process(pid)
    proc.cpu_percent()
    samples: list[tuple[float, float]] = []
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=swapper))
    for t in threads:
        t.start()
    while time.monotonic() < stop_at:
        time.sleep(1.0)
        samples.append((proc.cpu_percent(), proc.memory_info().rss / 2**20))
    for t in threads:
        t.join(180)
    with Client(sock, timeout=60) as c:
        status = c.status()
    out["samples"], out["status"] = samples, status
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--quick", action="store_true", help="20 s")
    p.add_argument("--swap-every", type=float, default=3.0)
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    seconds = 20.0 if a.quick else a.seconds
    with tempfile.TemporaryDirectory(prefix="apreqeld-load-") as tmp:
        root = Path(tmp)
        print("building the plan set ...", file=sys.stderr, flush=True)
        plans, state, ids = build_planset(root, a.threads)
        sock = root / "apreqeld.sock"
        proc = start(plans, state, sock, a.threads, "--queue", "64", "--priority", "memory")
        try:
            r = run(sock, ids, a.clients, seconds, a.swap_every, a.tokens, proc.pid)
        finally:
            stop(proc)
    q, s, counts = r["queued_ms"], r["samples"], r["status"]["counts"]
    quarter = max(1, len(s) // 4)
    cpu = [c for c, _ in s]
    rss = [m for _, m in s]
    rows = [
        ("clients / seconds / swap every", f"{a.clients} / {seconds:g} s / {a.swap_every:g} s"),
        ("requests sent", r["sent"]), ("answered", r["answered"]),
        ("failed (not busy)", r["failed"]), ("busy (by design)", r["busy"]),
        ("daemon accepted / served / failed", f"{counts['accepted']} / {counts['served']} / "
                                              f"{counts['failed']}"),
        ("swaps done", counts["swaps"]), ("worker restarts", counts["restarts"]),
        ("queueing p50 / p99 ms", f"{percentile(q, 0.5):.1f} / {percentile(q, 0.99):.1f}"),
        ("queueing mean ms", f"{statistics.fmean(q):.1f}" if q else "nan"),
        ("supervisor CPU % mean / max", f"{statistics.fmean(cpu):.1f} / {max(cpu):.1f}"),
        ("supervisor RSS MiB first / last quarter",
         f"{statistics.fmean(rss[:quarter]):.1f} / {statistics.fmean(rss[-quarter:]):.1f}"),
        ("supervisor RSS MiB max", f"{max(rss):.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for e in r["errors"][:5]:
        print(f"error: {e}")


if __name__ == "__main__":
    main()

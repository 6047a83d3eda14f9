"""Time and peak memory of ranking every distribution with TOPSIS (apreqel.topsis).

Run: .venv/bin/python benchmarks/bench_planner.py
Prints, for each (L, M):
  planner_time_s[L=..,M=..]                 best of 3 wall-clock seconds of rank_distributions
  planner_peak_mib[L=..,M=..]               tracemalloc peak of Python allocations in one call
  planner_exact_over_proportional[L=..,M=..] time with the exact-memory estimator / proportional
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from apreqeld.core.candidates import exact_memory
from apreqeld.core.topsis import rank_distributions

CASES = ((64, 5), (72, 5), (64, 6))
WEIGHTS = (0.2, 0.6, 0.2)
REPEATS = 3


def best_time(call: Callable[[], object], repeats: int = REPEATS) -> float:
    """Best wall-clock time of `repeats` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_mib(call: Callable[[], object]) -> float:
    """Peak traced Python (and numpy) allocation during one call, in MiB."""
    tracemalloc.start()
    try:
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    """Benchmark each case with random positive costs and per-rank byte sizes."""
    rng = np.random.default_rng(20240601)
    for n_sublayers, n_types in CASES:
        label = f"[L={n_sublayers},M={n_types}]"
        costs = rng.uniform(1.0, 10.0, (n_types, 3))
        by_rank = rng.uniform(1e6, 5e7, (n_sublayers, n_types))

        def proportional(n=n_sublayers, c=costs) -> object:
            return rank_distributions(n, c, WEIGHTS)

        def exact(n=n_sublayers, c=costs, sizes=by_rank) -> object:
            return rank_distributions(
                n, c, WEIGHTS, memory_column=lambda z: exact_memory(z, sizes, outside_bytes=1e8)
            )

        seconds = best_time(proportional)
        print(f"planner_time_s{label}: {seconds:.3f}", flush=True)
        print(f"planner_peak_mib{label}: {peak_mib(proportional):.1f}", flush=True)
        ratio = best_time(exact) / seconds
        print(f"planner_exact_over_proportional{label}: {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()

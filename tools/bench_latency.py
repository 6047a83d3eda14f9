"""Latency evidence under a deliberate CPU hog: does the detector catch what a busy machine
corrupts, and do the clean samples it keeps give the quiet figure?

Run: .venv/bin/python tools/bench_latency.py [--samples N] [--n-gen N] [--threads N]
Times the default model (llama-bench tg, one run per sample) in two phases of N samples:
  quiet   no hog (this machine's own background work is whatever it is: reported, not hidden)
  hogged  a busy loop on every core during the middle third of the phase, started and stopped
          by the benchmark itself (each loop also ends by itself)
Reports per phase the detector's flags against the truth (hog running or not):
  caught            hogged samples flagged disturbed        (goal: all)
  wrongly_flagged   samples without the hog flagged          (background work counts here)
  median_clean_ms   median of the samples judged clean; against the quiet phase's median of its
                    clean samples (goal: within 5 %), and the naive median of every sample
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time

import numpy as np

from apreqeld import engine
from apreqeld.core.disturbance import BOUNDS, sample_disturbed, stolen_share
from apreqeld.evidence.conditions import combine, observe
from apreqeld.resources import default_model_path


def _spin(until: float) -> None:
    while time.monotonic() < until:
        pass


def _phase(session: engine.Session, n: int, n_gen: int, threads: int,
           hog: bool) -> dict:
    """n samples; with `hog`, busy loops on every core for the middle third."""
    ctx = multiprocessing.get_context("spawn")
    procs: list = []
    rows = []
    for i in range(n):
        if hog and i == n // 3:
            procs = [ctx.Process(target=_spin, args=(time.monotonic() + 120,), daemon=True)
                     for _ in range(os.cpu_count() or 1)]
            for p in procs:
                p.start()
            time.sleep(0.3)
        if hog and i == 2 * n // 3:
            for p in procs:
                p.terminate()
            for p in procs:
                p.join(5)
            procs = []
            time.sleep(0.3)
        truth = bool(procs)
        with observe() as w:
            t = engine.time_generation(session, n_gen=n_gen, reps=1, seed=i, warmup=False)
        stolen = stolen_share(w.others_cpu_s, w.wall_s, cores=w.cores, threads=threads)
        rows.append((t.ms_per_token[0], truth, sample_disturbed(stolen, BOUNDS), stolen, w))
    ms = np.array([r[0] for r in rows])
    truth = np.array([r[1] for r in rows])
    flag = np.array([r[2] for r in rows])
    return {"samples": n, "hogged": int(truth.sum()),
            "caught": int((truth & flag).sum()), "missed": int((truth & ~flag).sum()),
            "wrongly_flagged": int((~truth & flag).sum()),
            "clean_kept": int((~flag).sum()),
            "median_all_ms": round(float(np.median(ms)), 3),
            "median_clean_ms": round(float(np.median(ms[~flag])), 3) if (~flag).any() else None,
            "median_stolen": round(float(np.median([r[3] or 0 for r in rows])), 3),
            "conditions": combine([r[4] for r in rows])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    with engine.open_session(default_model_path(), n_ctx=512, threads=args.threads) as s:
        engine.time_generation(s, n_gen=1, reps=1, warmup=True)
        quiet = _phase(s, args.samples, args.n_gen, args.threads, hog=False)
        hogged = _phase(s, args.samples, args.n_gen, args.threads, hog=True)
    ref = quiet["median_clean_ms"] or quiet["median_all_ms"]
    result = {"bounds": {"max_stolen": BOUNDS.max_stolen, "max_spread": BOUNDS.max_spread},
              "n_gen": args.n_gen, "threads": args.threads, "quiet": quiet, "hogged": hogged,
              "hogged_clean_vs_quiet": (round(hogged["median_clean_ms"] / ref - 1, 4)
                                        if hogged["median_clean_ms"] else None),
              "hogged_naive_vs_quiet": round(hogged["median_all_ms"] / ref - 1, 4)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Composition benchmark (#18): plan-set members only against members + composition, side by
side in one run, on the same replayed trace and load.

Run: .venv/bin/python tools/bench_compose.py [--quick] [--set front|uniform] [--threads 2]
The plan set is plans/smollm2-135m (`front`: as checked in; `uniform`: cut to its uniform
members, the front recomputed among them, the evidence kept: a sparse set, as a user's set of
uniform quantizations is), materialized into the state dir first (quantizing only what the
store lacks). The trace's budget sweeps slowly from the largest front
member's footprint to below the smallest (a step every 2 s), then holds. Two daemons, one after
the other (`--no-compose`, then composition on), priority accuracy, a steady client. Reported
per strategy: seconds over the memory budget (footprint of what served: measured for members,
measured online for composed members, else predicted; in all, and while some member fits:
below the smallest, the smallest serves), failed requests, swaps, the predicted
KLD of what was served (the plan set's predictor for every plan, time-weighted; and by tokens),
the memory step between adjacent footprints served (MiB, median and max), decision time; and
the ratio of the two KLDs over the time the budget lies between two members.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_adapt as adapt  # noqa: E402
from apreqeld.client import Client
from apreqeld.core.prediction import predictor_from_record, written
from apreqeld.errors import DaemonError
from apreqeld.gguf.view import read_model
from apreqeld.manifest import load_planset
from apreqeld.store.online import composed_path

REPO, MIB, RESERVE, SLACK = adapt.REPO, adapt.MIB, adapt.RESERVE, adapt.SLACK
CHECKED_IN = REPO / "plans" / "smollm2-135m"
STEP_S = 2.0


@dataclass
class Run(adapt.Run):
    composed: dict[str, dict] = field(default_factory=dict)  # id -> predicted / online


def sweep(planset, steps: int) -> list[tuple[float, float]]:
    """(t, budget) from the largest front footprint (plus the slack) to 4 MiB below the
    smallest, in `steps` even steps of STEP_S, then held half as long again."""
    fp = sorted(m.measured.footprint_bytes for m in planset.pareto_members)
    top, bottom = fp[-1] + SLACK + MIB, fp[0] - 4 * MIB
    rows = [(k * STEP_S, top - (top - bottom) * k / (steps - 1)) for k in range(steps)]
    return rows + [(steps * STEP_S * 1.5, bottom)]


def write_trace(rows: list[tuple[float, float]], path: Path) -> None:
    path.write_text("".join(json.dumps({"t": t, "mem_available_bytes": b + RESERVE,
                                        "power_mode": "MAXN"}) + "\n" for t, b in rows))


def budget_at(rows: list[tuple[float, float]], t: float) -> float:
    return [b for at, b in rows if at <= t][-1]


def plan_folder(kind: str, tmp: Path) -> Path:
    """The checked-in set, or a copy cut to its uniform members (front among them)."""
    if kind == "front":
        return CHECKED_IN
    from apreqeld.manifest import save_planset
    from apreqeld.planset import with_front

    full = load_planset(CHECKED_IN)
    members = with_front([m for m in full.members if m.kind == "uniform"], full.accuracy)
    save_planset(full.model_copy(update={"members": members, "presets": [],
                                         "name": f"{full.name}-uniform"}), tmp / "uniform")
    return tmp / "uniform"


def run(name: str, flags: list[str], plans: Path, trace: Path, state: Path, args, end: float,
        tmp: Path) -> Run:
    sock, log = tmp / f"{name}.sock", tmp / f"{name}.log"
    # each daemon starts without what an earlier one learnt (kept composed members)
    composed_path(state, load_planset(plans).model.sha256).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "apreqeld.cli.daemon", "--plans", str(plans), "--socket",
           str(sock), "--state-dir", str(state), "--threads", str(args.threads), "--monitor",
           f"trace:{trace}", "--monitor-interval", "0.5", "--reserve", str(RESERVE), "--slack",
           str(SLACK), "--no-watch", "--priority", "accuracy", *flags]
    proc = adapt.launch(cmd, log, timeout=180)
    r = Run(name)
    try:
        with Client(sock, timeout=120) as c:
            status = c.status()
            r.started, r.first = status["monitor"]["started"], status["plan"]
            watcher = Client(sock, timeout=120)
            events = watcher.events()
            threading.Thread(target=follow, args=(events, r), daemon=True).start()
            stop = threading.Event()
            load = threading.Thread(target=adapt.steady, args=(sock, r, stop, args.tokens))
            load.start()
            while time.time() - r.started < end:
                time.sleep(0.2)
            stop.set()
            load.join(120)
            r.monitor = c.status()["monitor"]
            for m in c.plans().get("composed", []):
                r.composed.setdefault(m["id"], {}).update(online=m.get("online") or {},
                                                          predicted=m["predicted"])
            watcher.close()
    finally:
        adapt.terminate(proc)
    return r


def follow(events, r: Run) -> None:
    try:
        for e in events:
            if e["kind"] == "swap_done":
                r.swaps.append((e["time"] - r.started, e["to"]))
            elif e["kind"] == "composed":
                r.composed.setdefault(e["plan"], {})["predicted"] = e["predicted"]
            elif e["kind"] in ("composed_measured", "composed_dropped"):
                r.composed.setdefault(e["plan"], {})["online"] = e.get("online") or {}
                if e["kind"] == "composed_dropped":
                    r.composed[e["plan"]]["dropped"] = e["reason"]
    except (DaemonError, OSError):
        pass


def summarise(r: Run, planset, predict, rows, end: float) -> dict:
    members = {m.id: m for m in planset.members}

    def footprint(plan: str) -> float:
        if plan in members:
            return float(members[plan].measured.footprint_bytes)
        c = r.composed.get(plan, {})
        return float((c.get("online") or {}).get("footprint_bytes")
                     or c["predicted"]["footprint_bytes"])

    def kld(plan: str) -> float:
        if plan in members:
            return predict(members[plan].recipe)
        return float(r.composed[plan]["predicted"]["kld"])

    fps = sorted(m.measured.footprint_bytes for m in planset.pareto_members)
    step = 0.05
    grid = [i * step for i in range(int(end / step))]
    over = sum(step for t in grid if footprint(r.plan_at(t)) > budget_at(rows, t))
    avoidable = sum(step for t in grid if footprint(r.plan_at(t)) > budget_at(rows, t)
                    and budget_at(rows, t) >= fps[0])
    between = [t for t in grid if fps[0] < budget_at(rows, t) < fps[-1]]
    kld_between = statistics.fmean(kld(r.plan_at(t)) for t in between) if between else None
    tokens = [(res["usage"]["completion_tokens"], res["plan"]) for _, res in r.results]
    served_tokens = sum(n for n, _ in tokens)
    served = sorted({footprint(p) for p in [r.first, *(to for _, to in r.swaps)]})
    gaps = [(b - a) / MIB for a, b in zip(served, served[1:], strict=False)]
    return {
        "strategy": r.name, "over_budget_s": round(over, 2),
        "over_budget_s_a_member_fits": round(avoidable, 2), "failed": r.errors,
        "requests": len(r.results), "tokens": served_tokens, "swaps": len(r.swaps),
        "composed": len([p for p in r.composed if p not in members]),
        "dropped": len([c for c in r.composed.values() if "dropped" in c]),
        "kld_time_weighted": round(statistics.fmean(kld(r.plan_at(t)) for t in grid), 5),
        "kld_between_members": round(kld_between, 5) if kld_between is not None else None,
        "kld_by_tokens": (round(sum(n * kld(p) for n, p in tokens) / served_tokens, 5)
                          if served_tokens else None),
        "memory_step_mib_median": round(statistics.median(gaps), 1) if gaps else None,
        "memory_step_mib_max": round(max(gaps), 1) if gaps else None,
        "distinct_footprints": len(served),
        "decide_ms_p50": r.monitor.get("decide_ms_p50"),
        "decide_ms_p99": r.monitor.get("decide_ms_p99")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="12 budget steps instead of 30")
    p.add_argument("--set", dest="kind", choices=["front", "uniform"], default="front")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--state-dir", type=Path, help="shard store (default $APREQEL_HOME/state)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    state = args.state_dir or Path(os.environ.get("APREQEL_HOME",
                                                  Path.home() / ".cache" / "apreqel")) / "state"
    with tempfile.TemporaryDirectory(prefix="bench-compose-") as tmp_name:
        tmp = Path(tmp_name)
        plans = plan_folder(args.kind, tmp)
        planset = load_planset(plans)
        print(f"materializing the front of {planset.name} in {state} ...", flush=True)
        subprocess.run([sys.executable, "-m", "apreqeld.cli.apreqel", "planset", "materialize",
                        str(plans), "--front", "--state-dir", str(state)], check=True, cwd=REPO)
        rows = sweep(planset, 12 if args.quick else 30)
        end = rows[-1][0]
        trace = tmp / "sweep.jsonl"
        write_trace(rows, trace)
        runs = [run("members-only", ["--no-compose"], plans, trace, state, args, end, tmp),
                run("composition", [], plans, trace, state, args, end, tmp)]
    view = member_view(state, planset)
    pred = predictor_from_record(view, planset.protocol["planning"]["aim"])

    def predict(recipe: dict) -> float:
        return pred.predict(written(view, recipe))["kld"]

    table = [summarise(r, planset, predict, rows, end) for r in runs]
    keys = list(table[0])
    print(f"\nbudget sweep {rows[0][1] / MIB:.1f} -> {rows[-1][1] / MIB:.1f} MiB over "
          f"{end:g} s, {args.threads} threads, {args.tokens} tokens per request")
    for k in keys:
        print(f"{k:<24}" + "".join(f"{str(row[k]):>16}" for row in table))
    a, b = table[0]["kld_between_members"], table[1]["kld_between_members"]
    if a and b:
        print(f"\ncomposition / members-only, predicted KLD while the budget lies between "
              f"members: {b / a:.3f} (goal <= 0.90)")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")


def member_view(state: Path, planset):
    """The model's tensors, read from an assembled front member's files."""
    from apreqeld.store.shards import ShardStore, member_assembly

    store = ShardStore(state)
    m = planset.pareto_members[0]
    return read_model(store.member_path(member_assembly(planset.store, m.recipe, m.base_type)))


if __name__ == "__main__":
    main()

"""Adaptation benchmark: one replayed machine scenario, the real daemon, a steady client.

Run: .venv/bin/python tools/bench_adapt.py [--quick] [--threads 1] [--svg tools/figures/adapt.svg]
The plan set is plans/smollm2-135m when it is materialized, else three members of the default
model (uniform q4_0, q8_0 and a q8_0/q4_0 mix, measured with a tiny protocol, cached under
$APREQEL_HOME/bench-adapt), with a per-power-mode latency column: MAXN as measured, 15W 3x.
The scenario (written to tools/traces/adapt.jsonl; MemAvailable without the daemon's model),
replayed with --gpu-layers 99 (the GPU signals count; a CPU-only build ignores the offload):
  normal -> memory drop (budget holds a smaller plan, not the largest) -> recovered ->
  thrashing (PSI memory some 40 % with MemAvailable plenty: the serving plan still "fits";
  the machine needs 10 % of the largest back) -> recovered -> power drop to 15W (3x latency,
  the measured column) -> GPU busy with another process (60 %: 2.5x) -> a thermal ramp (GPU
  clock 80, 60, 45 % of its maximum) -> normal. The service level max latency excludes the
  slower plans in the slow phases.
Strategies, each on the same trace and load: apreqeld (priority accuracy with the latency
level), static largest, static smallest, evict-and-reload (static largest; when the budget
falls below its footprint the worker is killed, as the OOM killer would, and the smallest is
loaded for good). Reported per strategy: seconds over the memory budget, seconds over the
latency level, requests failed, tokens served, token-weighted KLD, swaps and swaps per
phase, decision latency, the monitor's CPU; for apreqeld the time from each phase's onset to
the decision it needs; and the procfs monitor's own cost per reading on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from apreqeld.client import Client
from apreqeld.core.budget import budget_bytes
from apreqeld.errors import DaemonError
from apreqeld.manifest import PlanSet, load_planset, save_planset

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2
RESERVE, SLACK = 64 * MIB, 4 * MIB
PLENTY = 4 * 1024**3
SLOW = 3.0  # the 15W power mode's latency factor


# --------------------------------------------------------------------------- the plan set

def tiny_planset(root: Path, threads: int) -> tuple[Path, Path]:
    """Three measured members of the default model (as the daemon's tests build them)."""
    from apreqeld.core.qtypes import qtype
    from apreqeld.core.recipes import tensor_recipe
    from apreqeld.evidence.protocol import Protocol
    from apreqeld.evidence.workspace import Workspace
    from apreqeld.gguf.view import read_model
    from apreqeld.planset import planset_from_recipes
    from apreqeld.resources import default_model_path

    plans, state = root / "plans", root / "state"
    if (plans / "planset.json").is_file():
        return plans, state
    source = default_model_path()
    view = read_model(source)
    n = len(view.sublayers)
    recipes = {
        "uniform q4_0": tensor_recipe(view, [qtype("q4_0")] * n, outside=qtype("q8_0")),
        "mix q8_0/q4_0": tensor_recipe(
            view, [qtype("q8_0")] * (n // 2) + [qtype("q4_0")] * (n - n // 2),
            outside=qtype("q8_0")),
        "uniform q8_0": tensor_recipe(view, [qtype("q8_0")] * n, outside=qtype("q8_0")),
    }
    planset_from_recipes(source, recipes, plans,
                         workspace=Workspace(root / "work", state_dir=state),
                         protocol=Protocol(n_ctx=512, chunks=1, n_gen=8, reps=3,
                                           threads=threads),
                         serving_ctx=256, name="bench-adapt")
    return plans, state


def with_power_modes(planset: PlanSet, out: Path) -> PlanSet:
    """The plan set with a latency column per power mode (MAXN measured, 15W x3), saved."""
    members = []
    for m in planset.members:
        lat = m.measured.latency
        slow = lat.model_copy(update={k: getattr(lat, k) * SLOW
                                      for k in ("median_ms", "iqr_ms", "mean_ms", "std_ms")})
        members.append(m.model_copy(update={"conditions": {"MAXN": lat, "15W": slow}}))
    planset = planset.model_copy(update={"members": members})
    save_planset(planset, out)
    return planset


# --------------------------------------------------------------------------- the scenario

@dataclass(frozen=True)
class Phase:
    name: str
    start: float
    mem_available: float
    power_mode: str = "MAXN"
    gpu_load: float = 0.05
    others: float | None = None  # GPU load other processes make
    clock: float | None = None  # GPU clock / its maximum
    psi: float | None = None  # PSI memory some since the last reading, %
    slow: float = 1.0  # how much slower than its power-mode column every plan really runs
    shed: float = 0.0  # share of the largest plan the machine needs back


def spread_enough(planset: PlanSet) -> bool:
    """Whether a serving member lies far enough below the largest for the memory drop."""
    fp = sorted(m.measured.footprint_bytes for m in serving_members(planset))
    return any(f <= fp[-1] - 2 * SLACK - 4 * MIB for f in fp)


def scenario(planset: PlanSet, scale: float) -> list[Phase]:
    fp = sorted(m.measured.footprint_bytes for m in serving_members(planset))
    below = max(f for f in fp if f <= fp[-1] - 2 * SLACK - 4 * MIB)
    tight = RESERVE + below + SLACK + 2 * MIB  # holds a smaller plan, not the largest
    assert tight - RESERVE < fp[-1]
    P = PLENTY
    plan = [Phase("normal", 0, P), Phase("memory drop", 6, tight), Phase("recovered", 12, P),
            Phase("thrashing", 16, P, psi=40.0, shed=0.1), Phase("recovered", 22, P),
            Phase("power 15W", 34, P, "15W"),
            Phase("GPU busy", 42, P, gpu_load=0.9, others=0.6, slow=2.5),
            Phase("thermal 80%", 50, P, clock=0.8, slow=1.25),
            Phase("thermal 60%", 53, P, clock=0.6, slow=1 / 0.6),
            Phase("thermal 45%", 56, P, clock=0.45, slow=1 / 0.45), Phase("normal", 60, P)]
    return [replace(ph, start=ph.start * scale) for ph in plan]


SCENARIO_END = 68


def serving_members(planset: PlanSet) -> list:
    """The members the daemon chooses among (its Pareto members)."""
    return planset.pareto_members or planset.members


def write_trace(phases: list[Phase], end: float, path: Path) -> None:
    rows = []
    for p in phases:
        row = {"t": p.start, "mem_available_bytes": p.mem_available, "power_mode": p.power_mode,
               "gpu_load": p.gpu_load, "gpu_load_others": p.others or 0.0,
               "gpu_clock_ratio": p.clock or 1.0, "psi_memory_some_recent": p.psi or 0.0}
        rows.append(row)
    rows.append(rows[-1] | {"t": end})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def phase_at(phases: list[Phase], t: float) -> Phase:
    return [p for p in phases if p.start <= t][-1]


def budget_at(phases: list[Phase], t: float, largest: float) -> float:
    """The budget any plan has at trace time t (the scenario counts no model as used); in a
    thrashing phase, the largest plan less what the machine needs back."""
    phase = phase_at(phases, t)
    free = budget_bytes(mem_available=phase.mem_available, reserve=RESERVE)
    return min(free, largest * (1 - phase.shed)) if phase.shed else free


# --------------------------------------------------------------------------- one run

@dataclass
class Run:
    name: str
    started: float = 0.0
    first: str = ""
    swaps: list[tuple[float, str]] = field(default_factory=list)  # (trace t, new plan)
    decisions: list[float] = field(default_factory=list)  # trace t of each switch decided
    results: list[tuple[float, dict]] = field(default_factory=list)
    errors: int = 0
    monitor: dict = field(default_factory=dict)

    def plan_at(self, t: float) -> str:
        plan = self.first
        for at, to in self.swaps:
            if at <= t:
                plan = to
        return plan


def run_strategy(name: str, plans: Path, state: Path, trace: Path, args, planset: PlanSet,
                 phases: list[Phase], level_ms: float, end: float, tmp: Path) -> Run:
    flags = {"apreqeld": ["--priority", "accuracy"],
             "static largest": ["--priority", "accuracy", "--no-adapt"],
             "static smallest": ["--priority", "memory", "--no-adapt"],
             "evict-and-reload": ["--priority", "accuracy", "--no-adapt"]}[name]
    sock, log = tmp / f"{name.replace(' ', '-')}.sock", tmp / f"{name.replace(' ', '-')}.log"
    cmd = [sys.executable, "-m", "apreqeld.cli.daemon", "--plans", str(plans), "--socket",
           str(sock), "--state-dir", str(state), "--threads", str(args.threads), "--monitor",
           f"trace:{trace}", "--monitor-interval", str(args.interval), "--dwell",
           str(args.dwell), "--reserve", str(RESERVE), "--slack", str(SLACK), "--no-watch",
           "--gpu-layers", "99", *flags]
    proc = launch(cmd, log)
    run = Run(name)
    try:
        with Client(sock, timeout=60) as c:
            status = c.status()
            run.started, run.first = status["monitor"]["started"], status["plan"]
            c.set_priority(status["priority"]["name"], max_latency_ms=level_ms, wait=True)
            watcher = Client(sock, timeout=60)  # an event stream takes its own connection
            events = watcher.events()
            stop = threading.Event()
            threading.Thread(target=follow, args=(events, run), daemon=True).start()
            load = threading.Thread(target=steady, args=(sock, run, stop, args.tokens))
            load.start()
            smallest = min(serving_members(planset),
                           key=lambda m: m.measured.footprint_bytes).id
            evicted = name != "evict-and-reload"
            largest = max(footprint(planset, m.id) for m in serving_members(planset))
            while (t := time.time() - run.started) < end:
                if not evicted and budget_at(phases, t, largest) < footprint(planset,
                                                                              run.plan_at(t)):
                    evicted = True  # the kernel's OOM killer, then a reload of the smallest
                    pid = next(w["pid"] for w in c.status()["workers"] if w["alive"])
                    os.kill(pid, signal.SIGKILL)
                    c.pin(smallest, wait=False)
                time.sleep(0.05)
            stop.set()
            load.join(60)
            run.monitor = c.status()["monitor"]
            watcher.close()
    finally:
        terminate(proc)
    return run


def launch(cmd: list[str], log: Path, *, timeout: float = 120) -> subprocess.Popen:
    """Start `apreqeld` (output to `log`) and wait until it serves; exit if it does not."""
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + timeout
    while "apreqeld: serving" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            terminate(proc)
            raise SystemExit(f"apreqeld did not start: {log.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM (the daemon drains), then SIGKILL after 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def follow(events, run: Run) -> None:
    try:
        for e in events:
            if e["kind"] == "swap_done":
                run.swaps.append((e["time"] - run.started, e["to"]))
            elif e["kind"] == "decision" and e.get("switch") and e.get("source") == "monitor":
                run.decisions.append(e["time"] - run.started)
    except (DaemonError, OSError):
        pass


def steady(sock: Path, run: Run, stop: threading.Event, tokens: int) -> None:
    with Client(sock, timeout=60) as c:
        while not stop.is_set():
            try:
                r = c.generate("Once upon a time", max_tokens=tokens, seed=7)
                run.results.append((time.time() - run.started, r))
            except DaemonError:
                run.errors += 1


def footprint(planset: PlanSet, plan: str) -> float:
    return float(planset.member(plan).measured.footprint_bytes)


# --------------------------------------------------------------------------- report

def summarise(run: Run, planset: PlanSet, phases: list[Phase], level_ms: float,
              end: float) -> dict:
    step = 0.05
    grid = [i * step for i in range(int(end / step))]
    largest = max(footprint(planset, m.id) for m in serving_members(planset))
    over = sum(step for t in grid
               if footprint(planset, run.plan_at(t)) > budget_at(phases, t, largest))
    slow = 0.0
    for t in grid:
        m, phase = planset.member(run.plan_at(t)), phase_at(phases, t)
        ms = m.conditions[phase.power_mode].median_ms * phase.slow
        slow += step if ms > level_ms else 0.0
    per_phase = [sum(1 for at, _ in run.swaps if p.start <= at < nxt)
                 for p, nxt in zip(phases, [p.start for p in phases[1:]] + [end], strict=True)]
    onset = {}
    for p in phases[1:]:
        after = [d - p.start for d in run.decisions if p.start <= d < p.start + 4]
        if after:
            onset[f"{p.name} ({p.start:g} s)"] = round(after[0], 2)
    tokens = [(r["usage"]["completion_tokens"], r["plan"]) for _, r in run.results]
    served = sum(n for n, _ in tokens)
    kld = sum(n * planset.member(p).measured.kld for n, p in tokens) / served if served else 0
    mon = run.monitor
    return {"strategy": run.name, "over_budget_s": round(over, 2),
            "over_latency_s": round(slow, 2), "failed": run.errors,
            "requests": len(run.results), "tokens": served, "kld": round(kld, 5),
            "swaps": len(run.swaps), "swaps_per_phase": per_phase,
            "onset_to_decision_s": onset, "decide_ms_p50": mon.get("decide_ms_p50"),
            "decide_ms_p99": mon.get("decide_ms_p99"), "monitor_cpu_pct": mon.get("cpu_percent")}


def procfs_cost(planset: PlanSet, n: int = 200) -> tuple[float, float]:
    """CPU ms of one procfs reading + decision on this machine, and % of a core at 1 s."""
    from apreqeld.core.latency import Conditions
    from apreqeld.core.selection import priority_from
    from apreqeld.runtime.monitor import ProcfsSource
    from apreqeld.runtime.policy import Policy

    source, policy = ProcfsSource(), Policy(reserve_bytes=RESERVE)
    priority = priority_from("accuracy")
    cpu = time.process_time()
    for i in range(n):
        state = source.read()
        policy.see(state, now=float(i))
        policy.decide(state, planset.members, priority, current=planset.members[0].id,
                      now=float(i), conditions=Conditions())
    ms = (time.process_time() - cpu) * 1000 / n
    return ms, ms / 1000 * 100


def figure(runs: list[Run], planset: PlanSet, phases: list[Phase], end: float,
           path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = sorted({r.first for r in runs} | {to for r in runs for _, to in r.swaps},
                  key=lambda i: footprint(planset, i))
    label = {i: planset.member(i).label.replace("uniform ", "") for i in used}
    palette = ("#4c9f70", "#e0a030", "#c0504d", "#5b7fc7", "#8e6bb8", "#777777")
    colors = {i: palette[n % len(palette)] for n, i in enumerate(used)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    ts = [i * 0.05 for i in range(int(end / 0.05) + 1)]
    largest = max(footprint(planset, m.id) for m in serving_members(planset))
    top.step(ts, [budget_at(phases, t, largest) / MIB for t in ts], where="post",
             color="black", lw=2, label="budget")
    styles = ("-", "--", ":", "-.")
    for run, style in zip(runs, styles, strict=False):
        top.step(ts, [footprint(planset, run.plan_at(t)) / MIB for t in ts], where="post",
                 ls=style, lw=1.5, label=f"{run.name} footprint")
    fps = [m.measured.footprint_bytes / MIB for m in serving_members(planset)]
    top.set_ylim(min(fps) * 0.8, max(fps) * 1.5)
    top.set_ylabel("MiB")
    top.legend(loc="upper right", fontsize=7, ncol=2)
    for p in phases:
        for ax in (top, bottom):
            ax.axvline(p.start, color="grey", lw=0.5)
        top.text(p.start + 0.2, max(fps) * 1.45, p.name, fontsize=7, va="top")
    for row, run in enumerate(runs):
        edges = [0.0] + [t for t, _ in run.swaps if t < end] + [end]
        plans = [run.first] + [to for t, to in run.swaps if t < end]
        for a, b, plan in zip(edges, edges[1:], plans, strict=False):
            bottom.broken_barh([(a, b - a)], (row - 0.4, 0.8), color=colors[plan])
    bottom.set_yticks(range(len(runs)), [r.name for r in runs], fontsize=8)
    bottom.set_xlabel("trace time (s)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    bottom.legend(handles, [label[i] for i in colors], fontsize=7, loc="lower right",
                  title="serving plan", title_fontsize=7)
    fig.suptitle("apreqeld: budget over a replayed scenario, footprint and plan per strategy",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a half-length scenario (~1.5 min)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--planset", choices=["auto", "real", "tiny"], default="auto",
                   help="auto: plans/smollm2-135m when it is there (its Pareto members are "
                        "materialized first), else the tiny set")
    p.add_argument("--tokens", type=int, default=8, help="tokens per request")
    p.add_argument("--svg", type=Path, default=REPO / "tools" / "figures" / "adapt.svg")
    p.add_argument("--trace", type=Path, default=REPO / "tools" / "traces" / "adapt.jsonl")
    args = p.parse_args()
    scale = 0.5 if args.quick else 1.0
    args.interval, args.dwell = 0.25, 4.0 * scale
    from apreqeld.storage import default_workdir

    real = REPO / "plans" / "smollm2-135m"
    work = default_workdir() / "bench-adapt"
    if args.planset != "tiny" and (real / "planset.json").is_file() and \
            not spread_enough(load_planset(real)):
        if args.planset == "real":
            raise SystemExit(f"the front of {real} spans too little memory for the scenario's "
                             "memory drop (no member 2 slacks + 4 MiB below the largest)")
        print(f"plan set: the front of {real} is too dense for the memory drop; using the "
              "tiny set")
        args.planset = "tiny"
    if args.planset != "tiny" and (real / "planset.json").is_file():
        from apreqeld.evidence.workspace import Workspace
        from apreqeld.planset import materialize

        base_dir, state = real, work / "state-real"
        t0 = time.monotonic()
        real_set = load_planset(real)
        materialize(real_set, workspace=Workspace(state_dir=state),
                    members=serving_members(real_set))
        print(f"plan set: {real} ({len(serving_members(real_set))} Pareto members "
              f"materialized in {time.monotonic() - t0:.0f} s)")
    elif args.planset == "real":
        raise SystemExit(f"no plan set at {real}")
    else:
        print(f"plan set: three tiny members of the default model (cached in {work})")
        base_dir, state = tiny_planset(work, args.threads)
    planset = with_power_modes(load_planset(base_dir), work / "plans-power")
    phases = scenario(planset, scale)
    end = SCENARIO_END * scale
    write_trace(phases, end, args.trace)
    ms = sorted(m.measured.latency.median_ms for m in serving_members(planset))
    level_ms = SLOW * (ms[0] + ms[1]) / 2  # at 15W (and GPU busy: 2.5x) only the fastest fits
    for m in sorted(serving_members(planset), key=lambda m: m.measured.footprint_bytes):
        print(f"  {m.id}  {m.label:<16} {m.measured.footprint_bytes / MIB:7.1f} MiB  "
              f"{m.measured.latency.median_ms:6.2f} ms/token  KLD {m.measured.kld:.4f}")
    print(f"latency level {level_ms:.2f} ms/token; trace {args.trace} ({end:g} s)")
    runs, rows = [], []
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-adapt-{os.getpid()}"
    tmp.mkdir(parents=True)
    for name in ("apreqeld", "static largest", "static smallest", "evict-and-reload"):
        run = run_strategy(name, work / "plans-power", state, args.trace, args, planset,
                           phases, level_ms, end, tmp)
        runs.append(run)
        rows.append(summarise(run, planset, phases, level_ms, end))
        print(f"  done: {name}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    cols = [("strategy", 16, "s"), ("over_budget_s", 9, "g"), ("over_latency_s", 9, "g"),
            ("failed", 6, "d"), ("requests", 8, "d"), ("tokens", 7, "d"), ("kld", 8, ".5f"),
            ("swaps", 5, "d"), ("decide_ms_p50", 9, ".4f"), ("decide_ms_p99", 9, ".4f"),
            ("monitor_cpu_pct", 9, ".4f")]
    print("  ".join(f"{c[:w]:>{w}}" for c, w, _ in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>{w}{f}}" if r[c] is not None else f"{'-':>{w}}"
                        for c, w, f in cols))
    cost_ms, pct = procfs_cost(planset)
    print(f"procfs monitor + decision on this machine: {cost_ms:.3f} ms CPU per reading, "
          f"{pct:.3f}% of a core at 1 s")
    figure(runs, planset, phases, end, args.svg)
    print(f"figure: {args.svg}")
    for r in rows:
        if r["strategy"] == "apreqeld":
            per = [f"{p.name} {n}" for p, n in zip(phases, r["swaps_per_phase"], strict=True)]
            print("apreqeld swaps per phase: " + ", ".join(per))
            print(f"apreqeld onset to decision (s): {r['onset_to_decision_s']}")
    print("json: " + json.dumps(rows))


if __name__ == "__main__":
    main()

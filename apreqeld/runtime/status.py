"""Status views: read-only snapshots of the scheduler's owners for `status` and `plans`."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict
from typing import TYPE_CHECKING

from apreqeld.core.latency import slowdown
from apreqeld.core.selection import Priority, closeness, feasibility
from apreqeld.runtime import wire
from apreqeld.runtime.adapter import state_dict
from apreqeld.runtime.monitor import TraceSource

if TYPE_CHECKING:
    from apreqeld.runtime.scheduler import Scheduler


def priority_dict(priority: Priority) -> dict:
    return {"name": priority.name, "weights": list(priority.weights),
            "levels": {k: v for k, v in asdict(priority.levels).items() if v is not None}}


def _quantile(values: deque[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of the recent values, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 4)


def status_view(s: Scheduler) -> dict:
    """Everything `apreqelctl status` shows."""
    a, sw, d = s.adapter, s.swapper, s.dispatcher
    member = a.member(s.serving)
    health = s.health.view()
    return {
        "protocol": wire.PROTOCOL,
        "plan": s.serving,
        "label": member.label if member else None,
        "serving_composed": bool(member and member.kind == "composed"),
        "target": sw.target,
        "swapping": sw.swap is not None,
        "swap": dict(sw.swap) if sw.swap else None,
        "swap_state": str(sw.phase),
        "priority": priority_dict(a.priority),
        "pinned": a.pinned,
        "pin_held": a.pin_held,
        "pin_error": a.pin_error,
        "queue": d.queued,
        "queue_bound": d.bound,
        "in_flight": d.current is not None,
        "closing": s.closing,
        "broken": s.broken,
        "workers": s.pool.describe(),
        "health": health,
        "quarantined": sorted(k for k, v in health.items() if v["quarantined"]),
        "loops": {"running": s.supervisor.running(), "stuck": s.supervisor.progress.stuck(),
                  "failed": s.supervisor.reason},
        "planset": {"name": a.planset.name, "members": len(a.planset.members),
                    "dir": str(s.config.plans)},
        "counts": dict(s.counts),
        "subscribers": s.events.subscribers,
        "last_decision": a.last_decision,
        "uptime_s": round(time.monotonic() - s.started, 1),
        "monitor": monitor_view(s),
        "pressure": pressure_view(s),
        "latency": latency_view(s),
        "state": state_dict(a.state),
        "budget_bytes": a.budget_bytes(),
        "plans": plan_fit(s),
        "composition": s.composer.view(),
    }


def monitor_view(s: Scheduler) -> dict | None:
    """The monitor's source, interval, readings and their CPU and decision cost."""
    a = s.adapter
    if a.monitor is None:
        return None
    w = a.watch
    alive = time.time() - w["started"] if w["started"] else 0.0
    return {"source": w["source"], "interval_s": s.config.monitor_interval_s,
            "adapt": s.config.adapt, "started": w["started"], "ticks": w["ticks"],
            "errors": w["errors"], "cpu_s": round(w["cpu_s"], 6),
            "cpu_percent": round(100 * w["cpu_s"] / alive, 4) if alive > 0 else None,
            "decide_ms_mean": (round(w["decide_ms_sum"] / w["decisions"], 4)
                               if w["decisions"] else None),
            "decide_ms_p50": _quantile(a.decide_ms, 0.5),
            "decide_ms_p99": _quantile(a.decide_ms, 0.99),
            "decide_ms_max": round(w["decide_ms_max"], 4),
            "dwell_elapsed": a.dwell_elapsed(),
            "trace_t": (round(a.monitor.elapsed(), 2)
                        if isinstance(a.monitor, TraceSource) else None)}


def pressure_view(s: Scheduler) -> dict:
    """Shedding: whether members may grow, whether the serving one is shed now, why; the PSI
    triggers set (or why not) and the last reaction seen."""
    a, now = s.adapter, time.monotonic()
    shed = a.policy.shedding
    return {"shedding": shed.active(now=now), "shed_now": a.policy.shed_now(now=now),
            "reason": shed.reason or None,
            "last_pressure_s_ago": (round(now - shed.last_pressure, 2)
                                    if shed.last_pressure is not None else None),
            "triggers": a.watch_psi.status() if a.watch_psi is not None else None,
            "last_reaction": ({k: v for k, v in a.reaction.items() if k != "seen"}
                              if a.reaction else None)}


def latency_view(s: Scheduler) -> dict:
    """The live latency scale: the machine's slowdown, its parts, the served-token
    correction, and the signals this machine does not give."""
    a = s.adapter
    model = slowdown(a.conditions())
    return {"scale": round(a.latency_scale(), 4), "model": round(model.factor, 4),
            "parts": {k: round(v, 4) for k, v in model.parts.items()},
            "correction": round(a.policy.correction.value, 4),
            "samples": a.policy.correction.samples,
            "unavailable": a.unavailable() if a.monitor is not None else None}


def plan_fit(s: Scheduler) -> list[dict]:
    """Each candidate: footprint, live latency, accuracy, fits or why not, closeness."""
    a = s.adapter
    budget, scale = a.budget_bytes(), a.latency_scale()
    rows, fitting = [], []
    kinds = {m.id: m.kind for m in a.members()}
    for c in a.candidates():
        limit = budget if budget is None or c.id == s.serving else budget - a.policy.slack_bytes
        why = feasibility(c, a.priority.levels, budget_bytes=limit, latency_scale=scale)
        if why is None and c.id != s.serving and not s.health.available(c.id):
            why = "quarantined" if s.health.quarantined(c.id) else "backing off"
        if why is None:
            fitting.append(c)
        rows.append({"id": c.id, "footprint_bytes": c.footprint_bytes,
                     "latency_ms": round(c.latency_ms * scale, 3), "accuracy": c.accuracy,
                     "fits": why is None, "why": why, "serving": c.id == s.serving,
                     "composed": kinds.get(c.id) == "composed"})
    scores = closeness(fitting, a.priority.weights, latency_scale=scale)
    for row in rows:
        row["closeness"] = round(scores[row["id"]], 4) if row["id"] in scores else None
    return rows


def plans_view(s: Scheduler) -> dict:
    a = s.adapter
    return {"planset": a.planset.name, "accuracy": a.planset.accuracy,
            "members": [{"id": m.id, "label": m.label, "kind": m.kind, "pareto": m.pareto,
                         "serving": m.id == s.serving, "present": s.files.present(m),
                         "measured": m.measured.model_dump(mode="json")}
                        for m in a.planset.members],
            "composed": [{"id": m.id, "label": m.label, "kind": m.kind,
                          "serving": m.id == s.serving, "predicted": m.predicted,
                          "online": s.composer.online.get(m.id, {}),
                          "measured": m.measured.model_dump(mode="json")}
                         for m in s.composer.members()],
            "compose": {"on": s.composer.off_reason is None,
                        "off_reason": s.composer.off_reason}}

"""Is a latency figure clean? The detector on recorded samples and their conditions (pure).

Rule: other processes *steal* from a run when the CPU they took exceeds the cores it left
free, `stolen = max(0, others_cpu_s / wall_s - (cores - threads)) / threads`; a sample or a
whole measurement is disturbed when `stolen` exceeds `max_stolen`, and a measurement also when
the spread of its repetitions (IQR / median) exceeds `max_spread`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from apreqeld.core.metrics import latency_stats

CLEAN, DISTURBED, UNCHECKED = "clean", "disturbed", "unchecked"


@dataclass(frozen=True)
class Bounds:
    """Where contention and spread stop being noise."""

    max_stolen: float = 0.15
    max_spread: float = 0.20


BOUNDS = Bounds()


def stolen_share(others_cpu_s: float | None, wall_s: float, *, cores: int,
                 threads: int) -> float | None:
    """Share of the run's own cores that other processes took (None when unknown)."""
    if others_cpu_s is None or wall_s <= 0:
        return None
    threads = max(1, min(threads, cores))
    return max(0.0, others_cpu_s / wall_s - (cores - threads)) / threads


def sample_disturbed(stolen: float | None, bounds: Bounds = BOUNDS) -> bool:
    """One sample: disturbed when others stole more than the bound of its cores."""
    return stolen is not None and stolen > bounds.max_stolen


def judge(samples_ms: Sequence[float], stolen: float | None,
          bounds: Bounds = BOUNDS) -> tuple[str, str | None]:
    """(quality, reason) of a measurement from its samples and the share stolen over it."""
    stats = latency_stats(np.asarray(samples_ms, dtype=np.float64))
    if sample_disturbed(stolen, bounds):
        return DISTURBED, (f"other processes took {100 * stolen:.0f}% of its cores "
                           f"(bound {100 * bounds.max_stolen:.0f}%)")
    spread = stats["iqr_ms"] / stats["median_ms"] if stats["median_ms"] > 0 else 0.0
    if spread > bounds.max_spread:
        return DISTURBED, (f"repetitions spread {100 * spread:.0f}% (IQR/median, bound "
                           f"{100 * bounds.max_spread:.0f}%)")
    return CLEAN, None


def latency_record(samples_ms: Sequence[float], sample_stolen: Sequence[float | None],
                   conditions: Mapping, *, threads: int, bounds: Bounds = BOUNDS) -> dict:
    """Robust statistics, per-sample flags, conditions and the verdict of one measurement."""
    stolen = stolen_share(conditions.get("others_cpu_s"), conditions.get("wall_s", 0.0),
                          cores=int(conditions.get("cores", 1)), threads=threads)
    quality, reason = judge(samples_ms, stolen, bounds)
    return latency_stats(np.asarray(samples_ms, dtype=np.float64)) | {
        "quality": quality, "reason": reason,
        "stolen": None if stolen is None else round(stolen, 4),
        "samples_ms": [round(float(x), 4) for x in samples_ms],
        "samples_disturbed": [sample_disturbed(s, bounds) for s in sample_stolen],
        "conditions": dict(conditions),
        "bounds": {"max_stolen": bounds.max_stolen, "max_spread": bounds.max_spread}}


def quality_of(measured: Mapping) -> str:
    """The latency quality a measurement records (unchecked when it predates the detector)."""
    return str(measured.get("latency_quality") or UNCHECKED)


def worst(qualities: Sequence[str]) -> str:
    """disturbed over unchecked over clean."""
    for q in (DISTURBED, UNCHECKED):
        if q in qualities:
            return q
    return CLEAN


def profile_latency_evidence(device_profile: Mapping) -> dict:
    """Which latency figures a device profile gives a plan, and their quality."""
    types = {}
    for name in device_profile["types"]:
        m = device_profile["uniform"][name]["measured"]
        rec = m.get("latency") or {}
        types[name] = {"quality": quality_of(m), "latency_ms": m.get("latency_ms"),
                       "median_ms": m.get("latency_median_ms"), "iqr_ms": m.get("latency_iqr_ms"),
                       "stolen": rec.get("stolen"), "reason": rec.get("reason")}
    return {"quality": worst([t["quality"] for t in types.values()]),
            "figure": "llama-bench tg mean of the repetitions (latency_ms)", "types": types}


def disturbed_text(evidence: Mapping) -> str | None:
    """One line naming the disturbed (or unchecked) figures of `profile_latency_evidence`."""
    bad = {n: t for n, t in evidence["types"].items() if t["quality"] != CLEAN}
    if not bad:
        return None
    parts = [f"{n} {t['quality']}" + (f" ({t['reason']})" if t.get("reason") else "")
             for n, t in bad.items()]
    return "latency " + ", ".join(parts)

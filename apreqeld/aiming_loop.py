"""The closed loop between aiming and measuring (offline): recalibrate the predictor on every
measured member, re-aim each preset still undominated with margins from the measured error,
measure what was aimed, and repeat, within bounded rounds and members added.

Per round: the members measured last round give the predictor's out-of-sample error (how far
their measurements came out above the predictions they were aimed with: core.aims
.error_margins); the predictor is refitted to all members (core.calibration); each preset no
own member dominates in the latest timing run is aimed at again (core.aims.aims_at) from its
measured footprint, latency and accuracy, with margins: footprint at least the measured
footprint error, latency at least the preset's rounds' spread (IQR / median) and the measured
latency error, accuracy the measured accuracy error, each raised for a preset by how far its
own aims of the last round landed beyond their limits. A preset for which no recipe is
predicted at even the last relaxation of the margins is shown unbeatable, with the reason.
Each round measures at most the member bound spread over the rounds (or one aim per preset
still open, if more), taken one aim per preset in turn. Stops when every preset is dominated
or shown unbeatable, at the round or member bound, or when no aim gives a recipe not measured
yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from apreqeld.aiming import (
    aim_label,
    calibrated,
    outside_recipe,
    predictable,
    written,
)
from apreqeld.core.aims import STRICT, aims_at, error_margins, objectives, unbeatable_reason
from apreqeld.core.calibration import Calibration
from apreqeld.core.frontier import dominance_gaps
from apreqeld.core.targeting import Options, Predictor, option_tables, tensor_options
from apreqeld.errors import InputError
from apreqeld.evidence.protocol import Progress, no_progress
from apreqeld.gguf.view import ModelView
from apreqeld.manifest import Member

FLOORS = {"footprint_bytes": 0.002, "latency_ms": 0.0, "accuracy": 0.01}
MAX_MARGIN = 0.5  # no margin grows beyond this share of the preset


@dataclass(frozen=True)
class Bounds:
    """How far the loop may go: rounds after the first measurement, and members it adds."""

    rounds: int = 3
    members: int = 36

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.members < 0:
            raise InputError(f"aim bounds must be >= 0, got rounds {self.rounds}, members "
                             f"{self.members}")


DEFAULT_BOUNDS = Bounds()


@dataclass
class LoopResult:
    """The members after the last round, the predictor refitted to them, and the record."""

    members: list[Member]
    predictor: Predictor
    calibration: Calibration | None
    rounds: list[dict] = field(default_factory=list)
    status: dict[str, dict] = field(default_factory=dict)  # preset -> state, reason
    stop: str = ""


# (label, recipe, its prediction) to add -> every member, measured and timed together
Measure = Callable[[Sequence[tuple[str, dict[str, str], Mapping[str, float]]]], list[Member]]


def verdicts(members: Sequence[Member], presets: Mapping[str, str], accuracy: str,
             /) -> dict[str, tuple[list[str], str | None, list[float]]]:
    """Preset -> (own members dominating it, the closest one, its relative miss per objective),
    as compare_presets judges them (the same run's latency)."""
    points = np.asarray([_point(m, accuracy) for m in members])
    index = {m.id: i for i, m in enumerate(members)}
    own = [i for i, m in enumerate(members) if m.kind != "preset"]
    names = list(presets)
    gaps = dominance_gaps(points, [index[presets[n]] for n in names], own)
    return {n: ([members[i].id for i in doms], None if near is None else members[near].id, miss)
            for n, (doms, near, miss) in zip(names, gaps, strict=True)}


def _point(m: Member, accuracy: str) -> tuple[float, float, float]:
    return (float(m.measured.footprint_bytes), m.measured.latency.median_ms,
            float(getattr(m.measured, accuracy)))


def measured_of(m: Member, accuracy: str, /) -> dict[str, float]:
    return dict(zip(objectives(accuracy), _point(m, accuracy), strict=True))


def close_loop(view: ModelView, members: Sequence[Member], presets: Mapping[str, str],
               prior: Predictor, measure: Measure, /, *, outside: str, accuracy: str,
               bounds: Bounds = DEFAULT_BOUNDS,
               first_added: int = 0, progress: Progress = no_progress) -> LoopResult:
    """Run the loop from the first measurement (`members`; `first_added` of them aimed
    before it) until every preset in `presets` (name -> member id) is dominated or shown
    unbeatable, or a bound stops it. `measure(new (label, recipe, prediction)s)` adds and
    measures them and returns every member, timed again together."""
    names = objectives(accuracy)
    floors = {"footprint_bytes": FLOORS["footprint_bytes"], "latency_ms": FLOORS["latency_ms"],
              accuracy: FLOORS["accuracy"]}
    options = tensor_options(view, list(prior.figures[accuracy]))
    fixed = outside_recipe(view, outside)
    members = list(members)
    extra = {p: dict.fromkeys(names, 0.0) for p in presets}
    status: dict[str, dict] = {}
    aimed: dict[str, tuple[str, dict[str, float]]] = {}  # member id -> (preset, its limits)
    fresh = [m.id for m in members if m.kind != "uniform"]
    aimer, added, rounds, stop = prior, 0, [], ""
    cal: Calibration | None = None
    started = time.time()
    rounds.append(_round(0, members, presets, accuracy, added=first_added, aimed=[],
                         wall=0.0))
    for r in range(1, bounds.rounds + 2):
        t0 = time.time()
        by_id = {m.id: m for m in members}
        new = [by_id[i] for i in fresh
               if i in by_id and predictable(aimer, written(view, by_id[i].recipe))]
        errors = error_margins([aimer.predict(written(view, m.recipe)) for m in new],
                               [measured_of(m, accuracy) for m in new], names, floor=floors)
        cal = calibrated(view, prior, members, accuracy=accuracy)
        aimer = cal.predictor
        rounds[-1]["errors"] = errors
        rounds[-1]["residual"] = cal.residual
        judged = verdicts(members, presets, accuracy)
        for mid, (p, limits) in aimed.items():
            if mid in by_id and not judged[p][0]:
                got = measured_of(by_id[mid], accuracy)
                for m in names:
                    extra[p][m] = min(MAX_MARGIN, max(extra[p][m], got[m] / limits[m] - 1))
        open_ = [p for p in presets if not judged[p][0]
                 and status.get(p, {}).get("state") != "unbeatable"]
        for p in presets:
            if judged[p][0]:
                status[p] = {"state": "dominated", "reason": None}
        if not open_:
            stop = "every preset is dominated or shown unbeatable"
            break
        if r > bounds.rounds:
            stop = f"round bound ({bounds.rounds} rounds)"
            break
        if added >= bounds.members:
            stop = f"member bound ({bounds.members} members added)"
            break
        progress(f"aim round {r}: {len(open_)} presets undominated", 0.0)
        tables = option_tables(aimer, options)
        queue: dict[str, list[tuple[str, dict[str, str], dict[str, float]]]] = {}
        for p in open_:
            state, todo = _aim_preset(p, by_id, presets[p], aimer, options, tables, fixed,
                                      errors, extra[p], accuracy=accuracy, round_=r)
            if state is not None:
                status[p] = state
            queue[p] = todo
        share = -(-bounds.members // max(bounds.rounds, 1))  # the bound spread over rounds
        picks = _round_robin(queue, min(bounds.members - added, max(len(open_), share)))
        if not picks:
            stop = ("every preset is dominated or shown unbeatable"
                    if all(status.get(p, {}).get("state") == "unbeatable" for p in open_)
                    else "no aim gives a recipe not measured yet")
            break
        before = {m.id for m in members}
        members = measure([(label, rec, aimer.predict(rec)) for _, label, rec, _ in picks])
        fresh = [m.id for m in members if m.id not in before]
        aimed = {}
        for m in members:
            for p, _, rec, limits in picks:
                if m.id in fresh and m.recipe == dict(sorted(rec.items())):
                    aimed[m.id] = (p, limits)
        added += len(fresh)
        rounds.append(_round(r, members, presets, accuracy, added=len(fresh),
                             aimed=sorted({p for p, *_ in picks}), wall=time.time() - t0))
    judged = verdicts(members, presets, accuracy)
    for p in presets:
        if judged[p][0]:
            status[p] = {"state": "dominated", "reason": None}
        elif status.get(p, {}).get("state") != "unbeatable":
            status[p] = {"state": "open", "reason": f"undominated when the loop stopped "
                         f"({stop}); " + _miss_text(judged[p], names)}
    rounds[-1]["wall_s"] = round(rounds[-1]["wall_s"], 1)
    return LoopResult(members, aimer, cal, rounds, status,
                      stop + f" after {time.time() - started:.0f} s")


def _aim_preset(p: str, by_id: Mapping[str, Member], member_id: str, aimer: Predictor,
                options: Options, tables: Mapping, fixed: Mapping[str, str],
                errors: Mapping[str, float], extra: dict[str, float], /, *, accuracy: str,
                round_: int) -> tuple[dict | None, list[tuple[str, dict, dict]]]:
    """One preset's aims this round: (a new status or None, [(label, recipe, limits)] not
    measured yet). When every aim is a member already measured, its miss raises the margins
    (`extra`, in place) and the preset is aimed once more."""
    names = objectives(accuracy)
    preset = by_id[member_id]
    target = measured_of(preset, accuracy)
    spread = preset.measured.latency.iqr_ms / preset.measured.latency.median_ms
    known = {frozenset(m.recipe.items()): m for m in by_id.values()}
    for _ in range(2):
        margins = {m: min(MAX_MARGIN, max(errors[m], spread if m == "latency_ms" else 0.0)
                          + extra[m]) for m in names}
        level, found = aims_at(aimer, options, target, fixed, margins, accuracy=accuracy,
                               tables=tables)
        if level is None:
            return {"state": "unbeatable", "reason": unbeatable_reason(
                aimer, options, target, fixed, accuracy=accuracy, tables=tables)}, []
        limits = {m: target[m] * (1 - max(margins[m] * level, STRICT)) for m in names}
        todo = [(aim_label(p, mn, margins, level, round_=round_), rec, limits)
                for mn, rec in found if frozenset(rec.items()) not in known]
        if todo:
            return None, todo
        for _, rec in found:
            got = measured_of(known[frozenset(rec.items())], accuracy)
            for m in names:
                extra[m] = min(MAX_MARGIN, max(extra[m], got[m] / limits[m] - 1))
    return {"state": "open", "reason": "its aims are members already measured, which miss "
            "it"}, []


def _round(r: int, members: Sequence[Member], presets: Mapping[str, str], accuracy: str, /,
           *, added: int, aimed: Sequence[str], wall: float) -> dict:
    judged = verdicts(members, presets, accuracy)
    return {"round": r, "aimed": list(aimed), "added": added, "members": len(members),
            "dominated": [p for p in presets if judged[p][0]], "wall_s": round(wall, 1)}


def _round_robin(queue: Mapping[str, list], budget: int, /) -> list[tuple]:
    """(preset, label, recipe, limits) taken one per preset in turn, each recipe once, at most
    `budget` of them."""
    picks: list[tuple] = []
    seen: set[frozenset] = set()
    lists = {p: list(v) for p, v in queue.items()}
    while len(picks) < budget and any(lists.values()):
        for p, items in lists.items():
            while items:
                label, rec, limits = items.pop(0)
                key = frozenset(rec.items())
                if key not in seen:
                    seen.add(key)
                    picks.append((p, label, rec, limits))
                    break
            if len(picks) >= budget:
                break
    return picks


def _miss_text(judged: tuple[list[str], str | None, list[float]], names: Sequence[str]) -> str:
    _, near, miss = judged
    if near is None:
        return "no own member to compare"
    short = {"footprint_bytes": "footprint", "latency_ms": "ms"}
    return f"closest {near}: " + ", ".join(f"{short.get(k, k)} {100 * v:+.1f}%"
                                           for k, v in zip(names, miss, strict=True))

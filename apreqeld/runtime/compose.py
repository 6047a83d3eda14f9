"""The composer: the one owner of composed members (#18), recipes between the plan set's
measured members that the store's shards assemble in milliseconds.

On when the plan set records the aiming predictor's evidence and its error (`protocol.planning
.aim`) and not `--no-compose`. Asked by the adapter for the best recipe under the memory limit
and latency level of the moment; it answers one only when it is predicted better than every
member that fits by more than the predictor's median error, over the types whose shards the
store holds (nothing is quantized). A composed member is a `Member` of kind `composed` whose
figures are the predictor's until served: then its footprint (the worker's RSS less the
baseline measured members show in this daemon) and ms/token (served, over the ratio of served
to measured the measured members show) replace them, kept in the state dir's `online/`, never
in the manifest. Accuracy stays predicted. One that measures worse than predicted beyond the
tolerance (core.compose) is dropped and never composed again; at most `keep` are kept (LRU).
"""

from __future__ import annotations

import contextlib
import statistics
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from pathlib import Path

from apreqeld.core.compose import (
    Composition,
    RecordedError,
    available_options,
    compose,
    measured_worse,
    recorded_error,
    worth_serving,
)
from apreqeld.core.prediction import outside_recipe, predictor_from_record, written
from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import ModelShape
from apreqeld.core.targeting import Options, Predictor, option_tables, tensor_options
from apreqeld.errors import ApreqelError
from apreqeld.manifest import LatencyStats, Member, Metrics, PlanSet
from apreqeld.store.online import read_composed, write_composed
from apreqeld.store.shards import ShardStore, member_assembly

MIB = 1024**2
LATENCY_SAMPLES = 4  # served requests before a composed member's ms/token is its own
Emit = Callable[..., object]


class Composer:
    """Composed members: proposed, kept (LRU), measured online, dropped."""

    def __init__(self, planset: PlanSet, store: ShardStore, state_dir: Path, /, *,
                 enabled: bool = True, keep: int = 4, emit: Emit = lambda *_a, **_k: None,
                 view_of: Callable[[], ModelShape | None] = lambda: None) -> None:
        self.store, self.state_dir, self.keep, self.emit = store, Path(state_dir), keep, emit
        self.enabled, self._view_of = enabled, view_of
        self.kept: OrderedDict[str, Member] = OrderedDict()  # LRU, oldest first
        self.dropped: dict[str, Member | None] = {}  # looked up while a worker serves one
        self.online: dict[str, dict] = {}  # id -> measured online figures
        self._latency: dict[str, deque[float]] = {}
        self._ratio: deque[float] = deque(maxlen=16)  # served / measured of measured members
        self._baseline: deque[float] = deque(maxlen=8)  # worker RSS less measured footprint
        self._cache: dict[tuple, Composition | None] = {}
        self.proposals = 0
        self.use(planset)

    # ------------------------------------------------------------------ the plan set

    def use(self, planset: PlanSet, /) -> None:
        """Compose from this plan set (start, reload); kept members it cannot assemble go."""
        self.planset = planset
        self.record = (planset.protocol.get("planning") or {}).get("aim") or {}
        self.error: RecordedError | None = recorded_error(self.record.get("prediction_error"))
        self._predictor: Predictor | None = None
        self._view: ModelShape | None = None
        self._accuracy: dict[str, float | None] = {}  # member id -> predicted accuracy
        self._options: Options | None = None
        self._tables: dict | None = None
        self._outside: dict[str, str] = {}
        self._cache.clear()
        self.kept.clear()
        if self.off_reason is None:
            self._load()

    @property
    def off_reason(self) -> str | None:
        """Why nothing is composed (None: composition is on)."""
        if not self.enabled:
            return "turned off with --no-compose"
        if self.planset.store is None:
            return "no shard table in the plan set"
        if not self.record.get("calibration") or not self.record.get("sensitivity") \
                or self.error is None:
            return ("no predictor evidence in the plan set; `apreqel planset --presets` "
                    "records it")
        return None

    def _ready(self) -> bool:
        """The predictor and the options over the shards at hand, built once per plan set."""
        if self.off_reason is not None:
            return False
        if self._predictor is not None:
            return True
        view = self._view_of()
        if view is None:
            return False
        try:
            self._predictor, self._view = predictor_from_record(view, self.record), view
            self._outside = outside_recipe(view, self.record["sensitivity"]["outside"])
            types = list(self._predictor.figures[self.planset.accuracy])
            table = self.planset.store
            held = {t: {qtype(q).name for q, sha in by.items() if self.store.has(sha)}
                    for t, by in table.shards.items()}
            options = available_options(tensor_options(view, types), held)
        except (ApreqelError, KeyError, ValueError) as exc:
            self.emit("compose_unavailable", reason=f"the predictor cannot be built: {exc}")
            self.enabled = False
            return False
        if options is None or any(q not in held.get(t, ()) for t, q in self._outside.items()):
            self._options = None
            return True
        self._options, self._tables = options, option_tables(self._predictor, options)
        return True

    # ------------------------------------------------------------------ proposing

    def members(self) -> list[Member]:
        """The kept composed members (candidates like any member)."""
        return list(self.kept.values()) if self.off_reason is None else []

    def member(self, plan: str | None) -> Member | None:
        return self.kept.get(plan) or self.dropped.get(plan) if plan else None

    def predicted_accuracy(self, member: Member, /) -> float | None:
        """The predictor's accuracy of any member (composed or measured), for comparing;
        computed once per member and plan set."""
        if not self._ready():
            return None
        if member.id not in self._accuracy:
            try:
                self._accuracy[member.id] = self._predictor.predict(
                    written(self._view, member.recipe))[self.planset.accuracy]
            except (KeyError, ApreqelError):
                self._accuracy[member.id] = None
        return self._accuracy[member.id]

    def composition(self, *, max_footprint_bytes: float | None,
                    max_latency_ms: float | None) -> Composition | None:
        """The best recipe under these limits (cached per MiB and per 0.1 ms/token)."""
        if not self._ready() or self._options is None:
            return None
        key = (None if max_footprint_bytes is None else int(max_footprint_bytes // MIB),
               None if max_latency_ms is None else round(max_latency_ms, 1))
        if key not in self._cache:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = compose(
                self._predictor, self._options, self._outside, accuracy=self.planset.accuracy,
                max_footprint_bytes=None if key[0] is None else key[0] * MIB,
                max_latency_ms=key[1], error=self.error, tables=self._tables)
        return self._cache[key]

    def propose(self, *, max_footprint_bytes: float | None, max_latency_ms: float | None,
                fitting: list[Member]) -> Member | None:
        """A composed member to add to the candidates, when one is worth serving: predicted
        better than every member in `fitting` (those that fit now) beyond the median error."""
        found = self.composition(max_footprint_bytes=max_footprint_bytes,
                                 max_latency_ms=max_latency_ms)
        if found is None:
            return None
        accuracy = found.predicted[self.planset.accuracy]
        best = min((a for a in map(self.predicted_accuracy, fitting) if a is not None),
                   default=None)
        if not worth_serving(accuracy, best, self.error, accuracy=self.planset.accuracy):
            return None
        member = self.member_of(found)
        return None if member.id in self.dropped else self.kept.get(member.id, member)

    def admit(self, member: Member, /, *, protect: tuple[str | None, ...] = ()) -> None:
        """Keep `member` (most recent; it was chosen to serve); the oldest beyond `keep` go,
        never one in `protect`."""
        if member.id not in self.kept:
            self.proposals += 1
            self.emit("composed", plan=member.id, reason=member.label,
                      predicted=_rounded(member.predicted))
        self.kept[member.id] = member
        self.kept.move_to_end(member.id)
        for old in [k for k in self.kept if k not in protect][:max(len(self.kept) - self.keep,
                                                                   0)]:
            self.kept.pop(old)
            self.emit("composed_evicted", plan=old, reason=f"more than {self.keep} composed "
                      "members kept (least recently used goes)")
        self._save()

    def member_of(self, found: Composition) -> Member:
        table = self.planset.store
        base = self.planset.members[0].base_type
        assembly = member_assembly(table, dict(found.recipe), base)
        p = found.predicted
        mix = "/".join(f"{q} {n}" for q, n in Counter(found.recipe.values()).most_common())
        return Member(
            id=assembly.identity[:12], kind="composed", base_type=base,
            label=f"composed {p['footprint_bytes'] / MIB:.1f} MiB: {mix}",
            recipe=dict(found.recipe), assembly_sha256=assembly.identity,
            predicted=_rounded(p), pareto=False, measured=_figures(p))

    # ------------------------------------------------------------------ measuring

    def served(self, member: Member, ms_per_token: float, /) -> None:
        """A served ms/token of any member: measured members give the ratio of served to
        measured on this machine now, composed ones their own samples."""
        if member.kind != "composed":
            self._ratio.append(ms_per_token / member.measured.latency.median_ms)
            return
        if member.id in self.kept:
            self._latency.setdefault(member.id, deque(maxlen=32)).append(ms_per_token)
            self.kept.move_to_end(member.id)
            self._judge(member.id)

    def loaded(self, member: Member, rss_bytes: int, /) -> None:
        """A worker serving `member` is ready with this RSS."""
        if member.kind != "composed":
            self._baseline.append(rss_bytes - member.measured.footprint_bytes)
            return
        if member.id not in self.kept:
            return
        baseline = (statistics.median(self._baseline) if self._baseline
                    else self.planset.serving.baseline_rss_bytes)
        if baseline is None:
            return
        self.online.setdefault(member.id, {})["footprint_bytes"] = int(rss_bytes - baseline)
        self._judge(member.id)

    def _judge(self, plan: str) -> None:
        """Replace predictions by what was measured; drop the member when beyond tolerance."""
        member, online = self.kept[plan], self.online.setdefault(plan, {})
        samples = self._latency.get(plan, ())
        if len(samples) >= LATENCY_SAMPLES and self._ratio:
            online["latency_ms"] = statistics.median(samples) / statistics.median(self._ratio)
            online["latency_samples"] = len(samples)
        worse = {}
        for metric in ("footprint_bytes", "latency_ms"):
            if metric in online:
                excess = measured_worse(member.predicted[metric], online[metric],
                                        self.error.tolerance(metric))
                if excess is not None:
                    worse[metric] = excess
        if worse:
            self.kept.pop(plan)
            self.dropped[plan] = member
            said = ", ".join(f"{m} {x:+.1%} (tolerance {self.error.tolerance(m):.1%})"
                             for m, x in worse.items())
            self.emit("composed_dropped", plan=plan, online=_rounded(online),
                      predicted=_rounded(member.predicted),
                      reason=f"measured worse than predicted: {said}")
        else:
            self.kept[plan] = _with_online(member, online)
            self.emit("composed_measured", plan=plan, online=_rounded(online),
                      predicted=_rounded(member.predicted))
        self._save()

    # ------------------------------------------------------------------ the online section

    def _save(self) -> None:
        write_composed(self.state_dir, self.planset.model.sha256,
                       kept=[m.model_dump(mode="json") for m in self.kept.values()],
                       dropped=sorted(self.dropped), online=self.online)

    def _load(self) -> None:
        """Composed members kept from an earlier run that this plan set still assembles."""
        data = read_composed(self.state_dir, self.planset.model.sha256)
        self.online = dict(data.get("online") or {})
        for plan in data.get("dropped", []):
            self.dropped.setdefault(plan, None)
        for raw in data.get("kept", []):
            with contextlib.suppress(ValueError, KeyError, ApreqelError):
                m = Member.model_validate(raw)
                shards = member_assembly(self.planset.store, m.recipe, m.base_type).shards
                if self.store.check(shards)[0] == [] and m.id not in self.dropped:
                    self.kept[m.id] = _with_online(m, self.online.get(m.id, {}))

    def view(self) -> dict:
        """What status shows of composition."""
        return {"on": self.off_reason is None, "off_reason": self.off_reason, "keep": self.keep,
                "kept": [{"id": m.id, "label": m.label, "predicted": m.predicted,
                          "online": _rounded(self.online.get(m.id, {}))}
                         for m in self.kept.values()],
                "dropped": sorted(self.dropped), "proposals": self.proposals,
                "error": ({"median": dict(self.error.median), "max": dict(self.error.max)}
                          if self.error else None)}


def _figures(p: Mapping[str, float], /) -> Metrics:
    """A composed member's figures as the policy reads them (standard errors unknown: 0)."""
    ms = float(p["latency_ms"])
    return Metrics(parameter_bytes=int(p["memory_bytes"]),
                   footprint_bytes=int(p["footprint_bytes"]),
                   latency=LatencyStats(median_ms=ms, iqr_ms=0.0, mean_ms=ms, std_ms=0.0, n=1),
                   ppl=max(float(p.get("ppl", 1.0)), 1e-9), ppl_se=0.0,
                   kld=max(float(p.get("kld", 0.0)), 0.0), kld_se=0.0)


def _with_online(member: Member, online: Mapping[str, float], /) -> Member:
    """The member with its measured footprint and ms/token in place of the predicted ones."""
    p = dict(member.predicted) | {k: v for k, v in online.items()
                                  if k in ("footprint_bytes", "latency_ms")}
    return member.model_copy(update={"measured": _figures(p)})


def _rounded(d: Mapping[str, float]) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}

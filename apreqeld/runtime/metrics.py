"""Prometheus metrics of the daemon, served as `GET /metrics` by the HTTP listener.

Counted as requests are answered, for both front doors (msgpack and HTTP submit through
`Metrics.submit`, which wraps `Scheduler.submit`): requests by outcome, prompt and completion
tokens, time to first token, ms/token, queue wait. Counted from the scheduler's events: swaps
by mode and reason, with their total time and downtime. Read at each scrape from the scheduler
(`status()` and its attributes): queue length, what serves, its footprint, the budget, the
monitor's state (available memory, PSI, ...), the live latency scale, the scheduler's own
counts. Each daemon has its own registry (nothing global).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from apreqeld.errors import DaemonError
from apreqeld.runtime import wire
from apreqeld.runtime.workers import Job

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FRONTENDS = ("msgpack", "http")
KINDS = ("generate", "chat")
OUTCOMES = ("served", "cancelled", "busy", "invalid", "unavailable", "failed")
SWAP_REASONS = ("pin", "unpin", "priority", "reload", "policy", "other")
# Numeric fields of the monitor's State, as gauges (name, State field, help).
STATE_GAUGES = (
    ("apreqeld_memory_available_bytes", "mem_available_bytes", "MemAvailable (or jtop's)"),
    ("apreqeld_cgroup_headroom_bytes", "cgroup_headroom_bytes", "cgroup memory.max - current"),
    ("apreqeld_psi_memory_some_avg10", "psi_memory_some_avg10", "PSI memory some avg10 (%)"),
    ("apreqeld_psi_memory_full_avg10", "psi_memory_full_avg10", "PSI memory full avg10 (%)"),
    ("apreqeld_gpu_load_ratio", "gpu_load", "GPU load (0-1)"),
    ("apreqeld_cpu_freq_ratio", "cpu_freq_ratio", "CPU frequency over its maximum"),
    ("apreqeld_temperature_celsius", "temperature_c", "hottest sensor"),
    ("apreqeld_power_watts", "power_w", "board power"),
)


def outcome_of(error: BaseException) -> str:
    """The `outcome` label of a request that ended with this error."""
    code = getattr(error, "code", wire.FAILED)
    if code == wire.BUSY:
        return "busy"
    if code in (wire.INVALID, wire.TOO_LARGE):
        return "invalid"
    if code in (wire.UNAVAILABLE, wire.SHUTTING_DOWN):
        return "unavailable"
    return "cancelled" if code == "cancelled" else "failed"


def swap_reason(reason: str | None) -> str:
    """A bounded label for a swap's free-text reason (how the scheduler words its triggers)."""
    text = (reason or "").lower()
    for prefix, label in (("pinned", "pin"), ("unpinned", "unpin"), ("priority", "priority"),
                          ("plan set", "reload"), ("monitor", "policy")):
        if text.startswith(prefix):
            return label
    return "other"


class Metrics:
    """The registry, the request hook both front doors use, and the event follower."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        disable_created_metrics()  # no `_created` twin of every series (process-wide)
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("apreqeld_requests", "Requests answered, by front door, kind "
                                "and outcome", ["frontend", "kind", "outcome"], registry=r)
        self.prompt_tokens = Counter("apreqeld_prompt_tokens", "Prompt tokens of served "
                                     "requests (after the chat template)", ["frontend"],
                                     registry=r)
        self.completion_tokens = Counter("apreqeld_completion_tokens", "Tokens generated for "
                                         "served requests", ["frontend"], registry=r)
        self.ttft = Histogram("apreqeld_time_to_first_token_seconds", "From the worker taking "
                              "a request to its first token", registry=r,
                              buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10))
        self.ms_per_token = Histogram("apreqeld_ms_per_token", "Milliseconds per generated "
                                      "token after the first, per request", registry=r,
                                      buckets=(1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 50, 100, 250))
        self.queued = Histogram("apreqeld_queue_wait_seconds", "From acceptance to the worker "
                                "taking the request", registry=r,
                                buckets=(.001, .01, .05, .1, .25, .5, 1, 2, 5, 10, 30))
        self.swaps = Counter("apreqeld_swaps", "Swaps done, by mode and trigger",
                             ["mode", "reason"], registry=r)
        self.swap_failures = Counter("apreqeld_swap_failures", "Swaps that failed (the old "
                                     "variant kept serving)", registry=r)
        self.swap_seconds = Histogram("apreqeld_swap_duration_seconds", "Swap total time",
                                      ["mode"], registry=r,
                                      buckets=(.1, .25, .5, 1, 2, 5, 10, 30, 120))
        self.swap_downtime = Histogram("apreqeld_swap_downtime_seconds", "Time no variant "
                                       "served during a swap", ["mode"], registry=r,
                                       buckets=(0, .001, .01, .05, .1, .25, .5, 1, 2, 5, 30))
        for frontend in FRONTENDS:
            self.prompt_tokens.labels(frontend)
            self.completion_tokens.labels(frontend)
            for kind in KINDS:
                for outcome in OUTCOMES:
                    self.requests.labels(frontend, kind, outcome)
        r.register(_Live(scheduler))
        self._follower: asyncio.Task | None = None

    # ------------------------------------------------------------------ requests

    def submit(self, frontend: str, kind: str, params: dict,
               on_token: Callable[[str], None]) -> Job:
        """`scheduler.submit`, with the answer counted once, when the job's future resolves."""
        try:
            job = self.scheduler.submit(kind, params, on_token)
        except DaemonError as exc:
            self.requests.labels(frontend, kind, outcome_of(exc)).inc()
            raise
        job.future.add_done_callback(lambda future: self._answered(frontend, job, future))
        return job

    def _answered(self, frontend: str, job: Job, future: asyncio.Future) -> None:
        if future.cancelled():
            self.requests.labels(frontend, job.kind, "cancelled").inc()
            return
        error = future.exception()  # also marks it retrieved for a client that went away
        if error is not None:
            self.requests.labels(frontend, job.kind, outcome_of(error)).inc()
            return
        result = future.result()
        self.requests.labels(frontend, job.kind,
                             "cancelled" if job.cancelled else "served").inc()
        usage = result.get("usage") or {}
        self.prompt_tokens.labels(frontend).inc(usage.get("prompt_tokens") or 0)
        self.completion_tokens.labels(frontend).inc(usage.get("completion_tokens") or 0)
        if usage.get("ttft_ms") is not None:
            self.ttft.observe(usage["ttft_ms"] / 1000)
        if usage.get("ms_per_token"):
            self.ms_per_token.observe(usage["ms_per_token"])
        if result.get("queued_ms") is not None:
            self.queued.observe(max(0.0, result["queued_ms"]) / 1000)

    # ------------------------------------------------------------------ events

    def start(self) -> None:
        """Follow the scheduler's events (swaps) until `stop`."""
        self._follower = asyncio.get_running_loop().create_task(self._follow(),
                                                                name="metrics")

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None

    async def _follow(self) -> None:
        queue = self.scheduler.subscribe()
        try:
            while True:
                self.event(await queue.get())
        finally:
            self.scheduler.unsubscribe(queue)

    def event(self, event: dict) -> None:
        if event["kind"] == "swap_done":
            mode = str(event.get("mode"))
            self.swaps.labels(mode, swap_reason(event.get("reason"))).inc()
            self.swap_seconds.labels(mode).observe((event.get("total_ms") or 0) / 1000)
            self.swap_downtime.labels(mode).observe((event.get("downtime_ms") or 0) / 1000)
        elif event["kind"] == "swap_failed":
            self.swap_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _gauge(name: str, doc: str, value: float | None, labels: dict | None = None
           ) -> GaugeMetricFamily | None:
    if value is None:
        return None
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), float(value))
    return family


class _Live(Collector):
    """What the scheduler says at scrape time."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def describe(self) -> list:
        return []  # unchecked: the families depend on what the monitor knows

    def collect(self) -> Iterator[Metric]:
        s = self.scheduler
        status = s.status()
        member = s.adapter.member(status["plan"])
        ready = status["plan"] is not None and not status["broken"] and not status["closing"]
        serving = [w for w in status["workers"] if w["plan"] == status["plan"] and w["alive"]]
        families = [
            _gauge("apreqeld_ready", "1 when a variant serves (what /health says)", ready),
            _gauge("apreqeld_queue_length", "Requests waiting", status["queue"]),
            _gauge("apreqeld_queue_bound", "Queue bound (beyond: busy/429)",
                   status["queue_bound"]),
            _gauge("apreqeld_in_flight", "1 while a request runs on a worker",
                   status["in_flight"]),
            _gauge("apreqeld_swapping", "1 while a swap is in progress", status["swapping"]),
            _gauge("apreqeld_workers", "Worker processes", len(status["workers"])),
            _gauge("apreqeld_planset_members", "Members of the plan set",
                   status["planset"]["members"]),
            _gauge("apreqeld_budget_bytes", "Memory a variant may use now",
                   status["budget_bytes"]),
            _gauge("apreqeld_latency_scale", "How much slower than measured the serving plan "
                   "runs now", s.latency_scale()),
            _gauge("apreqeld_pinned", "1 while pinned to a member", status["pinned"] is not None),
        ]
        if member is not None:
            composed = member.kind == "composed"
            online = s.composer.online.get(member.id, {}) if composed else {}
            families.append(_gauge("apreqeld_serving_info", "The member serving", 1, {
                "member": member.id, "label": member.label, "kind": member.kind,
                "state": "composed" if composed else "measured",
                "planset": status["planset"]["name"]}))
            source = ("measured" if not composed else
                      "online" if "footprint_bytes" in online else "predicted")
            families.append(_gauge("apreqeld_serving_footprint_bytes", "The serving member's "
                                   "measured footprint", member.measured.footprint_bytes,
                                   {"source": source}))
            if serving and serving[0]["rss"]:
                families[-1].add_metric(["resident"], float(serving[0]["rss"]))
            families.append(_gauge("apreqeld_serving_measured_ms_per_token", "The serving "
                                   "member's measured ms/token (median)",
                                   member.measured.latency.median_ms))
        state = status["state"] or {}
        for name, field, doc in STATE_GAUGES:
            families.append(_gauge(name, doc, state.get(field)))
        if state.get("power_mode") is not None:
            families.append(_gauge("apreqeld_power_mode_info", "The power mode",
                                   1, {"mode": str(state["power_mode"])}))
        counts = CounterMetricFamily("apreqeld_scheduler_requests", "The scheduler's own "
                                     "counts (both front doors)", labels=["outcome"])
        for key in ("accepted", "served", "failed", "cancelled", "busy"):
            counts.add_metric([key], status["counts"].get(key, 0))
        families.append(counts)
        restarts = CounterMetricFamily("apreqeld_worker_restarts", "Workers restarted after "
                                       "dying")
        restarts.add_metric([], status["counts"].get("restarts", 0))
        families.append(restarts)
        yield from (f for f in families if f is not None)

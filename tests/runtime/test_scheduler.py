"""The scheduler's queue and swap logic with fake workers (no llama.cpp): busy, exactly-once
answers under many swaps in both modes, crashes, failed loads, shutdown, priorities."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from pathlib import Path

import pytest

from apreqeld.core.selection import priority_from
from apreqeld.errors import BusyError, DaemonError
from apreqeld.manifest import (
    LatencyStats,
    Member,
    Metrics,
    ModelInfo,
    PlanSet,
    Serving,
    ShardTable,
    assembly_of,
    assembly_sha256,
)
from apreqeld.runtime.config import DaemonConfig
from apreqeld.runtime.files import MemberFiles
from apreqeld.runtime.scheduler import Scheduler
from apreqeld.store.shards import ShardStore

MIB = 1024**2
PIDS = itertools.count(1000)
# label -> (footprint MiB, ms/token, kld)
SPECS = {"small": (100, 3.0, 0.30), "mid": (150, 5.0, 0.10), "big": (200, 7.0, 0.01)}


# The fake members' "shards": one tensor, a type per member, and a metadata split.
TYPES = {"small": "q4_0", "mid": "q5_0", "big": "q8_0"}
BLOBS = {name: f"fake shard {name}".encode() for name in ("metadata", *TYPES)}
SHA = {name: hashlib.sha256(data).hexdigest() for name, data in BLOBS.items()}
TABLE = ShardTable(engine="fake", tensors=["t.weight"], metadata={"q8_0": SHA["metadata"]},
                   fixed={}, shards={"t.weight": {TYPES[k]: SHA[k] for k in TYPES}})


def make_planset() -> PlanSet:
    members = []
    for i, (label, (mib, ms, kld)) in enumerate(SPECS.items()):
        recipe = {"t.weight": TYPES[label]}
        members.append(Member(
            id=f"{i + 1:x}" * 16, kind="uniform", label=label, base_type="q8_0", recipe=recipe,
            assembly_sha256=assembly_sha256(assembly_of(TABLE, recipe, "q8_0")),
            measured=Metrics(parameter_bytes=mib * MIB, footprint_bytes=mib * MIB,
                             latency=LatencyStats(median_ms=ms, iqr_ms=0, mean_ms=ms, std_ms=0,
                                                  n=1),
                             ppl=10 + kld, ppl_se=0.1, kld=kld, kld_se=0.01),
            pareto=True))
    return PlanSet(name="fake", created="2026-01-01", model=ModelInfo(
        name="m", sha256="a" * 64, path="m.gguf", architecture="llama"), engine="fake",
        device={}, protocol={}, serving=Serving(n_ctx=64, threads=1, gpu_layers=0),
        members=members, store=TABLE)


PLANSET = make_planset()
IDS = {m.label: m.id for m in PLANSET.members}


class FakeProc:
    def __init__(self) -> None:
        self.pid = next(PIDS)
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        return self.returncode

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._exited.set()


class FakeWorker:
    def __init__(self, plan: str, farm: Farm) -> None:
        self.plan, self.farm = plan, farm
        self.proc = FakeProc()
        self.pid = self.proc.pid
        self.rss = 0
        self.stopping = False

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def run(self, job) -> dict:
        for i in range(self.farm.tokens):
            await asyncio.sleep(self.farm.token_s)
            if not self.alive:
                raise DaemonError("worker died", code="worker_failed")
            job.on_token(f"{i}")
        return {"text": "", "finish": "length",
                "usage": {"completion_tokens": self.farm.tokens, "plan": self.plan,
                          "total_ms": 1.0}}

    async def stop(self) -> None:
        self.stopping = True
        self.proc.exit(0)
        self.farm.live.discard(self)

    def describe(self) -> dict:
        return {"plan": self.plan, "pid": self.pid, "alive": self.alive}


class Farm:
    """Starts fake workers; records how many were alive at once."""

    def __init__(self, *, load_s: float = 0.01, token_s: float = 0.001, tokens: int = 3) -> None:
        self.load_s, self.token_s, self.tokens = load_s, token_s, tokens
        self.live: set[FakeWorker] = set()
        self.max_live = 0
        self.failing: set[str] = set()
        self.started: list[str] = []

    async def start(self, plan: str, _path: Path, _spawn) -> FakeWorker:
        await asyncio.sleep(self.load_s)
        if plan in self.failing:
            raise DaemonError(f"cannot load {plan}", code="unavailable")
        worker = FakeWorker(plan, self)
        self.live.add(worker)
        self.started.append(plan)
        self.max_live = max(self.max_live, len(self.live))
        return worker


def scheduler(tmp_path: Path, farm: Farm, **config) -> Scheduler:
    state = tmp_path / "state"
    store = ShardStore(state)
    for data in BLOBS.values():
        store.add(data)
    cfg = DaemonConfig(plans=tmp_path, socket=tmp_path / "s", state_dir=state, **config)
    return Scheduler(cfg, PLANSET, priority_from(config.get("priority", "memory")),
                     start_worker=farm.start)


def submit(s: Scheduler, tokens: list | None = None):
    return s.submit("generate", {"prompt": "x"}, (tokens.append if tokens is not None
                                                  else lambda _t: None))


@pytest.mark.timeout(30)
def test_full_queue_answers_busy_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        s = scheduler(tmp_path, Farm(token_s=0.05), queue_bound=2)
        await s.start()
        first = submit(s)
        await asyncio.sleep(0.01)  # the dispatcher takes it: in flight, not queued
        queued = [submit(s), submit(s)]
        with pytest.raises(BusyError, match="queue is full"):
            submit(s)
        results = await asyncio.gather(first.future, *(j.future for j in queued))
        assert [r["plan"] for r in results] == [IDS["small"]] * 3
        assert s.counts["busy"] == 1
        await s.shutdown(1)

    asyncio.run(main())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["make-before-break", "break-before-make"])
def test_every_request_is_answered_once_across_many_swaps(tmp_path: Path, mode: str) -> None:
    async def main() -> None:
        farm = Farm()
        s = scheduler(tmp_path, farm, swap_mode=mode, queue_bound=1000)
        await s.start()
        answers: list[int] = []
        jobs = []
        for round_ in range(30):
            batch = [submit(s) for _ in range(5)]
            jobs += batch
            s.request_swap(PLANSET.members[round_ % 3].id, reason="test")
            await asyncio.sleep(0.005)
        await s.settle()
        results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        for job in jobs:
            answers.append(0 if job.answer({"again": True}) else 1)  # already answered
        assert all(isinstance(r, dict) for r in results), results
        assert sum(answers) == len(jobs) == s.counts["served"] == s.counts["accepted"]
        assert s.counts["swaps"] >= 10
        assert farm.max_live <= (2 if mode == "make-before-break" else 1)
        await s.shutdown(1)
        assert not farm.live

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_crash_fails_the_request_in_flight_once_and_restarts(tmp_path: Path) -> None:
    async def main() -> None:
        farm = Farm(token_s=0.02, tokens=10)
        s = scheduler(tmp_path, farm)
        await s.start()
        events = s.subscribe()
        doomed, waiting = submit(s), submit(s)
        await asyncio.sleep(0.05)
        s.active.proc.exit(-9)
        with pytest.raises(DaemonError) as err:
            await doomed.future
        assert err.value.code == "worker_failed"
        assert (await waiting.future)["plan"] == IDS["small"]
        assert s.counts == s.counts | {"failed": 1, "served": 1, "restarts": 1}
        kinds = []
        while not events.empty():
            kinds.append(events.get_nowait()["kind"])
        assert "worker_restart" in kinds
        await s.shutdown(1)

    asyncio.run(main())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["make-before-break", "break-before-make"])
def test_a_failed_load_keeps_serving_the_old_plan(tmp_path: Path, mode: str) -> None:
    async def main() -> None:
        farm = Farm()
        farm.failing.add(IDS["big"])
        s = scheduler(tmp_path, farm, swap_mode=mode)
        await s.start()
        events = s.subscribe()
        await s.pin(IDS["big"], wait=True)
        assert s.serving == IDS["small"] and s.active.alive
        assert (await submit(s).future)["plan"] == IDS["small"]
        kinds = [events.get_nowait()["kind"] for _ in range(events.qsize())]
        assert "swap_failed" in kinds and "swap_done" not in kinds
        await s.shutdown(1)

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_shutdown_lets_work_finish_within_grace_then_errors(tmp_path: Path) -> None:
    async def main() -> None:
        farm = Farm(token_s=0.05, tokens=4)
        s = scheduler(tmp_path, farm)
        await s.start()
        jobs = [submit(s) for _ in range(3)]
        await asyncio.sleep(0.01)
        await s.shutdown(0.3)  # about one and a half requests fit
        outcomes = [j.future.exception() for j in jobs]
        assert outcomes[0] is None
        assert isinstance(outcomes[-1], DaemonError) and outcomes[-1].code == "shutting_down"
        with pytest.raises(DaemonError, match="shutting down"):
            submit(s)
        assert not farm.live

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_priorities_pick_the_expected_plan(tmp_path: Path) -> None:
    async def main() -> None:
        s = scheduler(tmp_path, Farm(), priority="memory")
        await s.start()
        assert s.serving == IDS["small"]
        for preset, label in (("accuracy", "big"), ("latency", "small"), ("memory", "small")):
            r = await s.set_priority(priority_from(preset), wait=True)
            assert r["decision"]["choice"] == IDS[label] and s.serving == IDS[label], preset
        r = await s.set_priority(priority_from([0.0, 0.0, 1.0]), wait=True)
        assert s.serving == IDS["big"] and r["priority"]["weights"] == [0.0, 0.0, 1.0]
        await s.pin(IDS["mid"], wait=True)
        r = await s.set_priority(priority_from("memory"), wait=True)
        assert s.serving == IDS["mid"] and r["pinned"] == IDS["mid"]
        await s.unpin(wait=True)
        assert s.serving == IDS["small"]
        status = s.status()
        assert status["plan"] == IDS["small"] and status["swapping"] is False
        assert status["priority"]["name"] == "memory" and status["queue"] == 0
        await s.shutdown(1)

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_missing_shards_are_built_outside_the_slot_first_plan_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first plan's shards are built before it loads; the members the policy can choose
    after it, smallest first, in the background; a swap's build happens before the slot is
    taken (never inside break-before-make)."""
    calls: list[tuple[str, bool, bool]] = []
    holder: list[Scheduler] = []

    async def fake_build(self: MemberFiles, member: Member, *, reason: str,
                         background: bool) -> None:
        calls.append((member.label, background, holder[0]._slot.locked()))
        assert "missing from the store" in reason
        self.store.add(BLOBS[member.label])

    monkeypatch.setattr(MemberFiles, "_build", fake_build)

    async def main() -> None:
        s = scheduler(tmp_path, Farm(), priority="accuracy", swap_mode="break-before-make")
        holder.append(s)
        for label in TYPES:
            s.files.store.shard_path(SHA[label]).unlink()
        assert not any(s.files.present(m) for m in PLANSET.members)
        await s.start()  # the first plan (big) is built before it is needed
        await s.pin(IDS["small"], wait=True)
        assert s.serving == IDS["small"]
        for _ in range(100):
            if len(calls) == 3:
                break
            await asyncio.sleep(0.01)
        # the first plan first; each member once; what start or a swap waited for was built
        # with the slot free; the background prefetch goes smallest first (the swap to small
        # and the prefetch race for small: either may build it)
        assert calls[0] == ("big", False, False)
        assert sorted(c[0] for c in calls) == ["big", "mid", "small"]
        assert not any(locked for _, background, locked in calls if not background)
        background = [label for label, bg, _ in calls if bg]
        assert background in (["small", "mid"], ["mid"])
        assert all(s.files.present(m) for m in PLANSET.members)
        await s.shutdown(1)

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_start_falls_back_to_another_plan_when_the_first_cannot_load(tmp_path: Path) -> None:
    async def main() -> None:
        farm = Farm()
        farm.failing |= {IDS["big"], IDS["small"]}
        s = scheduler(tmp_path, farm, priority="accuracy")
        await s.start()
        assert s.serving == IDS["mid"] and farm.started == [IDS["mid"]]
        assert [e["kind"] for e in s.history] == ["decision", "load_failed", "load_failed"]
        await s.shutdown(1)
        farm.failing.add(IDS["mid"])
        with pytest.raises(DaemonError, match="cannot load"):
            await scheduler(tmp_path, farm).start()

    asyncio.run(main())

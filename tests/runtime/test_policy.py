"""Policy timing: budget from a State, dwell, condition columns, served-latency scale."""

from __future__ import annotations

import pytest

from apreqeld.core.latency import Conditions, slowdown
from apreqeld.core.pressure import CLEAR_S, SETTLE_S
from apreqeld.core.selection import ServiceLevels, priority_from
from apreqeld.manifest import Member
from apreqeld.runtime.monitor import State
from apreqeld.runtime.policy import Policy, candidates_of

GIB = 1024**3


def member(tag: str, gib: float, ms: float, kld: float, **conditions: float) -> Member:
    lat = {"median_ms": ms, "iqr_ms": 0.1, "mean_ms": ms, "std_ms": 0.1, "n": 5}
    return Member.model_validate({
        "id": tag * 8, "kind": "uniform", "label": tag, "base_type": "q4_0", "recipe": {},
        "file_sha256": "0" * 64, "file_bytes": int(gib * GIB),
        "measured": {"parameter_bytes": int(gib * GIB), "footprint_bytes": int(gib * GIB),
                     "latency": lat, "ppl": 10 + kld, "ppl_se": 0.1, "kld": kld,
                     "kld_se": 0.001},
        "conditions": {k: {**lat, "median_ms": v, "mean_ms": v} for k, v in conditions.items()},
        "pareto": True,
    })


MEMBERS = [member("a", 6.0, 40.0, 0.002, low=120.0), member("b", 4.0, 30.0, 0.02, low=90.0),
           member("c", 2.0, 20.0, 0.2, low=60.0)]
A, B, C = (m.id for m in MEMBERS)
ACCURACY = priority_from("accuracy")
NO = Conditions()  # nothing known of the machine: the model predicts no slowdown


def state(avail_gib: float, **kw) -> State:
    return State(t=0.0, source="test", mem_available_bytes=avail_gib * GIB, **kw)


def test_candidates_use_the_power_mode_column_and_the_accuracy_kind() -> None:
    assert [c.latency_ms for c in candidates_of(MEMBERS)] == [40.0, 30.0, 20.0]
    assert [c.latency_ms for c in candidates_of(MEMBERS, power_mode="low")] == [120, 90, 60]
    assert candidates_of(MEMBERS, accuracy="ppl")[0].accuracy == pytest.approx(10.002)


def test_memory_drop_downgrades_at_once_and_recovery_waits_for_dwell() -> None:
    p = Policy(min_dwell_s=30.0, reserve_bytes=0.5 * GIB, margin=0.01)
    d = p.decide(state(16), MEMBERS, ACCURACY, current=None, now=0.0, conditions=NO)
    assert d.choice == A and d.switch
    # A is loaded (6 GiB); only 1 GiB more is free: budget 6.5 GiB still holds A
    assert not p.decide(state(1), MEMBERS, ACCURACY, current=A, now=5.0, conditions=NO).switch
    d = p.decide(state(0.2), MEMBERS, ACCURACY, current=A, now=6.0, conditions=NO)  # 5.7 GiB
    assert d.switch and d.choice == B and "no longer fits" in d.reason
    # memory comes back, but the dwell time has not passed
    d = p.decide(state(16), MEMBERS, ACCURACY, current=B, now=10.0, conditions=NO)
    assert d.choice == B and "dwell" in d.reason
    d = p.decide(state(16), MEMBERS, ACCURACY, current=B, now=40.0, conditions=NO)
    assert d.choice == A and d.switch


def test_psi_tightens_and_unknown_memory_means_no_budget() -> None:
    p = Policy(reserve_bytes=0.5 * GIB)
    d = p.decide(state(8, psi_memory_some_avg10=60.0), MEMBERS, ACCURACY, current=A, now=0.0,
                 conditions=NO)
    assert d.switch and d.budget_bytes == pytest.approx(5.5 * GIB)
    d = Policy().decide(State(t=0, source="test"), MEMBERS, ACCURACY, current=None, now=0.0,
                        conditions=NO)
    assert d.budget_bytes is None and d.choice == A


def test_served_latency_and_power_mode_feed_the_service_level() -> None:
    slo = priority_from("accuracy", levels=ServiceLevels(max_latency_ms=50.0))
    p = Policy(min_dwell_s=0.0)
    assert p.decide(state(16), MEMBERS, slo, current=None, now=0.0, conditions=NO).choice == A
    for ms in (95.0, 100.0, 105.0):  # A serves 2.5x slower than measured (contention)
        p.observe(ms, 40.0, slowdown(NO))
    assert p.latency_scale(NO) == pytest.approx(2.5)
    d = p.decide(state(16), MEMBERS, slo, current=A, now=1.0, conditions=NO)
    assert d.choice == C and "exceeds max latency 50" in d.reason
    # a power-mode column that matches explains the slowdown: the scale is relative to it
    q = Policy()
    for ms in (118.0, 120.0, 122.0):  # measured at 120 in that mode
        q.observe(ms, 120.0, slowdown(NO))
    d = q.decide(state(16, power_mode="low"), MEMBERS, priority_from("accuracy"), current=A,
                 now=0.0, conditions=NO)
    assert d.choice == A and not d.switch


def test_one_set_of_defaults() -> None:
    """The Policy's defaults are the daemon's (policy.py once said 512/256 MiB and 30 s)."""
    from pathlib import Path

    from apreqeld.runtime.config import DaemonConfig

    config, policy = DaemonConfig(plans=Path(".")), Policy()
    assert (policy.reserve_bytes, policy.slack_bytes, policy.min_dwell_s, policy.margin) == (
        config.reserve_bytes, config.slack_bytes, config.min_dwell_s, config.swap_margin)


def test_a_users_decision_and_the_monitors_see_the_same_budget() -> None:
    p = Policy(min_dwell_s=30.0, reserve_bytes=0.5 * GIB, margin=0.5)
    s = state(3.0, psi_memory_some_avg10=12.0)  # budget 6.35 GiB: A (6 GiB) fits
    user = p.decide(s, MEMBERS, ACCURACY, current=B, now=0.0, conditions=NO, user=True)
    monitor = p.decide(s, MEMBERS, ACCURACY, current=B, now=0.0, conditions=NO)
    assert user.budget_bytes == monitor.budget_bytes == p.budget(s, current_footprint=4 * GIB,
                                                                 now=0.0)
    # a user's decision needs no margin and no dwell, and starts no dwell
    assert user.choice == A and user.switch and p.last_switch is None
    assert monitor.choice == B  # a gain inside the margin of 0.5


def test_thrashing_sheds_while_the_serving_member_still_fits() -> None:
    """MemAvailable is plenty, so the budget holds A; PSI says the machine stalls on memory:
    the policy sheds at once (no margin, no dwell), again once the first shed had time to
    show, never grows while the pressure lasts, and grows back only after CLEAR_S calm."""
    p = Policy(min_dwell_s=5.0, reserve_bytes=0.5 * GIB, margin=0.01)
    plenty, hot = state(16), state(16, psi_memory_some_recent=35.0)
    p.see(plenty, now=0.0)
    assert p.decide(plenty, MEMBERS, ACCURACY, current=None, now=0.0, conditions=NO).choice == A
    p.see(hot, now=1.0)  # the budget without shedding still holds A (16 GiB free)
    d = p.decide(hot, MEMBERS, ACCURACY, current=A, now=1.0, conditions=NO)
    assert d.switch and d.choice == B and d.budget_bytes == pytest.approx(6 * GIB * 0.9)
    assert d.reason.startswith("shedding memory (PSI memory some 35.0% >= 20%)")
    p.see(hot, now=2.0)  # still hot, the shed has not had time to show: no second shed
    d = p.decide(hot, MEMBERS, ACCURACY, current=B, now=2.0, conditions=NO)
    assert not d.switch and d.budget_bytes == 4 * GIB
    p.see(hot, now=1.0 + SETTLE_S)
    d = p.decide(hot, MEMBERS, ACCURACY, current=B, now=1.0 + SETTLE_S, conditions=NO)
    assert d.switch and d.choice == C
    calm = 1.0 + SETTLE_S + 1
    p.see(plenty, now=calm)  # pressure gone: no growth for CLEAR_S after the last one seen
    assert p.decide(plenty, MEMBERS, ACCURACY, current=C, now=calm + 5,
                    conditions=NO).choice == C
    p.see(plenty, now=1.0 + SETTLE_S + CLEAR_S)
    d = p.decide(plenty, MEMBERS, ACCURACY, current=C, now=1.0 + SETTLE_S + CLEAR_S,
                 conditions=NO)
    assert d.switch and d.choice == A  # and the dwell since the last switch has passed


def test_a_trigger_sheds_before_avg10_moves() -> None:
    p = Policy(reserve_bytes=0.5 * GIB)
    s = state(16, psi_memory_some_avg10=0.0)
    p.see(s, now=0.0, triggered=True)
    d = p.decide(s, MEMBERS, ACCURACY, current=A, now=0.0, conditions=NO)
    assert d.choice == B and "a PSI memory trigger fired" in d.reason


@pytest.mark.parametrize(("conditions", "chosen"), [
    (Conditions(offload=True), A),  # 40 ms: within the 50 ms level
    (Conditions(offload=True, gpu_others=0.35), B),  # another process holds a third of the GPU
    (Conditions(offload=True, gpu_clock_ratio=0.45), C),  # heat or a power cap: 2.2x
    (Conditions(cpu_freq_ratio=0.65), B),  # a CPU power mode with no measured column
])
def test_gpu_load_heat_and_power_change_the_choice_under_a_latency_level(
        conditions: Conditions, chosen: str) -> None:
    slo = priority_from("accuracy", levels=ServiceLevels(max_latency_ms=50.0))
    d = Policy().decide(state(16), MEMBERS, slo, current=None, now=0.0, conditions=conditions)
    assert d.choice == chosen, d.reason

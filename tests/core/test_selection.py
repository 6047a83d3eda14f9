"""Plan choice: presets, feasibility, TOPSIS against pymcdm, service levels, hysteresis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymcdm.methods import TOPSIS
from pymcdm.normalizations import vector_normalization

from apreqeld.core.selection import (
    PRESETS,
    Candidate,
    Priority,
    ServiceLevels,
    choose,
    priority_from,
)
from apreqeld.errors import InputError

GIB = 1024**3
# A small Pareto front: bigger is slower and more accurate.
PLANS = (
    Candidate("q8", 8.0 * GIB, 40.0, 0.001),
    Candidate("q6", 6.0 * GIB, 32.0, 0.004),
    Candidate("q5", 5.0 * GIB, 28.0, 0.010),
    Candidate("q4", 4.0 * GIB, 24.0, 0.030),
    Candidate("q3", 3.0 * GIB, 21.0, 0.090),
    Candidate("q2", 2.0 * GIB, 19.0, 0.300),
)
BALANCED = priority_from("balanced")


def test_presets_are_normalised_and_named() -> None:
    for name, weights in PRESETS.items():
        p = priority_from(name)
        assert p.name == name
        assert sum(p.weights) == pytest.approx(1.0)
        assert p.weights == pytest.approx(np.array(weights) / sum(weights))
    assert priority_from("MEMORY").weights == pytest.approx((0.8, 0.1, 0.1))


def test_priority_from_weights_text_and_sequence() -> None:
    assert priority_from("2,1,1").weights == pytest.approx((0.5, 0.25, 0.25))
    assert priority_from([0, 0, 3]).weights == pytest.approx((0, 0, 1))
    assert priority_from("accuracy=1,memory=1").weights == pytest.approx((0.5, 0, 0.5))
    levels = ServiceLevels(max_latency_ms=30)
    assert priority_from("latency", levels=levels).levels is levels


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fast", r"unknown priority 'fast' \(presets: memory, latency, accuracy, balanced"),
        ("1,-1,1", "weight -1 is negative"),
        ("0,0,0", "must not all be zero"),
        ("1,2", "expected 3 weights"),
        ([1, 2, 3, 4], "expected 3 weights"),
        ([0, 0, 0], "must not all be zero"),
    ],
)
def test_priority_from_rejects_bad_input(spec, message) -> None:
    with pytest.raises(InputError, match=message):
        priority_from(spec)


def test_priority_from_rejects_bad_service_levels() -> None:
    with pytest.raises(InputError, match="max_latency_ms must be positive"):
        priority_from("balanced", levels=ServiceLevels(max_latency_ms=-1))


@settings(max_examples=60, deadline=None)
@given(
    weights=st.tuples(*[st.floats(0.01, 1.0)] * 3),
    scale=st.floats(0.5, 3.0),
    n=st.integers(2, len(PLANS)),
)
def test_closeness_matches_pymcdm_topsis(weights, scale, n) -> None:
    plans = PLANS[:n]
    d = choose(plans, priority_from(list(weights)), latency_scale=scale)
    matrix = np.array([[c.footprint_bytes, c.latency_ms * scale, c.accuracy] for c in plans])
    w = np.array(weights) / sum(weights)
    expected = TOPSIS(normalization_function=vector_normalization)(matrix, w, -np.ones(3))
    assert [d.closeness[c.id] for c in plans] == pytest.approx(expected.tolist(), abs=1e-9)
    assert d.choice == plans[int(np.argmax(expected))].id


def test_presets_pick_their_end_of_the_front() -> None:
    assert choose(PLANS, priority_from("memory")).choice in {"q2", "q3"}
    assert choose(PLANS, priority_from("0.99,0.005,0.005")).choice == "q2"
    assert choose(PLANS, priority_from("accuracy")).choice in {"q8", "q6", "q5"}
    assert choose(PLANS, priority_from([0, 0, 1])).choice == "q8"
    start = choose(PLANS, BALANCED)
    assert start.switch and start.reason.startswith("start with")


def test_budget_limits_the_feasible_set() -> None:
    d = choose(PLANS, priority_from("accuracy"), budget_bytes=5.5 * GIB)
    assert d.feasible == ("q5", "q4", "q3", "q2")
    assert d.choice == "q5" and set(d.closeness) == set(d.feasible)
    assert d.budget_bytes == 5.5 * GIB


def test_current_that_no_longer_fits_switches_at_once_saying_why() -> None:
    fresh = choose(PLANS, priority_from("accuracy"), budget_bytes=6.5 * GIB)
    d = choose(PLANS, priority_from("accuracy"), current="q8", budget_bytes=6.5 * GIB,
               dwell_elapsed=False, margin=1.0)
    assert d.switch and d.choice == fresh.choice and d.feasible == ("q6", "q5", "q4", "q3", "q2")
    assert d.reason.startswith("q8 no longer fits: footprint 8.00 GiB exceeds the budget 6.50")


def test_service_levels_exclude_plans_and_name_the_level() -> None:
    levels = ServiceLevels(max_latency_ms=30.0, max_accuracy=0.05)
    p = priority_from("accuracy", levels=levels)
    d = choose(PLANS, p, current="q6")
    assert d.feasible == ("q5", "q4") and d.choice == "q5" and d.switch
    assert "latency 32.0 ms/token exceeds max latency 30" in d.reason
    # the live latency scale pushes q5 over the limit too
    d = choose(PLANS, p, current="q5", latency_scale=1.2)
    assert d.feasible == ("q4",) and d.choice == "q4"
    assert "latency 33.6 ms/token exceeds max latency 30" in d.reason
    d = choose(PLANS, priority_from("latency", levels=levels), current="q4")
    assert "q2" not in d.feasible  # accuracy 0.3 > 0.05
    mem = priority_from("accuracy", levels=ServiceLevels(max_memory_bytes=4.5 * GIB))
    assert choose(PLANS, mem).choice == "q4"


def test_nothing_fits_picks_the_smallest_never_none() -> None:
    d = choose(PLANS, BALANCED, current="q5", budget_bytes=1 * GIB)
    assert d.choice == "q2" and d.switch and d.feasible == ()
    assert d.reason == "nothing fits (the memory budget excludes every plan); smallest footprint q2"
    again = choose(PLANS, BALANCED, current="q2", budget_bytes=1 * GIB)
    assert again.choice == "q2" and not again.switch
    slo = priority_from("balanced", levels=ServiceLevels(max_latency_ms=10))
    d = choose(PLANS, slo, current="q5")
    assert d.choice == "q2" and "every plan exceeds max latency" in d.reason
    assert choose([], BALANCED).choice is None


def test_hysteresis_margin_and_dwell() -> None:
    best = choose(PLANS, BALANCED)
    others = {k: v for k, v in best.closeness.items() if k != best.choice}
    near = max(others, key=others.get)  # the runner-up
    gain = best.closeness[best.choice] - best.closeness[near]
    kept = choose(PLANS, BALANCED, current=near, margin=gain + 0.01)
    assert kept.choice == near and not kept.switch and "within the margin" in kept.reason
    waiting = choose(PLANS, BALANCED, current=near, margin=gain / 2, dwell_elapsed=False)
    assert waiting.choice == near and "dwell time has not passed" in waiting.reason
    moved = choose(PLANS, BALANCED, current=near, margin=gain / 2)
    assert moved.choice == best.choice and moved.switch and moved.reason.startswith("switch to")
    same = choose(PLANS, BALANCED, current=best.choice)
    assert not same.switch and "still the best" in same.reason


def test_ties_go_to_the_smaller_footprint_then_id() -> None:
    twins = [Candidate("b", 2.0, 10.0, 0.1), Candidate("a", 2.0, 10.0, 0.1),
             Candidate("c", 3.0, 10.0, 0.1)]
    d = choose(twins, Priority((0.0, 1.0, 0.0)))
    assert d.choice == "a"


def test_unknown_current_switches_and_bad_candidates_are_rejected() -> None:
    d = choose(PLANS, BALANCED, current="gone")
    assert d.switch and "not in the plan set" in d.reason
    with pytest.raises(InputError, match="candidate id q8 appears twice"):
        choose([PLANS[0], PLANS[0]], BALANCED)
    with pytest.raises(InputError, match="candidate x has a negative or non-finite metric"):
        choose([Candidate("x", -1.0, 1.0, 1.0)], BALANCED)
    with pytest.raises(InputError, match="latency scale must be positive"):
        choose(PLANS, BALANCED, latency_scale=0.0)


def test_slack_keeps_others_out_but_not_the_current() -> None:
    d = choose(PLANS, priority_from("accuracy"), current="q5", budget_bytes=5.2 * GIB,
               slack_bytes=0.5 * GIB)
    assert d.choice == "q5" and "q5" in d.feasible
    d = choose(PLANS, priority_from("accuracy"), current="q4", budget_bytes=5.2 * GIB,
               slack_bytes=0.5 * GIB)
    assert "q5" not in d.feasible and d.choice == "q4"


PHASE = 40  # decisions per phase (one a second)
DWELL = 10
SLACK = 0.5 * GIB


@settings(max_examples=80, deadline=None)
@given(
    levels=st.lists(st.sampled_from([c.footprint_bytes for c in PLANS] + [20.0 * GIB]),
                    min_size=2, max_size=5),
    offsets=st.lists(st.floats(-0.1, 0.1), min_size=5, max_size=5),
    weights=st.tuples(*[st.floats(0.0, 1.0)] * 3).filter(lambda w: sum(w) > 0.05),
    noise_gib=st.floats(0.0, 0.2),
    seed=st.integers(0, 2**16),
)
def test_noisy_trace_around_a_threshold_does_not_flap(levels, offsets, weights, noise_gib,
                                                      seed) -> None:
    """Budget noise around a footprint, latency noise: at most one switch per phase."""
    rng = np.random.default_rng(seed)
    priority = priority_from(list(weights))
    current, since = None, 0
    for phase, level in enumerate(levels):
        centre = level + offsets[phase] * GIB
        switches = 0
        for _ in range(PHASE):
            budget = centre + rng.uniform(-1, 1) * noise_gib * GIB
            scale = 1.0 + rng.uniform(-0.05, 0.05)
            d = choose(PLANS, priority, current=current, budget_bytes=budget,
                       latency_scale=scale, margin=0.05, dwell_elapsed=since >= DWELL,
                       slack_bytes=SLACK)
            since += 1
            if d.switch:
                switches += 1
                current, since = d.choice, 0
        assert switches <= 1, f"phase {phase} at {centre / GIB:.2f} GiB switched {switches}x"

"""core.compose: the composed recipe against brute force over every recipe of a small model,
the limits it keeps (with the recorded error added), the worth and drop rules."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apreqeld.core.compose import (
    NOISE_FLOOR,
    RecordedError,
    available_options,
    compose,
    measured_worse,
    recorded_error,
    worth_serving,
)
from apreqeld.core.targeting import Options, Predictor

TENSORS = ("blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.1.attn_q.weight",
           "blk.1.ffn_up.weight")
TYPES = ("q8_0", "q4_0", "q2_K")
SIZE = {"q8_0": 8.5, "q4_0": 4.5, "q2_K": 2.625}  # bits per weight
ELEMENTS = {t: n for t, n in zip(TENSORS, (4096, 16384, 4096, 16384), strict=True)}
OUTSIDE = {"token_embd.weight": "q8_0"}
NO_ERROR = RecordedError({}, {})


def predictor() -> Predictor:
    """Accuracy weighted unevenly (blk.0 attention is the sensitive one), latency by size."""
    total = sum(ELEMENTS.values())
    by_size = {t: n / total for t, n in ELEMENTS.items()}
    sensitive = {TENSORS[0]: 0.5, TENSORS[1]: 0.2, TENSORS[2]: 0.2, TENSORS[3]: 0.1}
    bytes_of = {t: {q: int(n * SIZE[q] / 8) for q in TYPES} for t, n in ELEMENTS.items()}
    bytes_of["token_embd.weight"] = {q: int(8192 * SIZE[q] / 8) for q in TYPES}
    return Predictor(
        weights={"kld": sensitive, "latency_ms": by_size, "overhead_bytes": by_size},
        figures={"kld": {"q8_0": 0.001, "q4_0": 0.03, "q2_K": 0.4},
                 "latency_ms": {"q8_0": 10.0, "q4_0": 7.0, "q2_K": 8.0},
                 "overhead_bytes": {q: 1000.0 for q in TYPES}},
        bytes_of=bytes_of, fixed_bytes=500)


def options() -> Options:
    return Options(TENSORS, tuple(tuple({t: q} for q in TYPES) for t in TENSORS))


def brute_force(pred: Predictor, *, footprint: float | None, latency: float | None):
    """The least-KLD recipe of all 3^4 within the limits, by enumeration."""
    best = None
    for combo in itertools.product(TYPES, repeat=len(TENSORS)):
        recipe = dict(zip(TENSORS, combo, strict=True)) | OUTSIDE
        p = pred.predict(recipe)
        if (footprint is None or p["footprint_bytes"] <= footprint) and \
                (latency is None or p["latency_ms"] <= latency):
            if best is None or p["kld"] < best[1]["kld"]:
                best = (recipe, p)
    return best


def footprints(pred: Predictor) -> list[float]:
    return sorted(pred.predict(dict(zip(TENSORS, c, strict=True)) | OUTSIDE)["footprint_bytes"]
                  for c in itertools.product(TYPES, repeat=len(TENSORS)))


@settings(max_examples=60, deadline=None)
@example(share=0.1875, latency=7.51)  # a thin region the multiplier grid alone misses
@given(share=st.floats(0.0, 1.0),  # latency limits off the lattice of exact sums
       latency=st.sampled_from([None, 7.13, 7.37, 7.51, 7.77, 8.03, 8.49, 9.51]))
def test_the_composed_recipe_fits_and_is_as_accurate_as_brute_force(share, latency) -> None:
    pred = predictor()
    fps = footprints(pred)
    budget = fps[0] + share * (fps[-1] - fps[0])
    found = compose(pred, options(), OUTSIDE, accuracy="kld", max_footprint_bytes=budget,
                    max_latency_ms=latency, error=NO_ERROR)
    best = brute_force(pred, footprint=budget, latency=latency)
    if best is None:
        assert found is None
        return
    assert found is not None
    assert found.predicted["footprint_bytes"] <= budget
    assert latency is None or found.predicted["latency_ms"] <= latency
    # Lagrangian sweep + greedy fill: the exact optimum on this small problem
    assert found.predicted["kld"] <= best[1]["kld"] * (1 + 1e-9)
    assert found.predicted == pred.predict(found.recipe)


def test_the_recorded_footprint_error_is_kept_free() -> None:
    pred = predictor()
    fps = footprints(pred)
    budget = (fps[0] + fps[-1]) / 2
    plain = compose(pred, options(), OUTSIDE, accuracy="kld", max_footprint_bytes=budget,
                    max_latency_ms=None, error=NO_ERROR)
    careful = compose(pred, options(), OUTSIDE, accuracy="kld", max_footprint_bytes=budget,
                      max_latency_ms=None,
                      error=RecordedError({}, {"footprint_bytes": 0.10}))
    assert careful.predicted["footprint_bytes"] * 1.10 <= budget
    assert careful.predicted["kld"] >= plain.predicted["kld"]


def test_no_limit_gives_the_most_accurate_recipe_and_too_small_a_budget_none() -> None:
    pred = predictor()
    top = compose(pred, options(), OUTSIDE, accuracy="kld", max_footprint_bytes=None,
                  max_latency_ms=None, error=NO_ERROR)
    assert set(top.recipe[t] for t in TENSORS) == {"q8_0"}
    assert compose(pred, options(), OUTSIDE, accuracy="kld",
                   max_footprint_bytes=footprints(pred)[0] - 1, max_latency_ms=None,
                   error=NO_ERROR) is None


def test_options_are_restricted_to_the_shards_at_hand() -> None:
    held = {t: {"q8_0", "q4_0"} for t in TENSORS}
    kept = available_options(options(), held)
    assert all({q for c in row for q in c.values()} == {"q8_0", "q4_0"} for row in kept.choices)
    assert available_options(options(), held | {TENSORS[2]: set()}) is None


def test_worth_serving_needs_a_gain_beyond_the_median_error() -> None:
    error = RecordedError({"kld": 0.05}, {"kld": 0.2})
    assert worth_serving(0.010, None, error, accuracy="kld")
    assert worth_serving(0.0094, 0.010, error, accuracy="kld")
    assert not worth_serving(0.0096, 0.010, error, accuracy="kld")


def test_dropping_is_beyond_the_larger_of_the_recorded_error_and_the_noise_floor() -> None:
    error = recorded_error({"footprint_bytes": {"median": 0.0004, "max": 0.0037},
                            "latency_ms": {"median": 0.009, "max": 0.40}})
    assert error.tolerance("footprint_bytes") == NOISE_FLOOR["footprint_bytes"]
    assert error.tolerance("latency_ms") == 0.40
    assert measured_worse(100.0, 101.5, error.tolerance("footprint_bytes")) is None
    assert measured_worse(100.0, 130.0, error.tolerance("footprint_bytes")) == pytest.approx(0.3)
    assert recorded_error({}) is None

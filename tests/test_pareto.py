import itertools
import math

import moocore
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from apreqeld.core.pareto import NORMALISATION, compare_sets, hypervolume, nondominated
from apreqeld.errors import InputError


def dominates(a, b):
    return bool(np.all(a <= b) and np.any(a < b))


point_sets = st.integers(1, 4).flatmap(
    lambda d: arrays(
        np.int64, st.tuples(st.integers(1, 12), st.just(d)), elements=st.integers(0, 4)
    )
)


@given(point_sets)
def test_flagged_points_are_not_dominated(points):
    mask = nondominated(points)
    for i in np.flatnonzero(mask):
        assert not any(dominates(points[j], points[i]) for j in range(len(points)))


@given(point_sets)
def test_unflagged_points_are_dominated_by_a_flagged_point(points):
    mask = nondominated(points)
    assert mask.any()
    for i in np.flatnonzero(~mask):
        assert any(dominates(points[j], points[i]) for j in np.flatnonzero(mask))


@given(point_sets, st.randoms())
def test_nondominated_is_invariant_under_permutation(points, random):
    permutation = list(range(len(points)))
    random.shuffle(permutation)
    assert nondominated(points[permutation]).tolist() == nondominated(points)[permutation].tolist()


@given(point_sets)
def test_maximising_is_minimising_the_negation(points):
    assert nondominated(points, maximise=True).tolist() == nondominated(-points).tolist()


def test_every_copy_of_a_nondominated_duplicate_is_kept():
    points = np.array([[1, 1], [0, 1], [1, 0], [1, 0], [2, 2], [2, 2]])
    assert nondominated(points).tolist() == [False, True, True, True, False, False]
    assert nondominated(np.zeros((0, 3))).tolist() == []


def test_hypervolume_known_values_2d():
    assert hypervolume(np.array([[1.0, 1.0]]), ref=[2, 2]) == 1.0
    staircase = np.array([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0]])
    assert hypervolume(staircase, ref=[3, 3]) == pytest.approx(6.0)
    assert (
        hypervolume(np.array([[2.0, 0.0], [3.0, 3.0]]), ref=[2, 2]) == 0.0
    )  # none strictly better
    assert hypervolume(np.zeros((0, 2)), ref=[1, 1]) == 0.0
    assert hypervolume(np.array([[3.0, 3.0]]), ref=[1, 2], maximise=True) == pytest.approx(2.0)


def test_hypervolume_known_values_3d():
    assert hypervolume(np.array([[1.0, 1.0, 1.0]]), ref=[2, 2, 2]) == 1.0
    assert hypervolume(np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]), ref=[2, 2, 2]) == 3.0
    three = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert hypervolume(three, ref=[2, 2, 2]) == pytest.approx(4.0)


def box_union_volume(points, ref):
    """Exact volume of the union of boxes [p, ref] by coordinate compression."""
    inside = points[np.all(points < ref, axis=1)]
    if len(inside) == 0:
        return 0.0
    axes = [np.unique(np.append(inside[:, d], ref[d])) for d in range(len(ref))]
    volume = 0.0
    for cell in itertools.product(*(range(len(a) - 1) for a in axes)):
        low = np.array([axes[d][i] for d, i in enumerate(cell)])
        if np.any(np.all(inside <= low, axis=1)):
            volume += math.prod(axes[d][i + 1] - axes[d][i] for d, i in enumerate(cell))
    return volume


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 3).flatmap(
        lambda d: st.tuples(
            arrays(np.float64, st.tuples(st.integers(1, 8), st.just(d)), elements=st.floats(0, 10)),
            arrays(np.float64, (d,), elements=st.floats(0, 12)),
        )
    )
)
def test_hypervolume_matches_exact_box_union(data):
    points, ref = data
    assert hypervolume(points, ref=ref) == pytest.approx(box_union_volume(points, ref), abs=1e-9)


def test_hypervolume_rejects_mismatched_reference():
    with pytest.raises(InputError, match="reference point must have 2 objectives"):
        hypervolume(np.ones((2, 2)), ref=[1, 1, 1])


def test_compare_sets_known_values():
    baseline = np.array([[0.0, 4.0], [2.0, 2.0], [4.0, 0.0]])
    candidates = np.array([[1.0, 3.0], [3.0, 1.0]])
    result = compare_sets(baseline, candidates)
    assert result.ref == (4.0, 4.0)
    assert result.ideal == (0.0, 0.0)
    assert result.hv_baseline == pytest.approx(0.25)  # only (0.5, 0.5) is inside the box
    assert result.hv_candidates == pytest.approx(0.3125)
    assert result.hv_union == pytest.approx(0.375)
    assert result.gain == pytest.approx(0.25)
    assert result.gain_union == pytest.approx(0.5)
    assert result.normalisation == NORMALISATION


def test_compare_sets_ideal_includes_candidates():
    baseline = np.array([[2.0, 10.0, 1.0], [4.0, 20.0, 3.0]])
    candidates = np.array([[0.0, 15.0, 2.0]])
    result = compare_sets(baseline, candidates)
    assert result.ref == (4.0, 20.0, 3.0)
    assert result.ideal == (0.0, 10.0, 1.0)
    # normalised baseline point (0.5, 0, 0) -> 0.5 * 1 * 1; candidate (0, 0.5, 0.5) -> 0.25
    assert result.hv_baseline == pytest.approx(0.5)
    assert result.hv_candidates == pytest.approx(0.25)
    assert result.hv_union == pytest.approx(0.5 + 0.25 - 0.5 * 0.5 * 0.5)
    assert result.gain == pytest.approx(-0.5)


def test_constant_objective_gives_the_uniform_set_no_volume():
    """The paper's reference point is the worst uniform value: where an objective is constant
    over the uniform set, every uniform point lies on it, so the uniform set has no volume and
    the gain is undefined (None), never -100 %."""
    baseline = np.array([[1.0, 5.0], [3.0, 5.0]])
    candidates = np.array([[2.0, 5.0], [0.0, 6.0]])
    assert moocore.hypervolume(baseline, ref=baseline.max(axis=0)) == 0.0  # raw objectives
    result = compare_sets(baseline, candidates)
    assert result.hv_baseline == 0.0 and result.hv_candidates == 0.0
    assert result.gain is None and result.gain_union is None
    single = compare_sets(np.array([[1.0, 1.0]]), np.array([[0.5, 0.5]]))
    assert single.hv_baseline == 0.0
    assert single.hv_candidates == pytest.approx(1.0)
    assert single.gain is None and single.gain_union is None


def test_constant_objective_with_a_moved_reference_point():
    """Moved out by 10 %, the constant objective contributes a slab of width 0.1 (at 5 -> 1,
    reference 1.1); the point worse than the constant (6) stays outside."""
    result = compare_sets(np.array([[1.0, 5.0], [3.0, 5.0]]),
                          np.array([[2.0, 5.0], [0.0, 6.0]]), margin=0.1)
    # objective 1 normalised over [0, 3]: baseline 1/3 and 1, candidate 2/3
    assert result.hv_baseline == pytest.approx((1.1 - 1 / 3) * 0.1)
    assert result.hv_candidates == pytest.approx((1.1 - 2 / 3) * 0.1)
    assert result.gain == pytest.approx((1.1 - 2 / 3) / (1.1 - 1 / 3) - 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 3).flatmap(lambda d: st.tuples(
    arrays(np.float64, st.tuples(st.integers(1, 6), st.just(d)),
           elements=st.floats(0, 10, allow_nan=False)),
    arrays(np.float64, st.tuples(st.integers(1, 6), st.just(d)),
           elements=st.floats(0, 10, allow_nan=False)),
    st.sampled_from([0.0, 0.1, 0.5]))))
def test_moved_reference_point_matches_raw_moocore(data):
    """In raw units the moved reference point is ideal + (1 + margin)(ref - ideal) and every
    volume is divided by the box's volume prod(ref - ideal): moocore on the raw points agrees."""
    baseline, candidates, margin = data
    ref, ideal = baseline.max(axis=0), np.vstack((baseline, candidates)).min(axis=0)
    span = ref - ideal
    if np.any(span < 1e-3):
        return  # constant objectives have their own test
    raw_ref = ideal + (1 + margin) * span
    result = compare_sets(baseline, candidates, margin=margin)
    for points, hv in ((baseline, result.hv_baseline), (candidates, result.hv_candidates),
                       (np.vstack((baseline, candidates)), result.hv_union)):
        assert hv == pytest.approx(moocore.hypervolume(points, ref=raw_ref) / np.prod(span),
                                   rel=1e-9, abs=1e-12)


def test_compare_sets_rejects_bad_input():
    with pytest.raises(InputError, match="the baseline set is empty"):
        compare_sets(np.zeros((0, 2)), np.ones((1, 2)))
    with pytest.raises(InputError, match="candidates have 3 objectives, the baseline has 2"):
        compare_sets(np.ones((1, 2)), np.ones((1, 3)))
    with pytest.raises(InputError, match="only finite values"):
        compare_sets(np.array([[1.0, np.inf]]), np.ones((1, 2)))

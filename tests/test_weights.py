import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apreqeld.core.weights import normalise_weights, parse_weights
from apreqeld.errors import InputError


def test_positional_form_is_normalised():
    assert parse_weights("0.2,0.6,0.2") == pytest.approx((0.2, 0.6, 0.2))
    assert parse_weights(" 1 , 3 , 0 ") == pytest.approx((0.25, 0.75, 0.0))


def test_keyword_form_any_order_with_aliases_and_missing_names():
    assert parse_weights("accuracy=0.2,memory=0.2,latency=0.6") == pytest.approx((0.2, 0.6, 0.2))
    assert parse_weights("lat=3, mem=1") == pytest.approx((0.25, 0.75, 0.0))
    assert parse_weights("ACC=2") == pytest.approx((0.0, 0.0, 1.0))


def test_normalise_weights_on_numbers():
    assert normalise_weights([1, 1, 2]) == pytest.approx((0.25, 0.25, 0.5))
    assert normalise_weights((0.0, 5.0, 0.0)) == (0.0, 1.0, 0.0)


def test_huge_weights_do_not_overflow():
    assert normalise_weights([1e308, 1e308, 0]) == pytest.approx((0.5, 0.5, 0.0))


@given(st.lists(st.floats(0, 1e6), min_size=3, max_size=3).filter(lambda v: max(v) > 0))
def test_normalised_weights_sum_to_one_and_keep_proportions(values):
    weights = normalise_weights(values)
    assert math.isclose(sum(weights), 1.0)
    assert all(w >= 0 for w in weights)
    text = ",".join(repr(v) for v in values)
    assert parse_weights(text) == pytest.approx(weights)
    largest = max(range(3), key=lambda i: values[i])
    assert weights[largest] == max(weights)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memory=0.2,latency=abc,accuracy=0.2", "^weight 'latency=abc' is not a number$"),
        ("0.2,abc,0.2", "^weight 'abc' is not a number$"),
        ("0.2,,0.2", "^weight '' is not a number$"),
        ("0,0,0", "^weights must not all be zero$"),
        ("memory=0", "^weights must not all be zero$"),
        ("-1,1,1", "^weight -1 is negative$"),
        ("latency=-0.5,memory=1", "^weight latency=-0.5 is negative$"),
        ("inf,1,1", "^weight inf is not finite$"),
        ("nan,1,1", "^weight nan is not finite$"),
        ("speed=1", "^unknown weight name 'speed'$"),
        ("0.2,0.6", r"^expected 3 weights \(memory,latency,accuracy\), got 2$"),
        ("1,1,1,1", r"^expected 3 weights \(memory,latency,accuracy\), got 4$"),
        ("", r"^expected 3 weights \(memory,latency,accuracy\), got 0$"),
        ("memory=1,0.5", r"^weight '0.5' has no name \(write name=value for every weight"),
        ("mem=1,memory=2", "^weight 'memory' is given twice$"),
    ],
)
def test_parse_errors_name_the_bad_value(text, message):
    with pytest.raises(InputError, match=message):
        parse_weights(text)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1, 2], r"^expected 3 weights \(memory,latency,accuracy\), got 2$"),
        ([1, -1, 1], "^weight -1 is negative$"),
        ([1, -0.5, 1], "^weight -0.5 is negative$"),
        ([0, 0, 0.0], "^weights must not all be zero$"),
        ([1, float("inf"), 1], "^weight inf is not finite$"),
        ([1, "x", 1], "^weight 'x' is not a number$"),
        ([True, 1, 1], "^weight True is not a number$"),
    ],
)
def test_normalise_errors_name_the_bad_value(values, message):
    with pytest.raises(InputError, match=message):
        normalise_weights(values)

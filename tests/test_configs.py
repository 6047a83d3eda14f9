import json
import math
from collections import Counter

import pytest

from apreqeld.core.configs import PAPER_CONFIGS, WeightConfig, parse_configs
from apreqeld.errors import InputError


def by_name():
    return {config.name: config for config in PAPER_CONFIGS}


def test_there_are_28_paper_configs_in_four_categories():
    assert len(PAPER_CONFIGS) == 28
    counts = Counter(config.category for config in PAPER_CONFIGS)
    assert counts == {"Fairness": 4, "Memory": 8, "Latency": 8, "Accuracy": 8}
    assert [config.category for config in PAPER_CONFIGS[:4]] == ["Fairness"] * 4


def test_paper_configs_are_distinct_and_sum_to_one():
    assert len({config.name for config in PAPER_CONFIGS}) == 28
    assert len({config.weights for config in PAPER_CONFIGS}) == 28
    for config in PAPER_CONFIGS:
        assert isinstance(config, WeightConfig)
        assert math.isclose(sum(config.weights), 1.0)
        assert all(w >= 0 for w in config.weights)


def test_paper_configs_hold_the_weightings_of_section_4_1_1():
    configs = by_name()
    third = pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert configs["fair-all"].weights == third
    assert configs["fair-memory-latency"].weights == (0.5, 0.5, 0.0)
    assert configs["fair-memory-accuracy"].weights == (0.5, 0.0, 0.5)
    assert configs["fair-latency-accuracy"].weights == (0.0, 0.5, 0.5)
    assert configs["memory-0.8"].weights == pytest.approx((0.8, 0.1, 0.1))
    assert configs["memory-0.7"].weights == pytest.approx((0.7, 0.15, 0.15))
    assert configs["accuracy-0.9"].weights == pytest.approx((0.05, 0.05, 0.9))
    assert configs["memory-only"].weights == (1.0, 0.0, 0.0)
    assert configs["latency-only"].weights == (0.0, 1.0, 0.0)
    assert configs["accuracy-only"].weights == (0.0, 0.0, 1.0)
    assert configs["memory-0.75-latency"].weights == (0.75, 0.25, 0.0)
    assert configs["latency-0.9-memory"].weights == (0.1, 0.9, 0.0)
    assert configs["accuracy-0.9-latency"].weights == (0.0, 0.1, 0.9)
    assert configs["latency-0.75-accuracy"].category == "Latency"


def test_each_metric_category_prioritises_its_metric():
    index = {"Memory": 0, "Latency": 1, "Accuracy": 2}
    for config in PAPER_CONFIGS:
        if config.category in index:
            main = config.weights[index[config.category]]
            assert main >= 0.7
            assert main == max(config.weights)


def test_plain_text_lines_with_defaults_comments_and_keyword_weights():
    text = """
    # my configs
    0.2,0.6,0.2
    1, 1, 2   Balanced   even-ish   # spaces around commas are fine
    memory=3,latency=1 Memory mem-heavy
    0,0,1 Accuracy
    """
    configs = parse_configs(text)
    assert [c.name for c in configs] == ["config-1", "even-ish", "mem-heavy", "config-4"]
    assert [c.category for c in configs] == ["Custom", "Balanced", "Memory", "Accuracy"]
    assert configs[0].weights == pytest.approx((0.2, 0.6, 0.2))
    assert configs[1].weights == pytest.approx((0.25, 0.25, 0.5))
    assert configs[2].weights == pytest.approx((0.75, 0.25, 0.0))


def test_json_list_of_objects():
    text = json.dumps(
        [
            {"weights": [1, 1, 2], "name": "a", "category": "Mine"},
            {"weights": "lat=1"},
            {"weights": [0.2, 0.6, 0.2], "category": "Latency"},
        ]
    )
    configs = parse_configs(text)
    assert configs[0] == WeightConfig("a", "Mine", pytest.approx((0.25, 0.25, 0.5)))
    assert configs[1] == WeightConfig("config-2", "Custom", (0.0, 1.0, 0.0))
    assert configs[2].name == "config-3" and configs[2].category == "Latency"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "^the configs file has no weight configuration$"),
        ("# only a comment\n\n", "^the configs file has no weight configuration$"),
        ("[]", "^the configs file has no weight configuration$"),
        ("1,1,1 A same\n1,2,1 B same", "^duplicate config name 'same'$"),
        ("1,1,1\n1,1,1 Custom config-1", "^duplicate config name 'config-1'$"),
        ("1,1,1\n1,-1,1", "^line 2: weight -1 is negative$"),
        ("1,1", r"^line 1: expected 3 weights \(memory,latency,accuracy\), got 2$"),
        ("speed=1", "^line 1: unknown weight name 'speed'$"),
        ("0,0,0 X", "^line 1: weights must not all be zero$"),
        (
            "1,1,1 Cat name extra",
            "^line 1: expected 'weights \\[category\\] \\[name\\]', got extra",
        ),
        (",1,1", "^line 1: cannot read weights from ',1,1'$"),
        ("[1,", "^configs file is not valid JSON: "),
        ('[{"weights": [1, "x", 1]}]', "^config 1: weight 'x' is not a number$"),
        ('[{"weights": "latency=abc"}]', "^config 1: weight 'latency=abc' is not a number$"),
        ('[{"weights": [1, 1]}]', r"^config 1: expected 3 weights \(memory,latency,accuracy\)"),
        ('[{"weights": 3}]', "^config 1: weights 3 must be a list of 3 numbers or a string$"),
        ('[{"name": "a"}]', '^config 1: missing "weights"$'),
        ('[{"weights": [1,1,1], "colour": "red"}]', "^config 1: unknown key 'colour'$"),
        ('[{"weights": [1,1,1], "name": ""}]', "^config 1: name '' must be a non-empty string$"),
        ("[[1, 1, 1]]", '^config 1: expected an object with "weights", got \\[1, 1, 1\\]$'),
        (
            '[{"weights": [1,1,1], "name": "x"}, {"weights": [1,2,1], "name": "x"}]',
            "^duplicate config name 'x'$",
        ),
    ],
)
def test_config_errors_are_one_line_and_name_the_problem(text, message):
    with pytest.raises(InputError, match=message) as caught:
        parse_configs(text)
    assert "\n" not in str(caught.value)


def test_json_object_instead_of_list_is_rejected():
    with pytest.raises(InputError, match="^a JSON configs file must hold a list of objects$"):
        parse_configs('{"weights": [1, 1, 1]}')

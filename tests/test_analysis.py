"""Tests of the pure post-study analysis: Table 2 (robustness) and Figure 5 (bpw per category)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from apreqeld.study.analysis import PRIORITY, average_bpw_by_category, robustness_table
from study_fixture import make_study


def _m(name: str, cat: str, mem: float | None, lat: float | None, ppl: float | None,
       bpw: float | None = 4.0, same_as: str | None = None) -> dict:
    """A minimal configuration entry with measured memory, latency and ppl."""
    return {"name": name, "category": cat, "bpw": bpw, "same_as": same_as,
            "measured": {"memory_bytes": mem, "latency_ms": lat, "ppl": ppl, "kld": None}}


@pytest.fixture
def models() -> list[dict]:
    """Hand-made set: best memory M1 (50), best latency L1 (5), best ppl A1 (15)."""
    return [
        _m("F1", "Fairness", 100, 10, 20, bpw=5.0),
        _m("M1", "Memory", 50, 12, 25, bpw=3.5),
        _m("M2", "Memory", 60, 11, 24, bpw=3.7),
        _m("L1", "Latency", 80, 5, 22, bpw=4.5),
        _m("A1", "Accuracy", 120, 9, 15, bpw=8.5),
    ]


def _row(table: dict, cat: str) -> dict:
    """The row of one category."""
    return next(r for r in table["rows"] if r["category"] == cat)


def test_known_differences(models: list[dict]) -> None:
    t = robustness_table(models)
    assert t["metrics"] == ["memory_bytes", "latency_ms", "ppl"]
    assert [r["category"] for r in t["rows"]] == ["Fairness", "Memory", "Latency", "Accuracy"]
    assert _row(t, "Fairness")["diff"] == {"memory_bytes": 50, "latency_ms": 5, "ppl": 5}
    assert _row(t, "Fairness")["rel"] == pytest.approx(
        {"memory_bytes": 1.0, "latency_ms": 1.0, "ppl": 1 / 3})
    assert _row(t, "Memory")["diff"] == {"memory_bytes": 5, "latency_ms": 6.5, "ppl": 9.5}
    assert _row(t, "Memory")["n_models"] == 2
    assert _row(t, "Latency")["diff"] == {"memory_bytes": 30, "latency_ms": 0, "ppl": 7}
    assert _row(t, "Accuracy")["diff"] == {"memory_bytes": 70, "latency_ms": 4, "ppl": 0}


def test_best_models_ok(models: list[dict]) -> None:
    t = robustness_table(models)
    best = t["best"]
    assert (best["memory_bytes"]["name"], best["memory_bytes"]["category"]) == ("M1", "Memory")
    assert (best["latency_ms"]["name"], best["latency_ms"]["value"]) == ("L1", 5)
    assert best["ppl"]["name"] == "A1" and best["ppl"]["expected"] == "Accuracy"
    assert all(b["ok"] for b in best.values()) and t["all_ok"] is True


def test_fairness_best_is_not_ok(models: list[dict]) -> None:
    models[0]["measured"]["latency_ms"] = 4.0  # F1 becomes the fastest
    t = robustness_table(models)
    b = t["best"]["latency_ms"]
    assert (b["name"], b["category"], b["ok"]) == ("F1", "Fairness", False)
    assert t["all_ok"] is False
    assert t["best"]["memory_bytes"]["ok"] is True


def test_wrong_category_best_is_not_ok(models: list[dict]) -> None:
    models[4]["measured"]["memory_bytes"] = 10  # an Accuracy config is the smallest
    b = robustness_table(models)["best"]["memory_bytes"]
    assert (b["name"], b["category"], b["expected"], b["ok"]) == ("A1", "Accuracy", "Memory",
                                                                   False)


def test_tie_counts_ok_when_one_tied_best_is_right(models: list[dict]) -> None:
    models[0]["measured"]["latency_ms"] = 5  # F1 ties L1
    b = robustness_table(models)["best"]["latency_ms"]
    assert b["ok"] is True and (b["name"], b["category"]) == ("L1", "Latency")
    assert {t["name"] for t in b["tied"]} == {"F1", "L1"}


def test_same_as_models_still_count(models: list[dict]) -> None:
    models.append({**copy.deepcopy(models[1]), "name": "M1b", "same_as": "M1"})
    t = robustness_table(models)
    row = _row(t, "Memory")
    assert row["n_models"] == 3
    assert row["diff"]["memory_bytes"] == pytest.approx((0 + 10 + 0) / 3)
    assert {x["name"] for x in t["best"]["memory_bytes"]["tied"]} == {"M1", "M1b"}


def test_missing_values_and_empty_category() -> None:
    ms = [_m("F1", "Fairness", 100, None, 20), _m("M1", "Memory", 50, 7, None),
          {"name": "X", "category": "Memory", "measured": None}]
    t = robustness_table(ms)
    assert _row(t, "Memory")["n_models"] == 2
    assert _row(t, "Memory")["diff"]["memory_bytes"] == 0
    assert _row(t, "Memory")["diff"]["ppl"] is None
    assert _row(t, "Fairness")["diff"]["latency_ms"] is None
    acc = _row(t, "Accuracy")
    assert acc["n_models"] == 0 and acc["diff"] == {"memory_bytes": None, "latency_ms": None,
                                                     "ppl": None}
    assert t["best"]["ppl"]["ok"] is False  # best ppl is a Fairness config
    json.dumps(t)


def test_no_models() -> None:
    t = robustness_table([])
    assert t["all_ok"] is False
    assert all(b["value"] is None and b["ok"] is False for b in t["best"].values())
    assert all(r["n_models"] == 0 for r in t["rows"])


def test_kld_metric_and_unknown_metric(models: list[dict]) -> None:
    for i, m in enumerate(models):
        m["measured"]["kld"] = 0.1 * (5 - i)  # A1 is best
    t = robustness_table(models, metrics=("kld",), categories=("Accuracy", "Memory"))
    assert t["best"]["kld"]["name"] == "A1" and t["best"]["kld"]["ok"] is True
    assert [r["category"] for r in t["rows"]] == ["Accuracy", "Memory"]
    with pytest.raises(ValueError, match="energy"):
        robustness_table(models, metrics=("energy",))


def test_relative_difference_with_zero_best() -> None:
    t = robustness_table([_m("A", "Accuracy", 1, 1, 0.0), _m("B", "Memory", 1, 1, 2.0)])
    assert _row(t, "Memory")["diff"]["ppl"] == 2.0 and _row(t, "Memory")["rel"]["ppl"] is None


def test_average_bpw_by_category(models: list[dict]) -> None:
    models.append(_m("Z", "Custom", 1, 1, 1, bpw=6.0))
    models.append(_m("N", "Latency", 1, 1, 1, bpw=None))
    stats = average_bpw_by_category(models)
    assert list(stats) == ["Fairness", "Memory", "Latency", "Accuracy", "Custom"]
    assert stats["Memory"] == {"n": 2, "mean": pytest.approx(3.6), "min": 3.5, "max": 3.7,
                               "values": [3.5, 3.7]}
    assert stats["Latency"]["values"] == [4.5]
    assert average_bpw_by_category([]) == {}


def test_fixture_study_is_consistent() -> None:
    study = make_study()
    assert len(study["models"]) == 28 and len(study["uniform"]) == 5
    assert len(study["contribution"]["sublayers"]) == 60
    assert len(study["pareto"]["models"]) == 28
    cats = [m["category"] for m in study["models"]]
    assert {c: cats.count(c) for c in set(cats)} == {"Fairness": 4, "Memory": 8, "Latency": 8,
                                                     "Accuracy": 8}
    assert all(abs(sum(m["weights"]) - 1) < 1e-9 for m in study["models"])
    assert all(sum(m["distribution"].values()) == 60 for m in study["models"])
    assert json.loads(json.dumps(study)) == study
    assert make_study(0)["models"] == []


def test_robustness_of_the_fixture_study_against_numpy() -> None:
    """Table 2 of the 28-configuration fixture, recomputed with numpy: per category, the mean
    of (value - best over all models); the best model is one that attains the minimum."""
    models = make_study()["models"]
    table = robustness_table(models)
    categories = np.array([m["category"] for m in models])
    for metric in ("memory_bytes", "latency_ms", "ppl"):
        values = np.array([m["measured"][metric] for m in models], dtype=np.float64)
        best = values.min()
        for row in table["rows"]:
            members = values[categories == row["category"]]
            assert row["n_models"] == len(members)
            assert row["diff"][metric] == pytest.approx((members - best).mean())
            assert row["rel"][metric] == pytest.approx((members - best).mean() / abs(best))
        winners = {m["name"] for m, v in zip(models, values, strict=True) if v == best}
        assert table["best"][metric]["name"] in winners
        assert table["best"][metric]["ok"] == any(
            m["category"] == PRIORITY[metric] for m, v in zip(models, values, strict=True)
            if v == best)

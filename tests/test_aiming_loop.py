"""The closed aiming loop on the default model's tensor layout, with a made-up measurement:
a "truth" predictor that differs from the loop's prior, so that only recalibration from what
was measured brings the aims where they must land. The loop stops at its bounds, a preset the
predictor shows unbeatable carries its reason into the manifest, and aims beat their targets
on every axis by their margins as predicted."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from apreqeld import planset as P
from apreqeld.aiming import (
    calibrated,
    calibration_record,
    evidence_record,
    predictor,
    predictor_from_record,
    written,
)
from apreqeld.aiming_loop import Bounds, close_loop, verdicts
from apreqeld.core.aims import aims_at, error_margins, unbeatable_reason
from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import tensor_recipe
from apreqeld.core.sensitivity import parts
from apreqeld.core.targeting import Predictor, option_tables, tensor_options
from apreqeld.errors import InputError
from apreqeld.gguf.view import ModelView
from apreqeld.manifest import LatencyStats, Member, Metrics, PresetComparison, load_planset

TYPES = ("q8_0", "q5_0", "q4_0", "q4_K")
UNIFORM = {"q8_0": (7.0, 0.004, 80e6), "q5_0": (7.2, 0.08, 80e6), "q4_0": (4.5, 0.28, 80.5e6),
           "q4_K": (6.4, 0.07, 80.5e6)}  # latency ms, kld, footprint overhead


def evidence(view: ModelView, types: Sequence[str] = TYPES) -> dict:
    """Aiming evidence as aiming_evidence returns it, made up: uniform figures, footprints and
    a sensitivity per sublayer (the last ones more sensitive) and per part."""
    n = len(view.sublayers)
    memory = {q: sum(t.bytes_as(qtype(q if s is not None else "q8_0"))
                     for s in [*view.sublayers, None]
                     for t in (s.tensors if s is not None else view.outside) if t.quantizable)
              + sum(t.n_bytes for t in view.tensors if not t.quantizable) for q in types}
    return {"uniform": {q: {"memory_bytes": memory[q], "latency_ms": UNIFORM[q][0],
                            "kld": UNIFORM[q][1], "ppl": 20 + 10 * UNIFORM[q][1]}
                        for q in types},
            "footprint": {q: {"footprint_bytes": memory[q] + UNIFORM[q][2]} for q in types},
            "sensitivity": {"base": "q8_0", "probe": "q4_0", "outside": "q8_0",
                            "base_kld": 0.004, "sublayers": [s.name for s in view.sublayers],
                            "added_kld": [0.005 + 0.01 * i / n for i in range(n)],
                            "part_added_kld": dict.fromkeys(parts(view), 0.02)
                            | {"ffn_down": 0.1, "attn_v": 0.08}}}


def uniform_recipe(view: ModelView, q: str) -> dict[str, str]:
    return tensor_recipe(view, [qtype(q)] * len(view.sublayers), outside=qtype("q8_0"))


def member(view: ModelView, truth: Predictor, recipe: Mapping[str, str], kind: str,
           label: str, *, slow: float = 1.0) -> Member:
    """A member measured as `truth` predicts it (latency `slow` times the truth)."""
    got = truth.predict(written(view, recipe))
    ms = got["latency_ms"] * slow
    mid = hashlib.sha256(repr(sorted(recipe.items())).encode()).hexdigest()[:12]
    return Member(id=mid, kind=kind, label=label, base_type="q8_0", recipe=dict(sorted(
        recipe.items())), measured=Metrics(
            parameter_bytes=int(got["memory_bytes"]), footprint_bytes=int(got["footprint_bytes"]),
            latency=LatencyStats(median_ms=ms, iqr_ms=0.02 * ms, mean_ms=ms, std_ms=0.01 * ms,
                                 n=5),
            ppl=got["ppl"], ppl_se=0.1, kld=got["kld"], kld_se=0.001), pareto=True)


class Lab:
    """Measures recipes as the truth predicts them; mixes `mix_slow` times slower."""

    def __init__(self, view: ModelView, truth: Predictor, *, mix_slow: float = 1.0) -> None:
        self.view, self.truth, self.mix_slow = view, truth, mix_slow
        self.members: list[Member] = []
        self.calls: list[int] = []

    def add(self, recipe: Mapping[str, str], kind: str, label: str) -> Member:
        m = member(self.view, self.truth, recipe, kind, label,
                   slow=self.mix_slow if kind == "mix" else 1.0)
        if m.id not in {x.id for x in self.members}:
            self.members.append(m)
        return m

    def measure(self, new: Sequence[tuple[str, dict[str, str], Mapping[str, float]]]
                ) -> list[Member]:
        self.calls.append(len(new))
        for label, recipe, _ in new:
            self.add(recipe, "mix", label)
        return list(self.members)


def truth_of(view: ModelView, ev: dict) -> Predictor:
    """The prior with q4_K 15 % slower and ffn_down twice as sensitive as measured."""
    prior = predictor(view, ev)
    kld = dict(prior.weights["kld"])
    kld = {t: w * (2.0 if ".ffn_down." in t else 1.0) for t, w in kld.items()}
    total = sum(kld.values())
    figures = {m: dict(f) for m, f in prior.figures.items()}
    if "q4_K" in figures["latency_ms"]:
        figures["latency_ms"]["q4_K"] *= 1.15
    return Predictor(weights=dict(prior.weights) | {"kld": {t: w / total for t, w in kld.items()}},
                     figures=figures, bytes_of=prior.bytes_of, fixed_bytes=prior.fixed_bytes)


def start(view: ModelView, *, mix_slow: float = 1.0, types: Sequence[str] = TYPES
          ) -> tuple[Lab, Predictor, dict[str, str]]:
    ev = evidence(view, types)
    prior = predictor(view, ev)
    lab = Lab(view, truth_of(view, ev), mix_slow=mix_slow)
    for q in types:
        lab.add(uniform_recipe(view, q), "uniform", q)
    km = uniform_recipe(view, "q5_0") | {t: "q4_K" for t in prior.bytes_of if ".ffn_down." in t}
    presets = {"Q4_0": lab.add(uniform_recipe(view, "q4_0"), "uniform", "q4_0").id}
    if "q4_K" in types:
        presets["K_MIX"] = lab.add(km, "preset", "K_MIX").id
    return lab, prior, presets


def test_the_loop_dominates_a_preset_the_prior_misjudges(source_view: ModelView) -> None:
    lab, prior, presets = start(source_view)
    got = close_loop(source_view, lab.members, presets, prior, lab.measure, outside="q8_0",
                     accuracy="kld", bounds=Bounds(rounds=3, members=20))
    assert got.status["K_MIX"]["state"] == "dominated"
    assert verdicts(got.members, presets, "kld")["K_MIX"][0]
    assert [r["round"] for r in got.rounds] == list(range(len(got.rounds)))
    assert sum(r["added"] for r in got.rounds[1:]) == sum(lab.calls) <= 20
    assert all(r["members"] == len(lab.members) for r in got.rounds[-1:])
    # the calibrated predictor learnt the truth's slower q4_K from what was measured
    assert got.predictor.figures["latency_ms"]["q4_K"] > prior.figures["latency_ms"]["q4_K"]


def test_the_loop_stops_at_its_round_bound(source_view: ModelView) -> None:
    lab, prior, presets = start(source_view, mix_slow=1.3)  # every mix 30 % slower: no aim lands
    got = close_loop(source_view, lab.members, presets, prior, lab.measure, outside="q8_0",
                     accuracy="kld", bounds=Bounds(rounds=2, members=100))
    assert len(lab.calls) == 2 and [r["round"] for r in got.rounds] == [0, 1, 2]
    assert got.stop.startswith("round bound (2 rounds)")
    assert got.status["K_MIX"]["state"] == "open"
    assert "undominated when the loop stopped (round bound" in got.status["K_MIX"]["reason"]
    assert got.rounds[1]["aimed"] == ["K_MIX"] and got.rounds[1]["added"] == lab.calls[0]
    # the second round aimed with the margins the first round's misses taught it
    assert got.rounds[1]["errors"]["latency_ms"] >= 0.29


def test_the_loop_stops_at_its_member_bound(source_view: ModelView) -> None:
    lab, prior, presets = start(source_view, mix_slow=1.3)
    got = close_loop(source_view, lab.members, presets, prior, lab.measure, outside="q8_0",
                     accuracy="kld", bounds=Bounds(rounds=10, members=2))
    assert sum(lab.calls) == 2 and got.stop.startswith("member bound (2 members added)")
    nothing = close_loop(source_view, lab.members, presets, prior, lab.measure, outside="q8_0",
                         accuracy="kld", bounds=Bounds(rounds=0, members=10))
    assert len(lab.calls) == 1 and nothing.rounds[-1]["round"] == 0
    with pytest.raises(InputError, match="aim bounds must be >= 0"):
        Bounds(rounds=-1)


def test_an_unbeatable_preset_carries_its_reason_into_the_manifest(
        source_view: ModelView) -> None:
    # without q4_K, uniform q4_0 is the smallest and fastest recipe: nothing can beat it
    lab, prior, presets = start(source_view, types=("q8_0", "q5_0", "q4_0"))
    got = close_loop(source_view, lab.members, presets, prior, lab.measure, outside="q8_0",
                     accuracy="kld", bounds=Bounds(rounds=2, members=10))
    state = got.status["Q4_0"]
    assert state["state"] == "unbeatable" and state["reason"].startswith("predictor: ")
    clauses = state["reason"].removeprefix("predictor: ").split("; ")
    assert len(clauses) == 3 and all("within its" in c for c in clauses)
    assert all("no recipe is predicted" in c or "(+" in c for c in clauses)  # none does better
    assert got.stop.startswith("every preset is dominated or shown unbeatable")
    compared = P.compare_presets(got.members, [("Q4_0", presets["Q4_0"])], "kld",
                                 {p: s["reason"] for p, s in got.status.items()})
    assert compared[0].reason == state["reason"] and not compared[0].dominated_by
    again = PresetComparison.model_validate(compared[0].model_dump(mode="json"))
    assert again.reason == state["reason"]


def test_aims_beat_the_target_by_their_margins_per_tensor(source_view: ModelView) -> None:
    prior = predictor(source_view, evidence(source_view))
    options = tensor_options(source_view, TYPES)
    downs = {r: {q for c in options.choices[i] for q in c.values()}
             for i, r in enumerate(options.sublayers)}
    assert downs["blk.0.ffn_down.weight"] == set(TYPES)  # rows of 1536 take q4_K
    assert downs["blk.0.attn_output.weight"] == {"q8_0", "q5_0", "q4_0"}  # 576: no K-quant
    assert len(options.sublayers) == sum(
        t.quantizable for s in source_view.sublayers for t in s.tensors)
    outside = {t.name: "q8_0" for t in source_view.outside if t.quantizable}
    target = prior.predict(written(source_view, uniform_recipe(source_view, "q5_0")))
    margins = {"footprint_bytes": 0.01, "latency_ms": 0.05, "kld": 0.1}
    level, found = aims_at(prior, options, target, outside, margins, accuracy="kld",
                           tables=option_tables(prior, options))
    assert level == 1.0 and 1 <= len(found) <= 3
    for minimize, recipe in found:
        got = prior.predict(recipe)
        for m, x in margins.items():
            assert got[m] <= target[m] * (1 - x) + 1e-9, (minimize, m)
    q4 = prior.predict(written(source_view, uniform_recipe(source_view, "q4_0")))
    plain = tensor_options(source_view, ("q8_0", "q5_0", "q4_0"))
    assert aims_at(prior, plain, q4, outside, margins, accuracy="kld") == (None, [])
    reason = unbeatable_reason(prior, plain, q4, outside, accuracy="kld")
    assert reason.count(";") == 2
    assert "no recipe is predicted within its footprint and kld" in reason


def test_error_margins_by_hand() -> None:
    predicted = [{"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0},
                 {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0}]
    measured = [{"a": 1.0, "b": 1.0}, {"a": 1.1, "b": 1.0}, {"a": 1.2, "b": 1.0},
                {"a": 1.3, "b": 1.0}, {"a": 0.9, "b": 1.0}]
    # excess a: 0, .1, .2, .3, 0 -> 75th percentile (linear) .2; b came out below: 0 -> floor
    got = error_margins(predicted, measured, ["a", "b"], floor={"b": 0.01})
    assert got == {"a": pytest.approx(0.2), "b": 0.01}
    assert error_margins([], [], ["a"]) == {"a": 0.0}


def test_the_manifest_record_rebuilds_the_calibrated_predictor(source_view: ModelView) -> None:
    lab, prior, presets = start(source_view)
    ev = evidence(source_view)
    cal = calibrated(source_view, prior, lab.members, accuracy="kld")
    record = {"types": list(TYPES)} | evidence_record(ev) | {
        "calibration": calibration_record(cal)}
    rebuilt = predictor_from_record(source_view, record)
    for m in lab.members:
        want = cal.predictor.predict(written(source_view, m.recipe))
        assert rebuilt.predict(written(source_view, m.recipe)) == pytest.approx(want)
    assert predictor_from_record(source_view, evidence_record(ev)).figures == prior.figures


def test_the_checked_in_plan_set_keeps_its_predictor_and_reasons(source_view: ModelView) -> None:
    """What issue 18 composes from: the manifest alone rebuilds the refitted predictor that
    made its kept predictions; every preset is dominated or says why not."""
    ps = load_planset(Path(__file__).resolve().parents[1] / "plans" / "smollm2-135m")
    aim = ps.protocol["planning"]["aim"]
    rebuilt = predictor_from_record(source_view, aim)
    for m in ps.members:
        got = rebuilt.predict(written(source_view, m.recipe))
        for k, v in aim["predictions"][m.id].items():
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (m.id, k)
    loop = aim["loop"]
    assert [r["round"] for r in loop["rounds"]] == list(range(len(loop["rounds"])))
    assert loop["added"] <= loop["bounds"]["members"]
    assert len(loop["rounds"]) - 1 <= loop["bounds"]["rounds"]
    for p in ps.presets:
        assert bool(p.dominated_by) != bool(p.reason), p.name

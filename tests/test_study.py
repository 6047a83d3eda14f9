"""The paper's evaluation end to end on the real default model, with a tiny budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import moocore
import numpy as np
import pytest

from apreqeld.core.configs import WeightConfig
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.workspace import Workspace
from apreqeld.resources import default_model_path
from apreqeld.study import run as study_module
from apreqeld.workflow import PlanOptions
from support import THREADS

pytestmark = pytest.mark.integration

TINY = Protocol(chunks=1, n_ctx=512, n_gen=4, reps=2, threads=THREADS)
GAMMA = 0.8
CONFIGS = (
    WeightConfig("mem", "Memory", (0.8, 0.1, 0.1)),
    WeightConfig("acc", "Accuracy", (0.1, 0.1, 0.8)),
    WeightConfig("mem-again", "Memory", (0.8, 0.1, 0.1)),
    WeightConfig("fair", "Fairness", (1 / 3, 1 / 3, 1 / 3)),
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("study-work"))


def _run(out: Path, workspace: Workspace, configs=CONFIGS) -> dict:
    options = PlanOptions(protocol=TINY, types="q4_0,q5_0,q8_0", calibration_tokens=256,
                          gamma=GAMMA)
    return study_module.run_study(default_model_path(), out, workspace=workspace,
                                  options=options, configs=configs)


def test_interrupted_study_resumes_without_measuring_twice(
        workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = study_module.measure_file
    calls: list[Path] = []

    def interrupt_on_second(path: Path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, **kwargs)

    monkeypatch.setattr(study_module, "measure_file", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, workspace)
    assert not (tmp_path / "study.json").exists()
    assert not list(tmp_path.rglob("*.part"))

    calls.clear()
    monkeypatch.setattr(study_module, "measure_file",
                        lambda path, **kw: calls.append(path) or real(path, **kw))
    result = _run(tmp_path, workspace)
    first_plan = result["models"][0]["gguf"]
    # the first model was measured before the interruption: never again
    assert all(not str(p).endswith(first_plan) for p in calls)
    assert len(result["models"]) == len(CONFIGS)


def test_study_outputs(workspace: Workspace, tmp_path: Path) -> None:
    result = _run(tmp_path, workspace)
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["models"] == json.loads(json.dumps(result["models"]))
    assert [u["name"] for u in saved["uniform"]] == ["q8_0", "q5_0", "q4_0"]
    by_name = {m["name"]: m for m in saved["models"]}
    # identical weights give the identical plan, built and measured once
    assert by_name["mem-again"]["same_as"] == "mem"
    assert by_name["mem-again"]["plan_id"] == by_name["mem"]["plan_id"]
    assert by_name["mem"]["measured"] == by_name["mem-again"]["measured"]
    assert len(list((tmp_path / "models").glob("*.gguf"))) == len(
        {m["plan_id"] for m in saved["models"]})
    for model in saved["models"]:
        assert model["measured"]["memory_bytes"] > 0
        assert sum(model["distribution"].values()) == 60
    for row in saved["uniform"] + saved["models"]:  # every re-timed figure says how clean it is
        m = row["measured"]
        assert m["latency_quality"] in ("clean", "disturbed")
        assert m["latency_median_ms"] > 0 and m["latency_iqr_ms"] >= 0
    for key in ("ppl", "kld", "ppl+margin", "kld+margin"):
        hv = saved["hypervolume"][key]
        objs = hv["objectives"]
        uniform = _points(saved["uniform"], objs)
        mixed = _points(saved["models"], objs)
        # independently: raw moocore with the moved reference point, over the box's volume
        ideal, ref = np.vstack((uniform, mixed)).min(axis=0), uniform.max(axis=0)
        raw_ref = ideal + (1 + hv["margin"]) * (ref - ideal)
        box = np.prod(ref - ideal)
        expected_uniform = moocore.hypervolume(uniform, ref=raw_ref) / box
        expected_mixed = moocore.hypervolume(mixed, ref=raw_ref) / box
        assert hv["hv_uniform"] == pytest.approx(expected_uniform, abs=1e-12)
        assert hv["hv_apreqel"] == pytest.approx(expected_mixed, abs=1e-12)
        if expected_uniform > 0:
            assert hv["gain"] == pytest.approx(expected_mixed / expected_uniform - 1)
        else:  # the paper's reference point: a type worst in any objective adds no volume
            assert hv["gain"] is None
    assert saved["hypervolume"]["ppl+margin"]["margin"] == study_module.HV_MARGIN
    # with the reference point moved out, every uniform type that is not dominated counts
    assert saved["hypervolume"]["ppl+margin"]["hv_uniform"] > 0
    for model in saved["models"] + saved["uniform"]:
        assert model["measured"]["latency_isolated_ms"] > 0  # interleaved rounds kept both
    # Pareto flags: brute-force dominance over every measured point
    everyone = saved["uniform"] + saved["models"]
    points = _points(everyone, saved["pareto"]["objectives"])
    expected = [not any(_dominates(q, p) for q in points) for p in points]
    assert saved["pareto"]["uniform"] + saved["pareto"]["models"] == expected
    # one rule for uniform GGUFs (measure-types' and the study's): deleted once measured
    assert not list(workspace.root.rglob("uniform-*.gguf"))
    assert saved["planning"]["gamma"] == GAMMA == saved["contribution"]["gamma"]
    assert {row["category"] for row in saved["robustness"]["rows"]} >= {"Memory", "Accuracy"}
    assert len(saved["contribution"]["sublayers"]) == 60
    html = (tmp_path / "report.html").read_text()
    assert "mem-again" in html and "<svg" in html


def _points(rows: list[dict], objectives: list[str]) -> np.ndarray:
    return np.array([[r["measured"][o] for o in objectives] for r in rows], dtype=np.float64)


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


def test_pareto_flags_use_the_chosen_accuracy_metric() -> None:
    """With accuracy kld, a model that is worse in ppl but better in kld is on the front."""
    def measured(mem: float, lat: float, ppl: float, kld: float) -> dict:
        return {"memory_bytes": mem, "latency_ms": lat, "ppl": ppl, "kld": kld, "bpw": 4.0}

    dev = {"types": ["q8_0", "q4_0"],
           "uniform": {"q8_0": {"measured": measured(10, 1, 10, 0.01)},
                       "q4_0": {"measured": measured(5, 1, 12, 0.20)}}}
    model = {"name": "m", "category": "Memory", "measured": measured(5, 1, 13, 0.10)}
    by_ppl = study_module.analyse(dev, [dict(model)], accuracy="ppl")
    by_kld = study_module.analyse(dev, [dict(model)], accuracy="kld")
    assert by_ppl["pareto"]["models"] == [False]  # dominated by q4_0 in ppl
    assert by_kld["pareto"]["objectives"][-1] == "kld"
    assert by_kld["pareto"]["models"] == [True] and by_kld["pareto"]["uniform"] == [True, False]


def test_report_rerenders_from_study_json(workspace: Workspace, tmp_path: Path) -> None:
    _run(tmp_path, workspace, configs=CONFIGS[:1])
    (tmp_path / "report.html").unlink()
    done = subprocess.run([sys.executable, "-m", "apreqeld.cli.apreqel", "report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_report_without_study_fails_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "apreqeld.cli.apreqel", "report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"error: no study.json in {tmp_path}"]

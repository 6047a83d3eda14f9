"""The `apreqel` commands end to end on the real default model, and the options every one of
them checks before any work (run for real in a subprocess, as the user runs them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from apreqeld import workflow
from apreqeld.errors import PlanError
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import read_model
from support import (
    CALIBRATION_TOKENS,
    CLI_PROTOCOL_ARGS,
    PROTOCOL,
    THREADS,
    TINY_TYPES,
    BuiltPlan,
    CliRunner,
)
from test_cli import assert_one_line_error

CAL = ("--calibration-tokens", str(CALIBRATION_TOKENS))
CAVEAT = "note: the F16 reference is dequantized from Q4_1"


# --------------------------------------------------------------------------- cheap options first


@pytest.mark.parametrize(("option", "fragment"), [
    (("--estimator", "magic"), "unknown estimator 'magic'"),
    (("--accuracy", "bleu"), "unknown accuracy metric 'bleu'"),
    (("--types", "q4_0,q9_9"), "unknown quantization type 'q9_9'"),
    (("--outside-type", "q1"), "unknown quantization type 'q1'"),
    (("--gamma", "2"), "gamma 2.0 is outside [-1, 1]"),
    (("--max-size", "12 parsecs"), "size '12 parsecs' is not a size"),
    (("--calibration", "missing.txt"), "calibration file not found: missing.txt"),
    (("--chunks", "0"), "chunks must be at least 1"),
])
def test_plan_checks_every_option_before_measuring(run_cli: CliRunner, tmp_path: Path,
                                                   option: tuple[str, str], fragment: str) -> None:
    """A bad option fails in under 2 s with one line, and nothing is written to the workspace
    (before: `plan --estimator magic` measured for ~50 s and left 280 MB of cache)."""
    home = tmp_path / "home"
    started = time.time()
    result = run_cli("plan", *option, "--workdir", home, cwd=tmp_path, timeout=60)
    assert time.time() - started < 2
    assert_one_line_error(result, fragment)
    assert not home.exists()


@pytest.mark.parametrize("command", [("plan",), ("optimize", "-o", "x.gguf"), ("study",)])
def test_options_that_profile_replaces_are_an_error_with_profile(
        run_cli: CliRunner, tmp_path: Path, command: tuple[str, ...]) -> None:
    result = run_cli(*command, "--profile", "p.json", "--types", "q4_0", cwd=tmp_path)
    assert_one_line_error(result, "--types cannot be combined with --profile")


def test_protocol_options_with_profile_are_an_error_unless_models_are_measured(
        run_cli: CliRunner, tmp_path: Path) -> None:
    result = run_cli("plan", "--profile", "p.json", "--chunks", "2", cwd=tmp_path)
    assert_one_line_error(result, "--chunks cannot be combined with --profile")
    verified = run_cli("optimize", "-o", "x.gguf", "--verify", "--profile", "p.json",
                       "--chunks", "2", cwd=tmp_path)
    assert_one_line_error(verified, "device profile not found: p.json")  # accepted, then read


def test_plan_has_no_dry_run(run_cli: CliRunner, tmp_path: Path) -> None:
    result = run_cli("plan", "--dry-run", cwd=tmp_path)
    assert result.returncode != 0 and "No such option: --dry-run" in result.stderr


@pytest.mark.parametrize("command", ["demo", "study"])
def test_output_is_dash_o(run_cli: CliRunner, tmp_path: Path, command: str) -> None:
    result = run_cli(command, "--help", cwd=tmp_path)
    assert "-o" in result.stdout and "--output" in result.stdout and "--out " not in result.stdout


def test_demo_has_gpu_layers(run_cli: CliRunner, tmp_path: Path) -> None:
    assert "--gpu-layers" in run_cli("demo", "--help", cwd=tmp_path).stdout


# --------------------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def saved_plan(run_cli: CliRunner, device_profile: dict, layer_profile: dict,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plan saved by `apreqel plan -o` with the session's tiny protocol (cached evidence)."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    result = run_cli("plan", "--types", TINY_TYPES, *CLI_PROTOCOL_ARGS, *CAL, "-w", "1,0,1",
                     "-o", path)
    assert result.returncode == 0, result.stderr
    assert CAVEAT in result.stderr
    return path


@pytest.mark.integration
def test_plan_records_its_source_and_build_uses_it(run_cli: CliRunner, saved_plan: Path,
                                                   source_model: Path, tmp_path: Path) -> None:
    plan = json.loads(saved_plan.read_text())
    assert plan["model"]["path"] == str(source_model.resolve())
    moved = tmp_path / "moved.gguf"
    plan["model"]["path"] = str(moved)
    edited = tmp_path / "plan.json"
    edited.write_text(json.dumps(plan))
    missing = run_cli("build", "--plan", edited, "-o", tmp_path / "a.gguf", cwd=tmp_path)
    assert_one_line_error(missing, "model file not found: ", str(moved))
    moved.symlink_to(source_model)
    built = run_cli("build", "--plan", edited, "-o", tmp_path / "a.gguf", "--threads",
                    str(THREADS), cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert f"from plan {plan['plan_id']}" in built.stdout


@pytest.mark.integration
def test_gamma_is_honoured_by_plan_and_recorded(run_cli: CliRunner, saved_plan: Path) -> None:
    result = run_cli("plan", "--types", TINY_TYPES, *CLI_PROTOCOL_ARGS, *CAL, "-w", "1,0,1",
                     "--gamma", "0.5", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["evidence"]["layer_profile"]["gamma"] == 0.5
    assert json.loads(saved_plan.read_text())["evidence"]["layer_profile"]["gamma"] == 0.9


@pytest.mark.integration
def test_verify_refuses_a_file_built_from_another_plan(built_plan: BuiltPlan,
                                                       source_model: Path,
                                                       workspace: Workspace) -> None:
    other = dict(built_plan.plan, plan_id="0123456789ab")
    with pytest.raises(PlanError, match=r"was not built from plan 0123456789ab \(its plan: "):
        workflow.verify(built_plan.gguf, other, source=source_model, workspace=workspace,
                        protocol=Protocol(chunks=1, threads=THREADS))


def test_plan_options_reject_before_any_work() -> None:
    with pytest.raises(PlanError, match="unknown estimator 'magic'"):
        workflow.PlanOptions(protocol=PROTOCOL, estimator="magic")


# --------------------------------------------------------------------------- end to end


@pytest.mark.integration
def test_demo_end_to_end(run_cli: CliRunner, device_profile: dict, layer_profile: dict,
                         tmp_path: Path) -> None:
    result = run_cli("demo", "-o", tmp_path / "demo", "--types", TINY_TYPES,
                     *CLI_PROTOCOL_ARGS, *CAL, timeout=600)
    assert result.returncode == 0, result.stderr
    for name in ("memory-first", "latency-first", "accuracy-first"):
        assert name in result.stdout
        plan = json.loads((tmp_path / "demo" / f"{name}.plan.json").read_text())
        assert (tmp_path / "demo" / f"{name}.gguf").is_file()
        assert set(plan["allocation"].values()) <= {"q4_0", "q8_0"}
    assert CAVEAT in result.stderr


@pytest.mark.integration
def test_measure_end_to_end(run_cli: CliRunner, built_plan: BuiltPlan, source_model: Path) -> None:
    result = run_cli("measure", built_plan.gguf, "--reference", source_model,
                     *CLI_PROTOCOL_ARGS, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["memory_bytes"] == read_model(built_plan.gguf).parameter_bytes
    assert 0 < data["kld"] < 1 and 1 < data["ppl"] < 100 and data["latency_ms"] > 0
    assert data["protocol"]["chunks"] == 1
    assert CAVEAT in result.stderr


@pytest.mark.integration
def test_study_end_to_end(run_cli: CliRunner, device_profile: dict, layer_profile: dict,
                          tmp_path: Path) -> None:
    configs = tmp_path / "configs.txt"
    configs.write_text("0.9,0.05,0.05 Memory mem\n0.05,0.05,0.9 Accuracy acc\n")
    out = tmp_path / "study"
    result = run_cli("study", "-o", out, "--configs", configs, "--types", TINY_TYPES,
                     *CLI_PROTOCOL_ARGS, *CAL, "--no-interleave", "--allow-disturbed-latency",
                     timeout=600)
    assert result.returncode == 0, result.stderr
    study = json.loads((out / "study.json").read_text())
    assert [m["name"] for m in study["models"]] == ["mem", "acc"]
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert "reference point +10%" in result.stdout
    assert CAVEAT in result.stderr

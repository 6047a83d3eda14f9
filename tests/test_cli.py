"""The `apreqel` console script, run for real in a subprocess against the session workspace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apreqeld.evidence.reference import Reference
from support import CALIBRATION_TOKENS, CLI_PROTOCOL_ARGS, THREADS, BuiltPlan, CliResult, CliRunner

CAL = ("--calibration-tokens", str(CALIBRATION_TOKENS))


def assert_one_line_error(result: CliResult, *fragments: str) -> str:
    """Non-zero exit, one non-empty stderr line starting with 'error:', no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.error_lines) == 1, result.stderr
    line = result.error_lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


# --------------------------------------------------------------------------- bad model files


@pytest.fixture
def bad_models(tmp_path: Path, reference: Reference) -> dict[str, Path]:
    text = tmp_path / "notes.gguf"
    text.write_text("definitely not a model\n")
    truncated = tmp_path / "truncated.gguf"  # the first 3 MiB of the F16 reference
    with reference.path.open("rb") as f:
        truncated.write_bytes(f.read(3 * 2**20))
    return {"missing": tmp_path / "missing.gguf", "text": text, "truncated": truncated}


@pytest.mark.integration
@pytest.mark.parametrize(("kind", "message", "command"), [
    ("missing", "model file not found: ", ("inspect",)),
    ("missing", "model file not found: ", ("optimize", "-o", "OUT")),
    ("text", "not a GGUF file (bad magic): ", ("inspect",)),
    ("text", "not a GGUF file (bad magic): ", ("measure-types", "-o", "OUT")),
    ("truncated", "truncated GGUF file: ", ("optimize", "-o", "OUT")),
])
def test_bad_model_file(run_cli: CliRunner, bad_models: dict[str, Path], tmp_path: Path,
                        kind: str, message: str, command: tuple[str, ...]) -> None:
    out = tmp_path / "out.gguf"
    args = [out if a == "OUT" else a for a in command]
    result = run_cli(*args, bad_models[kind], cwd=tmp_path)
    assert_one_line_error(result, message, bad_models[kind].name)
    assert not out.exists()
    assert not list(tmp_path.glob("*.part"))


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(("weights", "fragment"), [
    ("1,2", "expected 3 weights (memory,latency,accuracy), got 2"),
    ("a,b,c", "weight 'a' is not a number"),
    ("0,0,0", "weights must not all be zero"),
    ("-1,1,1", "weight -1 is negative"),
    ("memory=1,speed=2", "unknown weight name 'speed'"),
])
def test_optimize_with_bad_weights(run_cli: CliRunner, tiny_model: Path, tmp_path: Path,
                                   weights: str, fragment: str) -> None:
    """Weights are checked before anything is measured or built (a tiny valid GGUF stands in
    for the model: the command must stop at the weights)."""
    out = tmp_path / "out.gguf"
    result = run_cli("optimize", tiny_model, "--weights", weights, "-o", out, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not out.exists()


@pytest.mark.integration
def test_bad_weights_with_the_default_model(run_cli: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    result = run_cli("plan", "-w", "memory=1,speed=2", "-o", out, cwd=tmp_path)
    assert_one_line_error(result, "unknown weight name 'speed'")
    assert not out.exists()


@pytest.mark.integration
def test_unknown_type_name(run_cli: CliRunner, reference: Reference, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    result = run_cli("measure-types", "--types", "q4_0,q9_9", *CLI_PROTOCOL_ARGS, "-o", out,
                     cwd=tmp_path)
    assert_one_line_error(result, "unknown quantization type 'q9_9'")
    assert not out.exists()


def test_empty_calibration_file(run_cli: CliRunner, tiny_model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    result = run_cli("profile", tiny_model, "--calibration", empty, "--json", cwd=tmp_path)
    assert_one_line_error(result, "calibration file is empty: ", "empty.txt")
    assert result.stdout == ""


# --------------------------------------------------------------------------- bad plan files


@pytest.mark.integration
@pytest.mark.parametrize(("kind", "fragment"), [
    ("not-json", "plan file is not valid JSON: "),
    ("not-a-plan", 'not an apreqel plan (missing "kind": "apreqel.plan")'),
    ("edited", "plan was edited: its recipe no longer matches its plan_id"),
    ("missing", "plan file not found: "),
])
def test_build_with_a_bad_plan(run_cli: CliRunner, built_plan: BuiltPlan, tmp_path: Path,
                               kind: str, fragment: str) -> None:
    plan_file = tmp_path / "plan.json"
    if kind == "not-json":
        plan_file.write_text("{this is not json")
    elif kind == "not-a-plan":
        plan_file.write_text(json.dumps({"kind": "apreqel.device-profile", "types": []}))
    elif kind == "edited":
        plan = json.loads(built_plan.plan_json.read_text())
        name = next(n for n, t in plan["tensor_types"].items() if t != "q8_0")
        plan["tensor_types"][name] = "q8_0"
        plan_file.write_text(json.dumps(plan))
    out = tmp_path / "out.gguf"
    result = run_cli("build", "--plan", plan_file, "-o", out, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        [] if kind == "missing" else ["plan.json"])


# --------------------------------------------------------------------------- happy paths


@pytest.mark.integration
def test_inspect_json(run_cli: CliRunner, source_model: Path) -> None:
    result = run_cli("inspect", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["n_sublayers"] == len(data["sublayers"]) == 60
    assert data["n_blocks"] == 30
    assert data["path"] == str(source_model)


@pytest.mark.integration
def test_profile_json(run_cli: CliRunner, layer_profile: dict) -> None:
    result = run_cli("profile", *CAL, "--threads", str(THREADS), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["sublayers"]) == 60
    assert data["token_range"] == [0, CALIBRATION_TOKENS]
    assert data["sublayers"] == layer_profile["sublayers"]


@pytest.fixture(scope="module")
def cli_device_profile(run_cli: CliRunner, device_profile: dict,
                       tmp_path_factory: pytest.TempPathFactory) -> tuple[CliResult, Path]:
    """`apreqel measure-types` with the session's tiny protocol: served from the cache."""
    out = tmp_path_factory.mktemp("cli") / "device-profile.json"
    result = run_cli("measure-types", "--types", "q4_0,q8_0", *CLI_PROTOCOL_ARGS, "-o", out)
    return result, out


@pytest.mark.integration
def test_measure_types_writes_a_device_profile(cli_device_profile: tuple[CliResult, Path],
                                               device_profile: dict) -> None:
    result, path = cli_device_profile
    assert result.returncode == 0, result.stderr
    assert f"device profile written to {path}" in result.stdout
    assert "F16 dequantized from Q4_1" in result.stdout
    data = json.loads(path.read_text())
    assert data["kind"] == "apreqel.device-profile"
    assert data["types"] == ["q8_0", "q4_0"]  # least to most aggressive
    assert data["reference"]["note"].startswith("F16 dequantized from Q4_1")
    assert data["protocol"]["chunks"] == 1 and data["protocol"]["n_gen"] == 4
    # the library's measurements of the same protocol were reused, not repeated
    for name in data["types"]:
        assert data["uniform"][name]["measured"] == device_profile["uniform"][name]["measured"]


@pytest.mark.integration
def test_plan_json_from_a_profile(run_cli: CliRunner, cli_device_profile: tuple[CliResult, Path],
                                  layer_profile: dict, tmp_path: Path) -> None:
    _, profile = cli_device_profile
    saved = tmp_path / "plan.json"
    # latency weighs here: timed on a busy machine it would be refused (tests/test_latency_
    # evidence.py pins that), which is not what this test is about
    result = run_cli("plan", "--weights", "0.2,0.6,0.2", "--profile", profile, *CAL,
                     "--threads", str(THREADS), "--json", "-o", saved,
                     "--allow-disturbed-latency")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["kind"] == "apreqel.plan"
    assert len(plan["allocation"]) == 60
    assert set(plan["allocation"].values()) <= {"q8_0", "q4_0"}
    assert plan["weights"] == pytest.approx({"memory": 0.2, "latency": 0.6, "accuracy": 0.2})
    assert json.loads(saved.read_text()) == plan
    assert not list(tmp_path.glob("*.gguf"))  # plan never builds


@pytest.mark.integration
def test_optimize_and_verify(run_cli: CliRunner, cli_device_profile: tuple[CliResult, Path],
                             device_profile: dict, tmp_path: Path) -> None:
    _, profile = cli_device_profile
    out = tmp_path / "small.gguf"
    result = run_cli("optimize", "--profile", profile, "-w", "memory=1", "-o", out, "--verify",
                     *CAL, *CLI_PROTOCOL_ARGS, timeout=420)
    assert result.returncode == 0, result.stderr
    assert "predicted vs measured" in result.stdout
    assert "distribution: q4_0×60" in result.stdout
    assert out.is_file()
    assert (tmp_path / "small.plan.json").is_file()
    assert (tmp_path / "small.tensor-types.txt").is_file()
    # all sublayers q4_0: the same tensors as the measured uniform q4_0 model
    assert f"({device_profile['uniform']['q4_0']['measured']['memory_bytes'] / 2**20:.1f} MiB)" \
        in result.stdout

"""The product's jobs as library functions: profile, measure, plan, build, verify, demo.

Each CLI command calls one of these; they tie the pure core to the engine and the work
directory's caches, and report progress through a callback.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from apreqeld import engine
from apreqeld.build import build_gguf
from apreqeld.core.contribution import DEFAULT_GAMMA
from apreqeld.core.plans import (
    DISTURBED_POLICIES,
    canonical_sha256,
    check_choices,
    make_plan,
    validate_plan,
)
from apreqeld.core.qtypes import parse_types, qtype
from apreqeld.errors import InputError, PlanError
from apreqeld.evidence.measurement import measure_file, measure_types
from apreqeld.evidence.profiling import profile_layers, read_calibration
from apreqeld.evidence.protocol import Progress, Protocol, no_progress
from apreqeld.evidence.reference import ensure_reference, reference_caveat, reference_file
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import read_model
from apreqeld.resources import evaluation_text
from apreqeld.storage import write_json_atomic


def layer_profile(source: Path, /, *, workspace: Workspace, calibration: str | Path | None = None,
                  n_tokens: int = 2048, gamma: float = 0.9, threads: int | None = None,
                  progress: Progress = no_progress) -> dict:
    """Contribution scores of every sublayer, computed on the F16 reference and cached."""
    _check_profiling(n_tokens, gamma)
    text, text_name = read_calibration(calibration)
    sha = workspace.sha256(source)
    key = canonical_sha256([sha, hashlib.sha256(text.encode()).hexdigest(), n_tokens, gamma,
                            engine.engine_version()])[:16]
    path = workspace.model_dir(sha) / f"layers-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    ref = reference_file(source, workspace=workspace, progress=progress)
    result = profile_layers(
        read_model(ref), text, text_name=text_name, n_tokens=n_tokens, gamma=gamma,
        threads=threads, progress=lambda done, total: progress("profiling layers", done / total),
    ).to_dict() | {"model_sha256": sha, "profiled_on": "F16 reference"}
    write_json_atomic(path, result)
    return result


def _check_profiling(n_tokens: int, gamma: float) -> None:
    if n_tokens < 2:
        raise InputError(f"calibration tokens must be at least 2, got {n_tokens}")
    if not -1.0 <= gamma <= 1.0:
        raise InputError(f"gamma {gamma} is outside [-1, 1]")


@dataclass(frozen=True)
class PlanOptions:
    """Everything a plan depends on besides the model and the weights (plan, optimize, study,
    demo); checked when made, so that a bad option fails before anything is measured."""

    protocol: Protocol = field(default_factory=Protocol)
    types: str | None = None
    outside: str = "q8_0"
    profile_path: Path | None = None
    estimator: str = "proportional"
    accuracy: str = "ppl"
    calibration: Path | None = None
    calibration_tokens: int = 2048
    gamma: float = DEFAULT_GAMMA
    limits: Mapping[str, float] = field(default_factory=dict)
    disturbed_latency: str = "refuse"  # or "flag": plan anyway, the plan records the quality

    def __post_init__(self) -> None:
        check_choices(estimator=self.estimator, accuracy=self.accuracy, limits=self.limits)
        if self.disturbed_latency not in DISTURBED_POLICIES:
            raise InputError(f"unknown disturbed-latency policy '{self.disturbed_latency}' "
                             f"(choose {', '.join(DISTURBED_POLICIES)})")
        if self.types is not None and self.types.strip().lower() != "auto":
            parse_types(self.types)
        qtype(self.outside)
        _check_profiling(self.calibration_tokens, self.gamma)
        if self.calibration is not None:
            read_calibration(self.calibration)
        if self.profile_path is not None:
            load_device_profile(self.profile_path)


def _read_json(path: str | Path, what: str) -> object:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except ValueError as exc:
        raise InputError(f"{what} is not valid JSON: {p} ({exc})") from None


def load_device_profile(path: str | Path) -> dict:
    """Read a device profile JSON written by `apreqel measure-types` (here or on a device)."""
    data = _read_json(path, "device profile")
    if not isinstance(data, dict) or data.get("kind") != "apreqel.device-profile":
        raise InputError(f"not an apreqel device profile: {path}")
    return data


def load_plan(path: str | Path) -> dict:
    """Read and validate a plan JSON (beside a built GGUF, or from `plan -o`)."""
    return validate_plan(_read_json(path, "plan file"))


def device_profile(source: Path, /, *, workspace: Workspace, protocol: Protocol,
                   types: str | None = None, outside: str = "q8_0",
                   profile_path: str | Path | None = None,
                   progress: Progress = no_progress, remeasure: Sequence[str] = ()) -> dict:
    """A given device profile, or one measured here (cached: a second call measures nothing
    but latencies that were disturbed; `remeasure=("latency",)` re-times every one)."""
    if profile_path is not None:
        return load_device_profile(profile_path)
    return measure_types(source, types=types, outside=outside, protocol=protocol,
                         workspace=workspace, progress=progress, remeasure=remeasure)


def evidence(source: Path, /, *, workspace: Workspace, options: PlanOptions,
             progress: Progress = no_progress) -> tuple[dict, dict]:
    """The device profile and the layer profile a plan of `source` is made from."""
    dev = device_profile(source, workspace=workspace, protocol=options.protocol,
                         types=options.types, outside=options.outside,
                         profile_path=options.profile_path, progress=progress)
    layers = layer_profile(source, workspace=workspace, calibration=options.calibration,
                           n_tokens=options.calibration_tokens, gamma=options.gamma,
                           threads=options.protocol.threads, progress=progress)
    return dev, layers


def plan(source: Path, weights: Sequence[float], /, *, workspace: Workspace,
         options: PlanOptions, progress: Progress = no_progress) -> dict:
    """The plan for `weights`: device profile + layer profile + TOPSIS + Algorithm 1; it names
    its source model (path and sha256), so `build --plan` needs no model argument."""
    view = read_model(source)
    dev, layers = evidence(source, workspace=workspace, options=options, progress=progress)
    result = make_plan(view, workspace.sha256(source), dev, layers, weights,
                       estimator=options.estimator, accuracy=options.accuracy,
                       limits=options.limits, disturbed=options.disturbed_latency)
    result["model"]["path"] = str(Path(source).resolve())
    return result


def plan_source(plan_data: Mapping, model: Path | None = None) -> Path | None:
    """The model a plan is built from: `model` when given, else the path the plan records
    (None, the default model, for a plan that records none; `build` checks the sha256)."""
    if model is not None:
        return model
    recorded = plan_data["model"].get("path")
    return None if recorded is None else Path(recorded)


def build(plan_data: dict, out: Path, /, *, source: Path, workspace: Workspace,
          threads: int = 0, progress: Callable[[str], None] = lambda _s: None) -> Path:
    """Build a plan from `source`'s F16 reference; refuses a plan made for another model."""
    validate_plan(plan_data)
    sha = workspace.sha256(source)
    if plan_data["model"]["sha256"] != sha:
        raise InputError(f"the plan was made for another model (sha256 "
                         f"{plan_data['model']['sha256'][:12]}…, {source} is {sha[:12]}…)")
    ref = reference_file(source, workspace=workspace)
    return build_gguf(plan_data, ref, out, threads=threads, progress=progress)


def verify(built: Path, plan_data: dict, /, *, source: Path, workspace: Workspace,
           protocol: Protocol, progress: Progress = no_progress) -> dict:
    """Measure a built model with the same protocol as the uniform types; refuses a file that
    was not built from `plan_data` (checked before anything is measured)."""
    built_id = read_model(built).plan_id
    if built_id != plan_data["plan_id"]:
        raise PlanError(f"{built} was not built from plan {plan_data['plan_id']} "
                        f"(its plan: {built_id or 'none'})")
    reference = ensure_reference(source, workspace=workspace, protocol=protocol,
                                 progress=progress)
    return measure_file(built, protocol=protocol, reference=reference, progress=progress)


def accuracy_caveat(source: Path, /) -> str | None:
    """The note every accuracy report of `source` carries when its reference is dequantized."""
    return reference_caveat(read_model(source))


def measure_one(path: Path, /, *, workspace: Workspace, protocol: Protocol,
                reference_model: Path | None = None, progress: Progress = no_progress) -> dict:
    """Measure any GGUF; KL divergence needs the model whose F16 reference it is judged by."""
    read_model(path)
    reference = None
    tokens = None
    if reference_model is not None:
        reference = ensure_reference(reference_model, workspace=workspace, protocol=protocol,
                                     progress=progress)
    else:
        with engine.open_session(path, n_ctx=protocol.n_ctx, threads=protocol.threads) as s:
            tokens = s.tokenize(evaluation_text())
    result = measure_file(path, protocol=protocol, reference=reference, tokens=tokens,
                          progress=progress)
    return {"model": str(path), "protocol": asdict(protocol),
            "reference": str(reference_model) if reference_model else None} | result


DEMO_WEIGHTS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("memory-first", (0.8, 0.1, 0.1)),
    ("latency-first", (0.1, 0.8, 0.1)),
    ("accuracy-first", (0.1, 0.1, 0.8)),
)

"""The product's jobs as library functions: profile, measure, plan, build, verify, demo.

Each CLI command calls one of these; they tie the pure core to the engine and the work
directory's caches, and report progress through a callback.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from apreqeld import engine
from apreqeld.build import build_gguf
from apreqeld.core.plans import make_plan, validate_plan
from apreqeld.errors import InputError
from apreqeld.evidence.measurement import measure_file, measure_types
from apreqeld.evidence.profiling import profile_layers, read_calibration
from apreqeld.evidence.protocol import Progress, Protocol, no_progress
from apreqeld.evidence.reference import ensure_reference, reference_file
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import read_model
from apreqeld.resources import evaluation_text
from apreqeld.storage import write_json_atomic


def layer_profile(source: Path, /, *, workspace: Workspace, calibration: str | None = None,
                  n_tokens: int = 2048, gamma: float = 0.9, threads: int | None = None,
                  progress: Progress = no_progress) -> dict:
    """Contribution scores of every sublayer, computed on the F16 reference and cached."""
    if n_tokens < 2:
        raise InputError(f"calibration tokens must be at least 2, got {n_tokens}")
    if not -1.0 <= gamma <= 1.0:
        raise InputError(f"gamma {gamma} is outside [-1, 1]")
    text, text_name = read_calibration(calibration)
    sha = workspace.sha256(source)
    key = hashlib.sha256(json.dumps([sha, hashlib.sha256(text.encode()).hexdigest(), n_tokens,
                                     gamma, engine.engine_version()]).encode()).hexdigest()[:16]
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
                   progress: Progress = no_progress) -> dict:
    """A given device profile, or one measured here (cached: a second call measures nothing)."""
    if profile_path is not None:
        return load_device_profile(profile_path)
    return measure_types(source, types=types, outside=outside, protocol=protocol,
                         workspace=workspace, progress=progress)


def plan(source: Path, weights: Sequence[float], /, *, workspace: Workspace,
         protocol: Protocol, types: str | None = None, outside: str = "q8_0",
         profile_path: str | Path | None = None, estimator: str = "proportional",
         accuracy: str = "ppl", calibration: str | None = None, calibration_tokens: int = 2048,
         limits: dict[str, float] | None = None, progress: Progress = no_progress) -> dict:
    """The plan for `weights`: device profile + layer profile + TOPSIS + Algorithm 1."""
    view = read_model(source)
    dev = device_profile(source, workspace=workspace, protocol=protocol, types=types,
                         outside=outside, profile_path=profile_path, progress=progress)
    layers = layer_profile(source, workspace=workspace, calibration=calibration,
                           n_tokens=calibration_tokens, threads=protocol.threads,
                           progress=progress)
    return make_plan(view, workspace.sha256(source), dev, layers, weights,
                     estimator=estimator, accuracy=accuracy, limits=limits)


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
    """Measure a built model with the same protocol as the uniform types."""
    reference = ensure_reference(source, workspace=workspace, protocol=protocol,
                                 progress=progress)
    return measure_file(built, protocol=protocol, reference=reference, progress=progress)


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

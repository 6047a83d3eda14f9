"""The plan-set manifest: the measured Pareto set of one model's variants, as versioned,
validated plain data (`plans/NAME/planset.json`).

The offline side (`apreqeld.planset`) writes it; the daemon (`apreqeld.runtime`) reads it and
never trusts it unvalidated. GGUFs are not part of it: each member is rebuilt byte for byte
from its recipe into a state directory and checked against `file_sha256`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apreqeld.errors import InputError
from apreqeld.storage import write_json_atomic

KIND = "apreqeld.planset"
FORMAT = 1
MANIFEST_NAME = "planset.json"
_HEX = re.compile(r"^[0-9a-f]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencyStats(_Strict):
    """ms per generated token over interleaved rounds: robust (median, IQR) and classic."""

    median_ms: float = Field(gt=0)
    iqr_ms: float = Field(ge=0)
    mean_ms: float = Field(gt=0)
    std_ms: float = Field(ge=0)
    n: int = Field(ge=1, description="samples (rounds) behind the figures")
    disturbed: bool = Field(default=False, description="other processes took the rounds' "
                            "cores, or the rounds spread too much (core.disturbance)")
    stolen: float | None = Field(default=None, ge=0, description="share of the rounds' cores "
                                 "other processes took (None: unknown)")
    reason: str | None = Field(default=None, description="why the rounds are disturbed")


class Metrics(_Strict):
    """What was measured of one member on this device."""

    parameter_bytes: int = Field(gt=0)
    footprint_bytes: int = Field(gt=0, description="resident memory of a serving process")
    latency: LatencyStats
    ppl: float = Field(gt=0)
    ppl_se: float = Field(ge=0)
    kld: float = Field(ge=0)
    kld_se: float = Field(ge=0)
    top1: float | None = Field(default=None, ge=0, le=1)


class Member(_Strict):
    """One variant: how to build it, what it is, and how it measured."""

    id: str = Field(min_length=8, max_length=64)
    kind: Literal["mix", "uniform", "preset"]
    label: str
    base_type: str = Field(description="type of tensors the recipe does not name")
    recipe: dict[str, str] = Field(description="tensor name -> type (for a preset: the types "
                                   "llama.cpp's own mixing gave it, replayed to rebuild it)")
    ftype: str | None = Field(default=None, description="llama.cpp preset (file type) this "
                              "member is, e.g. Q4_K_M")
    file_sha256: str = Field(min_length=64, max_length=64)
    file_bytes: int = Field(gt=0)
    weights: list[tuple[float, float, float]] = Field(default_factory=list)
    predicted: dict[str, float] | None = None
    measured: Metrics
    conditions: dict[str, LatencyStats] = Field(default_factory=dict)
    pareto: bool
    dominated_by: list[str] = Field(default_factory=list)

    @field_validator("id", "file_sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _HEX.match(value):
            raise ValueError("must be lower-case hexadecimal")
        return value


class ModelInfo(_Strict):
    name: str
    sha256: str = Field(min_length=64, max_length=64)
    path: str
    architecture: str


class Serving(_Strict):
    """The context a member was measured with when loaded for serving."""

    n_ctx: int = Field(ge=8)
    threads: int = Field(ge=1)
    gpu_layers: int = Field(ge=0)
    n_batch: int | None = Field(default=None, ge=1, description="batch (and micro-batch)")
    baseline_rss_bytes: int | None = Field(
        default=None, ge=0, description="RSS of the measuring process before loading a model; "
        "a member's footprint_bytes is what loading it added")


class PresetComparison(_Strict):
    """A llama.cpp preset against the plan set's own members (mixes and uniform types)."""

    name: str = Field(description="llama.cpp preset, e.g. Q4_K_M")
    ftype: int = Field(ge=0, description="its llama_ftype id")
    member: str = Field(description="id of the member whose file is this preset")
    dominated_by: list[str] = Field(default_factory=list, description="own members no worse "
                                    "in every objective and better in one")
    closest: str | None = Field(default=None, description="the own member nearest to "
                                "dominating it (smallest worst relative excess)")
    miss: dict[str, float] = Field(default_factory=dict, description="objective -> relative "
                                   "excess of `closest` over the preset (> 0: worse by that "
                                   "share; all <= 0 when it dominates)")


class PlanSet(_Strict):
    kind: Literal["apreqeld.planset"] = KIND
    format: Literal[1] = FORMAT
    name: str = Field(min_length=1)
    created: str
    model: ModelInfo
    engine: str = Field(description="llama.cpp build (llama-cpp-python version)")
    device: dict
    protocol: dict
    serving: Serving
    accuracy: Literal["kld", "ppl"] = "kld"
    objectives: tuple[str, str, str] = ("footprint_bytes", "latency_ms", "kld")
    members: list[Member] = Field(min_length=1)
    presets: list[PresetComparison] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    @field_validator("members")
    @classmethod
    def _unique_ids(cls, members: list[Member]) -> list[Member]:
        seen: set[str] = set()
        for m in members:
            if m.id in seen:
                raise ValueError(f"member id {m.id} appears twice")
            seen.add(m.id)
        return members

    @model_validator(mode="after")
    def _presets_name_members(self) -> PlanSet:
        ids = {m.id for m in self.members}
        for p in self.presets:
            for ref in (p.member, *p.dominated_by, *([p.closest] if p.closest else [])):
                if ref not in ids:
                    raise ValueError(f"preset {p.name} names member {ref}, which is not one")
        return self

    def member(self, member_id: str) -> Member:
        """The member with this id (a prefix of at least 4 characters is enough)."""
        found = [m for m in self.members if m.id == member_id or
                 (len(member_id) >= 4 and m.id.startswith(member_id))]
        if len(found) != 1:
            known = ", ".join(m.id for m in self.members)
            raise InputError(f"no single plan-set member '{member_id}' (members: {known})")
        return found[0]

    @property
    def pareto_members(self) -> list[Member]:
        return [m for m in self.members if m.pareto]


def one_line(error: ValidationError, /) -> str:
    """The first problem of a pydantic validation error, naming the field."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


def parse_planset(data: object, /, *, source: str = "plan set") -> PlanSet:
    """Validate loaded JSON as a plan set; one-line InputError naming the bad field."""
    try:
        return PlanSet.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"{source} is invalid: {one_line(exc)}") from None


def manifest_path(folder_or_file: str | Path, /) -> Path:
    """`plans/NAME` or `plans/NAME/planset.json` -> the manifest file."""
    p = Path(folder_or_file)
    return p if p.suffix == ".json" else p / MANIFEST_NAME


def load_planset(folder_or_file: str | Path, /) -> PlanSet:
    """Read and validate a plan-set manifest."""
    path = manifest_path(folder_or_file)
    if not path.is_file():
        raise InputError(f"no plan set at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None
    return parse_planset(data, source=str(path))


def save_planset(planset: PlanSet, folder: str | Path, /) -> Path:
    """Write the manifest atomically (temp file, then rename)."""
    return write_json_atomic(manifest_path(folder), planset.model_dump(mode="json"))


def member_filename(planset: PlanSet, member: Member, /) -> str:
    """Where a member's GGUF lives inside a state directory."""
    return f"{planset.model.sha256[:12]}-{member.id}.gguf"

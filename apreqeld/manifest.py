"""The plan-set manifest: the measured Pareto set of one model's variants, as versioned,
validated plain data (`plans/NAME/planset.json`).

The offline side (`apreqeld.planset`) writes it; the daemon (`apreqeld.runtime`) reads it and
never trusts it unvalidated. GGUFs are not part of it: each member is assembled from the shard
store (apreqeld.store) by its shards' sha256s, listed in the manifest's shard table; the
member's `assembly_sha256` is the sha256 of that list, its identity.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apreqeld.errors import InputError
from apreqeld.storage import write_json_atomic

KIND = "apreqeld.planset"
FORMAT = 2  # 2: members are assembled from a shard table (1: built from recipes, read only)
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
    kind: Literal["mix", "uniform", "preset", "composed"] = Field(
        description="composed: made by the daemon between the members, never in a manifest")
    label: str
    base_type: str = Field(description="type of tensors the recipe does not name")
    recipe: dict[str, str] = Field(description="tensor name -> type (for a preset: the types "
                                   "llama.cpp's own mixing gave it, replayed to rebuild it)")
    ftype: str | None = Field(default=None, description="llama.cpp preset (file type) this "
                              "member is, e.g. Q4_K_M")
    assembly_sha256: str | None = Field(default=None, min_length=64, max_length=64,
                                        description="sha256 of the member's shard sha256s "
                                        "(the store's Assembly.identity): its identity")
    file_sha256: str | None = Field(default=None, min_length=64, max_length=64,
                                    description="sha256 of the member exported as one GGUF "
                                    "(apreqel planset export), where known")
    file_bytes: int | None = Field(default=None, gt=0)
    weights: list[tuple[float, float, float]] = Field(default_factory=list)
    predicted: dict[str, float] | None = None
    measured: Metrics
    conditions: dict[str, LatencyStats] = Field(default_factory=dict)
    pareto: bool
    dominated_by: list[str] = Field(default_factory=list)

    @field_validator("id", "file_sha256", "assembly_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not _HEX.match(value):
            raise ValueError("must be lower-case hexadecimal")
        return value


class ShardTable(_Strict):
    """The shards a plan set's members are assembled from: split 0 is the metadata of the
    member's base type, split k the k-th tensor of `tensors` (the source's order) at the type
    the member's recipe asks (tensors no recipe names, such as norms, as the reference stores
    them). Types are as asked: a type llama.cpp falls back from names the fallback's shard."""

    engine: str = Field(description="llama.cpp build the shards were quantized with")
    tensors: list[str] = Field(min_length=1)
    metadata: dict[str, str] = Field(description="base type -> sha256 of the metadata split")
    fixed: dict[str, str] = Field(description="tensor no recipe names -> sha256")
    shards: dict[str, dict[str, str]] = Field(description="tensor -> type -> sha256")

    @model_validator(mode="after")
    def _complete(self) -> ShardTable:
        listed = set(self.tensors)
        if len(listed) != len(self.tensors):
            raise ValueError("a tensor is listed twice")
        for name in (*self.fixed, *self.shards):
            if name not in listed:
                raise ValueError(f"shard of {name}, which is not in tensors")
        for sha in [*self.metadata.values(), *self.fixed.values(),
                    *(s for by in self.shards.values() for s in by.values())]:
            if len(sha) != 64 or not _HEX.match(sha):
                raise ValueError(f"'{sha[:70]}' is not a sha256")
        return self


def assembly_of(table: ShardTable, recipe: dict[str, str], base_type: str, /) -> list[str]:
    """A member's shards in split order; ValueError naming what the table lacks."""
    if base_type not in table.metadata:
        raise ValueError(f"no metadata split for base type {base_type}")
    found = [table.metadata[base_type]]
    for name in table.tensors:
        if name in table.fixed:
            found.append(table.fixed[name])
            continue
        wanted = recipe.get(name)
        sha = table.shards.get(name, {}).get(wanted) if wanted else None
        if sha is None:
            raise ValueError(f"no shard of {name} as {wanted or 'nothing'}")
        found.append(sha)
    return found


def assembly_sha256(shards: list[str], /) -> str:
    """The identity of a model made of these shards (their sha256s, one per line)."""
    return hashlib.sha256("\n".join(shards).encode()).hexdigest()


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
    reason: str | None = Field(default=None, description="why no own member dominates it: "
                               "the aiming loop's verdict (shown unbeatable by the predictor, "
                               "or still open when the loop stopped)")


class PlanSet(_Strict):
    kind: Literal["apreqeld.planset"] = KIND
    format: Literal[1, 2] = FORMAT
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
    store: ShardTable | None = Field(default=None, description="the shards every member is "
                                     "assembled from (format 2)")

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
    def _no_composed(self) -> PlanSet:
        composed = [m.id for m in self.members if m.kind == "composed"]
        if composed:
            raise ValueError(f"member {composed[0]} is composed: composed members live in the "
                             "daemon's state dir, never in a plan set")
        return self

    @model_validator(mode="after")
    def _presets_name_members(self) -> PlanSet:
        ids = {m.id for m in self.members}
        for p in self.presets:
            for ref in (p.member, *p.dominated_by, *([p.closest] if p.closest else [])):
                if ref not in ids:
                    raise ValueError(f"preset {p.name} names member {ref}, which is not one")
        return self

    @model_validator(mode="after")
    def _members_assemble(self) -> PlanSet:
        if self.format == 1:
            return self
        if self.store is None:
            raise ValueError("a format-2 plan set needs its shard table (store)")
        for m in self.members:
            try:
                shards = assembly_of(self.store, m.recipe, m.base_type)
            except ValueError as exc:
                raise ValueError(f"member {m.id} cannot be assembled: {exc}") from None
            if m.assembly_sha256 != assembly_sha256(shards):
                raise ValueError(f"member {m.id}: assembly_sha256 is not that of its shards")
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


def member_shards(planset: PlanSet, member: Member, /) -> list[str]:
    """The member's shards in split order (from the plan set's shard table)."""
    if planset.store is None:
        raise InputError(f"plan set {planset.name} has no shard table (format 1): upgrade it "
                         "with `apreqel planset upgrade`")
    return assembly_of(planset.store, member.recipe, member.base_type)

"""Build a plan into a GGUF: one llama.cpp quantization of the F16 reference, checked tensor by
tensor against the plan, with the plan stored in the file's metadata, then moved into place."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import gguf

from apreqeld import engine
from apreqeld.core.plans import recipe_text, reproduce_command, validate_plan
from apreqeld.core.recipes import type_mismatches
from apreqeld.errors import PlanError
from apreqeld.gguf.split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, split_files
from apreqeld.gguf.view import read_model
from apreqeld.storage import atomic_path, write_json_atomic

PLAN_KEY = "apreqel.plan"
PLAN_ID_KEY = "apreqel.plan_id"


def companion_paths(out: Path) -> tuple[Path, Path]:
    """Where the plan JSON and the llama-quantize recipe go beside a built GGUF."""
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return out.with_name(f"{stem}.plan.json"), out.with_name(f"{stem}.tensor-types.txt")


def build_gguf(plan: Mapping, reference: Path, out: Path, /, *, threads: int = 0,
               progress: Callable[[str], None] = lambda _s: None) -> Path:
    """Quantize `reference` (the F16 model) with the plan's recipe into `out`, atomically."""
    validate_plan(plan)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise PlanError(f"output path is a directory: {out}")
    with atomic_path(out, suffix=".gguf") as final_tmp:
        raw = final_tmp.with_name(final_tmp.name + ".raw.gguf")
        try:
            progress("quantizing with llama.cpp")
            engine.quantize(reference, raw, tensor_types=plan["tensor_types"],
                            base=plan["outside_type"], threads=threads)
            progress("checking tensor types")
            problems = type_mismatches(plan["expected_types"], read_model(raw).tensor_types())
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise PlanError(f"the built file does not match the plan: {problems[0]}{more}")
            progress("writing metadata")
            _copy_with_metadata(raw, final_tmp, {PLAN_KEY: embedded_plan(plan),
                                                 PLAN_ID_KEY: plan["plan_id"]})
        finally:
            raw.unlink(missing_ok=True)
    plan_path, recipe_path = companion_paths(out)
    saved = dict(plan) | {"reproduce": reproduce_command(plan, recipe_path.name)}
    write_json_atomic(plan_path, saved)
    with atomic_path(recipe_path) as tmp:
        tmp.write_text(recipe_text(plan))
    return out


def embedded_plan(plan: Mapping) -> str:
    """The plan as stored in GGUF metadata: canonical JSON, so a replay is byte-identical."""
    core = {k: v for k, v in plan.items() if k not in ("reproduce",)}
    return json.dumps(core, sort_keys=True, separators=(",", ":"))


def read_embedded_plan(path: Path) -> dict | None:
    """The plan stored in a GGUF built by apreqel, or None."""
    field = gguf.GGUFReader(path).fields.get(PLAN_KEY)
    return None if field is None else json.loads(field.contents())


def _copy_with_metadata(src: Path, dst: Path, extra: Mapping[str, str]) -> None:
    """Rewrite a GGUF with extra string metadata (gguf-py's own reader and writer)."""
    reader = gguf.GGUFReader(src)
    _write_gguf(dst, reader, reader.tensors, extra)


def export_gguf(model: Path, plan: Mapping, out: Path, /) -> Path:
    """A model assembled from the shard store (its first split) written as one ordinary GGUF,
    byte for byte what `build_gguf` writes for the same plan, atomically."""
    validate_plan(plan)
    files = split_files(model)
    problems = type_mismatches(plan["expected_types"], read_model(model).tensor_types())
    if problems:
        raise PlanError(f"{model.name} is not the plan's model: {problems[0]}")
    meta = gguf.GGUFReader(files[0])
    tensors = [t for f in files[1:] for t in gguf.GGUFReader(f).tensors]
    with atomic_path(out, suffix=".gguf") as tmp:
        _write_gguf(tmp, meta, tensors, {PLAN_KEY: embedded_plan(plan),
                                         PLAN_ID_KEY: plan["plan_id"]},
                    skip=(SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS))
    return Path(out)


def _write_gguf(dst: Path, meta: gguf.GGUFReader, tensors: Sequence, extra: Mapping[str, str],
                *, skip: Sequence[str] = ()) -> None:
    """`meta`'s metadata (less `skip`, then `extra`) and `tensors` as one GGUF file."""
    arch = meta.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=meta.endianess)
    alignment = meta.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for field in meta.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name in extra or field.name in skip:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for key, value in extra.items():
        writer.add_string(key, value)
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype,
                               tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=meta.endianess)
    writer.close()

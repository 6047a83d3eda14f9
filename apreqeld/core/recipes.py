"""Recipes: the plain-data form of a quantized model, a dict from tensor name to type name.

A recipe can be saved, diffed, replayed, and exported for stock `llama-quantize`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from apreqeld.core.qtypes import QType, qtype
from apreqeld.errors import InputError, PlanError


class ModelShape(Protocol):
    """What planning needs of a model view (apreqeld.gguf.view.ModelView has it): tensors with
    name, type and quantizability, grouped into sublayers, and those outside them."""

    tensors: Sequence[Any]
    sublayers: Sequence[Any]
    outside: Sequence[Any]


def tensor_recipe(view: ModelShape, sublayer_types: Sequence[QType], /, *,
                  outside: QType) -> dict[str, str]:
    """Requested type of every quantizable tensor: its sublayer's type, or `outside` for the
    token embedding, output and anything else outside the sublayers."""
    if len(sublayer_types) != len(view.sublayers):
        raise PlanError(f"{len(sublayer_types)} types for {len(view.sublayers)} sublayers")
    recipe = {t.name: q.name for s, q in zip(view.sublayers, sublayer_types, strict=True)
              for t in s.tensors if t.quantizable}
    recipe |= {t.name: outside.name for t in view.outside if t.quantizable}
    return recipe


def expected_types(view: ModelShape, recipe: Mapping[str, str], /) -> dict[str, str]:
    """The type every tensor will really have once llama.cpp applies its shape fallbacks."""
    missing = [t.name for t in view.tensors if t.quantizable and t.name not in recipe]
    if missing:
        raise PlanError(f"the recipe gives no type to {missing[0]}")
    return {t.name: t.type_as(qtype(recipe[t.name])).name if t.quantizable else t.qtype.name
            for t in view.tensors}


def type_mismatches(expected: Mapping[str, str], actual: Mapping[str, str], /) -> list[str]:
    """Human-readable differences between the planned and the written tensor types."""
    problems = [f"{n}: planned {expected[n]}, file has {actual.get(n, 'nothing')}"
                for n in expected if expected[n].lower() != str(actual.get(n, "")).lower()]
    problems += [f"{n}: not planned" for n in actual if n not in expected]
    return problems


def llama_quantize_recipe(recipe: Mapping[str, str], /) -> str:
    """The recipe as a `llama-quantize --tensor-type-file` file: one `pattern=type` per line.

    Patterns are anchored, escaped regexes (llama.cpp lower-cases names and matches with
    std::regex_search), so each line names exactly one tensor.
    """
    return "".join(f"^{re.escape(name).lower()}$={qtype_name}\n"
                   for name, qtype_name in sorted(recipe.items()))


def recipe_prediction(view: ModelShape, recipe: Mapping[str, str],
                      uniform: Mapping[str, Mapping[str, float]], /) -> dict[str, float]:
    """Predicted metrics of any per-tensor recipe: memory exactly (the bytes each tensor really
    gets), the rest by the paper's proportional estimate taken per tensor: each sublayer counts
    1/L, split over its tensors by their share of its weights, each at its type's uniform
    figure. For a recipe with one type per sublayer this is the paper's formula."""
    memory = sum(t.bytes_as(qtype(recipe[t.name])) if t.quantizable else t.n_bytes
                 for t in view.tensors)
    predicted = {"memory_bytes": float(memory)}
    metrics = {k for m in uniform.values() for k in m} - {"memory_bytes"}
    for metric in sorted(metrics):
        total = 0.0
        for s in view.sublayers:
            weights = [t for t in s.tensors if t.quantizable]
            n = sum(t.n_elements for t in weights)
            total += sum(t.n_elements / n * float(uniform[recipe[t.name]][metric])
                         for t in weights) / len(view.sublayers)
        predicted[metric] = total
    return predicted


def parse_tensor_type_file(text: str, tensors: Sequence[str], /, *, name: str = "recipe"
                           ) -> dict[str, str]:
    """The types a `llama-quantize --tensor-type-file` text gives `tensors`: one `pattern=type`
    per line (blank lines and `#` comments skipped), the pattern lower-cased and searched in
    the tensor name, the first matching line winning, as llama.cpp does; tensors no line
    matches are left out (they get the base type)."""
    rules: list[tuple[re.Pattern[str], str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, type_name = line.rpartition("=")
        if not sep or not pattern or not type_name:
            raise InputError(f"{name}:{number}: expected PATTERN=TYPE, got '{line}'")
        try:
            rules.append((re.compile(pattern.lower()), qtype(type_name).name))
        except re.error as exc:
            raise InputError(f"{name}:{number}: bad pattern '{pattern}' ({exc})") from None
        except InputError as exc:
            raise InputError(f"{name}:{number}: {exc}") from None
    if not rules:
        raise InputError(f"{name}: no PATTERN=TYPE line")
    found = {}
    for tensor in tensors:
        for pattern, type_name in rules:
            if pattern.search(tensor):
                found[tensor] = type_name
                break
    return found

"""An additive model of a per-tensor recipe's metrics, with measured sublayer sensitivity.

The paper's proportional estimate counts every sublayer alike (1/L). Here each tensor has a
weight: for accuracy, its sublayer's measured sensitivity (the KL divergence a probe adds when
only that sublayer is quantized to an aggressive type) split over its tensors by size; for
latency and the memory a loaded model adds beyond its parameters, its share of the weights.
A recipe's prediction is the weighted sum of per-type figures, which reproduce every measured
uniform type exactly; a type that llama.cpp gives a fallback on some tensors (a K-quant on
rows that are not a multiple of 256) gets the figure that, with its fallback's, reproduces
its measured uniform model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import ModelShape, tensor_recipe
from apreqeld.errors import PlanError

SENSITIVITY_FLOOR = 1e-3  # share of the mean a sublayer's sensitivity never falls below


def probe_recipe(view: ModelShape, index: int, /, *, base: str, probe: str,
                 outside: str) -> dict[str, str]:
    """Every sublayer at `base`, sublayer `index` at `probe`, the rest at `outside`."""
    types = [qtype(base)] * len(view.sublayers)
    types[index] = qtype(probe)
    return tensor_recipe(view, types, outside=qtype(outside))


def part_probe_recipe(view: ModelShape, part: str, /, *, base: str, probe: str,
                      outside: str) -> dict[str, str]:
    """Every sublayer at `base` but the tensors named `blk.N.PART.*` (all blocks) at `probe`."""
    recipe = probe_recipe(view, 0, base=base, probe=base, outside=outside)
    return recipe | {t: qtype(probe).name for t in recipe if tensor_part(t) == part}


def tensor_part(name: str) -> str | None:
    """`blk.3.ffn_down.weight` -> `ffn_down`; None outside the blocks."""
    pieces = name.split(".")
    return pieces[2] if len(pieces) > 3 and pieces[0] == "blk" else None


def parts(view: ModelShape, /) -> list[str]:
    """The tensor parts of the sublayers (attn_q, ..., ffn_down), in model order."""
    found: dict[str, None] = {}
    for s in view.sublayers:
        found |= {tensor_part(t.name): None for t in s.tensors if t.quantizable}
    return [p for p in found if p is not None]


def size_weights(view: ModelShape, /) -> dict[str, float]:
    """Each quantizable sublayer tensor's share of all their weights."""
    tensors = [t for s in view.sublayers for t in s.tensors if t.quantizable]
    total = sum(t.n_elements for t in tensors)
    return {t.name: t.n_elements / total for t in tensors}


def sensitivity_weights(view: ModelShape, added: Sequence[float], /,
                        part_added: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each tensor's share of the model's sensitivity: its sublayer's measured added KL
    divergence (floored, a probe can come out a hair below its base), split over its tensors
    by their part's measured sensitivity (`part_added`: every block's PART at the probe), or
    by size without it."""
    if len(added) != len(view.sublayers):
        raise PlanError(f"{len(added)} sensitivities for {len(view.sublayers)} sublayers")
    mean = sum(max(a, 0.0) for a in added) / len(added)
    if mean <= 0:
        raise PlanError("no sublayer made the probe's accuracy worse: sensitivity is undefined")
    floor = SENSITIVITY_FLOOR * mean
    weights = {}
    for s, a in zip(view.sublayers, added, strict=True):
        tensors = [t for t in s.tensors if t.quantizable]
        share = {t.name: float(t.n_elements) for t in tensors}
        if part_added:
            share = {t.name: max(part_added.get(tensor_part(t.name) or "", 0.0), floor)
                     for t in tensors}
        n = sum(share.values())
        weights |= {t.name: max(a, floor) * share[t.name] / n for t in tensors}
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def type_figures(view: ModelShape, uniform: Mapping[str, float], weights: Mapping[str, float],
                 /) -> dict[str, float]:
    """Per-type figures that make `predict` reproduce every measured uniform model: a type
    written as asked on every tensor keeps its measured figure; one that some tensors refuse
    gets (measured - weight of refusing tensors x fallback figure) / weight of the rest."""
    figures: dict[str, float] = {}
    pending = dict(uniform)
    for _ in range(len(pending) + 1):
        for name, value in list(pending.items()):
            q = qtype(name)
            got = {t.name: t.type_as(q).name for s in view.sublayers for t in s.tensors
                   if t.quantizable}
            own = sum(weights[t] for t, g in got.items() if g == q.name)
            others = {g for g in got.values() if g != q.name}
            if others - set(figures):
                continue
            if own <= 0:
                pending.pop(name)
                continue
            rest = sum(weights[t] * figures[g] for t, g in got.items() if g != q.name)
            figures[q.name] = (float(value) - rest) / own
            pending.pop(name)
    return figures


def predict(recipe: Mapping[str, str], figures: Mapping[str, float],
            weights: Mapping[str, float], /) -> float:
    """The weighted sum of the figures of the types a recipe gives the sublayer tensors."""
    missing = [t for t in weights if recipe.get(t) not in figures]
    if missing:
        raise PlanError(f"no figure for {recipe.get(missing[0])} (tensor {missing[0]})")
    return sum(w * figures[recipe[t]] for t, w in weights.items())

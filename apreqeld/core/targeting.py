"""Recipes aimed at a target: the most accurate per-tensor recipe within a footprint and a
latency, as a multiple-choice knapsack over sublayers.

Each sublayer picks one option: a type for its main tensors and one for each named part
(`attn_v`, `ffn_down`: llama.cpp's presets treat them apart), among the types each group
takes as asked (a K-quant only where the rows are a multiple of 256). Costs and loss are
additive over tensors (core.sensitivity), so a Lagrangian sweep over the two constraints,
then a greedy pass that spends what is left, finds a recipe close to the best.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import ModelShape
from apreqeld.core.sensitivity import tensor_part
from apreqeld.errors import PlanError


@dataclass(frozen=True)
class Options:
    """Per row (a sublayer, or a tensor with `tensor_options`), the recipes (tensor -> type)
    it may take."""

    sublayers: tuple[str, ...]
    choices: tuple[tuple[dict[str, str], ...], ...]


def sublayer_options(view: ModelShape, types: Sequence[str], /, *,
                     parts: Sequence[str] = ()) -> Options:
    """Every combination of one type for a sublayer's main tensors and one for each part in
    `parts`, from the types that every tensor of the group takes as asked."""
    ladder = [qtype(n) for n in types]
    choices = []
    for s in view.sublayers:
        tensors = [t for t in s.tensors if t.quantizable]
        groups: dict[str, list] = {}
        for t in tensors:
            part = tensor_part(t.name)
            groups.setdefault(part if part in parts else "", []).append(t)
        accepted = [[q.name for q in ladder if all(t.type_as(q) == q for t in g)]
                    for g in groups.values()]
        if any(not a for a in accepted):
            raise PlanError(f"no type in {', '.join(types)} suits every tensor of {s.name}")
        names = [[t.name for t in g] for g in groups.values()]
        choices.append(tuple({t: q for ts, q in zip(names, combo, strict=True) for t in ts}
                             for combo in itertools.product(*accepted)))
    return Options(tuple(s.name for s in view.sublayers), tuple(choices))


def tensor_options(view: ModelShape, types: Sequence[str], /) -> Options:
    """Every quantizable sublayer tensor a row of its own, with each type of `types` it takes
    as asked: a K-quant where its rows are a multiple of 256, every type without a fallback
    (q8_0, q5_1, q4_0, iq4_nl, ...) wherever its rows are a multiple of 32."""
    ladder = [qtype(n) for n in types]
    names, choices = [], []
    for s in view.sublayers:
        for t in s.tensors:
            if not t.quantizable:
                continue
            accepted = tuple({t.name: q.name} for q in ladder if t.type_as(q) == q)
            if not accepted:
                raise PlanError(f"no type in {', '.join(types)} suits {t.name}")
            names.append(t.name)
            choices.append(accepted)
    return Options(tuple(names), tuple(choices))


def option_table(options: Options, score: Mapping[str, float] | None = None,
                 figures: Mapping[str, float] | None = None,
                 weights: Mapping[str, float] | None = None, *,
                 bytes_of: Mapping[str, Mapping[str, int]] | None = None) -> np.ndarray:
    """(S, O) array: each option's additive contribution, either sum(weights x figures) over its
    tensors or, with `bytes_of` (tensor -> type -> bytes), its exact bytes; absent options inf."""
    width = max(len(c) for c in options.choices)
    table = np.full((len(options.choices), width), np.inf)
    for i, choices in enumerate(options.choices):
        for j, recipe in enumerate(choices):
            if bytes_of is not None:
                table[i, j] = sum(bytes_of[t][q] for t, q in recipe.items())
            else:
                table[i, j] = sum(weights[t] * figures[q] for t, q in recipe.items())
    return table


def allocate(loss: np.ndarray, costs: Sequence[np.ndarray], budgets: Sequence[float], /, *,
             grid: int = 30) -> np.ndarray | None:
    """Option per sublayer minimizing the summed `loss` with each summed cost within its
    budget, or None when not even the cheapest choices fit. Lagrangian sweep + greedy fill."""
    loss = np.asarray(loss, dtype=np.float64)
    cost = np.stack([np.asarray(c, dtype=np.float64) for c in costs])  # (C, S, O)
    budget = np.asarray(budgets, dtype=np.float64)
    if cost.shape[1:] != loss.shape or len(budget) != len(cost):
        raise PlanError("loss, costs and budgets do not match")
    finite = np.isfinite(loss)
    cost = np.where(finite[None], cost, 0.0)
    span = float(np.sum(np.where(finite, loss, -np.inf).max(1)
                        - np.where(finite, loss, np.inf).min(1))) or 1.0
    scale = np.where(np.abs(budget) > 0, np.abs(budget), 1.0)
    lambdas = np.concatenate([[0.0], span * np.logspace(-3, 2, grid)])
    rows = np.arange(loss.shape[0])
    best, best_loss = None, np.inf
    for lam in itertools.product(lambdas, repeat=len(budget)):
        total = loss + np.tensordot(np.asarray(lam) / scale, cost, axes=1)
        pick = np.argmin(np.where(finite, total, np.inf), axis=1)
        if np.all(cost[:, rows, pick].sum(1) <= budget) and loss[rows, pick].sum() < best_loss:
            best, best_loss = pick, loss[rows, pick].sum()
    if best is None:
        return None
    return _fill(best, loss, cost, budget)


def improve(pick: np.ndarray, loss: np.ndarray, costs: Sequence[np.ndarray],
            budgets: Sequence[float], /) -> np.ndarray:
    """A feasible `pick` made better in `loss` one sublayer change at a time, every cost
    kept within its budget (the greedy pass of `allocate`)."""
    loss = np.asarray(loss, dtype=np.float64)
    cost = np.stack([np.asarray(c, dtype=np.float64) for c in costs])
    cost = np.where(np.isfinite(loss)[None], cost, 0.0)
    return _fill(np.asarray(pick), loss, cost, np.asarray(budgets, dtype=np.float64))


def _fill(pick: np.ndarray, loss: np.ndarray, cost: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Greedy: take the single-sublayer change that lowers the loss most and still fits,
    until none does."""
    pick = pick.copy()
    rows = np.arange(loss.shape[0])
    while True:
        used = cost[:, rows, pick].sum(1)
        gain = loss[rows, pick][:, None] - loss  # (S, O)
        room = budget[:, None, None] - (used[:, None, None] - cost[:, rows, pick][:, :, None]
                                       + cost)
        ok = np.isfinite(loss) & np.all(room >= 0, axis=0) & (gain > 1e-15)
        if not ok.any():
            return pick
        i, j = np.unravel_index(np.argmax(np.where(ok, gain, -np.inf)), gain.shape)
        pick[i] = j


def recipe_of(options: Options, pick: Sequence[int], /) -> dict[str, str]:
    """The sublayer tensors' types of one option per sublayer."""
    recipe: dict[str, str] = {}
    for choices, j in zip(options.choices, pick, strict=True):
        recipe |= choices[int(j)]
    return recipe


@dataclass(frozen=True)
class Predictor:
    """Additive predictions of any recipe: parameter bytes exactly; every other metric as
    sum over sublayer tensors of weight x the figure of its type (core.sensitivity)."""

    weights: Mapping[str, Mapping[str, float]]  # metric -> tensor -> weight
    figures: Mapping[str, Mapping[str, float]]  # metric -> type -> figure
    bytes_of: Mapping[str, Mapping[str, int]]  # quantizable tensor -> type -> bytes
    fixed_bytes: int  # the tensors llama.cpp does not quantize

    def predict(self, recipe: Mapping[str, str], /) -> dict[str, float]:
        """memory_bytes, and each metric of `figures` (footprint_bytes when the figures have
        overhead_bytes: parameters + the memory a loaded model adds beyond them)."""
        out = {"memory_bytes": float(self.fixed_bytes + sum(
            self.bytes_of[t][recipe[t]] for t in self.bytes_of))}
        for metric, figures in self.figures.items():
            out[metric] = sum(w * figures[recipe[t]] for t, w in self.weights[metric].items())
        if "overhead_bytes" in out:
            out["footprint_bytes"] = out["memory_bytes"] + out.pop("overhead_bytes")
        return out


def option_tables(predictor: Predictor, options: Options, /) -> dict[str, np.ndarray]:
    """Each metric's (S, O) table of option contributions, footprint_bytes included (exact
    bytes + predicted overhead): computed once, shared by every aim at the same options."""
    tables = {m: option_table(options, figures=predictor.figures[m], weights=predictor.weights[m])
              for m in predictor.figures}
    if "overhead_bytes" in tables:
        tables["footprint_bytes"] = (option_table(options, bytes_of=predictor.bytes_of)
                                     + tables["overhead_bytes"])
    return tables


def aim(predictor: Predictor, options: Options, target: Mapping[str, float],
        outside: Mapping[str, str], /, *, minimize: str = "kld",
        margins: Mapping[str, float],
        tables: Mapping[str, np.ndarray] | None = None) -> dict[str, str] | None:
    """The recipe (`outside` for the tensors outside the sublayers) with the least predicted
    `minimize` among those predicted at least `margins[m]` (a fraction) below the target in
    every metric m (footprint_bytes, latency_ms, an accuracy); None when there is none.
    `tables`: `option_tables(predictor, options)`, when several aims share them."""
    tables = tables if tables is not None else option_tables(predictor, options)
    fixed = {"footprint_bytes": predictor.fixed_bytes + sum(
        predictor.bytes_of[t][q] for t, q in outside.items())}
    limit = {m: target[m] * (1 - margins.get(m, 0.0)) for m in margins}
    constrained = [m for m in limit if m != minimize]
    pick = allocate(tables[minimize], [tables[m] for m in constrained],
                    [limit[m] - fixed.get(m, 0.0) for m in constrained])
    if pick is None:
        return None
    recipe = recipe_of(options, pick) | dict(outside)
    predicted = predictor.predict(recipe)
    if any(predicted[m] > limit[m] for m in limit):
        return None
    return recipe

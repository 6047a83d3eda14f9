"""Weight configurations: the paper's 28 (§4.1.1) and user-supplied sets (``--configs FILE``).

Weights are always (memory, latency, accuracy).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from apreqeld.core.weights import METRICS, normalise_weights, parse_weights
from apreqeld.errors import InputError


@dataclass(frozen=True)
class WeightConfig:
    """A named weighting of (memory, latency, accuracy) with the category it illustrates."""

    name: str
    category: str
    weights: tuple[float, float, float]


def _paper_configs() -> tuple[WeightConfig, ...]:
    """Build the 28 configurations: 4 Fairness, then 8 for each of memory, latency, accuracy."""
    third = 1 / 3
    configs = [
        WeightConfig("fair-all", "Fairness", (third, third, third)),
        WeightConfig("fair-memory-latency", "Fairness", (0.5, 0.5, 0.0)),
        WeightConfig("fair-memory-accuracy", "Fairness", (0.5, 0.0, 0.5)),
        WeightConfig("fair-latency-accuracy", "Fairness", (0.0, 0.5, 0.5)),
    ]

    def weights(**by_metric: float) -> tuple[float, float, float]:
        memory, latency, accuracy = (by_metric.get(metric, 0.0) for metric in METRICS)
        return (memory, latency, accuracy)

    for metric in METRICS:
        category = metric.capitalize()
        others = [other for other in METRICS if other != metric]
        for main, rest in ((0.7, 0.15), (0.8, 0.1), (0.9, 0.05)):
            shares = {metric: main, others[0]: rest, others[1]: rest}
            configs.append(WeightConfig(f"{metric}-{main}", category, weights(**shares)))
        configs.append(WeightConfig(f"{metric}-only", category, weights(**{metric: 1.0})))
        for main, rest in ((0.75, 0.25), (0.9, 0.1)):
            for other in others:
                shares = {metric: main, other: rest}
                configs.append(
                    WeightConfig(f"{metric}-{main}-{other}", category, weights(**shares))
                )
    return tuple(configs)


PAPER_CONFIGS: tuple[WeightConfig, ...] = _paper_configs()

_TEXT_LINE = re.compile(r"^(?P<weights>[^\s,]+(?:\s*,\s*[^\s,]+)*)(?:\s+(?P<rest>.*))?$")
_JSON_KEYS = {"weights", "name", "category"}


def parse_configs(text: str) -> tuple[WeightConfig, ...]:
    """Parse a user's configs file (JSON list or 'm,l,a [category] [name]' lines) into configs."""
    if text.lstrip().startswith(("[", "{")):
        entries = _json_entries(text)
    else:
        entries = _text_entries(text)
    if not entries:
        raise InputError("the configs file has no weight configuration")
    configs = []
    seen: set[str] = set()
    for number, (weights, category, name) in enumerate(entries, start=1):
        name = name if name is not None else f"config-{number}"
        if name in seen:
            raise InputError(f"duplicate config name '{name}'")
        seen.add(name)
        configs.append(WeightConfig(name, category if category is not None else "Custom", weights))
    return tuple(configs)


_Entry = tuple[tuple[float, float, float], str | None, str | None]


def _json_entries(text: str) -> list[_Entry]:
    """Entries of a JSON list of {"weights": ..., "name"?: ..., "category"?: ...} objects."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"configs file is not valid JSON: {error.msg} (line {error.lineno}, "
            f"column {error.colno})"
        ) from None
    if not isinstance(data, list):
        raise InputError("a JSON configs file must hold a list of objects")
    entries = []
    for number, item in enumerate(data, start=1):
        where = f"config {number}"
        if not isinstance(item, dict):
            raise InputError(f'{where}: expected an object with "weights", got {item!r}')
        unknown = sorted(set(item) - _JSON_KEYS)
        if unknown:
            raise InputError(f"{where}: unknown key '{unknown[0]}'")
        if "weights" not in item:
            raise InputError(f'{where}: missing "weights"')
        raw = item["weights"]
        try:
            if isinstance(raw, str):
                weights = parse_weights(raw)
            elif isinstance(raw, list):
                weights = normalise_weights(raw)
            else:
                raise InputError(f"weights {raw!r} must be a list of 3 numbers or a string")
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
        category = _text_field(item, "category", where)
        entries.append((weights, category, _text_field(item, "name", where)))
    return entries


def _text_field(item: dict, key: str, where: str) -> str | None:
    """An optional non-empty string field of a JSON config."""
    if key not in item:
        return None
    value = item[key]
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {key} {value!r} must be a non-empty string")
    return value.strip()


def _text_entries(text: str) -> list[_Entry]:
    """Entries of plain-text lines 'm,l,a [category] [name]'; blanks and # comments skipped."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        match = _TEXT_LINE.match(content)
        if match is None:  # a line starting with a comma
            raise InputError(f"line {number}: cannot read weights from '{content}'")
        extra = (match.group("rest") or "").split()
        if len(extra) > 2:
            raise InputError(
                f"line {number}: expected 'weights [category] [name]', got extra '{extra[2]}'"
            )
        try:
            weights = parse_weights(match.group("weights"))
        except InputError as error:
            raise InputError(f"line {number}: {error}") from None
        category = extra[0] if extra else None
        name = extra[1] if len(extra) > 1 else None
        entries.append((weights, category, name))
    return entries

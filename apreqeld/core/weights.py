"""User weights over the three QoS metrics, always in (memory, latency, accuracy) order.

Two text forms are accepted: positional ``"0.2,0.6,0.2"`` (exactly three values) and keyword
``"memory=0.2,latency=0.6,accuracy=0.2"`` (names ``memory``/``mem``, ``latency``/``lat``,
``accuracy``/``acc``, any order, a missing name weighs 0). Weights must be finite, non-negative
and not all zero; they are returned normalised to sum 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

from apreqeld.errors import InputError

METRICS: tuple[str, str, str] = ("memory", "latency", "accuracy")

_ALIASES: dict[str, int] = {
    "memory": 0,
    "mem": 0,
    "latency": 1,
    "lat": 1,
    "accuracy": 2,
    "acc": 2,
}


def parse_weights(text: str) -> tuple[float, float, float]:
    """Parse a weights option (positional or name=value form) into normalised weights."""
    items = [item.strip() for item in text.split(",")]
    if not any("=" in item for item in items):
        if len(items) != 3:
            got = 0 if items == [""] else len(items)
            raise InputError(f"expected 3 weights (memory,latency,accuracy), got {got}")
        return _normalise([_parse_number(item, item) for item in items], items)

    values = [0.0, 0.0, 0.0]
    labels = ["0", "0", "0"]
    seen: set[int] = set()
    for item in items:
        if "=" not in item:
            raise InputError(
                f"weight '{item}' has no name (write name=value for every weight, or no names)"
            )
        name, _, raw = item.partition("=")
        key = name.strip().lower()
        if key not in _ALIASES:
            raise InputError(f"unknown weight name '{name.strip()}'")
        index = _ALIASES[key]
        if index in seen:
            raise InputError(f"weight '{METRICS[index]}' is given twice")
        seen.add(index)
        values[index] = _parse_number(raw.strip(), item)
        labels[index] = item
    return _normalise(values, labels)


def normalise_weights(values: Sequence[float]) -> tuple[float, float, float]:
    """Check three numeric weights and scale them to sum 1, so TOPSIS gets comparable inputs."""
    values = list(values)
    if len(values) != 3:
        raise InputError(f"expected 3 weights (memory,latency,accuracy), got {len(values)}")
    numbers = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise InputError(f"weight {value!r} is not a number")
        numbers.append(float(value))
    return _normalise(numbers, [_show(v) for v in numbers])


def _parse_number(raw: str, label: str) -> float:
    """Convert one weight's text to float, naming the offending item on failure."""
    try:
        return float(raw)
    except ValueError:
        raise InputError(f"weight '{label}' is not a number") from None


def _show(value: float) -> str:
    """Format a weight for an error message: integers without a trailing '.0'."""
    if math.isfinite(value) and value.is_integer():
        return str(int(value))
    return repr(value)


def _normalise(values: Sequence[float], labels: Sequence[str]) -> tuple[float, float, float]:
    """Validate finite, non-negative, not-all-zero weights and divide them by their sum."""
    for value, label in zip(values, labels, strict=True):
        if not math.isfinite(value):
            raise InputError(f"weight {label} is not finite")
        if value < 0:
            raise InputError(f"weight {label} is negative")
    largest = max(values)
    if largest == 0:
        raise InputError("weights must not all be zero")
    scaled = [value / largest for value in values]  # avoids overflow of the sum for huge values
    total = math.fsum(scaled)
    memory, latency, accuracy = (value / total for value in scaled)
    return (memory, latency, accuracy)

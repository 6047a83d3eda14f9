"""User limits on a plan (size budget, latency, accuracy), parsed from the command line."""

from __future__ import annotations

import math
import re

from apreqeld.errors import InputError

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.I)


def parse_size(text: str) -> float:
    """Bytes from `900MB`, `0.9 GiB`, `123456` (decimal and binary units)."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise InputError(f"size '{text}' is not a size like 90MiB, 0.5GB or 123456")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise InputError(f"size '{text}' must be positive")
    return value


def build_limits(*, max_size: str | None = None, max_latency: float | None = None,
                 max_ppl: float | None = None, max_kld: float | None = None) -> dict[str, float]:
    """The plan's limits keyed by predicted metric; absent limits are left out."""
    limits: dict[str, float] = {}
    if max_size is not None:
        limits["memory_bytes"] = parse_size(max_size)
    for name, value, flag in (("latency_ms", max_latency, "--max-latency"),
                              ("ppl", max_ppl, "--max-ppl"), ("kld", max_kld, "--max-kld")):
        if value is not None:
            if not math.isfinite(value) or value <= 0:
                raise InputError(f"{flag} must be a positive number, got {value}")
            limits[name] = float(value)
    return limits

"""Live latency: how much slower than measured the members serve now, predicted from the
machine's state and corrected by the tokens served.

The model's slowdown from the state (1 where a signal is unknown or out of range):
  - GPU offload: the GPU's clock below its maximum (a power mode, heat), and the share of
    the GPU other processes keep busy;
  - CPU: the CPU's frequency below its maximum, and the share of the cores taken from this
    machine (steal, on a VM);
  - a measured power-mode column, where the member has one for the mode, replaces the clock
    part (the column was timed at that mode's clocks).
The correction is the median, over the last requests served by any member, of served ms/token
over (measured ms/token x the model's slowdown when served): kept across swaps, so it is the
machine's, not one member's. The scale = model slowdown x correction, clamped.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

SCALE_RANGE = (0.25, 20.0)  # outside: a measurement fault, not a machine
FLOOR = 0.05  # a clock or free share below this is read as this (no division blow-up)


@dataclass(frozen=True)
class Conditions:
    """What the latency model reads of the machine; None is unknown."""

    offload: bool = False  # layers run on a GPU
    gpu_clock_ratio: float | None = None  # current / max
    gpu_others: float | None = None  # busy share of the GPU taken by other processes
    cpu_freq_ratio: float | None = None
    cpu_steal: float | None = None  # share of the CPU time taken from this machine
    mode_column: bool = False  # the members' latency is a measured column for this mode


@dataclass(frozen=True)
class Slowdown:
    """The model's factor and the signals behind it (name -> factor)."""

    factor: float
    parts: dict[str, float]


def slowdown(c: Conditions, /) -> Slowdown:
    """How much slower than measured the machine's state alone predicts."""
    parts: dict[str, float] = {}
    if c.offload:
        if c.gpu_clock_ratio is not None and not c.mode_column:
            parts["gpu clock"] = 1 / _share(c.gpu_clock_ratio)
        if c.gpu_others is not None:
            parts["gpu busy with others"] = 1 / _share(1 - c.gpu_others)
    else:
        if c.cpu_freq_ratio is not None and not c.mode_column:
            parts["cpu frequency"] = 1 / _share(c.cpu_freq_ratio)
    if c.cpu_steal is not None:
        parts["cpu steal"] = 1 / _share(1 - c.cpu_steal)
    factor = math.prod(parts.values()) if parts else 1.0
    return Slowdown(_clamp(factor), parts)


class Correction:
    """served / predicted over the last requests of any member (the machine's, across swaps)."""

    def __init__(self, *, window: int = 16, min_samples: int = 3) -> None:
        self._ratios: deque[float] = deque(maxlen=window)
        self.min_samples = min_samples

    def observe(self, served_ms: float, measured_ms: float, factor: float, /) -> None:
        """A request served at `served_ms` ms/token by a member measured at `measured_ms`,
        while the model predicted `factor`."""
        if all(math.isfinite(x) and x > 0 for x in (served_ms, measured_ms, factor)):
            self._ratios.append(served_ms / (measured_ms * factor))

    @property
    def samples(self) -> int:
        return len(self._ratios)

    @property
    def value(self) -> float:
        """The median ratio, 1.0 before `min_samples` requests."""
        if len(self._ratios) < self.min_samples:
            return 1.0
        return _clamp(float(np.median(self._ratios)))


def scale(model: Slowdown, correction: Correction, /) -> float:
    """How much slower than measured every member serves now."""
    return _clamp(model.factor * correction.value)


def _share(x: float) -> float:
    return min(max(x, FLOOR), 1.0)


def _clamp(x: float) -> float:
    return min(max(x, SCALE_RANGE[0]), SCALE_RANGE[1])

"""The conditions a latency sample ran under: load average, the CPU time other processes took
(/proc/stat's busy time minus this process's own), CPU frequency and power mode where known.

Every signal is optional: where /proc or /sys lacks it the figure is None, never a guess.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

USER_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# /proc/stat "cpu" fields counted as busy: user nice system irq softirq steal (guest is in user).
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def _busy_cpu_s() -> float | None:
    """CPU seconds every process (and the kernel) has spent busy since boot, all cores."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(x) for x in fields[1:]]
    return sum(values[i] for i in _BUSY_FIELDS if i < len(values)) / USER_HZ


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def load_average() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_mhz() -> float | None:
    """The mean current CPU frequency (cpufreq where present, else /proc/cpuinfo)."""
    base = Path("/sys/devices/system/cpu")
    freqs = [float(v) / 1000 for p in sorted(base.glob("cpu[0-9]*/cpufreq/scaling_cur_freq"))
             if (v := _read(str(p))) and v.isdigit()]
    if not freqs:
        info = _read("/proc/cpuinfo") or ""
        freqs = [float(line.split(":")[1]) for line in info.splitlines()
                 if line.startswith("cpu MHz") and ":" in line]
    return round(sum(freqs) / len(freqs), 1) if freqs else None


def power_mode() -> str | None:
    """The platform's power profile or CPU governor, where the system exposes one."""
    for path, label in (("/sys/firmware/acpi/platform_profile", "profile"),
                        ("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", "governor")):
        value = _read(path)
        if value:
            return f"{label} {value}"
    return None


@dataclass
class Window:
    """What one timed stretch of work ran beside; filled in when its `observe` block ends."""

    wall_s: float = 0.0
    self_cpu_s: float = 0.0
    others_cpu_s: float | None = None
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    load_avg: float | None = None

    @property
    def contention(self) -> float | None:
        """Share of the machine's CPU time (wall x cores) that other processes took."""
        if self.others_cpu_s is None or self.wall_s <= 0:
            return None
        return self.others_cpu_s / (self.wall_s * self.cores)


@contextmanager
def observe() -> Iterator[Window]:
    """Measure wall time, this process's CPU time and everyone else's during the block."""
    window = Window()
    busy0, self0, t0 = _busy_cpu_s(), time.process_time(), time.perf_counter()
    try:
        yield window
    finally:
        window.wall_s = time.perf_counter() - t0
        window.self_cpu_s = time.process_time() - self0
        busy1 = _busy_cpu_s()
        if busy0 is not None and busy1 is not None:
            window.others_cpu_s = max(0.0, busy1 - busy0 - window.self_cpu_s)
        window.load_avg = load_average()


def combine(windows: list[Window]) -> dict:
    """The conditions of several windows together (sums of CPU time over summed wall time)."""
    wall = sum(w.wall_s for w in windows)
    known = [w.others_cpu_s for w in windows if w.others_cpu_s is not None]
    cores = windows[0].cores if windows else (os.cpu_count() or 1)
    others = sum(known) if known and len(known) == len(windows) else None
    loads = [w.load_avg for w in windows if w.load_avg is not None]
    return {
        "wall_s": round(wall, 4),
        "self_cpu_s": round(sum(w.self_cpu_s for w in windows), 4),
        "others_cpu_s": None if others is None else round(others, 4),
        "contention": None if others is None or wall <= 0 else round(others / (wall * cores), 4),
        "cores": cores,
        "load_avg_1m": max(loads) if loads else None,
        "cpu_mhz": cpu_mhz(),
        "power_mode": power_mode(),
    }

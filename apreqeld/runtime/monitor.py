"""The machine monitor: one `State` per interval from jtop, procfs/psutil, or a replayed trace.

Every signal is optional: a field is None when this machine does not expose it (PSI on older
Jetson kernels, cgroup limits outside a service, NVML without an NVIDIA driver). Sources are
opened by spec: `auto` (jtop, else procfs), `procfs`, `jtop`, `trace:FILE`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apreqeld.errors import InputError
from apreqeld.manifest import one_line

log = logging.getLogger(__name__)

Clock = Callable[[], float]
_KIB = 1024
_V1_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


@dataclass(frozen=True)
class State:
    """What the machine offers now; None is "unknown", never zero."""

    t: float
    source: str
    mem_available_bytes: float | None = None
    mem_total_bytes: float | None = None
    swap_used_bytes: float | None = None
    cgroup_headroom_bytes: float | None = None
    psi_memory_some_avg10: float | None = None
    psi_memory_full_avg10: float | None = None
    # stall share since the previous reading, from PSI's totals (faster than avg10)
    psi_memory_some_recent: float | None = None
    psi_memory_full_recent: float | None = None
    cgroup_psi_some_recent: float | None = None  # the daemon's own cgroup (v2)
    cgroup_psi_full_recent: float | None = None
    cgroup_high_events: float | None = None  # memory.high reached since the previous reading
    swapin_per_s: float | None = None  # pages swapped in a second (/proc/vmstat pswpin)
    cpu_steal: float | None = None  # share of CPU time the hypervisor took, since then
    power_mode: str | None = None
    gpu_load: float | None = None
    gpu_load_others: float | None = None  # the part of gpu_load other processes make
    gpu_clock_ratio: float | None = None  # current / max GPU clock
    cpu_freq_ratio: float | None = None
    temperature_c: float | None = None
    on_battery: bool | None = None
    power_w: float | None = None


class Source(Protocol):
    name: str

    def read(self) -> State: ...

    def close(self) -> None: ...


# -- procfs parsers (pure: text in, numbers out) ----------------------------------------------


def parse_meminfo(text: str, /) -> dict[str, int]:
    """/proc/meminfo -> {field: bytes} (values given in kB are multiplied out)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name.strip()] = int(parts[0]) * (_KIB if parts[1:] == ["kB"] else 1)
    return out


def _psi_fields(text: str, key: str, /) -> dict[str, str]:
    """A pressure file's `key` per line kind ("some", "full") as written."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        for pair in pairs:
            name, _, value = pair.partition("=")
            if name == key:
                found[kind] = value
    return found


def parse_psi(text: str, /) -> tuple[float | None, float | None]:
    """/proc/pressure/memory -> (some avg10, full avg10) in percent."""
    found = {k: float(v) for k, v in _psi_fields(text, "avg10").items()}
    return found.get("some"), found.get("full")


def parse_psi_totals(text: str, /) -> tuple[int | None, int | None]:
    """A pressure file -> (some total, full total): microseconds stalled since boot."""
    found = {k: int(v) for k, v in _psi_fields(text, "total").items() if v.isdigit()}
    return found.get("some"), found.get("full")


def parse_counters(text: str, /) -> dict[str, int]:
    """`name value` lines (/proc/vmstat, memory.events) -> {name: value}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def parse_cpu_times(text: str, /) -> tuple[int, int] | None:
    """/proc/stat's `cpu` line -> (all ticks, steal ticks)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu" and len(parts) > 8:
            ticks = [int(x) for x in parts[1:9]]  # user .. steal (guest is inside user)
            return sum(ticks), ticks[7]
    return None


class Rates:
    """Rates and shares of counters between two readings (the first reading gives None)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}

    def per_s(self, key: str, value: float | None, now: float) -> float | None:
        """Increase of `value` a second since the last call with `key`."""
        return self._delta(key, value, now, lambda dv, dt: dv / dt)

    def increase(self, key: str, value: float | None, now: float) -> float | None:
        """How much `value` rose since the last call with `key`."""
        return self._delta(key, value, now, lambda dv, _dt: dv)

    def share(self, key: str, value: float | None, now: float, *, unit: float) -> float | None:
        """Increase of `value` (in `unit`s a second) as a share of the time elapsed."""
        return self._delta(key, value, now, lambda dv, dt: min(max(dv / unit / dt, 0.0), 1.0))

    def _delta(self, key: str, value: float | None, now: float, f) -> float | None:
        if value is None:
            return None
        last = self._last.get(key)
        self._last[key] = (now, value)
        if last is None or now <= last[0] or value < last[1]:
            return None
        return f(value - last[1], now - last[0])


def parse_proc_cgroup(text: str, /) -> dict[str, str]:
    """/proc/self/cgroup -> {"": v2 path, "memory": v1 memory path, ...}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                out[controller] = parts[2]
    return out


def parse_cgroup_mounts(text: str, /) -> dict[str, tuple[str, str]]:
    """/proc/self/mountinfo -> {"": (root, mountpoint) of cgroup2, "memory": ... of v1}."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields_ = left.split()
        fstype, _, options = (right.split() + ["", ""])[:3]
        if fstype == "cgroup2":
            out.setdefault("", (fields_[3], fields_[4]))
        elif fstype == "cgroup" and "memory" in options.split(","):
            out.setdefault("memory", (fields_[3], fields_[4]))
    return out


def cgroup_headroom(limit_text: str, current_text: str, /) -> float | None:
    """memory.max (or v1 limit_in_bytes) - memory.current; None when there is no limit."""
    limit = limit_text.strip()
    if not limit.isdigit() or int(limit) >= _V1_UNLIMITED:
        return None
    return float(max(int(limit) - int(current_text.strip()), 0))


def cgroup_v2_folder(proc_cgroup: str, mountinfo: str, /) -> Path | None:
    """This process's cgroup v2 folder (memory.pressure, memory.events live there), or None."""
    found = [limit.parent for limit, _ in cgroup_memory_files(proc_cgroup, mountinfo)
             if limit.name == "memory.max"]
    return found[0] if found else None


def cgroup_memory_files(proc_cgroup: str, mountinfo: str, /) -> list[tuple[Path, Path]]:
    """(limit, usage) file pairs of this process's cgroup: v2 first, then v1."""
    paths = parse_proc_cgroup(proc_cgroup)
    mounts = parse_cgroup_mounts(mountinfo)
    found = []
    for key, limit, usage in (("", "memory.max", "memory.current"),
                              ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes")):
        if key in paths and key in mounts:
            root, mountpoint = mounts[key]
            rel = paths[key]
            if root != "/" and rel.startswith(root):
                rel = rel[len(root):]
            folder = Path(mountpoint) / rel.lstrip("/")
            found.append((folder / limit, folder / usage))
    return found


# -- live sources ------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


class ProcfsSource:
    """psutil and procfs/sysfs: MemAvailable, cgroup, PSI, platform profile, heat, NVML."""

    name = "procfs"

    def __init__(self, *, root: str | Path = "/", clock: Clock = time.monotonic) -> None:
        self._root = Path(root)
        self._clock = clock
        self._start = clock()
        proc = self._root / "proc"
        self._meminfo = proc / "meminfo"
        self._psi = proc / "pressure" / "memory"
        self._profile = self._root / "sys/firmware/acpi/platform_profile"
        self._cgroups = [
            (self._root / str(limit).lstrip("/"), self._root / str(usage).lstrip("/"))
            for limit, usage in cgroup_memory_files(
                _read(proc / "self" / "cgroup") or "", _read(proc / "self" / "mountinfo") or ""
            )
        ]
        self._zones = sorted((self._root / "sys/class/thermal").glob("thermal_zone*/temp"))
        self._nvml = _nvml_handle()
        folder = cgroup_v2_folder(_read(proc / "self" / "cgroup") or "",
                                  _read(proc / "self" / "mountinfo") or "")
        self.cgroup = None if folder is None else self._root / str(folder).lstrip("/")
        self._vmstat, self._stat = proc / "vmstat", proc / "stat"
        self._rates = Rates()

    def read(self) -> State:
        """Sample every signal once (a few small file reads)."""
        now = self._clock()
        mem = parse_meminfo(_read(self._meminfo) or "")
        psi_text = _read(self._psi)
        some, full = parse_psi(psi_text) if psi_text else (None, None)
        swap = None
        if "SwapTotal" in mem and "SwapFree" in mem:
            swap = float(mem["SwapTotal"] - mem["SwapFree"])
        profile = _read(self._profile)
        recent = self._psi_recent("system", psi_text, now)
        cgroup = self._psi_recent("cgroup", self._cgroup_file("memory.pressure"), now)
        events = parse_counters(self._cgroup_file("memory.events") or "")
        vmstat = parse_counters(_read(self._vmstat) or "")
        cpu = parse_cpu_times(_read(self._stat) or "")
        ticks = self._rates.per_s("cpu ticks", cpu[0] if cpu else None, now)
        steal = self._rates.per_s("steal ticks", cpu[1] if cpu else None, now)
        return State(
            t=now - self._start,
            source=self.name,
            mem_available_bytes=_float(mem.get("MemAvailable")),
            mem_total_bytes=_float(mem.get("MemTotal")),
            swap_used_bytes=swap,
            cgroup_headroom_bytes=self._headroom(),
            psi_memory_some_avg10=some,
            psi_memory_full_avg10=full,
            psi_memory_some_recent=recent[0],
            psi_memory_full_recent=recent[1],
            cgroup_psi_some_recent=cgroup[0],
            cgroup_psi_full_recent=cgroup[1],
            cgroup_high_events=self._rates.increase("high", _float(events.get("high")), now),
            swapin_per_s=self._rates.per_s("pswpin", _float(vmstat.get("pswpin")), now),
            cpu_steal=None if not ticks or steal is None else min(max(steal / ticks, 0.0), 1.0),
            power_mode=profile.strip() if profile else None,
            gpu_load=_nvml_load(self._nvml),
            gpu_clock_ratio=_nvml_clock_ratio(self._nvml),
            cpu_freq_ratio=_cpu_freq_ratio(),
            temperature_c=self._temperature(),
            on_battery=_on_battery(),
        )

    def _psi_recent(self, key: str, text: str | None, now: float
                    ) -> tuple[float | None, float | None]:
        """Percent of the time since the last reading some/all tasks stalled on memory."""
        some, full = parse_psi_totals(text) if text else (None, None)
        return (_pct(self._rates.share(f"{key} some", _float(some), now, unit=1e6)),
                _pct(self._rates.share(f"{key} full", _float(full), now, unit=1e6)))

    def _cgroup_file(self, name: str) -> str | None:
        return None if self.cgroup is None else _read(self.cgroup / name)

    def close(self) -> None:
        """Nothing to release."""

    def _headroom(self) -> float | None:
        for limit, usage in self._cgroups:
            limit_text, usage_text = _read(limit), _read(usage)
            if limit_text is not None and usage_text is not None:
                return cgroup_headroom(limit_text, usage_text)
        return None

    def _temperature(self) -> float | None:
        temps = []
        for zone in self._zones:
            text = _read(zone)
            if text and text.strip().lstrip("-").isdigit():
                temps.append(int(text) / 1000)
        valid = [t for t in temps if -40 < t < 200]
        return max(valid) if valid else None


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _pct(share: float | None) -> float | None:
    return None if share is None else round(100 * share, 3)


def _cpu_freq_ratio() -> float | None:
    import psutil

    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError):
        return None
    if freq is None or not freq.max:
        return None
    return min(max(freq.current / freq.max, 0.0), 1.0)


def _on_battery() -> bool | None:
    import psutil

    try:
        battery = psutil.sensors_battery()
    except (OSError, NotImplementedError, AttributeError):
        return None
    return None if battery is None or battery.power_plugged is None else not battery.power_plugged


def _nvml_handle() -> Any:
    """The first GPU's NVML handle, or None without pynvml or a driver (silently)."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # noqa: BLE001 - any failure means "no NVML here"
        return None


def _nvml_clock_ratio(handle: Any) -> float | None:
    """The GPU's graphics clock over its maximum (a power cap or heat lowers it)."""
    if handle is None:
        return None
    try:
        import pynvml  # type: ignore[import-not-found]

        now = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_GRAPHICS)
        top = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_GRAPHICS)
        return min(max(now / top, 0.0), 1.0) if top else None
    except Exception:  # noqa: BLE001
        return None


def _nvml_load(handle: Any) -> float | None:
    if handle is None:
        return None
    try:
        import pynvml  # type: ignore[import-not-found]

        return pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
    except Exception:  # noqa: BLE001
        return None


# -- jtop --------------------------------------------------------------------------------------


def state_from_jtop(
    stats: Mapping[str, Any],
    memory: Mapping[str, Any],
    nvpmodel: Any,
    gpu: Mapping[str, Any],
    /,
    *,
    t: float,
) -> State:
    """Map jetson-stats' `stats`, `memory` (kB), `nvpmodel` and `gpu` (load %) to a State."""
    ram = memory.get("RAM") or {}
    swap = memory.get("SWAP") or {}
    available = None
    if "free" in ram:
        available = float(ram["free"] + ram.get("buffers", 0) + ram.get("cached", 0)) * _KIB
    loads = [g["status"]["load"] for g in gpu.values()
             if isinstance(g, Mapping) and "load" in (g.get("status") or {})]
    clocks = [g["freq"]["cur"] / g["freq"]["max"] for g in gpu.values()
              if isinstance(g, Mapping) and isinstance(g.get("freq"), Mapping)
              and g["freq"].get("max") and "cur" in g["freq"]]
    temps = [float(v) for k, v in stats.items()
             if k.startswith("Temp ") and isinstance(v, int | float) and -40 < v < 200]
    power = stats.get("Power TOT")
    return State(
        t=t,
        source="jtop",
        mem_available_bytes=available,
        mem_total_bytes=float(ram["tot"]) * _KIB if "tot" in ram else None,
        swap_used_bytes=float(swap["used"]) * _KIB if "used" in swap else None,
        power_mode=_nvpmodel_name(nvpmodel, stats),
        gpu_load=min(max(max(loads) / 100, 0.0), 1.0) if loads else None,
        gpu_clock_ratio=min(max(min(clocks), 0.0), 1.0) if clocks else None,
        temperature_c=max(temps) if temps else None,
        power_w=float(power) / 1000 if isinstance(power, int | float) else None,
    )


def _nvpmodel_name(nvpmodel: Any, stats: Mapping[str, Any]) -> str | None:
    """The power model's name from jtop's NVPModel object, a {"name": ...} sample, or stats."""
    if nvpmodel is None:
        return stats.get("nvp model")
    if isinstance(nvpmodel, Mapping):
        return nvpmodel.get("name")
    return str(getattr(nvpmodel, "name", nvpmodel))


class JtopSource:
    """jetson-stats for power model, GPU load, heat and power; procfs for the memory signals."""

    name = "jtop"

    def __init__(self, *, clock: Clock = time.monotonic, interval: float = 1.0) -> None:
        from jtop import jtop  # ImportError when jetson-stats is not installed

        self._jetson = jtop(interval=interval)
        self._jetson.start()  # JtopException when the jtop service does not answer
        self.procfs = ProcfsSource(clock=clock)

    def read(self) -> State:
        """Overlay jtop's readings on procfs's (MemAvailable, PSI, cgroup come from procfs)."""
        base = self.procfs.read()
        j = self._jetson
        mapped = state_from_jtop(j.stats, j.memory, j.nvpmodel, j.gpu, t=base.t)
        return replace(
            base,
            source=self.name,
            mem_available_bytes=base.mem_available_bytes or mapped.mem_available_bytes,
            power_mode=mapped.power_mode or base.power_mode,
            gpu_load=mapped.gpu_load,
            gpu_clock_ratio=mapped.gpu_clock_ratio,
            temperature_c=mapped.temperature_c or base.temperature_c,
            power_w=mapped.power_w,
        )

    def close(self) -> None:
        self._jetson.close()


# -- trace replay and recording ----------------------------------------------------------------


class TraceRecord(BaseModel):
    """One line of a trace: `t` seconds from its start; a missing field is unknown."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    t: float = Field(ge=0, allow_inf_nan=False)
    mem_available_bytes: float = Field(ge=0, allow_inf_nan=False)
    mem_total_bytes: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    swap_used_bytes: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cgroup_headroom_bytes: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    psi_memory_some_avg10: float | None = Field(default=None, ge=0, le=100)
    psi_memory_full_avg10: float | None = Field(default=None, ge=0, le=100)
    psi_memory_some_recent: float | None = Field(default=None, ge=0, le=100)
    psi_memory_full_recent: float | None = Field(default=None, ge=0, le=100)
    cgroup_psi_some_recent: float | None = Field(default=None, ge=0, le=100)
    cgroup_psi_full_recent: float | None = Field(default=None, ge=0, le=100)
    cgroup_high_events: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    swapin_per_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cpu_steal: float | None = Field(default=None, ge=0, le=1)
    power_mode: str | None = None
    gpu_load: float | None = Field(default=None, ge=0, le=1)
    gpu_load_others: float | None = Field(default=None, ge=0, le=1)
    gpu_clock_ratio: float | None = Field(default=None, ge=0, le=1)
    cpu_freq_ratio: float | None = Field(default=None, ge=0, le=1)
    temperature_c: float | None = Field(default=None, allow_inf_nan=False)
    on_battery: bool | None = None
    power_w: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    model_bytes: float | None = Field(default=None, ge=0, allow_inf_nan=False)


def load_trace(path: str | Path, /) -> list[State]:
    """Read and validate a JSONL trace; one-line InputError naming the line and field."""
    return [state for state, _ in _load_records(path)]


def _load_records(path: str | Path, /) -> list[tuple[State, float]]:
    """(state, model_bytes) per line: the daemon model's footprint counted in MemAvailable."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read trace {p}: {exc.strerror}") from None
    states: list[tuple[State, float]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = TraceRecord.model_validate(json.loads(line))
        except ValueError as exc:
            why = one_line(exc) if isinstance(exc, ValidationError) else "not valid JSON"
            raise InputError(f"{p} line {number}: {why}") from None
        if states and record.t < states[-1][0].t:
            raise InputError(f"{p} line {number}: t {record.t} goes back in time")
        row = record.model_dump()
        model = row.pop("model_bytes") or 0.0
        states.append((State(source="trace", **row), model))
    if not states:
        raise InputError(f"trace {p} holds no states")
    return states


class TraceSource:
    """Replays a trace in real time (scaled by `speed`): read() gives the state in force now.

    A line's MemAvailable counts its `model_bytes` (the recording daemon's model, 0 when absent:
    a scenario written by hand) as used; replay swaps that for `loaded_bytes`, the footprint
    the replaying daemon has loaded, so a downgrade frees memory as it would on the machine.
    """

    name = "trace"

    def __init__(self, path: str | Path, *, clock: Clock = time.monotonic,
                 speed: float = 1.0) -> None:
        if not speed > 0:
            raise InputError(f"trace speed must be positive, got {speed}")
        records = _load_records(path)
        self.states = [state for state, _ in records]
        self._model = [model for _, model in records]
        self.loaded_bytes = 0.0
        self._clock = clock
        self._speed = speed
        self._start = clock()
        self._index = 0

    @property
    def duration(self) -> float:
        """Seconds of trace time from the first state to the last."""
        return self.states[-1].t

    @property
    def finished(self) -> bool:
        """True once the clock has passed the last state."""
        return self._elapsed() >= self.duration

    def read(self) -> State:
        """The last state whose t has been reached (the first one before that)."""
        elapsed = self._elapsed()
        while self._index + 1 < len(self.states) and self.states[self._index + 1].t <= elapsed:
            self._index += 1
        state = self.states[self._index]
        shift = self._model[self._index] - self.loaded_bytes
        if shift and state.mem_available_bytes is not None:
            state = replace(state, mem_available_bytes=max(state.mem_available_bytes + shift, 0))
        return state

    def restart(self) -> None:
        """Start the replay again from its first state, now."""
        self._start = self._clock()
        self._index = 0

    def elapsed(self) -> float:
        """Seconds of trace time since the replay started."""
        return self._elapsed()

    def close(self) -> None:
        """Nothing to release."""

    def _elapsed(self) -> float:
        return (self._clock() - self._start) * self._speed


class Recorder:
    """Writes states as trace lines (`--record FILE`), t counted from the first one."""

    _KEYS = tuple(f.name for f in fields(State) if f.name != "source")

    def __init__(self, path: str | Path, /) -> None:
        self.path = Path(path)
        self._file = self.path.open("w", encoding="utf-8")
        self._t0: float | None = None

    def write(self, state: State, /, *, model_bytes: float | None = None) -> None:
        """Append one line (with the daemon's own model footprint, counted in MemAvailable);
        unknown fields are left out (a line needs MemAvailable)."""
        if state.mem_available_bytes is None:
            return
        if self._t0 is None:
            self._t0 = state.t
        row = {k: v for k, v in asdict(state).items() if k in self._KEYS and v is not None}
        row["t"] = round(state.t - self._t0, 3)
        if model_bytes:
            row["model_bytes"] = model_bytes
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# -- opening by spec ---------------------------------------------------------------------------


def open_source(spec: str, /, *, clock: Clock = time.monotonic) -> Source:
    """`auto` (jtop, else procfs, saying so once), `procfs`, `jtop` or `trace:FILE`."""
    kind, _, arg = spec.partition(":")
    if kind == "trace":
        if not arg:
            raise InputError("monitor spec 'trace:' needs a file: trace:FILE")
        return TraceSource(arg, clock=clock)
    if arg:
        raise InputError(f"monitor spec '{spec}' takes no argument")
    if kind == "procfs":
        return ProcfsSource(clock=clock)
    if kind in ("jtop", "auto"):
        try:
            return _open_jtop(clock)
        except _JtopUnavailable as exc:
            if kind == "jtop":
                raise InputError(f"jtop is not available: {exc}") from None
            log.warning("jtop is not available (%s); monitoring through procfs/psutil", exc)
            return ProcfsSource(clock=clock)
    raise InputError(f"unknown monitor '{spec}' (use auto, procfs, jtop or trace:FILE)")


class _JtopUnavailable(Exception):
    """jetson-stats is not installed or its service does not answer."""


def _open_jtop(clock: Clock) -> JtopSource:
    """A JtopSource, or _JtopUnavailable saying why in one line."""
    try:
        from jtop import JtopException
    except ImportError as exc:
        raise _JtopUnavailable(f"jetson-stats is not installed ({exc})") from None
    try:
        return JtopSource(clock=clock)
    except JtopException as exc:
        raise _JtopUnavailable(_first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

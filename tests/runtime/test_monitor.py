"""Monitor: procfs/PSI/cgroup parsers on real and recorded files, jtop mapping and fallback,
trace replay and recording."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from apreqeld.errors import InputError
from apreqeld.runtime.monitor import (
    ProcfsSource,
    Recorder,
    State,
    TraceSource,
    cgroup_headroom,
    cgroup_memory_files,
    load_trace,
    open_source,
    parse_cgroup_mounts,
    parse_meminfo,
    parse_proc_cgroup,
    parse_psi,
    state_from_jtop,
)

DATA = Path(__file__).resolve().parents[1] / "data"
KIB = 1024


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_meminfo_uses_memavailable_in_bytes() -> None:
    mem = parse_meminfo((DATA / "meminfo_sample.txt").read_text())
    assert mem["MemAvailable"] == 2895680 * KIB and mem["MemFree"] == 203456 * KIB
    assert mem["HugePages_Total"] == 0


def test_psi_sample_and_this_machine() -> None:
    assert parse_psi((DATA / "psi_memory_pressure.txt").read_text()) == (23.51, 11.02)
    assert parse_psi("some avg10=1.50 avg60=0 avg300=0 total=5\n") == (1.5, None)
    real = Path("/proc/pressure/memory")
    if not real.exists():
        pytest.skip("this kernel has no PSI")
    some, full = parse_psi(real.read_text())
    assert 0 <= some <= 100 and 0 <= full <= 100


def test_cgroup_v2_sample() -> None:
    paths = parse_proc_cgroup((DATA / "proc_self_cgroup_v2.txt").read_text())
    assert paths == {"": "/system.slice/apreqeld.service"}
    mounts = parse_cgroup_mounts((DATA / "mountinfo_v2.txt").read_text())
    assert mounts == {"": ("/", "/sys/fs/cgroup")}
    files = cgroup_memory_files((DATA / "proc_self_cgroup_v2.txt").read_text(),
                                (DATA / "mountinfo_v2.txt").read_text())
    folder = Path("/sys/fs/cgroup/system.slice/apreqeld.service")
    assert files == [(folder / "memory.max", folder / "memory.current")]
    assert cgroup_headroom("4294967296\n", "1073741824\n") == 3 * 2**30
    assert cgroup_headroom("max\n", "1073741824\n") is None
    assert cgroup_headroom("9223372036854771712\n", "17707008\n") is None  # v1 "no limit"
    assert cgroup_headroom("100\n", "200\n") == 0.0


def test_cgroup_files_of_this_machine_parse() -> None:
    proc, mounts = Path("/proc/self/cgroup"), Path("/proc/self/mountinfo")
    if not proc.exists():
        pytest.skip("no /proc/self/cgroup (not Linux)")
    own, mountinfo = proc.read_text(), mounts.read_text()
    files = cgroup_memory_files(own, mountinfo)
    paths, mounted = parse_proc_cgroup(own), parse_cgroup_mounts(mountinfo)
    # every hierarchy this process is in and that is mounted gives one pair, v2 first
    expected = [key for key in ("", "memory") if key in paths and key in mounted]
    assert expected, "no mounted cgroup hierarchy for this process"
    assert len(files) == len(expected)
    for key, (limit, usage) in zip(expected, files, strict=True):
        assert limit.parent == usage.parent and limit.parent.is_dir(), limit
        assert limit.name == ("memory.max" if key == "" else "memory.limit_in_bytes")
        root, mountpoint = mounted[key]
        assert str(limit.parent).startswith(mountpoint)
        assert str(limit.parent).endswith(paths[key].removeprefix(root).rstrip("/"))
    found = [(lim, use) for lim, use in files if lim.exists() and use.exists()]
    if not found:
        assert ProcfsSource().read().cgroup_headroom_bytes is None
        return
    limit, usage = found[0]
    text = limit.read_text().strip()
    unlimited = not text.isdigit() or int(text) >= 2**60
    headroom = cgroup_headroom(text, usage.read_text())
    assert (headroom is None) == unlimited
    live = ProcfsSource().read().cgroup_headroom_bytes
    if unlimited:
        assert live is None
    else:  # the usage moves between two reads, not by more than a few MiB
        assert live is not None and abs(live - headroom) < 64 * 1024**2


def test_procfs_source_on_a_recorded_root(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/pressure").mkdir()
    shutil.copy(DATA / "meminfo_sample.txt", tmp_path / "proc/meminfo")
    shutil.copy(DATA / "psi_memory_pressure.txt", tmp_path / "proc/pressure/memory")
    shutil.copy(DATA / "proc_self_cgroup_v2.txt", tmp_path / "proc/self/cgroup")
    shutil.copy(DATA / "mountinfo_v2.txt", tmp_path / "proc/self/mountinfo")
    cg = tmp_path / "sys/fs/cgroup/system.slice/apreqeld.service"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text("2147483648\n")
    (cg / "memory.current").write_text("536870912\n")
    (tmp_path / "sys/firmware/acpi").mkdir(parents=True)
    (tmp_path / "sys/firmware/acpi/platform_profile").write_text("low-power\n")
    for i, milli in enumerate(("45000", "61500")):
        zone = tmp_path / f"sys/class/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "temp").write_text(milli + "\n")
    clock = Clock()
    source = ProcfsSource(root=tmp_path, clock=clock)
    clock.now += 2.5
    s = source.read()
    assert s.t == 2.5 and s.source == "procfs"
    assert s.mem_available_bytes == 2895680 * KIB and s.mem_total_bytes == 7620440 * KIB
    assert s.swap_used_bytes == (3810208 - 3619698) * KIB
    assert s.cgroup_headroom_bytes == 1.5 * 2**30
    assert (s.psi_memory_some_avg10, s.psi_memory_full_avg10) == (23.51, 11.02)
    assert s.power_mode == "low-power" and s.temperature_c == 61.5


def test_procfs_source_with_nothing_says_unknown(tmp_path: Path) -> None:
    s = ProcfsSource(root=tmp_path).read()
    assert s.mem_available_bytes is None and s.psi_memory_some_avg10 is None
    assert s.cgroup_headroom_bytes is None and s.power_mode is None


def test_procfs_source_on_this_machine() -> None:
    s = ProcfsSource().read()
    assert 0 < s.mem_available_bytes <= s.mem_total_bytes
    assert s.gpu_load is None or 0 <= s.gpu_load <= 1


def test_state_from_jtop_sample() -> None:
    sample = json.loads((DATA / "jtop_orin_nano.json").read_text())
    s = state_from_jtop(sample["stats"], sample["memory"], sample["nvpmodel"], sample["gpu"],
                        t=3.0)
    assert s.source == "jtop" and s.t == 3.0
    assert s.mem_total_bytes == 7620440 * KIB
    assert s.mem_available_bytes == (1203456 + 98304 + 1593920) * KIB
    assert s.swap_used_bytes == 190510 * KIB
    assert s.power_mode == "15W" and s.gpu_load == pytest.approx(0.734)
    assert s.temperature_c == 55.2  # the offline sensor's -256 is ignored
    assert s.power_w == pytest.approx(7.123)


def test_state_from_jtop_with_little_data() -> None:
    s = state_from_jtop({"nvp model": "MAXN"}, {}, None, {}, t=0.0)
    assert s.power_mode == "MAXN" and s.mem_available_bytes is None and s.gpu_load is None


def test_auto_falls_back_to_procfs_with_real_jetson_stats_and_no_service(caplog) -> None:
    pytest.importorskip("jtop")
    with caplog.at_level(logging.WARNING, logger="apreqeld.runtime.monitor"):
        source = open_source("auto")
    assert isinstance(source, ProcfsSource)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("jtop is not available (The jtop.service is not active")
    with pytest.raises(InputError, match="jtop is not available: The jtop.service is not"):
        open_source("jtop")


def test_open_source_specs(tmp_path: Path) -> None:
    assert isinstance(open_source("procfs"), ProcfsSource)
    assert isinstance(open_source(f"trace:{DATA / 'trace_pressure.jsonl'}"), TraceSource)
    with pytest.raises(InputError, match=r"unknown monitor 'x' \(use auto, procfs, jtop"):
        open_source("x")
    with pytest.raises(InputError, match="needs a file"):
        open_source("trace:")


def test_trace_replays_in_time() -> None:
    clock = Clock()
    source = TraceSource(DATA / "trace_pressure.jsonl", clock=clock)
    assert source.read().mem_available_bytes == 12e9 and source.read().power_mode == "MAXN"
    clock.now += 10.5
    s = source.read()
    assert s.mem_available_bytes == 3e9 and s.psi_memory_some_avg10 == 25.0
    assert s.power_mode is None and s.cgroup_headroom_bytes is None  # missing = unknown
    clock.now += 20
    assert source.read().power_mode == "15W" and source.finished


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"t": 0}', r"line 2: mem_available_bytes: Field required"),
        ('{"t": 0, "mem_available_bytes": 1, "gpu_load": 3}', r"line 2: gpu_load: Input should"),
        ('{"t": 0, "mem_available_bytes": 1, "colour": 3}', r"line 2: colour: Extra inputs"),
        ("{nope", r"line 2: not valid JSON"),
        ('{"t": -1, "mem_available_bytes": 1}', r"line 2: t: Input should be greater"),
    ],
)
def test_trace_errors_name_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"t": 0, "mem_available_bytes": 5}\n' + line + "\n")
    with pytest.raises(InputError, match=message):
        load_trace(path)


def test_recorder_writes_a_replayable_trace(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    rec = Recorder(path)
    rec.write(State(t=50.0, source="procfs", mem_available_bytes=8e9, psi_memory_some_avg10=1.0))
    rec.write(State(t=51.0, source="procfs", mem_available_bytes=None))  # nothing to replay
    rec.write(State(t=52.0, source="procfs", mem_available_bytes=7e9, power_mode="quiet"))
    rec.close()
    states = load_trace(path)
    assert [s.t for s in states] == [0.0, 2.0]
    assert states[0].psi_memory_some_avg10 == 1.0 and states[1].power_mode == "quiet"
    assert states[1].psi_memory_some_avg10 is None

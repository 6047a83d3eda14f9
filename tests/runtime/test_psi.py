"""PSI triggers against this kernel's real files (skipped, saying why, where it refuses), a
trigger firing under a real memory hog in a memory cgroup of its own, and the real daemon
shedding memory when that hog makes the machine stall: from the hog's start to the decision."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apreqeld.client import Client
from apreqeld.core.pressure import SHED_SOME_PCT
from apreqeld.runtime.monitor import parse_psi
from apreqeld.runtime.psi import WINDOWS_S, PressureWatch, register, trigger_text
from test_daemon import Events

PSI = Path("/proc/pressure/memory")
HOG_LIMIT = 40 * 1024**2  # the hog's cgroup: a working set of 256 MiB thrashes in it
HOG_FILE_MIB = 256
HOG = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    for off in range(0, len(m), 4096):
        m[off]
"""


def test_trigger_text_is_the_kernels_format() -> None:
    assert trigger_text("some", 0.2, 1.0) == b"some 200000 1000000\0"
    assert trigger_text("full", 0.05, 2.0) == b"full 100000 2000000\0"


def test_a_trigger_registers_on_this_kernel_or_the_refusal_is_said() -> None:
    if not PSI.exists():
        pytest.skip("this kernel has no PSI (/proc/pressure/memory)")
    got = register(PSI, share=0.2)
    if isinstance(got, str):
        pytest.skip(f"this kernel refuses PSI triggers: {got}")
    fd, trigger = got
    os.close(fd)
    assert trigger.window_s in WINDOWS_S and trigger.kind == "some"
    assert trigger.threshold_s == pytest.approx(0.2 * trigger.window_s)


def test_files_without_psi_are_refused_with_the_reason(tmp_path: Path) -> None:
    plain = tmp_path / "memory.pressure"
    plain.write_text("not a pressure file\n")
    watch = PressureWatch([tmp_path / "gone" / "memory.pressure", plain], share=0.2,
                          on_event=lambda _p: None)
    try:
        refused = watch.status()["refused"]
        assert refused[str(tmp_path / "gone" / "memory.pressure")] == \
            "no such file (no PSI here)"
        assert refused[str(plain)] == f"{plain} is not a kernel pressure file"
        assert plain.read_text() == "not a pressure file\n" and not watch.active
    finally:
        watch.close()


def some_avg10() -> float:
    """The machine's PSI memory `some` avg10 now (%)."""
    return parse_psi(PSI.read_text())[0]


def wait_for_calm(timeout: float = 90) -> None:
    """Until PSI's avg10 has decayed well below the shedding threshold (an earlier hog, here
    or in another test, keeps it up for tens of seconds): the daemon starts on a calm machine."""
    deadline = time.monotonic() + timeout
    while some_avg10() >= SHED_SOME_PCT / 4:
        if time.monotonic() > deadline:
            pytest.skip(f"the machine stays under memory pressure (PSI some avg10 "
                        f"{some_avg10():.1f} %): no calm start to shed from")
        time.sleep(0.5)


@pytest.fixture
def hog(tmp_path: Path) -> Iterator:
    """Start, on call, a process that thrashes its page cache in a memory cgroup of 40 MiB
    (cgroup v1's memory controller or v2, whichever this machine has); skipped where no
    cgroup can be made."""
    if os.geteuid() != 0:
        pytest.skip("making a memory cgroup needs root")
    if not PSI.exists():
        pytest.skip("this kernel has no PSI")
    roots = [Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")]
    root = next((r for r in roots if (r / "memory.limit_in_bytes").exists()
                 or (r / "cgroup.subtree_control").exists()
                 and "memory" in (r / "cgroup.controllers").read_text()), None)
    if root is None:
        pytest.skip("no memory cgroup controller to put the hog in")
    group = root / f"apreqel-test-hog-{os.getpid()}"
    group.mkdir()
    limit = "memory.limit_in_bytes" if (root / "memory.limit_in_bytes").exists() else \
        "memory.max"
    (group / limit).write_text(str(HOG_LIMIT))
    data = tmp_path / "hog.bin"
    with data.open("wb") as f:
        for _ in range(HOG_FILE_MIB):
            f.write(os.urandom(1024**2))
        f.flush()
        os.fsync(f.fileno())
    procs: list[subprocess.Popen] = []

    def start(seconds: float) -> subprocess.Popen:
        fd = os.open(data, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: every page read again
        os.close(fd)
        proc = subprocess.Popen([sys.executable, "-c", HOG, str(data), str(seconds)],
                                preexec_fn=lambda: (group / "cgroup.procs").write_text(
                                    str(os.getpid())))
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
    time.sleep(0.2)
    group.rmdir()
    settle_pressure()  # the tests after this one start on a calm machine


def settle_pressure(timeout: float = 90) -> None:
    """Until PSI's avg10 has decayed below a quarter of the shedding threshold (bounded)."""
    deadline = time.monotonic() + timeout
    while some_avg10() >= SHED_SOME_PCT / 4 and time.monotonic() < deadline:
        time.sleep(0.5)


def test_a_trigger_fires_under_a_real_memory_hog(hog) -> None:
    fired: list[float] = []
    watch = PressureWatch([PSI], share=0.2, on_event=lambda _p: fired.append(time.monotonic()))
    if not watch.active:
        watch.close()
        pytest.skip(f"no trigger could be set: {watch.status()['refused']}")
    try:  # the hog runs until a trigger fires (how soon is bench material, printed here)
        t0 = time.monotonic()
        proc = hog(20)
        while not fired and proc.poll() is None:
            time.sleep(0.05)
        proc.kill()
        proc.wait(30)
    finally:
        watch.close()
    assert fired, "20 s of the hog made no trigger fire"
    print(f"\nfirst trigger {fired[0] - t0:.2f} s after the hog started, {len(fired)} in all")


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_daemon_sheds_when_a_real_hog_makes_the_machine_stall(daemon_factory, tiny_plans,
                                                                  hog) -> None:
    """Plenty of MemAvailable (the serving member still fits), but the machine stalls on
    memory: the daemon moves to a smaller member, and says why; from the hog's start to the
    decision is printed (the goal: within a second of the pressure's onset with triggers)."""
    ids = tiny_plans.by_label
    wait_for_calm()
    d = daemon_factory("--priority", "accuracy", "--monitor", "procfs",
                       "--monitor-interval", "1", "--dwell", "60")
    events = Events(d.socket)
    try:
        with Client(d.socket, timeout=60) as c:
            assert c.status()["plan"] == ids["q8_0"]  # the largest: accuracy first
            t0 = time.time()
            proc = hog(8)
            pressure = events.wait_for("pressure", timeout=20)[0]
            decided = events.wait_for("swap_done", timeout=30)[0]
            proc.wait(30)
            status = c.status()
    finally:
        events.close()
    assert decided["to"] != ids["q8_0"] and "shedding memory" in decided["reason"], decided
    assert tiny_plans.planset.member(decided["to"]).measured.footprint_bytes < \
        tiny_plans.planset.member(ids["q8_0"]).measured.footprint_bytes
    print(f"\npressure seen {pressure['time'] - t0:.2f} s after the hog started "
          f"({pressure['reason']}, trigger: {pressure['trigger']}); swap done "
          f"{decided['time'] - t0:.2f} s; reaction {status['pressure']['last_reaction']}")
    assert pressure["time"] - t0 < 5

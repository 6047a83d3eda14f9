"""PSI triggers: the kernel wakes the daemon when tasks stall on memory for more than a share
of a short window (Documentation/accounting/psi.rst), instead of the daemon finding out from
avg10, which lags by about ten seconds.

A trigger is `some THRESHOLD_US WINDOW_US` written (NUL-terminated) to a pressure file opened
read-write; the file then polls POLLPRI when the stall in any window passes the threshold.
This kernel refuses windows that are not a multiple of 2 s from processes without
CAP_SYS_RESOURCE (EINVAL), so each window is tried in turn: 1 s, then 2 s. Where every one is
refused, or there is no PSI (some Jetson kernels), the monitor's readings of PSI's totals
each interval are the fallback, and `status` says so.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

WINDOWS_S = (1.0, 2.0)
POLL_MS = 500  # how often the watching thread looks at its stop flag


@dataclass(frozen=True)
class Trigger:
    """One registered trigger: the file, its window and threshold."""

    path: str
    kind: str  # "some" or "full"
    window_s: float
    threshold_s: float


@dataclass
class Registration:
    """What registering found: the triggers set and, per file, why none could be."""

    triggers: list[Trigger] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def trigger_text(kind: str, share: float, window_s: float, /) -> bytes:
    """`some 200000 1000000\\0`: stalls of `share` of a `window_s` window."""
    window_us = int(window_s * 1e6)
    return f"{kind} {int(share * window_us)} {window_us}\0".encode()


def register(path: str | Path, /, *, kind: str = "some", share: float = 0.2,
             windows: Sequence[float] = WINDOWS_S) -> tuple[int, Trigger] | str:
    """(open file descriptor, trigger), or why the kernel refused every window. A file that
    is not a kernel pressure file (those read as PSI lines and stat as empty) is refused
    unwritten."""
    try:
        text, size = Path(path).read_text(), os.stat(path).st_size
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if size != 0 or not text.startswith("some avg10="):
        return f"{path} is not a kernel pressure file"
    last = "no window tried"
    for window in windows:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        except OSError as exc:
            return f"cannot open {path}: {exc.strerror}"
        try:
            os.write(fd, trigger_text(kind, share, window))
        except OSError as exc:
            os.close(fd)
            last = f"{kind} trigger with a {window:g} s window refused ({exc.strerror})"
            continue
        return fd, Trigger(str(path), kind, window, share * window)
    return last


class PressureWatch:
    """Triggers on memory pressure files, watched by one thread; `on_event(path)` is called
    from that thread (the caller hands it to its loop) each time one fires."""

    def __init__(self, paths: Sequence[str | Path], /, *, share: float,
                 on_event: Callable[[str], None]) -> None:
        self.registration = Registration()
        self._fds: dict[int, Trigger] = {}
        for path in paths:
            if not Path(path).exists():
                self.registration.refused[str(path)] = "no such file (no PSI here)"
                continue
            got = register(path, share=share)
            if isinstance(got, str):
                self.registration.refused[str(path)] = got
                continue
            fd, trigger = got
            self._fds[fd] = trigger
            self.registration.triggers.append(trigger)
        self.fired = 0
        self._on_event = on_event
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._fds:
            self._thread = threading.Thread(target=self._watch, name="psi-triggers",
                                            daemon=True)
            self._thread.start()

    @property
    def active(self) -> bool:
        return bool(self._fds)

    def _watch(self) -> None:
        poller = select.poll()
        for fd in self._fds:
            poller.register(fd, select.POLLPRI)
        while not self._stop.is_set():
            for fd, events in poller.poll(POLL_MS):
                if events & select.POLLERR:  # the file went away (cgroup removed)
                    poller.unregister(fd)
                    continue
                if events & select.POLLPRI:
                    self.fired += 1
                    with contextlib.suppress(Exception):
                        self._on_event(self._fds[fd].path)

    def status(self) -> dict:
        return {"triggers": [t.__dict__ for t in self.registration.triggers],
                "refused": dict(self.registration.refused), "fired": self.fired}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * POLL_MS / 1000)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

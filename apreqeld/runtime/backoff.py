"""Failures per member: capped exponential backoff, then quarantine (pure; the clock injected).

A member's failure (a load that failed, a worker that died unasked) is retried at once the
first time; after n > 1 failures in a row it waits `base_s * 2**(n-2)` seconds, at most
`cap_s`, before the next try; after `quarantine_after` failures in a row it is quarantined
for `quarantine_s`: no swap, no restart goes to it, and `status` says so. A request served by
it clears its record; so do a plan-set reload and a controller's explicit `pin` (the user asks
for one more try).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from apreqeld.errors import InputError

Clock = Callable[[], float]


@dataclass
class Record:
    """One member's failures in a row, when it may be tried again, and why it last failed."""

    failures: int = 0
    retry_at: float = 0.0
    quarantined_until: float | None = None
    reason: str = ""


class Health:
    """The failure records of the plan set's members."""

    def __init__(self, *, base_s: float = 1.0, cap_s: float = 60.0, quarantine_after: int = 3,
                 quarantine_s: float = 600.0, clock: Clock = time.monotonic) -> None:
        if base_s <= 0 or cap_s < base_s or quarantine_after < 1 or quarantine_s <= 0:
            raise InputError(f"backoff needs 0 < base <= cap, quarantine after >= 1 and a "
                             f"positive quarantine, got {base_s}, {cap_s}, {quarantine_after}, "
                             f"{quarantine_s}")
        self.base_s, self.cap_s = base_s, cap_s
        self.quarantine_after, self.quarantine_s = quarantine_after, quarantine_s
        self._clock = clock
        self._records: dict[str, Record] = {}

    def failed(self, member: str, reason: str, /) -> Record:
        """Count one failure; the record says whether it is now quarantined."""
        now = self._clock()
        r = self._records.setdefault(member, Record())
        r.failures += 1
        r.reason = reason
        r.retry_at = now + self.delay_s(r.failures)
        if r.failures >= self.quarantine_after:
            r.quarantined_until = now + self.quarantine_s
        return r

    def delay_s(self, failures: int, /) -> float:
        """The wait after `failures` failures in a row."""
        return 0.0 if failures <= 1 else min(self.cap_s, self.base_s * 2 ** (failures - 2))

    def succeeded(self, member: str, /) -> bool:
        """Forget the member's failures; True when it had any."""
        return self._records.pop(member, None) is not None

    def quarantined(self, member: str, /) -> bool:
        r = self._records.get(member)
        if r is None or r.quarantined_until is None:
            return False
        if self._clock() < r.quarantined_until:
            return True
        # the quarantine is over: one more try, and one more failure quarantines it again
        r.quarantined_until, r.failures = None, self.quarantine_after - 1
        return False

    def wait_s(self, member: str, /) -> float:
        """Seconds before the member may be tried again (0.0: now)."""
        r = self._records.get(member)
        return max(0.0, r.retry_at - self._clock()) if r else 0.0

    def available(self, member: str, /) -> bool:
        """Neither quarantined nor backing off."""
        return not self.quarantined(member) and self.wait_s(member) == 0.0

    def keep(self, members: Iterable[str], /) -> None:
        """Drop the records of members no longer in the plan set."""
        keep = set(members)
        for member in [m for m in self._records if m not in keep]:
            del self._records[member]

    def clear(self) -> None:
        self._records.clear()

    def view(self) -> dict[str, dict]:
        """For status: failures, seconds before a retry, quarantine, last reason, by member."""
        now = self._clock()
        out = {}
        for member, r in self._records.items():
            quarantined = self.quarantined(member)
            out[member] = {"failures": r.failures, "retry_in_s": round(max(0.0, r.retry_at - now),
                                                                     2),
                           "quarantined": quarantined,
                           "quarantined_for_s": (round(r.quarantined_until - now, 1)
                                                 if quarantined and r.quarantined_until else None),
                           "reason": r.reason}
        return out

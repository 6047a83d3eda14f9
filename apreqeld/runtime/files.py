"""Member files: the one place the daemon gets a loadable GGUF for a plan-set member.

Today a member is one file in the state dir, materialized from its recipe (in a thread,
through `apreqeld.planset.materialize`) when missing. `ensure` never runs twice for one member
at a time; `prefetch` builds the missing ones in the background, smallest first, and waits
while a request is served (`on_request_start`/`on_request_end`, called by the worker pool).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

from apreqeld.errors import DaemonError
from apreqeld.manifest import Member, PlanSet, member_filename
from apreqeld.runtime import wire


class MemberFiles:
    """path_of / present / ensure / prefetch for the members of the current plan set."""

    def __init__(self, state_dir: Path, planset: PlanSet, *,
                 emit: Callable[..., object] = lambda *_a, **_k: None) -> None:
        self.state_dir = Path(state_dir)
        self.planset = planset
        self._emit = emit
        self._locks: dict[str, asyncio.Lock] = {}
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._serving = 0

    def use(self, planset: PlanSet, /) -> None:
        """A reloaded plan set: its members from now on."""
        self.planset = planset
        ids = {m.id for m in planset.members}
        for member in [k for k, lock in self._locks.items() if k not in ids and
                       not lock.locked()]:
            del self._locks[member]

    def path_of(self, member: Member, /) -> Path:
        return self.state_dir / member_filename(self.planset, member)

    def present(self, member: Member, /) -> bool:
        path = self.path_of(member)
        return path.is_file() and path.stat().st_size == member.file_bytes

    async def ensure(self, member: Member, /) -> Path:
        """The member's GGUF, built from its recipe when missing (DaemonError when it cannot
        be)."""
        lock = self._locks.setdefault(member.id, asyncio.Lock())
        async with lock:  # the prefetch and a swap may want the same member
            if self.present(member):
                return self.path_of(member)
            return await self._materialize(member)

    async def prefetch(self, members: Iterable[Member], /) -> None:
        """Build the missing members, smallest footprint first, between requests."""
        for member in sorted(members, key=lambda m: m.measured.footprint_bytes):
            if not self.present(member):
                await self._quiet.wait()
                with contextlib.suppress(DaemonError):
                    await self.ensure(member)

    def on_request_start(self) -> None:
        self._serving += 1
        self._quiet.clear()

    def on_request_end(self) -> None:
        self._serving = max(0, self._serving - 1)
        if not self._serving:
            self._quiet.set()

    async def _materialize(self, member: Member) -> Path:
        self._emit("materialize", plan=member.id, reason="GGUF missing from the state dir")
        try:
            from apreqeld.planset import materialize
        except ImportError:
            raise DaemonError(f"{member.id} has no GGUF at {self.path_of(member)} and this "
                              "build cannot materialize it", code=wire.UNAVAILABLE) from None
        try:
            paths = await asyncio.to_thread(materialize, self.planset, self.state_dir,
                                            members=[member])
        except Exception as exc:  # noqa: BLE001 - one line to the user, the daemon lives on
            raise DaemonError(f"cannot materialize {member.id}: {exc}",
                              code=wire.UNAVAILABLE) from None
        return Path(paths.get(member.id, self.path_of(member)))

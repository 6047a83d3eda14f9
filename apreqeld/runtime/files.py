"""Member files for the daemon: each member is assembled from the shard store by links, in
milliseconds; the supervisor never quantizes. A shard the store lacks is built by a child
process (`apreqel planset materialize --member ID --idle`: crash-isolated, SCHED_IDLE, nice
19, idle I/O), one at a time; a background build (prefetch) is paused (SIGSTOP) while a
request is served and resumed between requests, a build a swap waits for is not paused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from apreqeld.errors import ApreqelError, DaemonError
from apreqeld.evidence.footprint import mapped_rss
from apreqeld.manifest import Member, PlanSet, manifest_path, member_shards
from apreqeld.runtime import wire
from apreqeld.store.shards import Assembly, MissingShards, ShardStore

BUILD_TIMEOUT_S = 3600.0
PRESENT_TTL_S = 1.0
Emit = Callable[..., object]


class MemberFiles:
    """The one owner of member files and of the child that builds missing shards."""

    def __init__(self, state_dir: Path, plans: Path, planset: PlanSet, /, *,
                 emit: Emit = lambda *_a, **_k: None, workdir: Path | None = None) -> None:
        self.store = ShardStore(Path(state_dir))
        self.plans = Path(plans)
        self.workdir = workdir
        self.emit = emit
        self.planset = planset
        self.builds = 0  # children started
        self._lock = asyncio.Lock()  # one build at a time
        self._child: asyncio.subprocess.Process | None = None
        self._child_pausable = False
        self._serving = 0  # requests being served now
        self._present: dict[str, tuple[float, bool]] = {}  # identity -> (checked, present)
        self.use(planset)

    def use(self, planset: PlanSet, /) -> None:
        """Serve this plan set from now on (start, reload); it is registered with the store."""
        if planset.store is None:
            raise DaemonError(f"plan set {planset.name} has no shard table (format 1): "
                              "run `apreqel planset upgrade` on it", code=wire.INVALID)
        self.planset = planset
        with contextlib.suppress(OSError, ApreqelError):
            self.store.register(planset, manifest_path(self.plans))

    def assembly(self, member: Member, /) -> Assembly:
        return Assembly(tuple(member_shards(self.planset, member)))

    def path(self, member: Member, /) -> Path:
        """Where the member's first split is once assembled."""
        return self.store.member_path(self.assembly(member))

    def present(self, member: Member, /) -> bool:
        """Whether the member can load now without building anything: its links and shards
        checked (stats only) at most once a second, as status and `plans` ask often."""
        assembly = self.assembly(member)
        now = time.monotonic()
        known = self._present.get(assembly.identity)
        if known is None or now - known[0] > PRESENT_TTL_S:
            known = self._present[assembly.identity] = (now, self.store.assembled(assembly))
        return known[1]

    async def ensure(self, member: Member, /, *, background: bool = False) -> Path:
        """The member's loadable path: assembled (ms), after its missing shards are built by
        a child process when the store lacks any."""
        assembly = self.assembly(member)
        try:
            return await self._assemble(assembly)
        except MissingShards as missing:
            reason = str(missing)
        async with self._lock:
            try:  # another build may have made them meanwhile
                return await self._assemble(assembly)
            except MissingShards:
                pass
            await self._build(member, reason=reason, background=background)
            self._present.clear()
        try:
            return await self._assemble(assembly)
        except MissingShards as exc:
            raise DaemonError(f"{member.id}: {exc} after building them",
                              code=wire.UNAVAILABLE) from None

    async def _assemble(self, assembly: Assembly) -> Path:
        try:
            path = await asyncio.to_thread(self.store.assemble, assembly)
        except MissingShards:
            self._present[assembly.identity] = (time.monotonic(), False)
            raise
        self._present[assembly.identity] = (time.monotonic(), True)
        return path

    async def prefetch(self, members: Sequence[Member], /) -> None:
        """Make sure the members the policy can choose are loadable, smallest first, building
        missing shards in the background (errors become events, the daemon lives on)."""
        for member in sorted(members, key=lambda m: m.measured.footprint_bytes):
            with contextlib.suppress(DaemonError):
                await self.ensure(member, background=True)

    async def _build(self, member: Member, *, reason: str, background: bool) -> None:
        cmd = [sys.executable, "-m", "apreqeld.cli.apreqel", "planset", "materialize",
               str(self.plans), "--state-dir", str(self.store.state_dir), "--member",
               member.id, "--idle"]
        if self.workdir is not None:
            cmd += ["--workdir", str(self.workdir)]
        self.emit("build_start", plan=member.id, reason=reason, background=background)
        self.builds += 1
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        self._child, self._child_pausable = proc, background
        if background and self._serving:
            self._signal(signal.SIGSTOP)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), BUILD_TIMEOUT_S)
        except TimeoutError:
            self._signal(signal.SIGKILL)
            await proc.wait()
            err = b"timed out"
        except asyncio.CancelledError:
            self._signal(signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
            raise
        finally:
            self._child = None
        if proc.returncode != 0:
            lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
            detail = (lines[-1] if lines else f"exit code {proc.returncode}").removeprefix(
                "error: ")
            self.emit("build_failed", plan=member.id, reason=detail)
            raise DaemonError(f"cannot build the shards of {member.id}: {detail}",
                              code=wire.UNAVAILABLE)
        self.emit("build_done", plan=member.id)

    # ------------------------------------------------------------------ serving hooks

    def request_started(self) -> None:
        """A request is being served: a background build stops using the CPU."""
        self._serving += 1
        if self._serving == 1 and self._child_pausable:
            self._signal(signal.SIGSTOP)

    def request_finished(self) -> None:
        self._serving = max(0, self._serving - 1)
        if self._serving == 0:
            self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        child = self._child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)

    async def close(self) -> None:
        """Stop a build in progress (SIGKILL works on a stopped child too)."""
        child = self._child
        if child is not None and child.returncode is None:
            self._signal(signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await child.wait()

    # ------------------------------------------------------------------ memory

    def shared_bytes(self, pid: int, loaded: Member, target: Member, /) -> int:
        """Bytes of `target`'s shards that the worker `pid` (serving `loaded`) already has
        resident: the page cache a second worker shares instead of reading again. Measured
        from /proc/PID/smaps (0 where it cannot be read)."""
        common = set(self.assembly(loaded).shards) & set(self.assembly(target).shards)
        if not common:
            return 0
        resident = mapped_rss(self.path(loaded), pid=pid) or {}
        wanted = {str(self.store.shard_path(s).resolve()) for s in common}
        return sum(b for f, b in resident.items() if f in wanted)

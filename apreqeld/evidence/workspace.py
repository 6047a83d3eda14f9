"""The work directory ($APREQEL_HOME): models, references and the measurement cache, keyed by
what determines each measurement, shared by processes through a file lock; and the state
directory (by default `$APREQEL_HOME/state`) whose shard store every measured model is
assembled from."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from apreqeld.core.disturbance import CLEAN, UNCHECKED
from apreqeld.core.plans import canonical_sha256
from apreqeld.errors import InputError
from apreqeld.evidence.protocol import Protocol, machine_fingerprint
from apreqeld.gguf.view import file_sha256
from apreqeld.storage import default_workdir, write_json_atomic
from apreqeld.store.shards import ShardStore, model_identity

if TYPE_CHECKING:
    from apreqeld.evidence.reference import Reference

LOCK_NAME = ".lock"
# What `apreqel cache` reports, by kind: glob patterns relative to the work directory.
KINDS: dict[str, tuple[str, ...]] = {
    "references": ("models/*/reference-f16.gguf", "models/*/tokens-*.npy",
                   "models/*/reference-logprobs-*.npz"),
    "measurements": ("measurements/*.json",),
    "layer profiles": ("models/*/layers-*.json",),
}


class Workspace:
    """The work directory. While it lives, it holds a shared lock on `root/.lock`, so that any
    number of CLI runs and a daemon can use it together and `clear` waits for none of them."""

    def __init__(self, root: Path | None = None, *, state_dir: Path | None = None) -> None:
        self.root = Path(root) if root else default_workdir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_dir = Path(state_dir) if state_dir else self.root / "state"
        self._store: ShardStore | None = None
        self._lock = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_SH)

    @property
    def store(self) -> ShardStore:
        """The shard store of the state directory (made, and its ownership checked, once)."""
        if self._store is None:
            self._store = ShardStore(self.state_dir)
        return self._store

    def close(self) -> None:
        """Release the lock (also done when the object is collected or the process ends)."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def __del__(self) -> None:
        self.close()

    def model_dir(self, sha: str) -> Path:
        d = self.root / "models" / sha[:16]
        d.mkdir(parents=True, exist_ok=True)
        return d

    def measurement_path(self, key: str) -> Path:
        return self.root / "measurements" / f"{key}.json"

    def sha256(self, path: Path) -> str:
        """A model's identity: its file's sha256 (cached by path, size and mtime), or, for a
        model assembled from the shard store, that of its shards (store.shards.Assembly)."""
        return model_identity(Path(path), digest=lambda p: file_sha256(p, cache_dir=self.root))

    def usage(self) -> dict[str, tuple[int, int]]:
        """(files, bytes) of each kind of cached data, and of everything else ("other")."""
        seen: set[Path] = set()
        result: dict[str, tuple[int, int]] = {}
        for kind, patterns in KINDS.items():
            files = {p for pattern in patterns for p in self.root.glob(pattern) if p.is_file()}
            seen |= files
            result[kind] = (len(files), sum(p.stat().st_size for p in files))
        state = self.state_dir.resolve()
        rest = [p for p in self.root.rglob("*")
                if p.is_file() and p not in seen and p.name != LOCK_NAME
                and state not in p.resolve().parents]
        result["other"] = (len(rest), sum(p.stat().st_size for p in rest))
        return result

    def clear(self) -> None:
        """Delete everything cached, not the state directory (the shard store has its own
        `prune`); refuses while another process uses the work directory."""
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"the work directory {self.root} is in use by another apreqel "
                             "process; clear it when that has finished") from None
        try:
            state = self.state_dir.resolve()
            for entry in self.root.iterdir():
                if entry.name == LOCK_NAME or entry.resolve() == state:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_SH)


def cached_measurement(workspace: Workspace, key_parts: dict, compute: Callable[[], dict], *,
                       retime: Callable[[dict], dict] | None = None,
                       again: bool = False) -> dict:
    """Return the stored measurement for `key_parts`, or compute, store and return it.

    A stored latency that is not clean (disturbed, or unchecked: stored before the detector)
    is never handed back as clean: it is re-timed with `retime` (stored result in, result with
    new latency keys out) when one is given, else returned marked. `again` re-times always."""
    key = canonical_sha256(key_parts)[:24]
    path = workspace.measurement_path(key)
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            result = stored["result"]
        except (ValueError, KeyError):
            path.unlink(missing_ok=True)
        else:
            if "latency_ms" not in result:
                return result
            result.setdefault("latency_quality", UNCHECKED)
            if retime is None or (result["latency_quality"] == CLEAN and not again):
                return result
            result = retime(result)
            _store(path, key_parts, result, stored.get("measured"))
            return result
    result = compute()
    _store(path, key_parts, result, None)
    return result


def _store(path: Path, key_parts: dict, result: dict, measured: str | None) -> None:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    write_json_atomic(path, {"key": key_parts, "result": result, "measured": measured or now}
                      | ({"latency_timed": now} if "latency_ms" in result else {}))


def measurement_key(tensor_types: dict[str, str], reference: Reference, protocol: Protocol) -> dict:
    """What a measurement of a model built from `reference` with `tensor_types` depends on: the
    model, the recipe, the protocol and the machine (CPU, cores, llama.cpp build, GPU)."""
    return {"model": reference.source_sha256, "recipe": canonical_sha256(tensor_types),
            "machine": machine_fingerprint(), "protocol": asdict(protocol),
            "apreqel_measure": 2}

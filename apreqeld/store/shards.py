"""The shard store on disk: content-addressed shards, their checks, assembly by links, the
build index, plan-set registrations and pruning. No llama.cpp here (see store.fill)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from apreqeld.errors import ApreqelError, InputError
from apreqeld.gguf.split import split_files, split_path
from apreqeld.manifest import PlanSet, ShardTable, assembly_of, load_planset
from apreqeld.storage import process_umask, write_json_atomic

_SHA = re.compile(r"^[0-9a-f]{64}$")
_SHARD_FILE = re.compile(r"^([0-9a-f]{64})\.gguf$")
INDEX_FORMAT = 1


class MissingShards(ApreqelError):
    """A model needs shards the store does not hold (never built, deleted, or found corrupt)."""

    def __init__(self, missing: Sequence[str], corrupt: Sequence[str] = ()) -> None:
        self.missing = tuple(missing)
        self.corrupt = tuple(corrupt)
        what = f"{len(self.missing)} shard(s) missing from the store"
        if self.corrupt:
            what += f" ({len(self.corrupt)} of them failed their sha256 and were removed)"
        super().__init__(what)


@dataclass(frozen=True)
class Assembly:
    """A model as the store makes it: the metadata split's sha256, then one shard per tensor
    in the source's order."""

    shards: tuple[str, ...]

    @property
    def identity(self) -> str:
        """The model's sha256: of its shards' sha256s, one per line, in order."""
        return hashlib.sha256("\n".join(self.shards).encode()).hexdigest()

    @property
    def count(self) -> int:
        return len(self.shards)


def member_assembly(table: ShardTable, recipe: Mapping[str, str], base_type: str) -> Assembly:
    """The assembly of a recipe (tensor -> requested type) from a plan set's shard table."""
    return Assembly(tuple(assembly_of(table, recipe, base_type)))


def check_private(path: Path, what: str) -> None:
    """Refuse `path` when a user other than this one (or root) could write it: owned by
    another user, or writable by its group or by everyone. One-line InputError."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid not in (os.geteuid(), 0):
        raise InputError(f"{what} {path} belongs to uid {st.st_uid}, not to this user "
                         f"({os.geteuid()}): refusing to load models from it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InputError(f"{what} {path} is writable by other users (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}): refusing to load models from it; "
                         f"chmod go-w {path}")


def _stamp_ns(sha: str) -> int:
    """The mtime a checked shard carries: derived from its sha256, so any later write (which
    sets mtime to now) makes the next check hash the file again."""
    return (1 + int(sha[:6], 16)) * 1_000_000_000


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardStore:
    """The store of a state directory (`STATE/store`, members linked in `STATE/members`)."""

    def __init__(self, state_dir: Path, /) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "store"
        self.members = self.state_dir / "members"
        for folder, what in ((self.state_dir, "state dir"), (self.root, "shard store"),
                             (self.members, "members dir")):
            folder.mkdir(parents=True, exist_ok=True)
            check_private(folder, what)
        for sub in ("shards", "sources", "sets", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)
        self._shards = str(self.root / "shards")

    # ------------------------------------------------------------------ shards

    def shard_path(self, sha: str) -> Path:
        return Path(self._shard(sha))

    def _shard(self, sha: str) -> str:
        """shard_path as a string: the checks below run per shard, pathlib's cost shows."""
        return f"{self._shards}/{sha[:2]}/{sha}.gguf"

    def add(self, data: bytes, /) -> str:
        """Store `data` as a shard (temp file, then rename; read-only, stamped); its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        dest = self.shard_path(sha)
        if self.has(sha):
            return sha
        dest.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=f".{sha[:12]}-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o444)
            os.utime(tmp, ns=(_stamp_ns(sha), _stamp_ns(sha)))
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return sha

    def has(self, sha: str, /, *, deep: bool = False) -> bool:
        """Whether the shard is here and intact: its stamp unchanged (a stat), or, when the
        stamp changed or `deep`, its sha256 recomputed. A corrupt shard is removed."""
        return self._probe(sha, deep) == "ok"

    def _probe(self, sha: str, deep: bool) -> str:
        """'ok', 'missing', or 'corrupt' (then removed)."""
        where = self._shard(sha)
        try:
            st = os.stat(where)
        except FileNotFoundError:
            return "missing"
        if not deep and stat.S_ISREG(st.st_mode) and st.st_mtime_ns == _stamp_ns(sha):
            return "ok"
        if file_sha256(Path(where)) == sha:
            with contextlib.suppress(OSError):
                os.utime(where, ns=(_stamp_ns(sha), _stamp_ns(sha)))
            return "ok"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
        return "corrupt"

    def check(self, shas: Iterable[str], /, *, deep: bool = False) -> tuple[list[str], list[str]]:
        """(missing, corrupt) among `shas`: corrupt ones failed their sha256 and are removed,
        so they are missing too."""
        found = {sha: self._probe(sha, deep) for sha in dict.fromkeys(shas)}
        return ([s for s, v in found.items() if v != "ok"],
                [s for s, v in found.items() if v == "corrupt"])

    def verify(self) -> list[str]:
        """Hash every shard again; the sha256s of those that failed (now removed)."""
        corrupt = []
        for path in sorted((self.root / "shards").glob("*/*.gguf")):
            m = _SHARD_FILE.match(path.name)
            if m and not self.has(m.group(1), deep=True):
                corrupt.append(m.group(1))
        return corrupt

    # ------------------------------------------------------------------ models

    def member_path(self, assembly: Assembly, /) -> Path:
        """Where the assembled model's first split is (what llama.cpp is given)."""
        name = assembly.identity[:16]
        return split_path(self.members / name / name, 0, assembly.count)

    def assembled(self, assembly: Assembly, /) -> bool:
        """Whether the model's links are in place and every shard is here (stats only)."""
        first = self.member_path(assembly)
        return self._links_right(first.parent, assembly) and not self.check(assembly.shards)[0]

    def assemble(self, assembly: Assembly, /, *, deep: bool = False) -> Path:
        """Make the model loadable: one link per split in a folder of its own, made in a temp
        folder and renamed into place; MissingShards when the store lacks any shard."""
        missing, corrupt = self.check(assembly.shards, deep=deep)
        if missing:
            raise MissingShards(missing, corrupt)
        first = self.member_path(assembly)
        folder = first.parent
        if self._links_right(folder, assembly):
            return first
        tmp = tempfile.mkdtemp(dir=self.members, prefix=f".{folder.name}-")
        try:
            # links relative to the member folder (members/<name>/ beside store/), so that a
            # state dir can be moved
            for link, sha in zip(self._link_names(tmp, folder.name, assembly.count),
                                 assembly.shards, strict=True):
                os.symlink(f"../../store/shards/{sha[:2]}/{sha}.gguf", link)
            os.chmod(tmp, 0o755 & ~process_umask())
            with self._lock(fcntl.LOCK_EX):
                if folder.exists() and not self._links_right(folder, assembly):
                    shutil.rmtree(folder)
                with contextlib.suppress(FileExistsError, OSError):
                    os.rename(tmp, folder)  # another process may have made the same links
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not self._links_right(folder, assembly):
            raise InputError(f"could not assemble {folder}")
        return first

    @staticmethod
    def _link_names(folder: str | Path, name: str, count: int) -> list[str]:
        return [f"{folder}/{name}-{no + 1:05d}-of-{count:05d}.gguf" for no in range(count)]

    def _links_right(self, folder: Path, assembly: Assembly) -> bool:
        try:
            if len(os.listdir(folder)) != assembly.count:
                return False
            for link, sha in zip(self._link_names(folder, folder.name, assembly.count),
                                 assembly.shards, strict=True):
                if not os.readlink(link).endswith(f"/{sha}.gguf"):
                    return False
        except OSError:
            return False
        return True

    # ------------------------------------------------------------------ the build index

    def index_path(self, source_sha256: str, engine: str) -> Path:
        slug = re.sub(r"[^0-9A-Za-z.]+", "-", engine).strip("-")
        return self.root / "sources" / source_sha256[:16] / f"index-{slug}.json"

    def index(self, source_sha256: str, engine: str) -> dict:
        """{"tensors": order, "metadata": {base: sha}, "shards": {tensor: {type: sha}}} of what
        this store has built for a model with one llama.cpp build (types as written)."""
        path = self.index_path(source_sha256, engine)
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return {"format": INDEX_FORMAT, "source_sha256": source_sha256, "engine": engine,
                    "tensors": [], "metadata": {}, "shards": {}}
        return data

    def record(self, source_sha256: str, engine: str, *, tensors: Sequence[str],
               shards: Mapping[str, Mapping[str, str]], metadata: Mapping[str, str]) -> None:
        """Add built shards to the index (read, merge, write atomically, under the lock)."""
        with self._lock(fcntl.LOCK_EX):
            index = self.index(source_sha256, engine)
            if index["tensors"] and list(index["tensors"]) != list(tensors):
                raise InputError(f"the store's index for {source_sha256[:12]}… lists other "
                                 "tensors than this reference: remove it with apreqel cache "
                                 "--prune")
            index["tensors"] = list(tensors)
            for tensor, by_type in shards.items():
                index["shards"].setdefault(tensor, {}).update(by_type)
            index["metadata"].update(metadata)
            write_json_atomic(self.index_path(source_sha256, engine), index)

    # ------------------------------------------------------------------ locks

    @contextlib.contextmanager
    def _lock(self, kind: int, name: str = ".lock") -> Iterator[None]:
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def filling(self) -> Iterator[None]:
        """Held while shards are built: one builder at a time per store (a second waits, then
        finds them built); pruning refuses while it is held."""
        with self._lock(fcntl.LOCK_EX, ".fill"):
            yield

    # ------------------------------------------------------------------ plan sets, pruning

    def register(self, planset: PlanSet, manifest: Path, /) -> None:
        """Remember that a plan set uses the store, so that pruning keeps its shards."""
        if planset.store is None:
            return
        where = str(Path(manifest).resolve())
        used = sorted(set(used_shards(planset)))
        key = hashlib.sha256(where.encode()).hexdigest()[:16]
        path = self.root / "sets" / f"{key}.json"
        record = {"name": planset.name, "manifest": where, "model": planset.model.sha256,
                  "shards": used}
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(path.read_text()) == record:
                return
        write_json_atomic(path, record)

    def registrations(self) -> list[dict]:
        """Every registered plan set, its manifest re-read where it still exists (`stale`
        where it does not: its shards are kept until it is forgotten)."""
        found = []
        for path in sorted((self.root / "sets").glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except ValueError:
                continue
            manifest = Path(record["manifest"])
            record["stale"] = not manifest.is_file()
            if not record["stale"]:
                with contextlib.suppress(ApreqelError):
                    record["shards"] = sorted(set(used_shards(load_planset(manifest))))
            record["file"] = str(path)
            found.append(record)
        return sorted(found, key=lambda r: (r["name"], r["manifest"]))

    def usage(self) -> dict:
        """Shards (count, bytes), which plan set uses how many, members linked, unused shards."""
        shards = {m.group(1): p.stat().st_size for p in (self.root / "shards").glob("*/*.gguf")
                  if (m := _SHARD_FILE.match(p.name))}
        sets = self.registrations()
        used = set().union(*(set(r["shards"]) for r in sets)) if sets else set()
        members = [p for p in self.members.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return {"root": str(self.root), "shards": len(shards), "bytes": sum(shards.values()),
                "members": len(members),
                "plansets": [{"name": r["name"], "manifest": r["manifest"], "stale": r["stale"],
                              "shards": len(r["shards"]),
                              "present": sum(s in shards for s in r["shards"]),
                              "bytes": sum(shards.get(s, 0) for s in r["shards"])}
                             for r in sets],
                "unused_shards": len(set(shards) - used),
                "unused_bytes": sum(b for s, b in shards.items() if s not in used)}

    def prune(self, *, forget_stale: bool = False) -> dict:
        """Remove shards no registered plan set uses, and member links to them; refused while
        shards are being built. `forget_stale` first drops plan sets whose manifest is gone."""
        fd = os.open(self.root / ".fill", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError("shards are being built right now; prune when that has "
                                 "finished") from None
            with self._lock(fcntl.LOCK_EX):
                sets = self.registrations()
                if forget_stale:
                    for r in [r for r in sets if r["stale"]]:
                        Path(r["file"]).unlink(missing_ok=True)
                    sets = [r for r in sets if not r["stale"]]
                keep = set().union(*(set(r["shards"]) for r in sets)) if sets else set()
                removed, freed = 0, 0
                for path in (self.root / "shards").glob("*/*.gguf"):
                    m = _SHARD_FILE.match(path.name)
                    if m and m.group(1) not in keep:
                        freed += path.stat().st_size
                        path.unlink()
                        removed += 1
                dropped = 0
                for folder in list(self.members.iterdir()):
                    if folder.is_dir() and any(not (folder / n).exists()
                                               for n in os.listdir(folder)):
                        shutil.rmtree(folder)
                        dropped += 1
                self._drop_index_entries(keep)
        finally:
            os.close(fd)
        return {"removed_shards": removed, "freed_bytes": freed, "removed_members": dropped,
                "kept_shards": len(keep)}

    def _drop_index_entries(self, keep: set[str]) -> None:
        for path in (self.root / "sources").glob("*/index-*.json"):
            try:
                index = json.loads(path.read_text())
            except ValueError:
                path.unlink()
                continue
            index["shards"] = {t: {q: s for q, s in by.items() if s in keep}
                               for t, by in index["shards"].items()}
            index["metadata"] = {b: s for b, s in index["metadata"].items() if s in keep}
            write_json_atomic(path, index)


def used_shards(planset: PlanSet, /) -> list[str]:
    """Every shard the plan set's members are assembled from."""
    if planset.store is None:
        return []
    return [sha for m in planset.members
            for sha in assembly_of(planset.store, m.recipe, m.base_type)]


def model_identity(path: Path, /, *, digest=file_sha256) -> str:
    """A model's sha256: of the file, or, for a model assembled from the store (every split a
    link to a shard named by its sha256), of its shards as Assembly.identity; other split
    models hash each of their files."""
    files = split_files(path)
    if len(files) == 1:
        return digest(files[0])
    shas = []
    for f in files:
        m = _SHARD_FILE.match(Path(os.readlink(f)).name) if f.is_symlink() else None
        shas.append(m.group(1) if m else digest(f))
    return Assembly(tuple(shas)).identity

"""The shard store against building each member as its own GGUF, side by side in one run, on
the checked-in plan set of the default model.

Run: .venv/bin/python tools/bench_store.py [--plans plans/smollm2-135m] [--members N]
                                           [--threads 2] [--requests 8] [--tokens 32]
                                           [--sections materialize,memory,serve]
In an empty work dir (the F16 reference made once, or taken from $APREQEL_HOME):
  materialize  the front (or its first --members members), cold: (a) built as
               `materialize` built it before the store, one llama.cpp quantization of the
               reference per member (build_gguf) and its sha256 checked against the
               manifest, against (b) the shard store filled from empty and every
               member linked; then one member assembled from the filled store (median of
               every front member, its links made again); the number of llama.cpp
               quantizations of each (whole models; tensors as model equivalents); disk of
               the state dir for the front and for all members (store) against the sum of
               the single files; every member from the store against its single-file build:
               the same tensors byte for byte, and the same greedy tokens and logits
  memory       two workers of two members that share most shards (make-before-break): the
               memory the second adds (the workers' PSS after, less the first's alone)
               against its footprint, and what the supervisor counts it as (footprint less
               the shared pages it reads in the first worker's /proc/PID/smaps); the same two
               members as single files (two full copies)
  serve        a fresh daemon on the store: --requests requests right after it serves,
               served ms/token against the member's measured ms/token; then a swap to a
               member never assembled before: time to its first token, and that nothing was
               quantized (no build event)
The last lines are `name: value` results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gguf
import numpy as np

from apreqeld import engine
from apreqeld.build import build_gguf
from apreqeld.client import Client
from apreqeld.errors import DaemonError
from apreqeld.evidence.reference import reference_file
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.split import split_files
from apreqeld.gguf.view import file_sha256, read_model
from apreqeld.manifest import Member, PlanSet, load_planset, member_shards
from apreqeld.planset import find_source, materialize, member_plan
from apreqeld.store.shards import Assembly

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2
PROMPT = "Once upon a time, in a small village by the sea,"


def du(path: Path) -> int:
    """Bytes of the regular files under `path` (links not followed)."""
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def assembly(planset: PlanSet, member: Member) -> Assembly:
    return Assembly(tuple(member_shards(planset, member)))


def materialize_section(planset: PlanSet, members: list[Member], work: Path,
                        threads: int) -> tuple[dict, dict[str, Path], Workspace]:
    """Old path (one quantization per member) against the store, cold, and the checks."""
    ws = Workspace(work, state_dir=work / "state")
    source = find_source(planset, workspace=ws)
    ref = reference_file(source, workspace=ws)
    view = read_model(source)
    singles: dict[str, Path] = {}
    folder = work / "single"
    folder.mkdir()
    q0 = engine.QUANTIZED["models"]
    t0 = time.perf_counter()
    mismatched = 0
    for k, m in enumerate(members):
        plan = member_plan(view, planset.model.sha256, m.recipe, m.base_type)
        singles[m.id] = build_gguf(plan, ref, folder / f"{m.id}.gguf", threads=threads)
        mismatched += file_sha256(singles[m.id]) != m.file_sha256  # as materialize checked
        print(f"  single file {k + 1}/{len(members)}: {m.id} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    old_s = time.perf_counter() - t0
    old_quantized = engine.QUANTIZED["models"] - q0
    tensors0 = engine.QUANTIZED["tensors"]
    t0 = time.perf_counter()
    paths = materialize(planset, workspace=ws, members=members)
    new_s = time.perf_counter() - t0
    tensor_quantized = engine.QUANTIZED["tensors"] - tensors0
    per_model = sum(t.quantizable for t in view.tensors)
    front_disk = du(ws.state_dir)
    # one member from a filled store: its links made again, every member once
    link_ms = []
    for m in members:
        folder_m = paths[m.id].parent
        shutil.rmtree(folder_m)
        t = time.perf_counter()
        ws.store.assemble(assembly(planset, m))
        link_ms.append((time.perf_counter() - t) * 1000)
    # the same tensors, and the same greedy tokens and logits, as the single files
    same_tensors = all(_tensors(paths[m.id]) == _tensors(singles[m.id]) for m in members)
    same_output = [_greedy(paths[m.id], threads) == _greedy(singles[m.id], threads)
                   for m in members]
    t0 = time.perf_counter()
    materialize(planset, workspace=ws)  # every member: the rest of the shards
    all_s = time.perf_counter() - t0
    result = {
        "members": len(members),
        "cold_single_files_s": round(old_s, 1), "cold_store_s": round(new_s, 2),
        "cold_speedup": round(old_s / new_s, 1),
        "single_file_quantizations": old_quantized,
        "store_tensor_quantizations": tensor_quantized,
        "store_quantizations_as_models": round(tensor_quantized / per_model, 1),
        "assemble_one_member_ms_median": round(statistics.median(link_ms), 2),
        "assemble_one_member_ms_max": round(max(link_ms), 2),
        "disk_front_single_files_mib": round(sum(p.stat().st_size
                                                 for p in singles.values()) / MIB, 1),
        "disk_front_store_mib": round(front_disk / MIB, 1),
        "disk_all_single_files_mib": round(sum(m.file_bytes or 0
                                               for m in planset.members) / MIB, 1),
        "disk_all_store_mib": round(du(ws.state_dir) / MIB, 1),
        "materialize_the_rest_s": round(all_s, 1),
        "single_files_unlike_the_manifest": mismatched,
        "tensors_byte_identical": same_tensors,
        "greedy_tokens_and_logits_identical": f"{sum(same_output)}/{len(same_output)}",
    }
    return result, singles, ws


def _tensors(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data) for f in split_files(path) for t in gguf.GGUFReader(f).tensors}


def _greedy(path: Path, threads: int, n: int = 16) -> tuple:
    """Greedy tokens of PROMPT and the logits of each step (rounded bytes), through llama.cpp."""
    with engine.open_session(path, n_ctx=128, threads=threads) as s:
        tokens = list(s.tokenize(PROMPT))
        s.clear()
        s.decode(np.asarray(tokens, dtype=np.int32))
        out, logits = [], []
        pos = len(tokens)
        for _ in range(n):
            row = np.array(s.logits(len(tokens) if not out else 1)[-1])
            logits.append(row.tobytes())
            nxt = int(row.argmax())
            out.append(nxt)
            s.decode(np.asarray([nxt], dtype=np.int32), start_pos=pos)
            pos += 1
    return tuple(out), tuple(logits)


# --------------------------------------------------------------------------- memory


def _rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes (Rss, Pss, Private_Clean, ...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields


def sharing_pair(planset: PlanSet, members: list[Member]) -> tuple[Member, Member]:
    """Two different front members with the most shard bytes in common."""
    table = {m.id: set(assembly(planset, m).shards) for m in members}
    best = max(((a, b) for i, a in enumerate(members) for b in members[i + 1:]
                if table[a.id] != table[b.id]),
               key=lambda p: len(table[p[0].id] & table[p[1].id]))
    return best


def memory_section(plans: Path, planset: PlanSet, members: list[Member], ws: Workspace,
                   singles: dict[str, Path], threads: int) -> dict:
    """What a second worker adds: the two workers' proportional set sizes (PSS: a page
    mapped by both counts half in each) after, less the first one's alone before; page cache
    both map is counted once, as the kernel holds it once."""
    import asyncio

    from apreqeld.runtime.files import MemberFiles
    from apreqeld.runtime.workers import Spawn, Worker

    a, b = sharing_pair(planset, members)
    files = MemberFiles(ws.state_dir, plans, planset)
    spawn = Spawn(n_ctx=planset.serving.n_ctx, threads=threads)

    async def two(path_a: Path, path_b: Path) -> dict:
        first = await Worker.start(a.id, path_a, spawn)
        try:
            await asyncio.sleep(0.5)
            shared = files.shared_bytes(first.pid, a, b) if path_a == files.path(a) else 0
            alone = _rollup(first.pid)["Pss"]
            second = await Worker.start(b.id, path_b, spawn)
            try:
                await asyncio.sleep(0.5)
                both = _rollup(first.pid)["Pss"] + _rollup(second.pid)["Pss"]
                rss = _rollup(second.pid)["Rss"]
            finally:
                await second.stop()
        finally:
            await first.stop()
        return {"second_adds_mib": round((both - alone) / MIB, 1),
                "second_rss_mib": round(rss / MIB, 1),
                "shared_counted_mib": round(shared / MIB, 1)}

    common = set(assembly(planset, a).shards) & set(assembly(planset, b).shards)
    store = asyncio.run(two(files.path(a), files.path(b)))
    for path in split_files(singles[a.id]) + split_files(singles[b.id]):
        fd = os.open(path, os.O_RDONLY)  # cold page cache for the single files too
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    single = asyncio.run(two(singles[a.id], singles[b.id]))
    footprint = b.measured.footprint_bytes
    return {"pair": f"{a.id} -> {b.id}",
            "shards_in_common": f"{len(common)}/{assembly(planset, b).count}",
            "footprint_second_mib": round(footprint / MIB, 1),
            "counted_for_make_before_break_mib": round((footprint - store["shared_counted_mib"]
                                                        * MIB) / MIB, 1),
            **{f"store_{k}": v for k, v in store.items() if k != "shared_counted_mib"},
            "store_shared_counted_mib": store["shared_counted_mib"],
            **{f"single_{k}": v for k, v in single.items() if k != "shared_counted_mib"}}


# --------------------------------------------------------------------------- serving


def serve_section(plans: Path, planset: PlanSet, ws: Workspace, threads: int, requests: int,
                  tokens: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    sock = tmp / "apreqeld.sock"
    env = dict(os.environ) | {"APREQEL_HOME": str(ws.root)}
    proc = subprocess.Popen([sys.executable, "-m", "apreqeld.cli.daemon", "--plans", str(plans),
                             "--state-dir", str(ws.state_dir), "--socket", str(sock),
                             "--threads", str(threads), "--priority", "latency", "--no-watch"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    t_start = time.perf_counter()
    log: list[str] = []
    for line in proc.stderr:
        log.append(line)
        if "apreqeld: serving" in line:
            break
    else:
        raise SystemExit("apreqeld did not start: " + "".join(log[-5:]))
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    started_s = time.perf_counter() - t_start
    try:
        with Client(sock, timeout=120) as c:
            served = []
            for i in range(requests):
                r = c.generate(PROMPT, max_tokens=tokens, temperature=0.0, seed=i)
                served.append(r["usage"]["ms_per_token"])
            plan = c.status()["plan"]
            measured = planset.member(plan).measured.latency.median_ms
            # a member never assembled before: its links removed, then pinned
            target = next(m for m in sorted(planset.pareto_members,
                                            key=lambda m: m.measured.footprint_bytes)
                          if m.id != plan)
            shutil.rmtree(ws.store.member_path(assembly(planset, target)).parent,
                          ignore_errors=True)
            t = time.perf_counter()
            c.pin(target.id, wait=True)
            first = None
            for _piece in c.generate_stream(PROMPT, max_tokens=2, temperature=0.0):
                first = first or time.perf_counter()
            swap_s = first - t
            status = c.status()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
    built = [ln for ln in log if "build_start" in ln]
    return {"daemon_start_s": round(started_s, 2), "serving": plan,
            "served_ms_per_token_median": round(statistics.median(served), 2),
            "served_ms_per_token_max": round(max(served), 2),
            "measured_ms_per_token": round(measured, 2),
            "served_over_measured": round(statistics.median(served) / measured, 3),
            "swap_to_unassembled_member_first_token_s": round(swap_s, 3),
            "swap_to": status["plan"], "builds_during_serving": len(built)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", type=Path, default=REPO / "plans" / "smollm2-135m")
    p.add_argument("--members", type=int, default=None, help="front members (default all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--sections", default="materialize,memory,serve")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    planset = load_planset(args.plans)
    members = planset.pareto_members[:args.members] if args.members else planset.pareto_members
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        work = Path(tmp)
        home = os.environ.get("APREQEL_HOME")
        if home:  # the F16 reference made once: taken from there (only it)
            for ref in Path(home).glob("models/*/reference-f16.gguf"):
                dest = work / ref.relative_to(home)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(ref, dest) if ref.stat().st_dev == work.stat().st_dev else \
                    shutil.copy2(ref, dest)
        print(f"materialize: {len(members)} front members of {planset.name}", flush=True)
        mat, singles, ws = materialize_section(planset, members, work, args.threads)
        results |= {f"materialize.{k}": v for k, v in mat.items()}
        if "memory" in sections:
            results |= {f"memory.{k}": v for k, v in memory_section(
                args.plans, planset, members, ws, singles, args.threads).items()}
        if "serve" in sections:
            try:
                results |= {f"serve.{k}": v for k, v in serve_section(
                    args.plans, planset, ws, args.threads, args.requests,
                    args.tokens).items()}
            except DaemonError as exc:
                results["serve.error"] = str(exc)
    print()
    for k, v in results.items():
        print(f"{k}: {v}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

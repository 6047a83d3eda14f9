"""Serving overhead and swap cost of apreqeld, against llama-cpp-python called directly.

Run: .venv/bin/python tools/bench_daemon.py [--rounds 5] [--tokens 64] [--swaps 20]
                                            [--threads 1]
Builds a two-member plan set of the default model (uniform q4_0 and q8_0, outside tensors
q8_0) in a temp folder (the F16 reference in $APREQEL_HOME when set), then:
  overhead   interleaved rounds of the same greedy generation through llama_cpp.Llama in
             this process and through apreqeld (socket + worker) on the same GGUF; medians of
             tokens/s (after the first token) and time to first token (TTFT)
  swaps      --swaps swaps alternating q4_0/q8_0 under a steady two-client load, once with
             make-before-break and once with break-before-make; medians of the total swap
             time and of the downtime (no variant serving), failed and duplicated requests
  cold load  median time for a fresh worker process to load and warm up the q8_0 GGUF
The last lines are the results as `name: value`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from apreqeld import engine
from apreqeld.client import Client
from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import tensor_recipe
from apreqeld.errors import DaemonError
from apreqeld.evidence.reference import reference_file
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import read_model
from apreqeld.manifest import (
    LatencyStats,
    Member,
    Metrics,
    ModelInfo,
    PlanSet,
    Serving,
    member_filename,
    save_planset,
)
from apreqeld.resources import default_model_path
from apreqeld.runtime.workers import Spawn, Worker

PROMPT = "Once upon a time, in a small village by the sea,"
N_CTX = 512


def build_planset(root: Path, threads: int) -> tuple[Path, Path, dict[str, str]]:
    """Two uniform members with rough metrics (file size as footprint): enough to serve."""
    source = default_model_path()
    home = os.environ.get("APREQEL_HOME")
    ws = Workspace(Path(home) if home else root / "work")
    ref = reference_file(source, workspace=ws)
    view = read_model(source)
    members, files = [], {}
    for rank, name in enumerate(("q4_0", "q8_0")):
        recipe = tensor_recipe(view, [qtype(name)] * len(view.sublayers), outside=qtype("q8_0"))
        path = root / f"{name}.gguf"
        engine.quantize(ref, path, tensor_types=recipe, base="q8_0", threads=threads)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        size = path.stat().st_size
        ms = 5.0 + rank
        members.append(Member(
            id=sha[:16], kind="uniform", label=f"uniform {name}", base_type="q8_0",
            recipe=recipe, file_sha256=sha, file_bytes=size, pareto=True,
            measured=Metrics(parameter_bytes=size, footprint_bytes=size,
                             latency=LatencyStats(median_ms=ms, iqr_ms=0, mean_ms=ms,
                                                  std_ms=0, n=1),
                             ppl=20.0 - rank, ppl_se=0.1, kld=0.05 / (rank + 1), kld_se=0.01)))
        files[name] = path
    planset = PlanSet(name="bench", created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                      model=ModelInfo(name=view.name, sha256=ws.sha256(source),
                                      path=str(source), architecture=view.architecture),
                      engine=engine.engine_version(), device={}, protocol={},
                      serving=Serving(n_ctx=N_CTX, threads=threads, gpu_layers=0),
                      members=members)
    state = root / "state"
    state.mkdir()
    for m, name in zip(members, files, strict=True):
        files[name].rename(state / member_filename(planset, m))
    save_planset(planset, root / "plans")
    return root / "plans", state, {name: m.id for m, name in zip(members, files, strict=True)}


def start(plans: Path, state: Path, sock: Path, threads: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "apreqeld.cli.daemon", "--plans", str(plans),
                             "--state-dir", str(state), "--socket", str(sock), "--threads",
                             str(threads), "--no-watch", *extra], stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stderr:
        if "apreqeld: serving" in line:
            break
    else:
        raise SystemExit("apreqeld did not start")
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def direct_run(llm, tokens: int) -> tuple[float, float]:
    """(TTFT ms, tokens/s after the first) of one greedy generation through llama_cpp."""
    t0 = time.perf_counter()
    first = None
    n = 0
    for chunk in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0,
                                       stream=True):
        if chunk["choices"][0]["text"]:
            n += 1
            first = first or time.perf_counter()
    end = time.perf_counter()
    return (first - t0) * 1000, (n - 1) / (end - first)


def daemon_run(client: Client, tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    n = 0
    for _piece in client.generate_stream(PROMPT, max_tokens=tokens, temperature=0.0):
        n += 1
        first = first or time.perf_counter()
    end = time.perf_counter()
    return (first - t0) * 1000, (n - 1) / (end - first)


def overhead(gguf: Path, sock: Path, rounds: int, tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    direct, served = [], []
    with Client(sock, timeout=120) as client:
        direct_run(llm, 4)
        daemon_run(client, 4)
        for _ in range(rounds):
            direct.append(direct_run(llm, tokens))
            served.append(daemon_run(client, tokens))
    llm.close()
    med = {k: statistics.median(v[i] for v in runs) for k, runs, i in (
        ("direct_ttft", direct, 0), ("direct_tps", direct, 1),
        ("daemon_ttft", served, 0), ("daemon_tps", served, 1))}
    return {"direct_tokens_per_s": med["direct_tps"], "daemon_tokens_per_s": med["daemon_tps"],
            "tokens_per_s_ratio": med["daemon_tps"] / med["direct_tps"],
            "direct_ttft_ms": med["direct_ttft"], "daemon_ttft_ms": med["daemon_ttft"],
            "ttft_delta_ms": med["daemon_ttft"] - med["direct_ttft"]}


def swaps(sock: Path, ids: dict[str, str], n: int) -> dict:
    events: list[dict] = []
    follower = Client(sock)
    stream = follower.events()

    def follow() -> None:
        try:
            events.extend(e for e in stream if e["kind"] == "swap_done")
        except DaemonError:
            pass

    threading.Thread(target=follow, daemon=True).start()
    stop_flag = threading.Event()
    outcomes = {"ok": 0, "failed": 0}

    def load(seed: int) -> None:
        with Client(sock, timeout=120) as c:
            while not stop_flag.is_set():
                try:
                    c.generate("Hello", max_tokens=4, seed=seed)
                    outcomes["ok"] += 1
                except DaemonError:
                    outcomes["failed"] += 1

    loaders = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in loaders:
        t.start()
    with Client(sock, timeout=120) as c:
        for i in range(n):
            c.pin(ids["q8_0" if i % 2 == 0 else "q4_0"], wait=True)
        time.sleep(0.5)
        stop_flag.set()
        for t in loaders:
            t.join(120)
        counts = c.status()["counts"]
    follower.close()
    return {"swaps": len(events), "total_ms": statistics.median(e["total_ms"] for e in events),
            "downtime_ms": statistics.median(e["downtime_ms"] for e in events),
            "requests": outcomes["ok"] + outcomes["failed"], "failed": outcomes["failed"],
            "duplicated": counts["served"] + counts["failed"] - counts["accepted"]}


def cold_load(gguf: Path, threads: int, n: int = 3) -> float:
    async def once() -> float:
        t0 = time.perf_counter()
        worker = await Worker.start("cold", gguf, Spawn(n_ctx=N_CTX, threads=threads))
        took = (time.perf_counter() - t0) * 1000
        await worker.stop()
        return took

    return statistics.median(asyncio.run(once()) for _ in range(n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        root = Path(tmp)
        plans, state, ids = build_planset(root, args.threads)
        results: dict[str, float] = {}
        sock = root / "d1.sock"
        d = start(plans, state, sock, args.threads, "--priority", "memory")
        try:
            gguf = next(state.glob(f"*-{ids['q4_0']}.gguf"))
            results |= overhead(gguf, sock, args.rounds, args.tokens, args.threads)
        finally:
            stop(d)
        for mode in ("make-before-break", "break-before-make"):
            sock = root / f"{mode}.sock"
            d = start(plans, state, sock, args.threads, "--priority", "memory",
                      "--swap-mode", mode)
            try:
                short = "mbb" if mode.startswith("make") else "bbm"
                results |= {f"{short}_{k}": v for k, v in swaps(sock, ids, args.swaps).items()}
            finally:
                stop(d)
        results["cold_load_ms"] = cold_load(next(state.glob(f"*-{ids['q8_0']}.gguf")),
                                            args.threads)
    print(json.dumps({"rounds": args.rounds, "tokens": args.tokens, "swaps": args.swaps,
                      "threads": args.threads}))
    for key, value in results.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()

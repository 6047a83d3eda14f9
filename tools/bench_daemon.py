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
  side       side by side with llama-cpp-python's own multi-model server (`python -m
             llama_cpp.server --config_file CFG`, the same two GGUFs as models "q4_0" and
             "q8_0", same n_ctx and threads, 127.0.0.1 on a free port; needs the `bench`
             extra): --side-switches switches alternating q4_0/q8_0 under the same steady
             two-client load (4-token requests in a loop, naming the current model on the
             server), in --side-rounds interleaved rounds (apreqeld, server, server, apreqeld,
             ...). Switch time: apreqeld `pin` until the first token of the next request (plus
             its own swap total and downtime); server: a streamed request naming the other
             model until its first token. Also the longest gap between answers the clients see
             during a switch, failed requests (errors, timeouts, dropped connections) and, on
             the server, streams cut short by its `interrupt_requests`. Medians [min-max].
Sections: --sections overhead,swaps,cold,side (default all).
The last lines are the results as `name: value` (the side by side also prints a table).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from apreqeld.client import Client
from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import tensor_recipe
from apreqeld.errors import DaemonError
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import read_model
from apreqeld.manifest import load_planset, member_shards
from apreqeld.planset import planset_from_recipes
from apreqeld.resources import default_model_path
from apreqeld.runtime.workers import Spawn, Worker
from apreqeld.store.shards import Assembly, ShardStore

PROMPT = "Once upon a time, in a small village by the sea,"
N_CTX = 512


def build_planset(root: Path, threads: int) -> tuple[Path, Path, dict[str, str]]:
    """Uniform q4_0 and q8_0 of the default model, built and measured with a tiny protocol."""
    source = default_model_path()
    home = os.environ.get("APREQEL_HOME")
    view = read_model(source)
    recipes = {f"uniform {name}": tensor_recipe(view, [qtype(name)] * len(view.sublayers),
                                                outside=qtype("q8_0"))
               for name in ("q4_0", "q8_0")}
    workspace = Workspace(Path(home) if home else root / "work", state_dir=root / "state")
    planset = planset_from_recipes(
        source, recipes, root / "plans", workspace=workspace,
        protocol=Protocol(n_ctx=512, chunks=1, n_gen=4, reps=2, threads=threads),
        serving_ctx=N_CTX, name="bench")
    return root / "plans", root / "state", {m.label.split()[-1]: m.id for m in planset.members}


def member_gguf(plans: Path, state: Path, member_id: str) -> Path:
    """The file a member is loaded from: its first split, assembled from the shard store."""
    planset = load_planset(plans)
    member = planset.member(member_id)
    return ShardStore(state).assemble(Assembly(tuple(member_shards(planset, member))))


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


def follow_swaps(sock: Path) -> tuple[list[dict], Client]:
    """A list that a background thread fills with the daemon's swap_done events, and the
    client whose event stream feeds it (close it to stop)."""
    events: list[dict] = []
    follower = Client(sock)
    stream = follower.events()

    def follow() -> None:
        try:
            events.extend(e for e in stream if e["kind"] == "swap_done")
        except (DaemonError, OSError):
            pass

    threading.Thread(target=follow, daemon=True).start()
    return events, follower


def swaps(sock: Path, ids: dict[str, str], n: int) -> dict:
    events, follower = follow_swaps(sock)
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


# --------------------------------------------------------------------------- side by side


SIDE_PROMPT = "Hello"
SIDE_TOKENS = 4
HTTP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(models: dict[str, Path], root: Path, threads: int,
                       timeout: float = 120) -> tuple[subprocess.Popen, int]:
    """`python -m llama_cpp.server --config_file CFG` on 127.0.0.1; waits for /v1/models."""
    port = free_port()
    cfg = root / "llama-server.json"
    cfg.write_text(json.dumps({
        "host": "127.0.0.1", "port": port,
        "models": [{"model": str(path), "model_alias": alias, "n_ctx": N_CTX,
                    "n_threads": threads, "n_threads_batch": threads, "n_gpu_layers": 0,
                    "verbose": False} for alias, path in models.items()]}))
    log = (root / "llama-server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--config_file",
                             str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                conn.close()
                return proc, port
            conn.close()
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_llama_server(proc)
            tail = (root / "llama-server.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"llama_cpp.server did not start (is the `bench` extra "
                             f"installed?):\n{tail}")
        time.sleep(0.2)


def stop_llama_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def post_completion(port: int, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        detail = resp.read()[:200]
        conn.close()
        raise OSError(f"HTTP {resp.status}: {detail!r}")
    return resp


def server_stream_first(port: int, model: str, t0: float) -> tuple[float, bool]:
    """A streamed completion naming `model`: (ms from t0 to its first token, finished)."""
    resp = post_completion(port, {"model": model, "prompt": SIDE_PROMPT, "max_tokens":
                                  SIDE_TOKENS, "temperature": 0.0, "stream": True})
    first, finished = None, False
    try:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            choice = json.loads(data)["choices"][0]
            if choice.get("text") and first is None:
                first = time.perf_counter()
            finished = finished or bool(choice.get("finish_reason"))
    finally:
        resp.close()
    if first is None:
        raise OSError("stream ended without a token")
    return (first - t0) * 1000, finished


def largest_gap_ms(stamps: list[float], start: float, end: float) -> float:
    """The longest interval between consecutive answers that overlaps [start, end]."""
    ordered = sorted(stamps)
    gaps = [b - a for a, b in zip(ordered, ordered[1:], strict=False) if b > start and a < end]
    return max(gaps, default=end - start) * 1000


class Load:
    """Two clients in a loop of 4-token requests; answers' times and failures."""

    def __init__(self, call) -> None:
        self.call, self.stamps, self.lock = call, [], threading.Lock()
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(2)]

    def _loop(self, seed: int) -> None:
        while not self.stop_flag.is_set():
            try:
                self.call(seed)
                with self.lock:
                    self.ok += 1
                    self.stamps.append(time.perf_counter())
            except (DaemonError, OSError, ValueError, KeyError) as exc:
                with self.lock:
                    self.failed += 1
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(HTTP_TIMEOUT + 30)


def side_apreqeld(sock: Path, ids: dict[str, str], order: list[str], pause: float,
                  events: list[dict], out: dict) -> None:
    """Switches of apreqeld under load: pin (wait) then the next streamed request's first
    token, served by the pinned plan."""
    local = threading.local()

    def call(seed: int) -> None:
        if not hasattr(local, "c"):
            local.c = Client(sock, timeout=HTTP_TIMEOUT)
        try:
            local.c.generate(SIDE_PROMPT, max_tokens=SIDE_TOKENS, seed=seed)
        except DaemonError:
            local.c.close()
            del local.c
            raise

    seen = len(events)
    with Load(call) as load, Client(sock, timeout=HTTP_TIMEOUT) as c:
        time.sleep(pause)
        for name in order:
            t0 = time.perf_counter()
            try:
                c.pin(ids[name], wait=True)
                stream = c.generate_stream(SIDE_PROMPT, max_tokens=SIDE_TOKENS,
                                           temperature=0.0)
                first = None
                for _piece in stream:
                    first = first or time.perf_counter()
                if first is None or stream.result["plan"] != ids[name]:
                    raise DaemonError(f"switch request served by {stream.result['plan']}")
                out["switch_ms"].append((first - t0) * 1000)
                out["gap_ms"].append(largest_gap_ms(load.stamps + [first], t0, first))
            except DaemonError as exc:
                out["switch_failed"] += 1
                out["errors"].append(f"switch: {exc}")
            time.sleep(pause)
    deadline = time.monotonic() + 10
    while len(events) - seen < len(order) and time.monotonic() < deadline:
        time.sleep(0.05)
    for e in events[seen:]:
        out["total_ms"].append(e["total_ms"])
        out["downtime_ms"].append(e["downtime_ms"])
        out["modes"].add(e["mode"])
    out["requests"] += load.ok + load.failed
    out["failed"] += load.failed
    out["errors"] += load.errors


def side_server(port: int, order: list[str], current: list[str], pause: float,
                out: dict) -> None:
    """Switches of llama_cpp.server under load: a streamed request naming the other model
    until its first token; the load names the current model."""

    def call(seed: int) -> None:
        resp = post_completion(port, {"model": current[0], "prompt": SIDE_PROMPT,
                                      "max_tokens": SIDE_TOKENS, "seed": seed})
        try:
            body = json.loads(resp.read())
        finally:
            resp.close()
        if not body["choices"]:
            raise ValueError("no choices")

    with Load(call) as load:
        time.sleep(pause)
        for name in order:
            t0 = time.perf_counter()
            current[0] = name
            try:
                took, finished = server_stream_first(port, name, t0)
                first = t0 + took / 1000
                out["switch_ms"].append(took)
                out["gap_ms"].append(largest_gap_ms(load.stamps + [first], t0, first))
                out["cut_short"] += not finished
            except (OSError, ValueError, KeyError) as exc:
                out["switch_failed"] += 1
                out["errors"].append(f"switch: {type(exc).__name__}: {exc}")
            time.sleep(pause)
    out["requests"] += load.ok + load.failed
    out["failed"] += load.failed
    out["errors"] += load.errors


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def side_by_side(plans: Path, state: Path, ids: dict[str, str], root: Path, threads: int,
                 switches: int, rounds: int, pause: float) -> dict:
    ggufs = {name: member_gguf(plans, state, ids[name]) for name in ("q4_0", "q8_0")}
    fresh = lambda: {"switch_ms": [], "gap_ms": [], "total_ms": [], "downtime_ms": [],  # noqa: E731
                     "modes": set(), "requests": 0, "failed": 0, "switch_failed": 0,
                     "cut_short": 0, "errors": []}
    ours, theirs = fresh(), fresh()
    sock = root / "side.sock"
    daemon = start(plans, state, sock, threads, "--priority", "memory")
    server = None
    follower = None
    try:
        server, port = start_llama_server(ggufs, root, threads)
        events, follower = follow_swaps(sock)
        with Client(sock, timeout=HTTP_TIMEOUT) as c:  # both start on q4_0
            c.pin(ids["q4_0"], wait=True)
        current = ["q4_0"]
        per_round = [switches // rounds + (r < switches % rounds) for r in range(rounds)]
        done = 0
        for r, k in enumerate(per_round):
            order = ["q8_0" if (done + i) % 2 == 0 else "q4_0" for i in range(k)]
            done += k
            runs = [lambda o=order: side_apreqeld(sock, ids, o, pause, events, ours),
                    lambda o=order: side_server(port, o, current, pause, theirs)]
            for run in (runs if r % 2 == 0 else runs[::-1]):
                run()
        with Client(sock, timeout=HTTP_TIMEOUT) as c:
            counts = c.status()["counts"]
    finally:
        if follower is not None:
            follower.close()
        if server is not None:
            stop_llama_server(server)
        stop(daemon)
    ours["duplicated"] = counts["served"] + counts["failed"] - counts["accepted"]
    rows = [
        ("switches done / asked", f"{len(ours['switch_ms'])} / {switches}",
         f"{len(theirs['switch_ms'])} / {switches}"),
        ("switch -> first token ms", spread(ours["switch_ms"]), spread(theirs["switch_ms"])),
        ("own swap total ms", spread(ours["total_ms"]), "-"),
        ("own swap downtime ms", spread(ours["downtime_ms"]), "-"),
        ("swap mode", ",".join(sorted(ours["modes"])) or "-", "unload, then load"),
        ("longest gap between answers ms", spread(ours["gap_ms"]), spread(theirs["gap_ms"])),
        ("load requests", ours["requests"], theirs["requests"]),
        ("failed load requests", ours["failed"], theirs["failed"]),
        ("failed switch requests", ours["switch_failed"], theirs["switch_failed"]),
        ("switch streams cut short", 0, theirs["cut_short"]),
        ("duplicated answers", ours["duplicated"], "-"),
    ]
    widths = [max(len(str(row[i])) for row in rows + [("", "apreqeld", "llama_cpp.server")])
              for i in range(3)]
    print(f"\nside by side: {switches} switches in {rounds} interleaved rounds, 2 clients, "
          f"{SIDE_TOKENS}-token requests, threads {threads}, n_ctx {N_CTX}")
    for row in [("", "apreqeld", "llama_cpp.server")] + rows:
        print("  ".join(f"{str(v):<{w}}" for v, w in zip(row, widths, strict=True)))
    for label, side in (("apreqeld", ours), ("llama_cpp.server", theirs)):
        for e in side["errors"][:3]:
            print(f"# {label} error: {e}")
    med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    return {"side_apreqeld_switch_ms": med(ours["switch_ms"]),
            "side_apreqeld_swap_total_ms": med(ours["total_ms"]),
            "side_apreqeld_downtime_ms": med(ours["downtime_ms"]),
            "side_apreqeld_gap_ms": med(ours["gap_ms"]),
            "side_apreqeld_failed": ours["failed"] + ours["switch_failed"],
            "side_apreqeld_duplicated": ours["duplicated"],
            "side_server_switch_ms": med(theirs["switch_ms"]),
            "side_server_gap_ms": med(theirs["gap_ms"]),
            "side_server_failed": theirs["failed"] + theirs["switch_failed"],
            "side_server_cut_short": theirs["cut_short"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sections", default="overhead,swaps,cold,side",
                   help="comma-separated subset of overhead,swaps,cold,side")
    p.add_argument("--side-switches", type=int, default=20)
    p.add_argument("--side-rounds", type=int, default=4)
    p.add_argument("--side-pause", type=float, default=0.5,
                   help="seconds of plain load before and after each switch")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    if sections - {"overhead", "swaps", "cold", "side"} or args.side_rounds < 1:
        p.error(f"bad --sections {args.sections!r} or --side-rounds")
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        root = Path(tmp)
        plans, state, ids = build_planset(root, args.threads)
        results: dict[str, float] = {}
        sock = root / "d1.sock"
        if "overhead" in sections:
            d = start(plans, state, sock, args.threads, "--priority", "memory")
            try:
                gguf = member_gguf(plans, state, ids["q4_0"])
                results |= overhead(gguf, sock, args.rounds, args.tokens, args.threads)
            finally:
                stop(d)
        for mode in ("make-before-break", "break-before-make") if "swaps" in sections else ():
            sock = root / f"{mode}.sock"
            d = start(plans, state, sock, args.threads, "--priority", "memory",
                      "--swap-mode", mode)
            try:
                short = "mbb" if mode.startswith("make") else "bbm"
                results |= {f"{short}_{k}": v for k, v in swaps(sock, ids, args.swaps).items()}
            finally:
                stop(d)
        if "cold" in sections:
            results["cold_load_ms"] = cold_load(member_gguf(plans, state, ids["q8_0"]),
                                                args.threads)
        if "side" in sections:
            results |= side_by_side(plans, state, ids, root, args.threads, args.side_switches,
                                    args.side_rounds, args.side_pause)
    print(json.dumps({"rounds": args.rounds, "tokens": args.tokens, "swaps": args.swaps,
                      "threads": args.threads, "sections": sorted(sections),
                      "side_switches": args.side_switches, "side_rounds": args.side_rounds}))
    for key, value in results.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()

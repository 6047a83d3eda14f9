"""apreqeld's OpenAI-compatible HTTP API side by side with llama-cpp-python direct, the msgpack
socket and llama-cpp-python's own OpenAI server, on the same GGUF; then concurrent streaming
clients through HTTP while the daemon swaps.

Run: .venv/bin/python tools/bench_http.py [--rounds 7] [--tokens 64] [--threads 1]
                                          [--clients 16] [--load-seconds 20] [--swap-every 3]
Needs the `bench` extra (llama_cpp.server). Builds the two-member plan set of
tools/bench_daemon.py (uniform q4_0 and q8_0) in a temp folder, starts apreqeld on it (priority
memory: q4_0 serves; `--http 127.0.0.1:PORT`) and `python -m llama_cpp.server` on the q4_0
GGUF (same n_ctx and threads, 127.0.0.1), and loads the q4_0 GGUF with llama_cpp.Llama here.
  side by side  --rounds interleaved rounds (the order rotates each round) of the same greedy
                streamed completion of --tokens tokens through: direct (llama_cpp.Llama in
                this process), apreqeld msgpack (apreqeld.client), apreqeld HTTP and
                llama_cpp.server (both POST /v1/completions, stream, read by the same small
                SSE reader on a connection opened just before, untimed). Tokens/s after the
                first token and time to first token (request sent -> first token); median
                [min-max] over the rounds, each against direct. Goals: HTTP >= 0.97x direct
                tokens/s, <= 5 ms added TTFT, and ahead of llama_cpp.server.
  load          --clients streaming clients (8-token completions back to back) through HTTP
                for --load-seconds while the daemon is pinned to the other member every
                --swap-every s; every stream must end with one finish chunk and [DONE], one id
                per stream and no id twice; failed = an HTTP error, a dropped connection or a
                stream without its end. Also the daemon's own accepted/served counts.
The last lines are the results as `name: value`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apreqeld.client import Client  # noqa: E402
from apreqeld.errors import DaemonError  # noqa: E402
from bench_daemon import (  # noqa: E402
    N_CTX,
    PROMPT,
    build_planset,
    daemon_run,
    direct_run,
    free_port,
    member_gguf,
    spread,
    start,
    start_llama_server,
    stop,
    stop_llama_server,
)

TIMEOUT = 120.0


class SSE:
    """Streamed completions over one keep-alive HTTP connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)

    def stream(self, body: dict, *, fresh: bool = False
               ) -> tuple[float, float | None, int, list[dict]]:
        """(t0, time of the first token, tokens, every chunk) of one streamed completion;
        raises OSError on an HTTP error or a stream without [DONE]. `fresh`: connect anew
        first (untimed), as the servers close idle keep-alive connections (uvicorn after 5 s)
        at different times."""
        if fresh:
            self.conn.close()
            self.conn.connect()
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/completions", body=json.dumps(body | {"stream": True}),
                          headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        if resp.status != 200:
            detail = resp.read()[:200]
            raise OSError(f"HTTP {resp.status}: {detail!r}")
        first, n, chunks, done = None, 0, [], False
        for raw in resp:
            if not raw.startswith(b"data: "):
                if raw.startswith(b"event: error"):
                    raise OSError("an error event")
                continue
            data = raw[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            chunks.append(chunk)
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                n += 1
                first = first or time.perf_counter()
        resp.read()  # the end of the chunked body: the connection is reusable
        if not done:
            raise OSError("the stream ended without [DONE]")
        return t0, first, n, chunks

    def close(self) -> None:
        self.conn.close()


def http_run(client: SSE, model: str, tokens: int) -> tuple[float, float]:
    t0, first, n, _ = client.stream({"model": model, "prompt": PROMPT, "max_tokens": tokens,
                                     "temperature": 0.0}, fresh=True)
    end = time.perf_counter()
    return (first - t0) * 1000, (n - 1) / (end - first)


def side_by_side(llm, sock: Path, port: int, server_port: int, rounds: int,
                 tokens: int) -> dict:
    ours, theirs = SSE(port), SSE(server_port)
    runs = {"direct": [], "msgpack": [], "http": [], "llama_cpp.server": []}
    with Client(sock, timeout=TIMEOUT) as c:
        call = {"direct": lambda t: direct_run(llm, t), "msgpack": lambda t: daemon_run(c, t),
                "http": lambda t: http_run(ours, "bench", t),
                "llama_cpp.server": lambda t: http_run(theirs, "q4_0", t)}
        for f in call.values():  # warm-up, not counted
            f(4)
        names = list(call)
        for r in range(rounds):
            for name in names[r % 4:] + names[:r % 4]:
                runs[name].append(call[name](tokens))
    ours.close()
    theirs.close()
    med = {name: (statistics.median(t for t, _ in v), statistics.median(s for _, s in v))
           for name, v in runs.items()}
    base_ttft, base_tps = med["direct"]
    print(f"\nside by side: {rounds} interleaved rounds, {tokens}-token greedy streamed "
          f"completions, same q4_0 GGUF, n_ctx {N_CTX}")
    header = ("", "tokens/s median [min-max]", "x direct", "TTFT ms median [min-max]",
              "TTFT - direct ms")
    rows = [header]
    for name, v in runs.items():
        tps, ttft = [s for _, s in v], [t for t, _ in v]
        rows.append((name, spread(tps), f"{med[name][1] / base_tps:.3f}", spread(ttft) if
                     max(ttft) >= 10 else f"{statistics.median(ttft):.1f} [{min(ttft):.1f}-"
                     f"{max(ttft):.1f}]", f"{med[name][0] - base_ttft:+.1f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(f"{str(v):<{w}}" for v, w in zip(row, widths, strict=True)))
    out = {}
    for name, key in (("direct", "direct"), ("msgpack", "msgpack"), ("http", "http"),
                      ("llama_cpp.server", "server")):
        out[f"{key}_tokens_per_s"] = med[name][1]
        out[f"{key}_ttft_ms"] = med[name][0]
    out |= {"http_tokens_per_s_ratio": med["http"][1] / base_tps,
            "http_ttft_delta_ms": med["http"][0] - base_ttft,
            "msgpack_tokens_per_s_ratio": med["msgpack"][1] / base_tps,
            "msgpack_ttft_delta_ms": med["msgpack"][0] - base_ttft,
            "server_tokens_per_s_ratio": med["llama_cpp.server"][1] / base_tps,
            "server_ttft_delta_ms": med["llama_cpp.server"][0] - base_ttft,
            "http_over_server_tokens_per_s": med["http"][1] / med["llama_cpp.server"][1]}
    return out


def load(sock: Path, port: int, ids: dict[str, str], clients: int, seconds: float,
         swap_every: float) -> dict:
    lock = threading.Lock()
    out = {"sent": 0, "complete": 0, "failed": 0, "duplicated": 0, "ttft_ms": [],
           "errors": []}
    seen: set[str] = set()
    stop_at = time.monotonic() + seconds

    def client(i: int) -> None:
        sse = SSE(port)
        while time.monotonic() < stop_at:
            with lock:
                out["sent"] += 1
            try:
                t0, first, _n, chunks = sse.stream({"model": "bench", "prompt": f"Story {i}:",
                                                    "max_tokens": 8, "seed": i})
            except (OSError, ValueError, http.client.HTTPException) as exc:
                sse.close()
                sse = SSE(port)
                with lock:
                    out["failed"] += 1
                    out["errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            ids_ = {c["id"] for c in chunks}
            finishes = [c for c in chunks if c.get("choices")
                        and c["choices"][0].get("finish_reason")]
            with lock:
                if len(ids_) != 1 or len(finishes) != 1 or ids_ & seen:
                    out["duplicated"] += 1
                else:
                    out["complete"] += 1
                seen.update(ids_)
                if first is not None:
                    out["ttft_ms"].append((first - t0) * 1000)
        sse.close()

    with Client(sock, timeout=TIMEOUT) as c:
        before = c.status()["counts"]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        order, pins = ["q8_0", "q4_0"], 0
        while time.monotonic() + swap_every < stop_at:
            time.sleep(swap_every)
            try:
                c.pin(ids[order[pins % 2]], wait=True)
                pins += 1
            except DaemonError as exc:
                out["errors"].append(f"pin: {exc}")
        for t in threads:
            t.join(TIMEOUT + seconds)
        c.unpin(wait=True)
        after = c.status()["counts"]
    delta = {k: after[k] - before[k] for k in ("accepted", "served", "failed", "swaps")}
    ttft = sorted(out["ttft_ms"])
    print(f"\nload: {clients} streaming clients through HTTP for {seconds:g} s, 8-token "
          f"completions, pinned to the other member every {swap_every:g} s")
    print(f"  streams sent {out['sent']}, complete {out['complete']}, failed {out['failed']}, "
          f"duplicated {out['duplicated']}; swaps {delta['swaps']} (pins {pins}); daemon "
          f"accepted {delta['accepted']}, served {delta['served']}, failed {delta['failed']}")
    if ttft:
        print(f"  TTFT ms p50 {ttft[len(ttft) // 2]:.0f}, p99 "
              f"{ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]:.0f} (queueing included)")
    for e in out["errors"][:5]:
        print(f"# error: {e}")
    return {"load_streams": out["sent"], "load_complete": out["complete"],
            "load_failed": out["failed"], "load_duplicated": out["duplicated"],
            "load_swaps": delta["swaps"], "load_daemon_accepted": delta["accepted"],
            "load_daemon_served": delta["served"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--load-seconds", type=float, default=20.0)
    p.add_argument("--swap-every", type=float, default=3.0)
    p.add_argument("--sections", default="side,load", help="side, load or both")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    if sections - {"side", "load"} or args.rounds < 1 or args.tokens < 2:
        p.error("bad --sections, --rounds or --tokens")
    from llama_cpp import Llama

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        root = Path(tmp)
        plans, state, ids = build_planset(root, args.threads)
        gguf = member_gguf(plans, state, ids["q4_0"])  # its first split, from the shard store
        sock, port = root / "d.sock", free_port()
        daemon = start(plans, state, sock, args.threads, "--priority", "memory", "--http",
                       f"127.0.0.1:{port}")
        server = None
        try:
            if "side" in sections:
                server, server_port = start_llama_server({"q4_0": gguf}, root, args.threads)
                llm = Llama(model_path=str(gguf), n_ctx=N_CTX, n_threads=args.threads,
                            n_threads_batch=args.threads, verbose=False)
                try:
                    results |= side_by_side(llm, sock, port, server_port, args.rounds,
                                            args.tokens)
                finally:
                    llm.close()
                    stop_llama_server(server)
                    server = None
            if "load" in sections:
                results |= load(sock, port, ids, args.clients, args.load_seconds,
                                args.swap_every)
        finally:
            if server is not None:
                stop_llama_server(server)
            stop(daemon)
    print(json.dumps(vars(args)))
    for key, value in results.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()

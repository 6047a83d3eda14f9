"""Python overhead of apreqel.engine against llama.cpp's own timing of the same calls.

Run: .venv/bin/python benchmarks/bench_engine.py [--chunks N] [--n-gen N] [--reps N]
                                                  [--rounds N] [--threads N]
Works in $APREQEL_HOME when set (the F16 reference is then made once), else in a temp folder.
Measures the default model's F16 reference, interleaving the cases in each round, and reports
the round with the lowest wall clock of each case:
  ppl_tokens_per_s_ours / _engine   decoded tokens per second of engine.perplexity_chunks
                                    (wall clock of the whole loop) / of llama.cpp's own
                                    timing of the same decodes (llama_perf_context)
  ppl_python_overhead               wall / engine - 1, without the KL reference (spec: <= 0.05)
  ppl_kld_*                         the same with the reference log-probs (KL divergence)
  latency_ms_per_token_ours         engine.time_generation's wall ms per token (mean of reps)
  latency_ms_per_token_engine       llama.cpp's own ms per token of the same decodes
  latency_ours_over_engine          ours / engine
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apreqeld import engine
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.reference import ensure_reference, reference_file
from apreqeld.evidence.workspace import Workspace
from apreqeld.resources import default_model_path


@dataclass(frozen=True)
class PplRun:
    """One pass of the perplexity loop: our wall clock and the engine's time of its decodes."""

    tokens: int
    wall_s: float
    engine_s: float

    @property
    def overhead(self) -> float:
        return self.wall_s / self.engine_s - 1.0


def warm_up(session: engine.Session, tokens: np.ndarray, n_ctx: int) -> None:
    """One full-size decode: llama.cpp books a context's first decode as load time."""
    outputs = np.zeros(n_ctx, dtype=np.int8)
    outputs[n_ctx // 2:] = 1
    session.clear()
    session.decode(tokens[:n_ctx], outputs=outputs)
    session.logits(n_ctx // 2)  # synchronizes


def time_perplexity(session: engine.Session, tokens: np.ndarray, *, n_ctx: int, chunks: int,
                    reference: Sequence[engine.SparseLogprobs] | None) -> PplRun:
    """Wall clock of the whole perplexity loop against llama.cpp's timing of its decodes."""
    session.perf_reset()
    start = time.perf_counter()
    for _ in engine.perplexity_chunks(session, tokens, n_ctx=n_ctx, n_chunks=chunks,
                                      reference=reference):
        pass
    wall = time.perf_counter() - start
    engine_ms, _ = session.perf()  # its count adds max(1, n_eval): count tokens ourselves
    return PplRun(chunks * n_ctx, wall, engine_ms / 1000.0)


def report_ppl(prefix: str, runs: Sequence[PplRun]) -> list[str]:
    for i, r in enumerate(runs, 1):
        print(f"# round {i} {prefix}: wall {r.wall_s:.3f} s, engine {r.engine_s:.3f} s, "
              f"overhead {r.overhead:.4f}", flush=True)
    best = min(runs, key=lambda r: r.wall_s)
    return [f"{prefix}_tokens_per_s_ours: {best.tokens / best.wall_s:.1f}",
            f"{prefix}_tokens_per_s_engine: {best.tokens / best.engine_s:.1f}",
            f"{prefix}_python_overhead: {best.overhead:.4f}"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--n-gen", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best is kept")
    parser.add_argument("--threads", type=int, default=engine.default_threads())
    args = parser.parse_args(argv)
    protocol = Protocol(chunks=args.chunks, n_gen=args.n_gen, reps=args.reps,
                        threads=args.threads)
    model = default_model_path()
    home = os.environ.get("APREQEL_HOME")
    with tempfile.TemporaryDirectory(prefix="apreqel-bench-") as tmp:
        workspace = Workspace(Path(home) if home else Path(tmp))
        started = time.perf_counter()
        ref_path = reference_file(model, workspace=workspace)
        reference = ensure_reference(model, workspace=workspace, protocol=protocol)
        print(f"# bench_engine: model {model.name} as its F16 reference, "
              f"threads {protocol.threads}, chunks {protocol.chunks} x {protocol.n_ctx} tokens, "
              f"n_gen {protocol.n_gen}, reps {protocol.reps}, rounds {args.rounds}; "
              f"ours and engine numbers come from the same calls in one run, side by side "
              f"(setup {time.perf_counter() - started:.1f} s, {engine.engine_version()})",
              flush=True)
        plain: list[PplRun] = []
        kld: list[PplRun] = []
        gens: list[engine.GenerationTiming] = []
        with engine.open_session(ref_path, n_ctx=protocol.n_ctx, threads=protocol.threads,
                                 gpu_layers=protocol.gpu_layers) as session:
            warm_up(session, reference.tokens, protocol.n_ctx)
            for _ in range(args.rounds):
                plain.append(time_perplexity(session, reference.tokens, n_ctx=protocol.n_ctx,
                                             chunks=protocol.chunks, reference=None))
                kld.append(time_perplexity(session, reference.tokens, n_ctx=protocol.n_ctx,
                                           chunks=protocol.chunks, reference=reference.logprobs))
                gens.append(engine.time_generation(session, n_gen=protocol.n_gen,
                                                   reps=protocol.reps))
    results = report_ppl("ppl", plain) + report_ppl("ppl_kld", kld)
    means = [float(np.mean(g.ms_per_token)) for g in gens]
    for i, (g, ours) in enumerate(zip(gens, means, strict=True), 1):
        print(f"# round {i} latency: ours {ours:.3f} ms/token "
              f"(reps {', '.join(f'{m:.2f}' for m in g.ms_per_token)}), "
              f"engine {g.engine_ms_per_token:.3f} ms/token", flush=True)
    best = int(np.argmin(means))
    results += [f"latency_ms_per_token_ours: {means[best]:.3f}",
                f"latency_ms_per_token_engine: {gens[best].engine_ms_per_token:.3f}",
                f"latency_ours_over_engine: {means[best] / gens[best].engine_ms_per_token:.4f}"]
    print("\n".join(results), flush=True)


if __name__ == "__main__":
    main()

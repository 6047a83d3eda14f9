"""Wall time of the full study (28 configurations) on the default model, cold and warm.

Cold: a fresh work directory and output folder (F16 reference, uniform types, layer profile,
every distinct plan built and measured). Warm: the same command again, which must measure
nothing and only re-plan and re-render. Run: .venv/bin/python benchmarks/bench_study.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from apreqeld.core.configs import PAPER_CONFIGS
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.workspace import Workspace
from apreqeld.resources import default_model_path
from apreqeld.study.run import run_study
from apreqeld.workflow import PlanOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--n-gen", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--configs", type=int, default=len(PAPER_CONFIGS))
    parser.add_argument("--types", default=None)
    args = parser.parse_args()
    protocol = Protocol(chunks=args.chunks, n_gen=args.n_gen, reps=args.reps)
    configs = PAPER_CONFIGS[: args.configs]
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace(Path(tmp) / "work")
        out = Path(tmp) / "study"
        print(f"study of {len(configs)} configurations on {default_model_path().name}, "
              f"{protocol.chunks} chunks x {protocol.n_ctx}, tg{protocol.n_gen} x "
              f"{protocol.reps}, {protocol.threads} threads; cold then warm in one run")
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            result = run_study(default_model_path(), out, workspace=workspace,
                               options=PlanOptions(protocol=protocol, types=args.types),
                               configs=configs)
            times.append(time.perf_counter() - t0)
        hv = result["hypervolume"].get("ppl", {})
        gain = hv.get("gain")
        print(f"distinct plans: {result['planning']['distinct_plans']}, HV gain (ppl): "
              + ("undefined" if gain is None else f"{100 * gain:+.2f}%"))
    print(f"study_cold_s: {times[0]:.1f}")
    print(f"study_warm_s: {times[1]:.1f}")
    print(f"study_warm_over_cold: {times[1] / times[0]:.3f}")


if __name__ == "__main__":
    main()

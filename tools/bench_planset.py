"""Read a plan set and print what issue 8 asks to measure: the front against the uniform
models on the same axes, how many distinct plans the grid produced, predicted vs measured per
member (and the aiming predictor's error over all members), and footprint vs parameter bytes.
(Cold/warm timing and front stability across two latency runs are not measured here yet.)

    .venv/bin/python tools/bench_planset.py plans/smollm2-135m
"""

from __future__ import annotations

import sys

from apreqeld.manifest import load_planset

MIB = 2**20


def main(folder: str) -> None:
    ps = load_planset(folder)
    acc = ps.accuracy
    mixes = [m for m in ps.members if m.kind == "mix"]
    uniform = [m for m in ps.members if m.kind == "uniform"]
    vectors = sum(len(m.weights) for m in ps.members)
    presets = [m for m in ps.members if m.kind == "preset"]
    aimed = [m for m in mixes if m.label.startswith("aimed at ")]
    print(f"{ps.name}: {vectors} weight vectors -> {len(mixes) - len(aimed)} distinct mixes "
          f"(+{len(aimed)} aimed at presets, +{len(uniform)} uniform, +{len(presets)} llama.cpp "
          f"presets); front: {len(ps.pareto_members)} members ({sum(m.pareto for m in mixes)} "
          f"mixes, {sum(m.pareto for m in aimed)} of them aimed, "
          f"{sum(m.pareto for m in uniform)} uniform, {sum(m.pareto for m in presets)} presets; "
          f"presets in detail: tools/bench_presets.py)")
    disturbed = [m.id for m in ps.members if m.measured.latency.disturbed]
    if disturbed:
        print(f"latency disturbed for {len(disturbed)} of {len(ps.members)} members "
              "(re-time with `apreqel planset -o FOLDER --retime`)")
    print(f"timing: {ps.protocol.get('timing_s')}")
    print(f"\n{'id':12} {'kind':7} {'label':26} {'foot':>6} {'param':>6} {'+MiB':>5} "
          f"{'ms med':>7} {'IQR':>5} {acc:>7} front  dominated by uniform?")
    uni_ids = {m.id for m in uniform}
    for m in sorted(ps.members, key=lambda m: m.measured.footprint_bytes):
        x = m.measured
        a = x.kld if acc == "kld" else x.ppl
        by_uniform = sorted(set(m.dominated_by) & uni_ids)
        extra = (x.footprint_bytes - x.parameter_bytes) / MIB
        print(f"{m.id:12} {m.kind:7} {m.label[:26]:26} {x.footprint_bytes / MIB:6.1f} "
              f"{x.parameter_bytes / MIB:6.1f} {extra:5.1f} "
              f"{x.latency.median_ms:7.2f} {x.latency.iqr_ms:5.2f} {a:7.4f} "
              f"{'yes' if m.pareto else 'no':5}  {','.join(by_uniform) or '-'}")
    print("\npredicted vs measured (mixes: memory exact; latency and accuracy relative error)")
    for m in mixes:
        p, x = m.predicted or {}, m.measured
        if not p:
            continue
        mem = p.get("memory_bytes_exact", p["memory_bytes"])
        print(f"{m.id:12} memory {mem / MIB:6.1f} vs {x.parameter_bytes / MIB:6.1f} MiB  "
              f"latency {p['latency_ms']:6.2f} vs {x.latency.median_ms:6.2f} "
              f"({100 * (p['latency_ms'] / x.latency.median_ms - 1):+5.0f}%)  "
              f"kld {p['kld']:.4f} vs {x.kld:.4f} "
              f"({100 * (p['kld'] / max(x.kld, 1e-9) - 1):+5.0f}%)")
    aim = (ps.protocol.get("planning") or {}).get("aim")
    if aim:
        print("\naiming predictor (sensitivity-weighted accuracy, size-weighted latency and "
              "footprint) against every member's measurement, relative error:")
        for metric, err in aim["prediction_error"].items():
            print(f"  {metric:16} median {100 * err['median']:5.1f}%  max {100 * err['max']:5.1f}%")
        paper = [abs(m.predicted[acc] / getattr(m.measured, acc) - 1) for m in mixes
                 if m.predicted and not m.label.startswith("aimed at")]
        if paper:
            paper.sort()
            print(f"  the paper's proportional {acc} estimate on the TOPSIS mixes: median "
                  f"{100 * paper[len(paper) // 2]:5.1f}%  max {100 * paper[-1]:5.1f}%")
    print(f"\nbaseline RSS of the measuring process (not in footprints): "
          f"{(ps.serving.baseline_rss_bytes or 0) / MIB:.1f} MiB; serving ctx {ps.serving.n_ctx}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "plans/smollm2-135m")

"""Read plan sets and print, for each, issue 22's tables: the aiming loop's rounds (presets
aimed, members added, presets dominated after each round's measurement, wall time), then every
llama.cpp preset it measured (memory as footprint and parameter bytes, ms/token, KLD, PPL),
the member that dominates it (all three objectives, the same run's interleaved latency) with
its latency margin, flagged when the margin is inside the rounds' spread (the mean of the two
IQRs), or none, by how much the closest misses and why the loop could not beat it; then the
counts (goal: every preset that is not itself an extreme point of the front), the loop's
members added and wall time, and what the run quantized.

    .venv/bin/python tools/bench_presets.py [plans/smollm2-135m ...]
"""

from __future__ import annotations

import sys

from apreqeld.manifest import Member, load_planset

MIB = 2**20


def latency_margin(preset: Member, dominators: list[Member]) -> tuple[Member, float, float]:
    """The dominating member with the largest latency margin over the preset (relative to
    the preset's median) and the noise it is judged against: the mean of the two IQRs."""
    def margin(m: Member) -> float:
        return 1 - m.measured.latency.median_ms / preset.measured.latency.median_ms

    best = max(dominators, key=margin)
    noise = ((best.measured.latency.iqr_ms + preset.measured.latency.iqr_ms) / 2
             / preset.measured.latency.median_ms)
    return best, margin(best), noise


def loop_table(ps: object) -> None:
    """The aiming loop's rounds, from `protocol.planning.aim.loop`."""
    aim = (ps.protocol.get("planning") or {}).get("aim") or {}
    loop = aim.get("loop")
    if not loop:
        print("(no aiming loop in this plan set)")
        return
    b = loop["bounds"]
    print(f"aiming loop: bounds {b['rounds']} rounds, {b['members']} members; stopped: "
          f"{loop['stop']}")
    print(f"{'round':>5} {'aimed':>5} {'added':>5} {'members':>7} {'dominated':>9} "
          f"{'wall s':>7}  dominated presets")
    for r in loop["rounds"]:
        print(f"{r['round']:5d} {len(r['aimed']) if r['round'] else '-':>5} {r['added']:5d} "
              f"{r['members']:7d} {len(r['dominated']):9d} {r['wall_s']:7.0f}  "
              + ",".join(r["dominated"]))
    print(f"members added by the loop (rounds 1+): {loop['added']}; round 0 aimed "
          f"{aim.get('first_aimed', 0)} before the first measurement\n")


def main(folder: str) -> None:
    ps = load_planset(folder)
    if not ps.presets:
        print(f"{ps.name}: no preset comparison in this plan set (made without presets?); "
              "rebuild it with `apreqel planset ... --presets all`")
        return
    by_id = {m.id: m for m in ps.members}
    rejected = ps.protocol.get("planning", {}).get("presets", {}).get("rejected", {})
    print(f"{ps.name} ({ps.model.name}): {len(ps.presets)} presets measured with "
          f"{len(ps.members)} members; front over footprint, ms/token (median), {ps.accuracy}"
          + (f"; not applicable: {', '.join(rejected)}" if rejected else "") + "\n")
    loop_table(ps)
    print(f"\n{'preset':8} {'member':12} {'foot':>6} {'param':>6} {'ms/tok':>7} {'KLD':>7} "
          f"{'PPL':>8}  dominated by (or closest: miss per objective)")
    beaten = covered = clear = 0
    reasons: list[tuple[str, str | None]] = []
    for p in ps.presets:
        m = by_id[p.member]
        x = m.measured
        flag = "!" if x.latency.disturbed else " "
        if p.dominated_by:
            beaten += 1
            best, margin, noise = latency_margin(m, [by_id[i] for i in p.dominated_by])
            clear += margin >= noise
            what = (f"{best.id} {best.kind} {best.label[:24]}"
                    + (f" (+{len(p.dominated_by) - 1})" if len(p.dominated_by) > 1 else "")
                    + f"; ms {100 * margin:.0f}% lower"
                    + ("" if margin >= noise else f", inside the noise ({100 * noise:.0f}%)"))
        else:
            gaps = " ".join(f"{k.split('_')[0]} {100 * v:+.1f}%" for k, v in p.miss.items())
            own = " (itself a " + m.kind + " member)" if m.kind != "preset" else ""
            covered += m.kind != "preset"
            what = f"none{own}; closest {p.closest}: {gaps}"
            reasons.append((p.name, p.reason))
        print(f"{p.name:8} {m.id:12} {x.footprint_bytes / MIB:6.1f} "
              f"{x.parameter_bytes / MIB:6.1f} {x.latency.median_ms:6.2f}{flag} {x.kld:7.4f} "
              f"{x.ppl:8.3f}  {what}")
    for name, reason in reasons:
        print(f"  why not {name}: {reason or '(no reason recorded: made without the loop?)'}")
    timing = ps.protocol.get("timing_s", {})
    quantized = ps.protocol.get("quantized", {})
    print(f"plan set wall time {timing.get('total', '?')} s; quantized: "
          + ", ".join(f"{k} {v}" for k, v in quantized.items()))
    disturbed = sum(m.measured.latency.disturbed for m in ps.members)
    print(f"\npresets dominated by a mix or uniform member: {beaten} of {len(ps.presets)} "
          f"(goal: all); {clear} of them with a latency margin beyond the rounds' spread; "
          f"undominated but identical to a uniform member: {covered}")
    if disturbed:
        print(f"! latency disturbed for {disturbed} of {len(ps.members)} members: re-time on a "
              "quiet machine with `apreqel planset -o FOLDER --retime`")


if __name__ == "__main__":
    for k, folder in enumerate(sys.argv[1:] or ["plans/smollm2-135m"]):
        if k:
            print("\n" + "=" * 100 + "\n")
        main(folder)

"""Synthetic but plausible `study` dicts (the study.json contract) for analysis and report tests."""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Any

import numpy as np

from apreqeld.study.analysis import robustness_table

N_BLOCKS = 30
N_SUBLAYERS = 2 * N_BLOCKS

TYPES = ["q8_0", "q6_K", "q5_K", "q4_K", "q3_K"]
"""Least to most aggressive, as in the study contract."""

UNIFORM = {
    # type: (bpw, memory_bytes, latency_ms, latency_std_ms, ppl, kld, top1)
    "q8_0": (8.5, 144_806_784, 2.91, 0.06, 17.812, 0.0009, 0.991),
    "q6_K": (6.5625, 118_243_072, 3.34, 0.05, 17.861, 0.0041, 0.978),
    "q5_K": (5.5, 103_745_280, 3.12, 0.07, 18.004, 0.0118, 0.962),
    "q4_K": (4.5, 90_178_816, 2.68, 0.04, 18.617, 0.0352, 0.931),
    "q3_K": (3.4375, 75_634_432, 3.02, 0.08, 21.493, 0.1407, 0.862),
}

T = 1 / 3
CONFIGS: list[tuple[str, str, tuple[float, float, float]]] = [
    # (name, category, (w_memory, w_latency, w_accuracy)): the paper's 28 configurations (§4.1.1)
    ("fairness-equal", "Fairness", (T, T, T)),
    ("fairness-mem-lat", "Fairness", (0.5, 0.5, 0.0)),
    ("fairness-mem-acc", "Fairness", (0.5, 0.0, 0.5)),
    ("fairness-lat-acc", "Fairness", (0.0, 0.5, 0.5)),
    ("memory-0.7", "Memory", (0.7, 0.15, 0.15)),
    ("memory-0.8", "Memory", (0.8, 0.1, 0.1)),
    ("memory-0.9", "Memory", (0.9, 0.05, 0.05)),
    ("memory-1.0", "Memory", (1.0, 0.0, 0.0)),
    ("memory-0.75+latency", "Memory", (0.75, 0.25, 0.0)),
    ("memory-0.75+accuracy", "Memory", (0.75, 0.0, 0.25)),
    ("memory-0.9+latency", "Memory", (0.9, 0.1, 0.0)),
    ("memory-0.9+accuracy", "Memory", (0.9, 0.0, 0.1)),
    ("latency-0.7", "Latency", (0.15, 0.7, 0.15)),
    ("latency-0.8", "Latency", (0.1, 0.8, 0.1)),
    ("latency-0.9", "Latency", (0.05, 0.9, 0.05)),
    ("latency-1.0", "Latency", (0.0, 1.0, 0.0)),
    ("latency-0.75+memory", "Latency", (0.25, 0.75, 0.0)),
    ("latency-0.75+accuracy", "Latency", (0.0, 0.75, 0.25)),
    ("latency-0.9+memory", "Latency", (0.1, 0.9, 0.0)),
    ("latency-0.9+accuracy", "Latency", (0.0, 0.9, 0.1)),
    ("accuracy-0.7", "Accuracy", (0.15, 0.15, 0.7)),
    ("accuracy-0.8", "Accuracy", (0.1, 0.1, 0.8)),
    ("accuracy-0.9", "Accuracy", (0.05, 0.05, 0.9)),
    ("accuracy-1.0", "Accuracy", (0.0, 0.0, 1.0)),
    ("accuracy-0.75+memory", "Accuracy", (0.25, 0.0, 0.75)),
    ("accuracy-0.75+latency", "Accuracy", (0.0, 0.25, 0.75)),
    ("accuracy-0.9+memory", "Accuracy", (0.1, 0.0, 0.9)),
    ("accuracy-0.9+latency", "Accuracy", (0.0, 0.1, 0.9)),
]


def _grid(step: int = 2) -> np.ndarray:
    """All distributions of the sublayers over the types, in multiples of `step` layers."""
    units = N_SUBLAYERS // step
    rows = [
        [b - a - 1 for a, b in zip((-1, *cuts), (*cuts, units + len(TYPES) - 1), strict=True)]
        for cuts in itertools.combinations(range(units + len(TYPES) - 1), len(TYPES) - 1)
    ]
    return np.asarray(rows, dtype=float) * step


def _topsis(x: np.ndarray, w: tuple[float, float, float]) -> int:
    """Index of the TOPSIS-best row of cost matrix `x` under weights `w` (paper §3.2.2)."""
    a = x / np.sqrt((x**2).sum(axis=0)) * np.asarray(w)
    d_best = np.sqrt(((a - a.min(axis=0)) ** 2).sum(axis=1))
    d_worst = np.sqrt(((a - a.max(axis=0)) ** 2).sum(axis=1))
    return int(np.argmax(d_worst / (d_best + d_worst)))


def _nondominated(points: np.ndarray) -> list[bool]:
    """Flags of the rows not dominated by another row (all objectives minimised)."""
    flags = []
    for p in points:
        dom = np.all(points <= p, axis=1) & np.any(points < p, axis=1)
        flags.append(not bool(dom.any()))
    return flags


def _hv(points: np.ndarray, ideal: np.ndarray, ref: np.ndarray, samples: np.ndarray) -> float:
    """Monte-Carlo hypervolume of min-max normalised points inside the unit box (fixture only)."""
    if len(points) == 0:
        return 0.0
    norm = (points - ideal) / (ref - ideal)
    covered = np.zeros(len(samples), dtype=bool)
    for p in norm:
        covered |= np.all(samples >= p, axis=1)
    return float(covered.mean())


def _measure(values: dict[str, float], rng: np.random.Generator) -> dict[str, float]:
    """A measured-metrics dict M around predicted `values`, with plausible noise and errors."""
    ppl = values["ppl"] * (1 + rng.normal(0.004, 0.006))
    kld = max(values["kld"] * (1 + rng.normal(0.05, 0.1)), 1e-5)
    return {
        "memory_bytes": int(round(values["memory_bytes_exact"])),
        "latency_ms": round(values["latency_ms"] * (1 + rng.normal(0.0, 0.04)), 4),
        "latency_std_ms": round(abs(rng.normal(0.06, 0.02)), 4),
        "ppl": round(ppl, 4),
        "ppl_se": round(ppl * 0.012, 4),
        "kld": round(kld, 6),
        "kld_se": round(kld * 0.03, 6),
        "top1_agreement": round(min(0.999, 1 - 0.9 * math.sqrt(kld)), 4),
    }


def _contribution(rng: np.random.Generator) -> dict[str, Any]:
    """Per-sublayer cosine profile and reward/penalty scores shaped like the paper's Figure 1."""
    tokens = 4096
    subs = []
    for b in range(N_BLOCKS):
        edge = 1.0 if b in (0, N_BLOCKS - 1) else 0.0
        for kind, base in (("attn", 0.955), ("ffn", 0.93 - 0.03 * math.sin(b / 4))):
            cos = float(np.clip(base - 0.45 * edge * (kind == "ffn") - 0.25 * edge
                                + rng.normal(0, 0.015), 0.2, 0.999))
            reward = int(tokens * float(np.clip((0.95 - cos) * 4 + 0.5, 0, 1)))
            subs.append({
                "name": f"blk.{b}.{kind}", "block": b, "kind": kind,
                "score": float(2 * reward - tokens), "reward": reward,
                "penalty": tokens - reward, "mean_cosine": round(cos, 5),
            })
    return {"gamma": 0.9, "text": "tinyshakespeare.txt[0:4096 tokens]", "tokens": tokens,
            "sublayers": subs}


def make_study(n_models: int = 28) -> dict[str, Any]:
    """A full study dict with the first `n_models` of the paper's 28 configurations (0..28)."""
    if not 0 <= n_models <= len(CONFIGS):
        raise ValueError(f"n_models must be in 0..{len(CONFIGS)}")
    rng = np.random.default_rng(20240611)
    uniform = [
        {"name": t, "type": t, "bpw": bpw,
         "measured": {"memory_bytes": mem, "latency_ms": lat, "latency_std_ms": sd, "ppl": ppl,
                      "ppl_se": round(ppl * 0.012, 4), "kld": kld, "kld_se": kld * 0.03,
                      "top1_agreement": top1}}
        for t, (bpw, mem, lat, sd, ppl, kld, top1) in UNIFORM.items()
    ]
    cols = ("memory_bytes", "latency_ms", "ppl")
    cost = np.asarray([[u["measured"][c] for c in cols] for u in uniform], dtype=float)
    kld_u = np.asarray([u["measured"]["kld"] for u in uniform])
    bpw_u = np.asarray([u["bpw"] for u in uniform])
    grid = _grid()
    share = grid / N_SUBLAYERS
    estimates = share @ cost
    models: list[dict[str, Any]] = []
    seen: dict[tuple[int, ...], dict[str, Any]] = {}
    for name, cat, w in CONFIGS[:n_models]:
        k = _topsis(estimates, w)
        z = tuple(int(v) for v in grid[k])
        mixed = share[k, -1] * (1 - share[k, -1])  # exact sizes differ a little from the estimate
        pred = {
            "memory_bytes": float(estimates[k, 0]),
            "memory_bytes_exact": float(estimates[k, 0] * (1 + 0.02 * mixed)),
            "latency_ms": float(estimates[k, 1]),
            "ppl": float(estimates[k, 2]),
            "kld": float(share[k] @ kld_u),
        }
        first = seen.get(z)
        plan_id = first["plan_id"] if first else hashlib.sha1(str(z).encode()).hexdigest()[:12]
        measured = dict(first["measured"]) if first else _measure(pred, rng)
        model = {
            "name": name, "category": cat, "weights": list(w),
            "distribution": dict(zip(TYPES, z, strict=True)),
            "bpw": round(float(share[k] @ bpw_u), 4),
            "predicted": pred, "measured": measured, "plan_id": plan_id,
            "gguf": f"models/{plan_id}.gguf", "same_as": first["name"] if first else None,
        }
        seen.setdefault(z, model)
        models.append(model)
    pts_u = np.asarray([[u["measured"][c] for c in cols] for u in uniform], dtype=float)
    pts_m = np.asarray([[m["measured"][c] for c in cols] for m in models], dtype=float)
    pts_m = pts_m.reshape(-1, 3)
    flags = _nondominated(np.vstack([pts_u, pts_m]))
    samples = np.random.default_rng(7).random((20000, 3))
    hypervolume = {}
    for acc in ("ppl", "kld"):
        obj = ["memory_bytes", "latency_ms", acc]
        pu = np.asarray([[u["measured"][c] for c in obj] for u in uniform], dtype=float)
        pm = np.asarray([[m["measured"][c] for c in obj] for m in models], dtype=float)
        pm = pm.reshape(-1, 3)
        union = np.vstack([pu, pm])
        ideal, ref = union.min(axis=0), pu.max(axis=0)
        hu, ha = _hv(pu, ideal, ref, samples), _hv(pm, ideal, ref, samples)
        hn = _hv(union, ideal, ref, samples)
        hypervolume[acc] = {
            "objectives": obj, "ideal": ideal.tolist(), "ref": ref.tolist(),
            "normalisation": "each objective min-max normalised between the ideal point (best "
                             "value over uniform and APreQEL models) and the reference point "
                             "(worst uniform value), all minimised",
            "hv_uniform": hu, "hv_apreqel": ha, "hv_union": hn,
            "gain": (ha - hu) / hu if hu else 0.0, "gain_union": (hn - hu) / hu if hu else 0.0,
        }
    return {
        "apreqel_version": "0.1.0",
        "created": "2025-11-23T14:39:00+00:00",
        "command": "apreqel study --model SmolLM2-135M-Instruct-Q4_1.gguf --out runs/smollm2",
        "model": {"name": "SmolLM2-135M-Instruct", "path": "models/SmolLM2-135M-Instruct-Q4_1.gguf",
                  "sha256": "3f1c0a9e" * 8, "architecture": "llama", "n_blocks": N_BLOCKS,
                  "n_sublayers": N_SUBLAYERS, "reference": "F16 (dequantized from Q4_1)"},
        "device": {"cpu": "AMD EPYC 9454 48-Core Processor", "gpu": "NVIDIA H100 80GB HBM3",
                   "threads": 16, "gpu_layers": 99, "llama_cpp": "0.3.36"},
        "protocol": {"text": "wiki.test.raw", "chunks": 40, "ctx": 512, "tokens_scored": 10240,
                     "latency_reps": 5, "latency_tokens": 128,
                     "calibration": "tinyshakespeare.txt"},
        "policy": {"outside_type": "q8_0"},
        "types": list(TYPES),
        "uniform": uniform,
        "models": models,
        "pareto": {"objectives": list(cols), "uniform": flags[: len(uniform)],
                   "models": flags[len(uniform):]},
        "hypervolume": hypervolume,
        "robustness": robustness_table(models),
        "contribution": _contribution(rng),
        "timing": {"total_s": 1843.2, "measure_uniform_s": 212.5, "build_s": 96.1,
                   "measure_models_s": 1490.3},
    }

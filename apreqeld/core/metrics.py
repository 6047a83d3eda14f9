"""Statistics of the accuracy protocol, as llama-perplexity reports them (pure, no I/O)."""

from __future__ import annotations

import math

import numpy as np

# The names of the measured and predicted metrics, everywhere (plans, studies, plan sets).
MEMORY = "memory_bytes"
LATENCY = "latency_ms"
ACCURACY_METRICS = ("ppl", "kld")
METRICS = (MEMORY, LATENCY, *ACCURACY_METRICS)


def mean_and_error(values: np.ndarray, /) -> tuple[float, float]:
    """Mean and its standard error, llama.cpp's mean_and_uncertainty: sqrt(var / (n - 1))."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n == 0:
        return math.nan, math.nan
    mean = float(v.mean())
    if n < 2:
        return mean, math.nan
    var = float((v * v).mean() - mean * mean)
    return mean, math.sqrt(max(var, 0.0) / (n - 1))


def perplexity(nll: np.ndarray, /) -> tuple[float, float]:
    """Perplexity exp(mean NLL) and its standard error (delta method, as llama-perplexity)."""
    mean, err = mean_and_error(nll)
    ppl = math.exp(mean)
    return ppl, ppl * err


def latency_stats(samples_ms: np.ndarray, /) -> dict[str, float | int]:
    """Robust (median, interquartile range) and classic (mean, sample std) statistics of ms per
    token samples, keyed as the plan-set manifest's LatencyStats."""
    v = np.asarray(samples_ms, dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError("latency statistics need at least one finite sample")
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return {"median_ms": float(median), "iqr_ms": float(q3 - q1), "mean_ms": float(v.mean()),
            "std_ms": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}

"""Statistics of the accuracy protocol, as llama-perplexity reports them (pure, no I/O)."""

from __future__ import annotations

import math

import numpy as np


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

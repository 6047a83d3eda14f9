"""The measurement protocol: what determines a measurement besides the model file, the machine
it ran on, and the progress callback every long job reports through."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from apreqeld import engine
from apreqeld.errors import InputError
from apreqeld.resources import EVAL_TEXT_NAME

Progress = Callable[[str, float], None]  # (what is happening, fraction done of this step)


def no_progress(_what: str, _fraction: float) -> None:
    """The default progress callback: report nothing."""
    pass


@dataclass(frozen=True)
class Protocol:
    """Everything that determines a measurement besides the model file itself."""

    n_ctx: int = 512
    chunks: int = 8
    n_gen: int = 64
    reps: int = 5
    threads: int = field(default_factory=engine.default_threads)
    gpu_layers: int = 0
    text: str = EVAL_TEXT_NAME

    def __post_init__(self) -> None:
        for name in ("n_ctx", "chunks", "n_gen", "reps", "threads"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('n_', '')} must be at least 1, "
                                 f"got {getattr(self, name)}")
        if self.n_ctx % 2 or self.n_ctx < 8:
            raise InputError(f"context must be an even number of at least 8, got {self.n_ctx}")
        if self.gpu_layers < 0:
            raise InputError(f"gpu-layers must be >= 0, got {self.gpu_layers}")

    @property
    def tokens_scored(self) -> int:
        return self.chunks * (self.n_ctx - self.n_ctx // 2 - 1)

    def to_dict(self) -> dict:
        return asdict(self) | {"tokens_scored": self.tokens_scored,
                               "scoring": "llama-perplexity: chunks of ctx tokens, BOS first "
                                          "when the vocabulary adds one, second half scored",
                               "latency": "llama-bench tg: warm-up, then reps runs of n_gen "
                                          "one-token decodes; ms per token"}


def machine_description(protocol: Protocol) -> dict:
    """Where the numbers come from: CPU, GPU backend, threads, llama.cpp build."""
    gpu = engine.gpu_offload_supported()
    return {"cpu": engine.cpu_description(), "gpu": "GPU backend" if gpu else None,
            "gpu_offload": gpu, "threads": protocol.threads,
            "gpu_layers": protocol.gpu_layers if gpu else 0,
            "llama_cpp": engine.engine_version(), "system_info": engine.system_info()}




def machine_fingerprint() -> dict:
    """What a cached measurement depends on about the machine: CPU model, cores, llama.cpp
    build, GPU backend (a measurement made elsewhere is never taken for this machine's)."""
    return {"cpu": engine.cpu_description(), "cores": os.cpu_count(),
            "llama_cpp": engine.engine_version(), "gpu_backend": engine.gpu_offload_supported()}

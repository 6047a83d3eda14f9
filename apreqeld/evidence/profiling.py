"""Capture the residual stream inside llama.cpp and turn it into layer contribution scores.

llama.cpp names graph tensors per architecture; the residual stream is found from a small
table of names (block output, the stream between attention and FFN, the embedding input), so a
new architecture that follows llama.cpp's conventions needs no code change, and one that does
not fails with a message naming what was missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apreqeld import engine
from apreqeld.core.contribution import DEFAULT_GAMMA, Contribution, cosine_rows, score_cosines
from apreqeld.errors import InputError, ModelError
from apreqeld.gguf.view import ModelView
from apreqeld.resources import calibration_text

# Graph-tensor names of the residual stream, as llama.cpp's model builders call them.
BLOCK_OUTPUT = ("l_out",)
AFTER_ATTENTION = ("ffn_inp", "sa_out", "attn_residual", "attn_out_res")
EMBEDDING = ("inp_scaled", "inp_embd", "embd")
_WANTED = re.compile(
    r"^(?:(?:{})-\d+|{})$".format("|".join(BLOCK_OUTPUT + AFTER_ATTENTION), "|".join(EMBEDDING))
)


@dataclass(frozen=True)
class LayerProfile:
    """Contribution scores of every sublayer, and where they came from."""

    contribution: Contribution
    sublayer_names: tuple[str, ...]
    text: str
    token_range: tuple[int, int]
    chunk: int
    stream_names: dict[str, str]  # which graph names were used (for the record)

    def to_dict(self) -> dict:
        c = self.contribution
        ranks = c.ranks()
        return {
            "gamma": c.gamma,
            "text": self.text,
            "token_range": list(self.token_range),
            "tokens": self.token_range[1] - self.token_range[0],
            "chunk": self.chunk,
            "stream_names": self.stream_names,
            "sublayers": [
                {"name": n, "block": int(n.split(".")[1]), "kind": n.split(".")[2],
                 "score": int(c.score[i]), "reward": int(c.reward[i]),
                 "penalty": int(c.penalty[i]), "mean_cosine": float(c.mean_cosine[i]),
                 "rank": int(ranks[i])}
                for i, n in enumerate(self.sublayer_names)
            ],
        }


def _pick(seen: set[str], names: tuple[str, ...], suffix: str = "") -> str | None:
    return next((f"{n}{suffix}" for n in names if f"{n}{suffix}" in seen), None)


def stream_layout(seen: set[str], n_blocks: int) -> list[tuple[str, str, str]]:
    """For each block: (input, after-attention, output) graph names; fails naming the gap."""
    embedding = _pick(seen, EMBEDDING)
    if embedding is None:
        raise ModelError(f"no embedding input in the graph (looked for {', '.join(EMBEDDING)})")
    layout = []
    previous = embedding
    for il in range(n_blocks):
        out = _pick(seen, BLOCK_OUTPUT, f"-{il}")
        mid = _pick(seen, AFTER_ATTENTION, f"-{il}")
        if out is None or mid is None:
            wanted = BLOCK_OUTPUT if out is None else AFTER_ATTENTION
            raise ModelError(
                f"cannot find the residual stream of block {il} in llama.cpp's graph "
                f"(looked for {', '.join(f'{w}-{il}' for w in wanted)}); this architecture "
                "needs its names added to apreqel.profiling")
        layout.append((previous, mid, out))
        previous = out
    return layout


def profile_layers(view: ModelView, text: str, /, *, text_name: str, n_tokens: int = 2048,
                   chunk: int = 512, gamma: float = DEFAULT_GAMMA, threads: int | None = None,
                   gpu_layers: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> LayerProfile:
    """Score every sublayer of `view` on the first `n_tokens` tokens of `text` (§3.1)."""
    if not text.strip():
        raise InputError(f"calibration text '{text_name}' is empty")
    captured: dict[str, np.ndarray] = {}
    not_f32: list[str] = []

    def keep(name: str, data: np.ndarray | None) -> None:
        if data is None:
            not_f32.append(name)
        else:
            captured[name] = data.copy()

    per_sublayer: list[list[np.ndarray]] = [[] for _ in view.sublayers]
    layout: list[tuple[str, str, str]] | None = None
    with engine.open_session(view.path, n_ctx=chunk, threads=threads, gpu_layers=gpu_layers,
                             on_tensor=keep, wanted=lambda n: bool(_WANTED.match(n))) as s:
        tokens = s.tokenize(text)
        if len(tokens) < 2:
            raise InputError(f"calibration text '{text_name}' has fewer than 2 tokens")
        tokens = tokens[:n_tokens]
        chunks = [tokens[i:i + chunk] for i in range(0, len(tokens), chunk)]
        chunks = [c for c in chunks if len(c) >= 2]
        for k, c in enumerate(chunks):
            captured.clear()
            engine.capture_tensors(s, [c])
            if not_f32:
                raise ModelError(f"residual tensor {not_f32[0]} is not float32; cannot profile")
            if layout is None:
                layout = stream_layout(set(captured), view.n_blocks)
            for il, (inp, mid, out) in enumerate(layout):
                per_sublayer[2 * il].append(cosine_rows(captured[inp], captured[mid]))
                per_sublayer[2 * il + 1].append(cosine_rows(captured[mid], captured[out]))
            if progress:
                progress(k + 1, len(chunks))
    cosines = np.stack([np.concatenate(parts) for parts in per_sublayer])
    names = {"input": layout[0][0], "after_attention": re.sub(r"-\d+$", "-N", layout[0][1]),
             "block_output": re.sub(r"-\d+$", "-N", layout[0][2])}
    return LayerProfile(score_cosines(cosines, gamma=gamma),
                        tuple(s.name for s in view.sublayers), text_name,
                        (0, int(sum(len(c) for c in chunks))), chunk, names)


def read_calibration(path: str | Path | None) -> tuple[str, str]:
    """The calibration text and its name: a user's file, or the shipped Tiny Shakespeare."""
    if path is None:
        return calibration_text(), "tinyshakespeare (shipped)"
    p = Path(path)
    if not p.is_file():
        raise InputError(f"calibration file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"calibration file is empty: {p}")
    return text, str(p)

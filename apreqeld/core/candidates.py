"""Candidate distributions of L sublayers over M quantization types and their estimated metrics.

A distribution (paper §3.2.1) is a vector ``z`` of M non-negative counts summing to L; column i
counts the sublayers given type i, types ordered from least to most aggressive.

Enumeration order: :func:`iter_distributions` yields every distribution exactly once in
*lexicographically descending* order, from ``(L, 0, ..., 0)`` (all sublayers at the least
aggressive type) to ``(0, ..., 0, L)``. So a row that comes earlier always prefers less
aggressive types; ``rank_distributions`` relies on this for its tie-break.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from math import comb

import numpy as np

from apreqeld.errors import InputError

DEFAULT_CHUNK_SIZE = 262_144


def count_distributions(n_sublayers: int, n_types: int) -> int:
    """Number of ways to split L sublayers over M types, C(L+M-1, M-1), to size the search."""
    _check_sizes(n_sublayers, n_types)
    return comb(n_sublayers + n_types - 1, n_types - 1)


def iter_distributions(
    n_sublayers: int, n_types: int, /, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[np.ndarray]:
    """Yield all distributions in lexicographically descending order, chunk by chunk.

    Each chunk is an integer array of shape (k, M) (int16, or int32 when L > 32767; it may be
    a column-major view) with k == chunk_size except for the last one, so memory stays bounded
    however large K is.
    """
    _check_sizes(n_sublayers, n_types)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk size must be a positive integer, got {chunk_size!r}")
    dtype = np.int16 if n_sublayers <= np.iinfo(np.int16).max else np.int32
    pieces = _pieces(int(n_sublayers), int(n_types), chunk_size, dtype)
    yield from _rechunk(pieces, chunk_size)


def proportional_metrics(distributions: np.ndarray, costs: np.ndarray, /) -> np.ndarray:
    """Estimate metrics of distributions as X = Z C / L (paper §3.2.1, x_kj = sum_i z_ki/L c_ij).

    L is taken as the sum of the first row; C is the (M, J) matrix of uniform-type metrics.
    """
    z = _as_distributions(distributions)
    c = np.asarray(costs, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != z.shape[1]:
        raise InputError(
            f"cost matrix must have shape (M, J) with M={z.shape[1]} types, got {c.shape}"
        )
    if z.shape[0] == 0:
        return np.zeros((0, c.shape[1]))
    n_sublayers = int(z[0].sum())
    if n_sublayers <= 0:
        raise InputError("distributions must count at least one sublayer")
    return (z.astype(np.float64) @ c) / n_sublayers


def exact_memory(
    distributions: np.ndarray, bytes_by_rank: np.ndarray, /, *, outside_bytes: float = 0
) -> np.ndarray:
    """Exact bytes of each distribution when Algorithm 1 allocates types by sublayer rank.

    Row r of ``bytes_by_rank`` (shape (L, M)) is the sublayer of rank r (0 = most important),
    column i its size at type i. The first z_0 ranks get type 0, the next z_1 type 1, and so on,
    so the size is ``outside_bytes + sum_i P[c_i, i] - P[c_i - z_i, i]`` where P is the
    column-wise cumulative sum with a leading zero row and c the cumulative counts.
    """
    z = _as_distributions(distributions)
    sizes = np.asarray(bytes_by_rank, dtype=np.float64)
    n_types = z.shape[1]
    if sizes.ndim != 2 or sizes.shape[1] != n_types:
        raise InputError(
            f"bytes_by_rank must have shape (L, M) with M={n_types} types, got {sizes.shape}"
        )
    n_sublayers = sizes.shape[0]
    prefix = np.zeros((n_types, n_sublayers + 1))  # prefix[i, r]: bytes of ranks < r at type i
    np.cumsum(sizes.T, axis=1, out=prefix[:, 1:])
    counts = np.array(z.T, dtype=np.int64, order="C")  # one contiguous row per type
    total = np.full(z.shape[0], float(outside_bytes))
    upto = np.zeros(z.shape[0], dtype=np.int64)
    for column in range(n_types):
        before = upto
        upto = before + counts[column]
        if np.any(upto > n_sublayers):
            raise InputError(f"every distribution must sum to L={n_sublayers} sublayers")
        total += prefix[column].take(upto) - prefix[column].take(before)
    if np.any(upto != n_sublayers):
        raise InputError(f"every distribution must sum to L={n_sublayers} sublayers")
    return total


def _check_sizes(n_sublayers: int, n_types: int) -> None:
    """Reject non-integer or non-positive numbers of sublayers and types."""
    for label, value in (("number of sublayers", n_sublayers), ("number of types", n_types)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise InputError(f"{label} must be a positive integer, got {value!r}")


def _as_distributions(distributions: np.ndarray) -> np.ndarray:
    """View input as a 2-D integer array of non-negative counts."""
    z = np.asarray(distributions)
    if z.ndim != 2 or not np.issubdtype(z.dtype, np.integer):
        raise InputError(f"distributions must be a 2-D integer array, got {z.dtype} {z.shape}")
    if z.size and z.min() < 0:
        raise InputError("distributions must not contain negative counts")
    return z


def _bounded_tuples(total: int, width: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """All width-tuples of non-negative ints with sum <= total, lexicographically descending.

    Built column by column from the right: a new leading value v is joined to every shorter
    tuple whose sum is at most total - v. Returns the table and its row sums.
    """
    table = np.zeros((1, 0), dtype=dtype)
    sums = np.zeros(1, dtype=np.int64)
    for _ in range(width):
        blocks, block_sums = [], []
        for lead in range(total, -1, -1):
            keep = sums <= total - lead
            block = np.empty((int(keep.sum()), table.shape[1] + 1), dtype=dtype)
            block[:, 0] = lead
            block[:, 1:] = table[keep]
            blocks.append(block)
            block_sums.append(sums[keep] + lead)
        table = np.concatenate(blocks)
        sums = np.concatenate(block_sums)
    return table, sums


def _all_at_once(n_sublayers: int, n_types: int, dtype: type) -> np.ndarray:
    """Every distribution in one table: the first M-1 counts, then the remainder."""
    head, sums = _bounded_tuples(n_sublayers, n_types - 1, dtype)
    table = np.empty((head.shape[0], n_types), dtype=dtype)
    table[:, :-1] = head
    table[:, -1] = n_sublayers - sums
    return table


def _pieces(n_sublayers: int, n_types: int, chunk_size: int, dtype: type) -> Iterator[np.ndarray]:
    """Yield distributions in order as pieces of about chunk_size rows (at most ~2x).

    Large spaces are split into the first H counts (a "head", itself enumerated recursively as
    the distributions of L over H+1 types whose last count is the remainder) and the last T
    counts (a "tail"), taken from one precomputed table of T-tuples grouped by their sum.
    """
    if n_types <= 2 or comb(n_sublayers + n_types - 1, n_types - 1) <= chunk_size:
        yield _all_at_once(n_sublayers, n_types, dtype)
        return
    tail_width = 2
    while tail_width + 1 < n_types and comb(n_sublayers + tail_width + 1, tail_width + 1) <= (
        chunk_size
    ):
        tail_width += 1
    head_width = n_types - tail_width

    tuples, sums = _bounded_tuples(n_sublayers, tail_width, dtype)
    order = np.argsort(sums, kind="stable")  # grouped by sum, descending order kept inside
    tail_columns = np.ascontiguousarray(tuples[order].T)
    group_len = np.bincount(sums, minlength=n_sublayers + 1)
    group_start = np.cumsum(group_len) - group_len

    for heads in iter_distributions(n_sublayers, head_width + 1, chunk_size=chunk_size):
        head_columns = np.ascontiguousarray(heads.T)
        remainder = head_columns[head_width].astype(np.int64)
        lens = group_len[remainder]
        starts = group_start[remainder]
        batch = (np.cumsum(lens) - lens) // chunk_size
        cuts = np.flatnonzero(np.diff(batch)) + 1
        for rows in np.split(np.arange(heads.shape[0]), cuts):
            piece_lens = lens[rows]
            n_rows = int(piece_lens.sum())
            # Filled column by column (contiguous writes), handed out as its (k, M) transpose.
            piece = np.empty((n_types, n_rows), dtype=dtype)
            for column in range(head_width):
                piece[column] = np.repeat(head_columns[column, rows], piece_lens)
            offsets = np.cumsum(piece_lens) - piece_lens - starts[rows]
            rows_in_tails = np.arange(n_rows) - np.repeat(offsets, piece_lens)
            for column in range(tail_width):
                np.take(tail_columns[column], rows_in_tails, out=piece[head_width + column])
            yield piece.T


def _rechunk(pieces: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup row blocks into chunks of exactly `size` rows (the last may be shorter)."""
    held: list[np.ndarray] = []
    n_held = 0
    for piece in pieces:
        while piece.shape[0]:
            take = min(size - n_held, piece.shape[0])
            held.append(piece[:take])
            n_held += take
            piece = piece[take:]
            if n_held == size:
                yield held[0] if len(held) == 1 else np.concatenate(held)
                held, n_held = [], 0
    if n_held:
        yield held[0] if len(held) == 1 else np.concatenate(held)

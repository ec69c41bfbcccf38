"""Twin of ``src/routing.hpp``: kernels over a whole routing, ids int [T, ..., top_k]."""

from __future__ import annotations

import numpy as np

from moeray.native._reference._checks import (
    check_array,
    check_ids,
    check_num_experts,
    check_writeable,
    index,
)

__all__ = ["_stack_histogram", "belady_hits", "schedule"]


def schedule(expert_ids, weights, num_experts: int):
    """Stable grouping by expert: (offsets int64 [E+1], token_indices int32, weights float32)."""
    num_experts = check_num_experts(num_experts)
    ids = check_ids(expert_ids, num_experts)
    if not isinstance(weights, np.ndarray):
        raise TypeError(f"weights: expected a numpy float32 array, got {type(weights).__name__}")
    if weights.dtype != np.float32:
        raise TypeError(f"weights: expected dtype float32, got {weights.dtype}")
    if weights.shape != ids.shape:
        raise ValueError(
            f"weights: expected shape {ids.shape} like expert_ids, got {weights.shape}"
        )
    if not weights.flags.c_contiguous:
        raise ValueError("weights: expected a C-contiguous array")
    if not np.isfinite(weights).all():
        raise ValueError("weights: every weight must be finite (no NaN or inf)")
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    offsets = np.zeros(num_experts + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=num_experts), out=offsets[1:])
    top_k = ids.shape[1]
    token_indices = (order // max(top_k, 1)).astype(np.int32)
    return offsets, token_indices, weights.ravel()[order].astype(np.float32)


def belady_hits(expert_ids, num_experts: int, capacity: int) -> int:
    """Hits of Belady's MIN over one layer's [T, top_k] accesses (see moeray.policy.belady)."""
    num_experts = check_num_experts(num_experts)
    capacity = index(capacity, "capacity")
    if not 1 <= capacity <= num_experts:
        raise ValueError(f"capacity: expected an int in [1, {num_experts}], got {capacity}")
    accesses = check_ids(expert_ids, num_experts).ravel().tolist()
    never = len(accesses)  # "no next access" sorts after every real position
    next_use = [never] * len(accesses)
    last_seen = [never] * num_experts
    for i in range(len(accesses) - 1, -1, -1):
        next_use[i] = last_seen[accesses[i]]
        last_seen[accesses[i]] = i
    hot: dict[int, int] = {}  # expert -> position of its next access
    hits = 0
    for i, e in enumerate(accesses):
        if e in hot:
            hits += 1
        elif len(hot) >= capacity:
            del hot[max(hot, key=lambda h: (hot[h], -h))]
        hot[e] = next_use[i]
    return hits


def _stack_histogram(last, histogram, ids, counter: int, scales) -> None:
    """Adds the LRU stack distances of a chunk of routing to ``histogram``, access by access, each
    weighted by its token's scale, updating ``last`` (the twin of ``stack_histogram``).

    last: int64 [L, E], writeable, the access counter of each expert's last use (-1: never);
    histogram: float64 [L, E], writeable; ids: int64 [T, L, top_k], each in [0, E); counter: the
    access counter of the chunk's first access, >= 0; scales: float64 [T]. The stack distance of
    an access is the number of distinct experts of its layer used since that expert's last use;
    an expert never used before is a miss at every capacity and adds nothing here."""
    if not isinstance(last, np.ndarray):
        raise TypeError(f"last: expected a numpy int64 array, got {type(last).__name__}")
    if last.ndim != 2:
        raise ValueError(f"last: expected shape [layers, experts], got {list(last.shape)}")
    L, E = last.shape
    if L < 1 or E < 1:
        raise ValueError(
            f"last: expected shape [layers, experts], each >= 1, got {list(last.shape)}"
        )
    check_writeable(last, "last", "int64", (L, E))
    check_writeable(histogram, "histogram", "float64", (L, E))
    want = (0, L, 1)  # ids [tokens, L, top_k]: tokens and top_k (>= 1) are the array's own
    if isinstance(ids, np.ndarray) and ids.ndim == 3:
        want = (ids.shape[0], L, max(ids.shape[2], 1))
    check_array(ids, "ids", "int64", want, "")
    T, k = want[0], want[2]
    check_array(scales, "scales", "float64", (T,), "")
    if ids.size and (ids.min() < 0 or ids.max() >= E):
        bad = ids[(ids < 0) | (ids >= E)].flat[0]
        raise ValueError(f"ids: every id must be in [0, {E}), got {bad}")
    counter = index(counter, "counter")
    if counter < 0 or counter > 2**63 - 1 - T * k:
        raise ValueError(f"counter: expected an int in [0, 2**63 - tokens * top_k), got {counter}")
    rows = np.arange(L)
    for token, scale in zip(ids, scales.tolist()):
        for j in range(token.shape[1]):
            e = token[:, j]
            seen = last[rows, e]
            old = seen >= 0
            distance = (last > seen[:, None]).sum(axis=1)
            histogram[rows[old], distance[old]] += scale  # one entry per layer
            last[rows, e] = counter
            counter += 1

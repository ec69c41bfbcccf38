"""Synthetic engine hints, made from the routing itself (for studies of the predictive policy).

For each token and layer, each of the top_k hinted ids is the expert the token really used in
that routing slot with probability ``accuracy``, otherwise an expert the token did not use
there. A hint names only the hinted layer's own routing of that token, which is what an engine
that computed the gate ahead would know; nothing else is taken from the future.
"""

from __future__ import annotations

import numpy as np

__all__ = ["synthetic_hints"]


def synthetic_hints(
    expert_ids: np.ndarray,
    num_experts: int,
    accuracy: float,
    rng: np.random.Generator,
    chunk_tokens: int = 1024,
) -> np.ndarray:
    """Engine hints made from the routing itself: expert_ids integer [T, L, top_k] in
    [0, num_experts); returns int32 [T, L, top_k] where each slot is the used expert with
    probability ``accuracy`` and otherwise one of the experts the token did not use at that
    layer (distinct within a token's layer; -1 when fewer than top_k unused experts exist)."""
    expert_ids = np.asarray(expert_ids)
    if expert_ids.ndim != 3:
        raise ValueError(
            f"expert_ids: expected [tokens, layers, top_k], got shape {expert_ids.shape}"
        )
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy: expected a float in [0, 1], got {accuracy}")
    T, L, k = expert_ids.shape
    out = np.empty((T, L, k), dtype=np.int32)
    spare = min(k, num_experts - 1)  # unused experts there are at least num_experts - k of
    for first in range(0, T, chunk_tokens):
        ids = expert_ids[first : first + chunk_tokens].astype(np.intp)
        n = ids.shape[0]
        keys = rng.random((n, L, num_experts), dtype=np.float32)
        np.put_along_axis(keys, ids, 2.0, axis=2)  # used experts sort last
        wrong = np.full((n, L, k), -1, dtype=np.intp)
        wrong[..., :spare] = np.argsort(keys, axis=2, kind="stable")[..., :spare]
        wrong[np.take_along_axis(keys, np.maximum(wrong, 0), axis=2) >= 2.0] = -1
        right = rng.random((n, L, k)) < accuracy
        out[first : first + n] = np.where(right, ids, wrong)
    return out

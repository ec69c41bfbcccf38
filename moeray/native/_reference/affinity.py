"""Twin of ``src/affinity.hpp``: an EMA affinity score and an activation count per expert."""

from __future__ import annotations

import math

import numpy as np

from moeray.native._reference._checks import as_float, check_ids, check_num_experts, index

__all__ = ["AffinityCore", "affinity_key"]

_NEG_INF = -math.inf
# The lazy form's bounds (src/affinity.hpp): its scale stays in [2^-64, 1], so boost / scale and
# max_score / scale stay finite for |boost|, max_score <= 2^512.
_MIN_DECAY = 2.0**-16
_BIG = 2.0**512
_MIN_SCALE = 2.0**-64


def lazy_applies(decay: float, boost: float, max_score: float) -> bool:
    """Whether the lazy decay (O(top_k) a token) holds for these parameters, as in the core."""
    return (
        _MIN_DECAY <= decay <= 1.0
        and abs(boost) <= _BIG
        and max_score >= 0.0
        and (max_score <= _BIG or max_score == math.inf)
    )


def affinity_key(score: float) -> float:
    # The seed ranks non-finite scores below every finite one.
    return score if math.isfinite(score) else _NEG_INF


class AffinityCore:
    """EMA affinity per expert: ``update`` decays every score, then boosts the activated ones.

    In the lazy form (``lazy_applies``) ``_scores`` holds the scaled values v and a score reads
    ``min(v * _scale, max_score)``; the same operations in the same order as ``src/affinity.hpp``.
    """

    def __init__(self, num_experts: int, decay: float, activation_boost: float, max_score: float):
        self._n = check_num_experts(num_experts)
        self._decay = as_float(decay, "decay")
        self._boost = as_float(activation_boost, "activation_boost")
        self._max = as_float(max_score, "max_score")
        self._lazy = lazy_applies(self._decay, self._boost, self._max)
        self._scale = 1.0
        self._scores = [0.0] * self._n
        self._counts = [0] * self._n

    def num_experts(self) -> int:
        return self._n

    def update(self, activated) -> None:
        ids = [index(e, "activated") for e in activated]
        if any(e < 0 for e in ids):
            raise ValueError(f"activated: expert ids must be >= 0, got {min(ids)}")
        self._update_row(ids)

    def _read(self, e: int) -> float:
        if self._lazy:
            return min(self._scores[e] * self._scale, self._max)
        return self._scores[e]

    def _update_row(self, ids) -> None:
        if self._lazy:
            self._lazy_row(ids)
            return
        decay, scores = self._decay, self._scores
        for e in range(self._n):
            scores[e] = scores[e] * decay
        for e in ids:
            if e < self._n:  # the seed ignores ids it does not track
                scores[e] = min(scores[e] + self._boost, self._max)
                self._counts[e] += 1

    def _lazy_row(self, ids) -> None:
        scale = self._scale * self._decay
        if scale < _MIN_SCALE:  # fold the scale into the stored values
            self._scores = [self._read(e) for e in range(self._n)]
            scale = self._decay
        self._scale = scale
        inverse = 1.0 / scale
        boost, max_score, scores = self._boost * inverse, self._max * inverse, self._scores
        for e in ids:
            if e < self._n:
                scores[e] = min(scores[e] + boost, max_score)
                self._counts[e] += 1

    def update_batch(self, expert_ids) -> None:
        ids = check_ids(expert_ids, self._n)
        for row in ids.tolist():
            self._update_row(row)

    def score(self, expert_id: int) -> float:
        e = index(expert_id, "expert_id")
        return self._read(e) if 0 <= e < self._n else 0.0

    def scores(self) -> np.ndarray:
        return np.array([self._read(e) for e in range(self._n)], dtype=np.float64)

    def activation_count(self, expert_id: int) -> int:
        e = index(expert_id, "expert_id")
        return self._counts[e] if 0 <= e < self._n else 0

    def activation_counts(self) -> np.ndarray:
        return np.array(self._counts, dtype=np.int64)

    def top_k_by_affinity(self, k: int) -> list[int]:
        k = index(k, "k")
        if k < 0:
            raise ValueError(f"k: expected k >= 0, got {k}")
        order = sorted(range(self._n), key=lambda e: (-affinity_key(self._read(e)), e))
        return order[:k]

    def top_k_by_frequency(self, k: int) -> list[int]:
        k = index(k, "k")
        if k < 0:
            raise ValueError(f"k: expected k >= 0, got {k}")
        return sorted(range(self._n), key=lambda e: (-self._counts[e], e))[:k]

    def least_affinity(self, candidates) -> int | None:
        ids = [index(e, "candidates") for e in candidates]
        if not ids:
            return None
        return min(ids, key=lambda e: (affinity_key(self.score(e)), e))

    def frequency_percentile(self, expert_id: int) -> float:
        count = self.activation_count(expert_id)
        lower = sum(1 for c in self._counts if c < count)
        equal = sum(1 for c in self._counts if c == count)
        return (lower + 0.5 * equal) / self._n

    def load_state(self, scores, activation_counts) -> None:
        """Restores scores (float64 [n]) and activation counts (int64 [n], >= 0)."""
        for name, value, dtype in (
            ("scores", scores, np.float64),
            ("activation_counts", activation_counts, np.int64),
        ):
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{name}: expected a numpy array")
            if value.dtype != dtype:
                raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {value.dtype}")
            if value.shape != (self._n,) or not value.flags.c_contiguous:
                raise ValueError(f"{name}: expected a C-contiguous array of {self._n} values")
        if (activation_counts < 0).any():
            raise ValueError("activation_counts: counts must be >= 0")
        self._scores = scores.tolist()
        self._scale = 1.0
        self._counts = activation_counts.tolist()

    def reset(self) -> None:
        self._scale = 1.0
        self._scores = [0.0] * self._n
        self._counts = [0] * self._n

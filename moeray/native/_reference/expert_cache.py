"""Twin of ``src/expert_cache.hpp``: one layer's hot set under LRU, LFU or ADAPTIVE eviction.

Written to be obviously correct rather than fast: the hot set is an ordered dict in recency
order (oldest first), and every victim choice is a scan over it. Tie rules (shared with the
native core, documented in ``moeray.policy.cache``): LRU evicts the least recently *touched*
hot expert (a hit or an admission is a touch); LFU the hot expert with the lowest access count,
the least recently touched first; affinity blends scan the hot set oldest first and keep the
first highest score.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from moeray.native._reference._checks import as_float, check_ids, check_num_experts, index
from moeray.native._reference.affinity import AffinityCore

__all__ = ["ADAPTIVE", "LFU", "LRU", "ExpertCacheCore"]

LRU, LFU, ADAPTIVE = 0, 1, 2
_NEG_INF = -math.inf


# --- eviction policies: each chooses a victim and scores the hot set for affinity blends ---


class _Lru:
    @staticmethod
    def victim(cache: ExpertCacheCore) -> int:
        return next(iter(cache._hot))

    @staticmethod
    def base_scores(cache: ExpertCacheCore) -> dict[int, float]:
        return _normalised(cache, cache._timestamp)


class _Lfu:
    @staticmethod
    def victim(cache: ExpertCacheCore) -> int:
        return min(cache._hot, key=lambda e: cache._freq[e])  # first minimum = oldest touch

    @staticmethod
    def base_scores(cache: ExpertCacheCore) -> dict[int, float]:
        return _normalised(cache, cache._freq)


class _Adaptive:
    @staticmethod
    def _skewed(cache: ExpertCacheCore) -> bool:
        freqs = [cache._freq[e] for e in cache._hot]
        return min(freqs) > 0 and max(freqs) >= 3 * min(freqs)

    @classmethod
    def victim(cls, cache: ExpertCacheCore) -> int:
        return (_Lfu if cls._skewed(cache) else _Lru).victim(cache)

    @classmethod
    def base_scores(cls, cache: ExpertCacheCore) -> dict[int, float]:
        return (_Lfu if cls._skewed(cache) else _Lru).base_scores(cache)


def _normalised(cache: ExpertCacheCore, value: list[int]) -> dict[int, float]:
    """Eviction score in [0, 1] per hot expert: 1 for the smallest value, 0.5 when all equal."""
    lo = min(value[e] for e in cache._hot)
    span = max(value[e] for e in cache._hot) - lo
    return {e: (1.0 - (value[e] - lo) / span) if span > 0 else 0.5 for e in cache._hot}


_POLICIES = {LRU: _Lru, LFU: _Lfu, ADAPTIVE: _Adaptive}


class ExpertCacheCore:
    """Hot set of at most ``max_hot`` experts of one layer, with the seed's accounting."""

    def __init__(self, num_experts: int, max_hot: int, prefetch_threshold: float, policy: int):
        self._n = check_num_experts(num_experts)
        max_hot = index(max_hot, "max_hot")
        prefetch_threshold = as_float(prefetch_threshold, "prefetch_threshold")
        policy = index(policy, "policy")
        if not 1 <= max_hot <= self._n:
            raise ValueError(f"max_hot_experts: expected an int in [1, {self._n}], got {max_hot}")
        if not math.isfinite(prefetch_threshold):
            raise ValueError(
                f"prefetch_threshold: expected a finite float, got {prefetch_threshold}"
            )
        if policy not in _POLICIES:
            raise ValueError(
                f"eviction_policy: expected 0 (LRU), 1 (LFU) or 2 (ADAPTIVE), got {policy}"
            )
        self._cap = int(max_hot)
        self._threshold = float(prefetch_threshold)
        self._policy = _POLICIES[policy]
        self._freq = [0] * self._n
        self._timestamp = [0] * self._n  # the seed's logical time of the last touch
        self._prefetched = [False] * self._n
        self._hot: OrderedDict[int, None] = OrderedDict()  # recency order, oldest first
        self._counter = 0
        self._hits = self._misses = self._evictions = self._prefetch_hits = 0

    def _check_id(self, expert_id) -> int:
        e = index(expert_id, "expert_id")
        if not 0 <= e < self._n:
            raise ValueError(f"expert_id: expected an id in [0, {self._n}), got {e}")
        return e

    def _check_affinity(self, affinity: AffinityCore) -> AffinityCore:
        if not isinstance(affinity, AffinityCore):
            raise TypeError(f"affinity: expected an ExpertAffinity, got {type(affinity).__name__}")
        if affinity.num_experts() != self._n:
            raise ValueError(
                f"affinity: tracks {affinity.num_experts()} experts, the cache {self._n}"
            )
        return affinity

    # --- the seed's API ---

    def num_experts(self) -> int:
        return self._n

    def access(self, expert_id: int) -> bool:
        e = self._check_id(expert_id)
        self._counter += 1
        self._freq[e] += 1
        if e in self._hot:
            self._timestamp[e] = self._counter
            self._hot.move_to_end(e)
            self._hits += 1
            if self._prefetched[e]:
                self._prefetch_hits += 1
                self._prefetched[e] = False
            return True
        self._misses += 1
        self.admit(e)
        return False

    def should_prefetch(self, expert_id: int, router_weight: float) -> bool:
        e = self._check_id(expert_id)
        router_weight = as_float(router_weight, "router_weight")
        if not math.isfinite(router_weight):
            raise ValueError(f"router_weight: expected a finite float, got {router_weight}")
        return router_weight > self._threshold and e not in self._hot

    def suggest_eviction(self) -> int | None:
        if len(self._hot) < self._cap:
            return None
        return self._policy.victim(self)

    def evict(self, expert_id: int) -> None:
        e = self._check_id(expert_id)
        if e in self._hot:
            del self._hot[e]
            self._evictions += 1
            self._prefetched[e] = False  # an unused prefetch is gone with its expert

    def admit(self, expert_id: int) -> None:
        e = self._check_id(expert_id)
        if e in self._hot:
            return
        if len(self._hot) >= self._cap:
            self.evict(self.suggest_eviction())
        self._timestamp[e] = self._counter
        self._hot[e] = None

    def prefetch_admit(self, expert_id: int) -> None:
        e = self._check_id(expert_id)
        if e in self._hot:
            return  # nothing was fetched, so a later hit is not a prefetch hit
        self._prefetched[e] = True
        self.admit(e)

    def is_hot(self, expert_id: int) -> bool:
        return self._check_id(expert_id) in self._hot

    def stats(self) -> tuple[int, int, int, int]:
        return (self._hits, self._misses, self._evictions, self._prefetch_hits)

    def reset_stats(self) -> None:
        self._hits = self._misses = self._evictions = self._prefetch_hits = 0

    def hot_count(self) -> int:
        return len(self._hot)

    def max_hot(self) -> int:
        return self._cap

    def hot_experts(self) -> list[int]:
        return list(self._hot)

    def suggest_eviction_with_affinity(self, affinity: AffinityCore, affinity_weight: float):
        self._check_affinity(affinity)
        affinity_weight = as_float(affinity_weight, "affinity_weight")
        if not math.isfinite(affinity_weight):
            raise ValueError(f"affinity_weight: expected a finite float, got {affinity_weight}")
        if len(self._hot) < self._cap:
            return None
        weight = min(max(float(affinity_weight), 0.0), 1.0)
        if weight < 1e-6:
            return self.suggest_eviction()
        base = self._policy.base_scores(self)
        best, best_score = None, _NEG_INF
        for e in self._hot:
            combined = (1.0 - weight) * base[e] + weight * (1.0 - affinity.score(e))
            if combined > best_score:
                best, best_score = e, combined
        # Non-finite affinities make every blend NaN: fall back to the base policy.
        return best if best is not None else self.suggest_eviction()

    def prefetch_by_affinity(self, affinity: AffinityCore, budget: int) -> list[int]:
        self._check_affinity(affinity)
        budget = index(budget, "budget")
        if budget < 0:
            raise ValueError(f"budget: expected budget >= 0, got {budget}")
        prefetched: list[int] = []
        if budget == 0:
            return prefetched
        for e in affinity.top_k_by_affinity(self._n):
            if len(prefetched) >= budget:
                break
            if e in self._hot:
                continue
            if len(self._hot) >= self._cap:
                self.evict(self.suggest_eviction_with_affinity(affinity, 0.5))
            self.prefetch_admit(e)
            prefetched.append(e)
        return prefetched

    # --- moeray's batch path ---

    def access_batch(self, expert_ids, affinity=None, affinity_weight: float = 0.0) -> np.ndarray:
        ids = check_ids(expert_ids, self._n)
        if affinity is not None:
            self._check_affinity(affinity)
            affinity_weight = as_float(affinity_weight, "affinity_weight")
            if not math.isfinite(affinity_weight):
                raise ValueError(f"affinity_weight: expected a finite float, got {affinity_weight}")
        hits = np.zeros(ids.shape, dtype=bool)
        for t, row in enumerate(ids.tolist()):
            for j, e in enumerate(row):
                if affinity is not None and e not in self._hot and len(self._hot) >= self._cap:
                    self.evict(self.suggest_eviction_with_affinity(affinity, affinity_weight))
                hits[t, j] = self.access(e)
            if affinity is not None:
                affinity._update_row(row)
        return hits

"""Expert hot-set cache of one MoE layer: the seed's ``ExpertCache``, with a batch fast path.

Semantics kept from ruvllm's ``expert_cache.rs``: ``access(e)`` returns True on a hit (refreshing
recency, counting frequency, counting a prefetch hit once) and admits on a miss, evicting by
policy when the hot set is full. Policies: LRU; LFU; ADAPTIVE (LFU while the hot set's access
counts are skewed, max >= 3 x min > 0, else LRU).

Where the seed leaves an outcome to the order of its internal vector, moeray fixes it:
- LRU evicts the least recently *touched* hot expert (a touch is a hit or an admission);
- LFU evicts the lowest access count, the least recently touched first among equals;
- affinity blends scan the hot set oldest touch first and keep the first highest score;
- ``hot_experts()`` lists the hot set oldest touch first.
Two seed quirks are fixed: a prefetched expert evicted before use loses its prefetch mark (the
seed would credit a much later hit to the prefetch), and ``prefetch_admit`` of an expert that
is already hot marks nothing (no bytes moved). Ids outside [0, num_experts) raise ValueError
(the seed admitted them into the hot set).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from moeray.native import backend
from moeray.policy._validate import as_expert_ids, check_float, check_int
from moeray.policy.affinity import ExpertAffinity

__all__ = ["EvictionPolicy", "ExpertCacheConfig", "ExpertCacheStats", "ExpertCache"]


class EvictionPolicy(enum.IntEnum):
    """Which hot expert leaves when a new one must come in."""

    LRU = backend.LRU
    LFU = backend.LFU
    ADAPTIVE = backend.ADAPTIVE


@dataclass(frozen=True)
class ExpertCacheConfig:
    """max_hot_experts: capacity of the hot set, >= 1 (and <= num_experts of the cache).
    prefetch_threshold: router weight above which a cold expert is worth prefetching.
    eviction_policy: LRU, LFU or ADAPTIVE."""

    max_hot_experts: int = 4
    prefetch_threshold: float = 0.1
    eviction_policy: EvictionPolicy = EvictionPolicy.LRU

    def __post_init__(self):
        check_int(self.max_hot_experts, "max_hot_experts", 1)
        if not np.isfinite(check_float(self.prefetch_threshold, "prefetch_threshold")):
            raise ValueError(
                f"prefetch_threshold: expected a finite float, got {self.prefetch_threshold!r}"
            )
        try:
            object.__setattr__(self, "eviction_policy", EvictionPolicy(self.eviction_policy))
        except ValueError:
            raise ValueError(
                f"eviction_policy: expected one of {[p.name for p in EvictionPolicy]}, "
                f"got {self.eviction_policy!r}"
            ) from None


@dataclass(frozen=True)
class ExpertCacheStats:
    """Counters since creation or the last ``reset_stats``."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_hits: int = 0

    def hit_rate(self) -> float:
        """hits / (hits + misses), 0.0 before any access."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ExpertCache(backend.ExpertCacheCore):
    """Hot set of one layer's experts; ids are ints in [0, num_experts).

    Scalar methods (``access``, ``admit``, ``evict``, ``prefetch_admit``, ``is_hot``,
    ``should_prefetch``, ``suggest_eviction``, ``suggest_eviction_with_affinity``,
    ``prefetch_by_affinity``, ``hot_count``, ``max_hot``, ``hot_experts``, ``reset_stats``) are
    the core's own. Every method that takes an ``ExpertAffinity`` needs one over the same
    ``num_experts``.
    """

    def __init__(self, num_experts: int, config: ExpertCacheConfig = ExpertCacheConfig()):
        if not isinstance(config, ExpertCacheConfig):
            raise TypeError(f"config: expected an ExpertCacheConfig, got {type(config).__name__}")
        num_experts = check_int(num_experts, "num_experts", 1)
        if config.max_hot_experts > num_experts:
            raise ValueError(
                f"max_hot_experts: expected an int in [1, {num_experts}] (num_experts), "
                f"got {config.max_hot_experts}"
            )
        super().__init__(
            num_experts,
            config.max_hot_experts,
            float(config.prefetch_threshold),
            int(config.eviction_policy),
        )
        self._config = config

    def config(self) -> ExpertCacheConfig:
        return self._config

    def stats(self) -> ExpertCacheStats:
        return ExpertCacheStats(*super().stats())

    def access_batch(
        self,
        expert_ids,
        affinity: ExpertAffinity | None = None,
        affinity_weight: float = 0.0,
    ) -> np.ndarray:
        """Accesses every id of ``expert_ids`` in row-major order; returns bool [T, top_k] hits.

        expert_ids: integer [T, top_k] (int32 avoids a copy), each in [0, num_experts).
        Without ``affinity``: exactly the decisions of ``access`` called on each id in turn.
        With ``affinity``: a miss on a full hot set evicts
        ``suggest_eviction_with_affinity(affinity, affinity_weight)``, and after each row the
        affinity is updated with that row (the affinity-blended policy of ``moeray replay``).
        Invalid input raises before any state changes.
        """
        ids = as_expert_ids(expert_ids, self.num_experts())
        weight = check_float(affinity_weight, "affinity_weight")
        return super().access_batch(ids, affinity, weight)

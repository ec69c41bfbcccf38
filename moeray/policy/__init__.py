"""Pure policy: expert cache, affinity, batch scheduling, the Belady optimum, memory helpers,
and the predictive ``moeray`` policy (cross-layer and previous-token prediction, prefetch).

Imports only the standard library, numpy and ``moeray.native``; never Ray. Same inputs give the
same decisions: nothing here reads a clock or global random state.
"""

from moeray.policy.affinity import AffinityConfig, ExpertAffinity
from moeray.policy.belady import belady_hits
from moeray.policy.cache import EvictionPolicy, ExpertCache, ExpertCacheConfig, ExpertCacheStats
from moeray.policy.memory import (
    NullPrefetcher,
    Prefetcher,
    align_to_cache_line,
    expert_memory_footprint,
)
from moeray.policy.predict import PredictConfig, PredictiveCaches, PredictStats
from moeray.policy.scheduler import ExpertBatch, ExpertBatches, MoeBatchScheduler, schedule

__all__ = [
    "AffinityConfig",
    "EvictionPolicy",
    "ExpertAffinity",
    "ExpertBatch",
    "ExpertBatches",
    "ExpertCache",
    "ExpertCacheConfig",
    "ExpertCacheStats",
    "MoeBatchScheduler",
    "NullPrefetcher",
    "PredictConfig",
    "PredictStats",
    "PredictiveCaches",
    "Prefetcher",
    "align_to_cache_line",
    "belady_hits",
    "expert_memory_footprint",
    "schedule",
]

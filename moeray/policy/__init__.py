"""Pure policy: expert cache, affinity, batch scheduling, the Belady optimum, memory helpers,
the predictive ``moeray`` policy (cross-layer and previous-token prediction, engine hints,
prefetch), and one total capacity re-split across layers by marginal benefit.

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
from moeray.policy.split import CapacitySplit, SplitConfig, SplitPlan

__all__ = [
    "AffinityConfig",
    "CapacitySplit",
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
    "SplitConfig",
    "SplitPlan",
    "align_to_cache_line",
    "belady_hits",
    "expert_memory_footprint",
    "schedule",
]

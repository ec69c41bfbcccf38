"""Pure policy: the seed's expert cache, affinity and batch scheduler, Belady's optimum, memory
helpers, the predictive ``moeray`` policy (``predict``), one capacity re-split across layers
(``split``), the per-window interface every online policy implements (``windows``) and the
registry of policies by name and kind (``registry``).

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
from moeray.policy.registry import POLICIES, PolicyEntry, PolicySettings, policy_entry
from moeray.policy.scheduler import ExpertBatch, ExpertBatches, MoeBatchScheduler, schedule
from moeray.policy.split import CapacitySplit, SplitConfig, SplitPlan
from moeray.policy.windows import DemandCaches, PolicyWindow, PredictiveWindows, WindowPolicy

__all__ = [
    "POLICIES",
    "AffinityConfig",
    "DemandCaches",
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
    "PolicyEntry",
    "PolicySettings",
    "PolicyWindow",
    "PredictConfig",
    "PredictStats",
    "PredictiveCaches",
    "PredictiveWindows",
    "Prefetcher",
    "SplitConfig",
    "SplitPlan",
    "WindowPolicy",
    "align_to_cache_line",
    "belady_hits",
    "expert_memory_footprint",
    "policy_entry",
    "schedule",
]

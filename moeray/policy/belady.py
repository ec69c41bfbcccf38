"""The offline optimum of demand caching (Belady's MIN), the bound every policy is measured against.

Per layer, with perfect knowledge of the future, over the accesses in row-major order (a token's
experts in their routing order, tokens in time order): every miss admits; on a miss with a full
hot set, evict the hot expert whose next access is farthest in the future (experts never
accessed again first, lowest id among them). The hot set starts empty and persists across
sequences. Hit rate = hits / (T * top_k).

This is exactly the model ``ExpertCache.access`` follows, so MIN's optimality makes it an upper
bound on every policy replayed on the same stream. (A variant that never evicts an expert of
the token being served is not: an online cache may evict an expert its token has already used,
and on ``[[0,1],[0,1],[0,1],[2,3],[0,1]]`` with capacity 2, LFU gets 5 hits to that variant's 4.)
"""

from __future__ import annotations

from moeray.native import backend
from moeray.policy._validate import as_expert_ids, check_int

__all__ = ["belady_hits"]


def belady_hits(expert_ids, num_experts: int, capacity: int) -> int:
    """Hits of the offline optimum over expert_ids: integer [T, top_k], each in [0, num_experts).

    capacity: hot-set size in experts, in [1, num_experts].
    """
    num_experts = check_int(num_experts, "num_experts", 1, 2**31 - 1)
    capacity = check_int(capacity, "capacity", 1, num_experts)
    return int(backend.belady_hits(as_expert_ids(expert_ids, num_experts), num_experts, capacity))

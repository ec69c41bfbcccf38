"""The offline optimum of demand caching (Belady's MIN), the bound every policy is measured against.

Per layer, with perfect knowledge of the future: the accesses of one token are served together;
a miss when the hot set is full evicts the hot expert, not among the current token's experts,
whose next use is farthest in the future (ties: lowest id); if every hot expert serves the
current token the miss bypasses the hot set. The hot set starts empty and persists across
sequences. Hit rate = hits / (T * top_k).
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

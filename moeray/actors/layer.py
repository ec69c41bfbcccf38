"""Body of a layer actor: the expert caches of one or more MoE layers hosted by one process.

A plain class (no Ray here): ``moeray.actors._ray`` wraps it with ``ray.remote`` where it is
created, and tests drive it directly. The coordinator sends it ``LayerWindow``s, the routing of
one layer coalesced over a window and numbered per layer (1, 2, 3, ...); it applies each exactly
once, in order, and answers with a ``LayerAck`` carrying that window's statistics.

With ``shards`` (a checkpoint directory on the actor's node) each hosted layer also keeps the
bytes of its shard resident for its hot set (``moeray.shards.residency``): after each window the
experts that left the hot set are released and the ones that entered it (on demand, or predicted
by affinity) are prefetched by the native prefetcher. Trace layer i is the checkpoint's i-th MoE
layer (DeepSeek-V2-Lite's first MoE layer is its layer 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeray.policy.affinity import AffinityConfig, ExpertAffinity
from moeray.policy.cache import EvictionPolicy, ExpertCache, ExpertCacheConfig

__all__ = ["POLICIES", "LayerWindow", "LayerAck", "LayerState", "WindowGapError", "LayerCaches"]

# policy name -> (base eviction policy, whether misses evict by the affinity blend)
POLICIES = {
    "lru": (EvictionPolicy.LRU, False),
    "lfu": (EvictionPolicy.LFU, False),
    "adaptive": (EvictionPolicy.ADAPTIVE, False),
    "affinity-lru": (EvictionPolicy.LRU, True),
}


@dataclass(frozen=True)
class LayerWindow:
    """expert_ids: int32 [T, top_k], the layer's routing over one window, tokens in order.
    seq: this layer's window number, from 1. prefetch_budget: experts to prefetch by affinity
    after the window is applied (0: none)."""

    layer: int
    seq: int
    expert_ids: np.ndarray
    prefetch_budget: int = 0


@dataclass(frozen=True)
class LayerAck:
    """What applying one window did: counters of that window alone, and the layer's affinity
    after it (float64 / int64 [E]: a few hundred bytes, cheaper to send than for the
    coordinator to replay the window's routing into its own copy)."""

    layer: int
    seq: int
    hits: int
    misses: int
    evictions: int
    prefetch_hits: int
    prefetches: int
    affinity_scores: np.ndarray
    activation_counts: np.ndarray
    # with shards: this window's bytes populated, experts used late / stalled, and the largest
    # resident-bytes reading (mincore) taken while it was applied
    bytes_moved: int = 0
    late_prefetches: int = 0
    stalls: int = 0
    resident_bytes_max: int = 0


@dataclass(frozen=True)
class LayerState:
    """The coordinator's copy of a layer: enough to restart its actor.

    seq: last window applied; affinity_scores float64 [E] and activation_counts int64 [E] after it.
    The hot set is not part of it: a restarted actor's memory is empty, as a real process's is."""

    layer: int
    seq: int
    affinity_scores: np.ndarray
    activation_counts: np.ndarray


class WindowGapError(RuntimeError):
    """A window arrived out of order: the actor needs a restore and the missing windows."""

    def __init__(self, layer: int, expected: int, got: int):
        super().__init__(f"layer {layer}: expected window {expected}, got {got}")
        self.layer, self.expected, self.got = layer, expected, got


class LayerCaches:
    """Caches of ``layers`` (each num_experts wide, ``capacity[layer]`` hot) under one policy."""

    def __init__(
        self,
        layers: list[int],
        num_experts: int,
        capacity: dict[int, int],
        policy: str = "lru",
        affinity_config: AffinityConfig | None = None,
        affinity_weight: float = 0.8,
        shards: str | None = None,
        settle: bool = False,
    ):
        """shards: checkpoint directory whose bytes follow the hot sets (None: decisions only).
        settle: model the consumer of a replay: read the experts a window stalled on and wait
        for its prefetches before reading resident bytes (exact peaks); otherwise (the service,
        whose consumer is the engine) the reading is taken when the next window arrives,
        without waiting."""
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {sorted(POLICIES)}, got {policy!r}")
        base, self._blended = POLICIES[policy]
        self._weight = affinity_weight
        affinity_config = affinity_config or AffinityConfig.with_num_experts(num_experts)
        self._caches = {
            layer: ExpertCache(num_experts, ExpertCacheConfig(capacity[layer], eviction_policy=base))
            for layer in layers
        }
        self._affinity = {layer: ExpertAffinity(affinity_config) for layer in layers}
        self._applied = {layer: 0 for layer in layers}
        self._residency = _open_residency(shards, layers, num_experts, capacity) if shards else {}
        self._settle = settle

    def layers(self) -> list[int]:
        return list(self._caches)

    def applied(self) -> dict[int, int]:
        """layer -> seq of the last window applied."""
        return dict(self._applied)

    def restore(self, states: list[LayerState]) -> None:
        """Takes the coordinator's copy after a restart: affinity and the last applied window."""
        for state in states:
            self._affinity[state.layer].load_state(state.affinity_scores, state.activation_counts)
            self._applied[state.layer] = state.seq

    def apply(self, windows: list[LayerWindow]) -> list[LayerAck]:
        """Applies windows in order; a window already applied is skipped (a resend after a
        failure), one that skips ahead raises WindowGapError before anything changes."""
        acks = []
        for window in windows:
            last = self._applied[window.layer]
            if window.seq <= last:
                continue
            if window.seq != last + 1:
                raise WindowGapError(window.layer, last + 1, window.seq)
            acks.append(self._apply_one(window))
        return acks

    def _apply_one(self, window: LayerWindow) -> LayerAck:
        cache, affinity = self._caches[window.layer], self._affinity[window.layer]
        residency = self._residency.get(window.layer)
        if residency is not None:
            shard_before = residency.stats()
            if not self._settle:
                residency.measure()  # the previous window's prefetches had this window's gap
            stalls = residency.use(np.unique(window.expert_ids), wait=self._settle)
        before = cache.stats()
        if self._blended:
            cache.access_batch(window.expert_ids, affinity, self._weight)
        else:
            cache.access_batch(window.expert_ids)
            affinity.update_batch(window.expert_ids)
        prefetched = cache.prefetch_by_affinity(affinity, window.prefetch_budget)
        after = cache.stats()
        self._applied[window.layer] = window.seq
        shard = {}
        if residency is not None:
            hot = cache.hot_experts()
            residency.sync(hot, prefetched)
            if self._settle:  # a replay's consumer reads what it stalled on, even if not kept
                residency.read_cold(stalls - set(hot))
                residency.settle()
                residency.measure()
            now = residency.stats()
            shard = dict(
                bytes_moved=now.bytes_moved - shard_before.bytes_moved,
                late_prefetches=now.late - shard_before.late,
                stalls=now.stalls - shard_before.stalls,
                resident_bytes_max=now.resident_bytes,  # this window's reading
            )
        return LayerAck(
            layer=window.layer,
            seq=window.seq,
            hits=after.hits - before.hits,
            misses=after.misses - before.misses,
            evictions=after.evictions - before.evictions,
            prefetch_hits=after.prefetch_hits - before.prefetch_hits,
            prefetches=len(prefetched),
            affinity_scores=affinity.scores(),
            activation_counts=affinity.activation_counts(),
            **shard,
        )

    def shard_capacity_bytes(self) -> dict[int, int]:
        """layer -> capacity in bytes (hot experts x an expert's bytes); empty without shards."""
        return {layer: r.stats().capacity_bytes for layer, r in self._residency.items()}

    def ping(self) -> bool:
        return True


def _open_residency(path: str, layers: list[int], num_experts: int,
                    capacity: dict[int, int]) -> dict:
    """layer -> ShardResidency over the checkpoint at ``path`` (its i-th MoE layer for layer i)."""
    from moeray.shards import ShardStore
    from moeray.shards.residency import ShardResidency

    store = ShardStore(path)
    moe_layers = store.layers
    if max(layers) >= len(moe_layers):
        raise ValueError(f"shards: {path} has {len(moe_layers)} MoE layers, the service "
                         f"{max(layers) + 1} or more")
    out = {}
    for layer in layers:
        stored = moe_layers[layer]
        if store.num_experts(stored) != num_experts:
            raise ValueError(f"shards: {path} layer {stored} has {store.num_experts(stored)} "
                             f"experts, the service {num_experts}")
        out[layer] = ShardResidency(store, stored, capacity[layer])
    return out

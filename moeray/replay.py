"""Replays a routing trace through each cache policy, per layer, beside the offline optimum.

One cache per layer, empty at the start, persisting across sequences (as ``belady_hits`` does),
so every policy sees exactly the stream the optimum sees. Decisions depend only on the trace;
the timer only measures decisions per second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from moeray._progress import Progress
from moeray.native import IS_NATIVE
from moeray.policy.affinity import AffinityConfig, ExpertAffinity
from moeray.policy.belady import belady_hits
from moeray.policy.cache import EvictionPolicy, ExpertCache, ExpertCacheConfig
from moeray.traces import Trace

__all__ = [
    "POLICY_NAMES",
    "ReplayConfig",
    "PolicyResult",
    "ReplayReport",
    "ShardResult",
    "capacity_from_fraction",
    "replay_shards",
    "replay_trace",
]

# Names are part of the --json schema: later work adds names, never renames these.
POLICY_NAMES = ("lru", "lfu", "adaptive", "affinity-lru", "belady")

_BASE_POLICY = {
    "lru": EvictionPolicy.LRU,
    "lfu": EvictionPolicy.LFU,
    "adaptive": EvictionPolicy.ADAPTIVE,
    "affinity-lru": EvictionPolicy.LRU,
}


def capacity_from_fraction(fraction: float, num_experts: int) -> int:
    """Hot-set size in experts for a fraction in (0, 1] of num_experts (rounded, at least 1)."""
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"capacity: expected a fraction in (0, 1], got {fraction!r}")
    return max(1, min(num_experts, int(round(fraction * num_experts))))


@dataclass(frozen=True)
class ReplayConfig:
    """capacity: hot-set size in experts per layer, in [1, num_experts].
    policies: names from POLICY_NAMES. The affinity-lru policy evicts by
    ``suggest_eviction_with_affinity(affinity, affinity_weight)`` over an EMA affinity with
    ``affinity_decay`` and ``affinity_boost``, updated after every token."""

    capacity: int
    policies: tuple[str, ...] = POLICY_NAMES
    # Chosen by a sweep on the developer split of the gpt-oss-20b and DeepSeek-V2-Lite traces
    # (decay 0.8-0.99, boost 0.05-1, weight 0.3-0.8): good on both, not the best on either.
    affinity_weight: float = 0.8
    affinity_decay: float = 0.95
    affinity_boost: float = 0.05

    def __post_init__(self):
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"capacity: expected an int >= 1, got {self.capacity!r}")
        unknown = [p for p in self.policies if p not in POLICY_NAMES]
        if unknown or not self.policies:
            raise ValueError(f"policies: expected names from {POLICY_NAMES}, got {list(self.policies)}")
        if not 0.0 <= self.affinity_weight <= 1.0:
            raise ValueError(f"affinity_weight: expected a float in [0, 1], got {self.affinity_weight}")


@dataclass(frozen=True)
class PolicyResult:
    """Hits per layer of one policy; accesses_per_layer = tokens x top_k."""

    name: str
    per_layer_hits: tuple[int, ...]
    accesses_per_layer: int
    per_layer_seconds: tuple[float, ...]

    @property
    def per_layer_hit_rate(self) -> list[float]:
        n = max(self.accesses_per_layer, 1)
        return [h / n for h in self.per_layer_hits]

    @property
    def hit_rate(self) -> float:
        """Hit rate averaged over layers."""
        rates = self.per_layer_hit_rate
        return float(np.mean(rates)) if rates else 0.0

    @property
    def worst_layer(self) -> int:
        return int(np.argmin(self.per_layer_hit_rate))

    @property
    def decisions_per_s(self) -> float:
        """Median over layers of accesses per second: robust to a noisy neighbour."""
        seconds = float(np.median(self.per_layer_seconds)) if self.per_layer_seconds else 0.0
        return self.accesses_per_layer / seconds if seconds > 0 else float("inf")


@dataclass(frozen=True)
class ShardResult:
    """Per layer, what keeping one policy's hot sets resident in a checkpoint's shards did.

    capacity_bytes: hot experts x one expert's bytes. resident_bytes_max: the largest mincore
    reading of the layer's shard. bytes_moved: bytes populated. late_prefetches: experts used
    while a prefetch ahead of use had not finished. stalls: experts used that nobody had asked
    for (on-demand loads)."""

    capacity_bytes: tuple[int, ...]
    expert_bytes: tuple[int, ...]
    resident_bytes_max: tuple[int, ...]
    bytes_moved: tuple[int, ...]
    late_prefetches: tuple[int, ...]
    stalls: tuple[int, ...]

    def over_bound(self) -> list[int]:
        """Layers whose resident bytes exceeded capacity plus one expert (the memory goal)."""
        return [layer for layer, (resident, cap, one) in enumerate(
            zip(self.resident_bytes_max, self.capacity_bytes, self.expert_bytes))
            if resident > cap + one]

    def to_json(self) -> dict:
        return {key: list(getattr(self, key)) for key in (
            "capacity_bytes", "resident_bytes_max", "bytes_moved", "late_prefetches", "stalls")}


@dataclass(frozen=True)
class ReplayReport:
    trace: str
    num_experts: int
    capacity: int
    results: dict[str, PolicyResult] = field(default_factory=dict)
    native: bool = IS_NATIVE
    shards: dict[str, ShardResult] = field(default_factory=dict)  # with a checkpoint only
    shards_path: str | None = None

    @property
    def capacity_fraction(self) -> float:
        return self.capacity / self.num_experts

    def to_json(self) -> dict:
        """``{"trace", "capacity", "policies": {NAME: {"hit_rate", "per_layer_hit_rate"}}}``
        plus extra keys (capacity_experts, num_experts, backend, decisions_per_s)."""
        return {
            "trace": self.trace,
            "capacity": self.capacity_fraction,
            "capacity_experts": self.capacity,
            "num_experts": self.num_experts,
            "backend": "native" if self.native else "python",
            "policies": {
                name: {
                    "hit_rate": r.hit_rate,
                    "per_layer_hit_rate": r.per_layer_hit_rate,
                    "decisions_per_s": r.decisions_per_s,
                }
                for name, r in self.results.items()
            },
            **({"shards": {"path": self.shards_path,
                           "policies": {n: r.to_json() for n, r in self.shards.items()}}}
               if self.shards else {}),
        }


def _layer_hits(name: str, ids: np.ndarray, trace: Trace, config: ReplayConfig) -> int:
    if name == "belady":
        return belady_hits(ids, trace.num_experts, config.capacity)
    cache = ExpertCache(
        trace.num_experts,
        ExpertCacheConfig(max_hot_experts=config.capacity, eviction_policy=_BASE_POLICY[name]),
    )
    if name == "affinity-lru":
        affinity = ExpertAffinity(
            AffinityConfig.with_num_experts(trace.num_experts)
            .with_decay(config.affinity_decay)
            .with_activation_boost(config.affinity_boost)
        )
        return int(cache.access_batch(ids, affinity, config.affinity_weight).sum())
    return int(cache.access_batch(ids).sum())


def replay_trace(
    trace: Trace,
    config: ReplayConfig,
    timer: Callable[[], float] = time.perf_counter,
    progress: Progress | None = None,
) -> ReplayReport:
    """Hits per layer of every policy in ``config.policies`` over ``trace``."""
    if config.capacity > trace.num_experts:
        raise ValueError(
            f"capacity: expected at most num_experts={trace.num_experts}, got {config.capacity}"
        )
    layers = [trace.layer_ids(layer) for layer in range(trace.num_layers)]
    results = {}
    for name in config.policies:
        hits, seconds = [], []
        for ids in layers:
            start = timer()
            hits.append(_layer_hits(name, ids, trace, config))
            seconds.append(timer() - start)
            if progress is not None:
                progress.advance(1, name)
        results[name] = PolicyResult(
            name, tuple(hits), trace.num_tokens * trace.top_k, tuple(seconds)
        )
    return ReplayReport(trace.name, trace.num_experts, config.capacity, results)


def shard_bytes(shards: str, num_layers: int, capacity: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(capacity_bytes, expert_bytes) per trace layer of the checkpoint at ``shards`` (trace
    layer i is its i-th MoE layer)."""
    from moeray.shards import ShardStore

    with ShardStore(shards) as store:
        layers = store.layers
        if num_layers > len(layers):
            raise ValueError(f"shards: {shards} has {len(layers)} MoE layers, the trace {num_layers}")
        one = tuple(max(store.expert_bytes(layer, e) for e in range(store.num_experts(layer)))
                    for layer in layers[:num_layers])
    return tuple(capacity * b for b in one), one


def replay_shards(
    trace: Trace,
    config: ReplayConfig,
    shards: str,
    step_tokens: int = 1,
    progress: Progress | None = None,
) -> ReplayReport:
    """``replay_trace`` against real bytes: every online policy runs in the layer actors' own
    body (``LayerCaches``) over the checkpoint at ``shards``, one window per ``step_tokens``
    tokens, waiting for each window's prefetches before reading resident bytes, so the readings
    are the real peaks. Hits equal ``replay_trace``'s; ``belady`` has no shard result."""
    from moeray.actors.layer import LayerCaches, LayerWindow

    if isinstance(step_tokens, bool) or not isinstance(step_tokens, int) or step_tokens < 1:
        raise ValueError(f"step_tokens: expected an int >= 1, got {step_tokens!r}")
    capacity_bytes, expert_bytes = shard_bytes(shards, trace.num_layers, config.capacity)
    layers = list(range(trace.num_layers))
    ids = [np.ascontiguousarray(trace.layer_ids(layer), dtype=np.int32) for layer in layers]
    affinity = (AffinityConfig.with_num_experts(trace.num_experts)
                .with_decay(config.affinity_decay).with_activation_boost(config.affinity_boost))
    results, shard_results = {}, {}
    for name in config.policies:
        if name == "belady":
            results[name] = replay_trace(trace, replace(config, policies=("belady",))).results[name]
            if progress is not None:
                progress.advance(trace.num_layers, name)
            continue
        body = LayerCaches(layers, trace.num_experts, dict.fromkeys(layers, config.capacity), name,
                           affinity, config.affinity_weight, shards=shards, settle=True)
        hits, moved, late, stalls, peak = ([0] * len(layers) for _ in range(5))
        seconds = [0.0] * len(layers)
        for seq, first in enumerate(range(0, trace.num_tokens, step_tokens), start=1):
            for layer in layers:
                start = time.perf_counter()
                (ack,) = body.apply([LayerWindow(layer, seq, ids[layer][first:first + step_tokens])])
                seconds[layer] += time.perf_counter() - start
                hits[layer] += ack.hits
                moved[layer] += ack.bytes_moved
                late[layer] += ack.late_prefetches
                stalls[layer] += ack.stalls
                peak[layer] = max(peak[layer], ack.resident_bytes_max)
        del body  # unmaps the shards
        results[name] = PolicyResult(name, tuple(hits), trace.num_tokens * trace.top_k, tuple(seconds))
        shard_results[name] = ShardResult(capacity_bytes, expert_bytes, tuple(peak), tuple(moved),
                                          tuple(late), tuple(stalls))
        if progress is not None:
            progress.advance(trace.num_layers, name)
    return ReplayReport(trace.name, trace.num_experts, config.capacity, results,
                        shards=shard_results, shards_path=str(shards))

"""What a replay reports: per policy its hits, stalls, transfers and predictors per layer
(``PolicyResult``), with shards what keeping its hot sets resident did (``ShardResult``), and the
whole run (``ReplayReport``, the ``--json`` document)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moeray.actors.messages import ServiceStats
from moeray.native import IS_NATIVE
from moeray.policy.predict import predictor_report
from moeray.shards.capacity import shard_capacity

__all__ = [
    "PolicyResult",
    "ReplayReport",
    "ShardResult",
    "policy_result",
    "resplit_report",
    "shard_result",
]


@dataclass(frozen=True)
class PolicyResult:
    """Hits per layer of one policy; accesses_per_layer = tokens x top_k.

    per_layer_stalls, per_layer_transfers, per_layer_wasted: per layer counts (None: the
    policy does not prefetch, so stalls and transfers are its misses and nothing is wasted).
    top_k: experts per token (0: unknown, then ``transfers_per_token`` is None).
    predictors: recall and precision of each predictor (predictive policies only; "hints"
    only when the policy had hints). resplit: what re-splitting one total capacity across
    layers did (moeray with re-split only): {"moved": experts of capacity moved between layers,
    "evictions": hot experts evicted by shrinking layers, "transfers": later loads of experts
    a re-split evicted (part of transfers), "per_layer_transfers", "final_capacity": per
    layer}."""

    name: str
    per_layer_hits: tuple[int, ...]
    accesses_per_layer: int
    per_layer_seconds: tuple[float, ...]
    per_layer_stalls: tuple[int, ...] | None = None
    per_layer_transfers: tuple[int, ...] | None = None
    per_layer_wasted: tuple[int, ...] | None = None
    top_k: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    predictors: dict | None = None
    resplit: dict | None = None

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
    def stalls(self) -> tuple[int, ...]:
        if self.per_layer_stalls is not None:
            return self.per_layer_stalls
        return tuple(self.accesses_per_layer - h for h in self.per_layer_hits)

    @property
    def transfers(self) -> tuple[int, ...]:
        return self.per_layer_transfers if self.per_layer_transfers is not None else self.stalls

    @property
    def per_layer_stall_rate(self) -> list[float]:
        n = max(self.accesses_per_layer, 1)
        return [s / n for s in self.stalls]

    @property
    def stall_rate(self) -> float:
        """Stall rate averaged over layers."""
        rates = self.per_layer_stall_rate
        return float(np.mean(rates)) if rates else 0.0

    @property
    def num_tokens(self) -> int | None:
        return self.accesses_per_layer // self.top_k if self.top_k else None

    @property
    def transfers_per_token(self) -> float | None:
        """Experts brought into the hot sets of all layers, per token."""
        tokens = self.num_tokens
        return sum(self.transfers) / tokens if tokens else None

    @property
    def wasted_prefetches(self) -> int:
        return sum(self.per_layer_wasted) if self.per_layer_wasted is not None else 0

    @property
    def decisions_per_s(self) -> float:
        """Median over layers of accesses per second: robust to a noisy neighbour."""
        seconds = float(np.median(self.per_layer_seconds)) if self.per_layer_seconds else 0.0
        return self.accesses_per_layer / seconds if seconds > 0 else float("inf")

    def to_json(self) -> dict:
        doc = {
            "hit_rate": self.hit_rate,
            "per_layer_hit_rate": self.per_layer_hit_rate,
            "decisions_per_s": self.decisions_per_s,
            "stall_rate": self.stall_rate,
            "per_layer_stall_rate": self.per_layer_stall_rate,
            "transfers_per_token": self.transfers_per_token,
            "wasted_prefetches": self.wasted_prefetches,
            "per_layer_transfers": list(self.transfers),
            "prefetches": self.prefetches,
            "prefetch_hits": self.prefetch_hits,
        }
        if self.predictors is not None:
            doc["predictors"] = self.predictors
        if self.resplit is not None:
            doc["resplit"] = self.resplit
        return doc


@dataclass(frozen=True)
class ShardResult:
    """Per layer, what keeping one policy's hot sets resident in a checkpoint's shards did.

    capacity_bytes: hot experts x one expert's bytes. resident_bytes_max: the largest mincore
    reading of the layer's shard. bytes_moved: bytes populated. late_prefetches: experts used
    while a prefetch ahead of use had not finished. cold_reads: experts read that nobody had
    asked for ahead (on-demand loads; a window's distinct experts, so fewer than the policy's
    stalls when a window uses an expert twice)."""

    capacity_bytes: tuple[int, ...]
    expert_bytes: tuple[int, ...]
    resident_bytes_max: tuple[int, ...]
    bytes_moved: tuple[int, ...]
    late_prefetches: tuple[int, ...]
    cold_reads: tuple[int, ...]

    def over_bound(self) -> list[int]:
        """Layers whose resident bytes exceeded capacity plus one expert (the memory goal)."""
        return [
            layer
            for layer, (resident, cap, one) in enumerate(
                zip(self.resident_bytes_max, self.capacity_bytes, self.expert_bytes)
            )
            if resident > cap + one
        ]

    def to_json(self) -> dict:
        return {
            key: list(getattr(self, key))
            for key in (
                "capacity_bytes",
                "resident_bytes_max",
                "bytes_moved",
                "late_prefetches",
                "cold_reads",
            )
        }


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
        """``{"trace", "capacity", "policies": {NAME: {"hit_rate", "per_layer_hit_rate",
        "stall_rate", "per_layer_stall_rate", "transfers_per_token", "wasted_prefetches"}}}``
        plus extra keys (capacity_experts, num_experts, backend, decisions_per_s, per_layer_
        transfers, prefetches, prefetch_hits; for moeray, predictors: {NAME: {recall,
        precision}}, and with re-split, resplit: {moved, evictions, transfers, per_layer_
        transfers, final_capacity})."""
        return {
            "trace": self.trace,
            "capacity": self.capacity_fraction,
            "capacity_experts": self.capacity,
            "num_experts": self.num_experts,
            "backend": "native" if self.native else "python",
            "policies": {name: r.to_json() for name, r in self.results.items()},
            **(
                {
                    "shards": {
                        "path": self.shards_path,
                        "policies": {n: r.to_json() for n, r in self.shards.items()},
                    }
                }
                if self.shards
                else {}
            ),
        }


def resplit_report(moved, evictions, transfers, capacity) -> dict:
    """PolicyResult.resplit: experts of capacity moved, hot experts evicted by shrinking and
    later loads of those (per layer arrays summed), and the final split."""
    return {
        "moved": int(moved),
        "evictions": int(np.sum(evictions)),
        "transfers": int(np.sum(transfers)),
        "per_layer_transfers": [int(x) for x in transfers],
        "final_capacity": [int(c) for c in capacity],
    }


def policy_result(
    name: str,
    stats: ServiceStats,
    top_k: int,
    per_layer_seconds,
    resplit: dict | None = None,
) -> PolicyResult:
    """A policy's result from a coordinator's statistics (every window acknowledged): hits,
    stalls, transfers (stalls + prefetches), wasted prefetches per layer, and the predictors'
    recall and precision when the policy has predictors."""
    layers = stats.layers
    counts = {
        key: [getattr(s, key) for s in layers if getattr(s, key)]
        for key in ("predictor_hits", "predictor_guesses", "predictor_uses")
    }
    predictors = None
    if counts["predictor_uses"]:
        predictors = predictor_report(*(np.sum(counts[key], axis=0) for key in counts))
    tokens = max((s.tokens for s in layers), default=0)
    return PolicyResult(
        name,
        tuple(s.hits for s in layers),
        tokens * top_k,
        tuple(per_layer_seconds),
        per_layer_stalls=tuple(s.stalls for s in layers),
        per_layer_transfers=tuple(s.transfers for s in layers),
        per_layer_wasted=tuple(s.wasted_prefetches for s in layers),
        top_k=top_k,
        prefetches=sum(s.prefetches for s in layers),
        prefetch_hits=sum(s.prefetch_hits for s in layers),
        predictors=predictors,
        resplit=resplit,
    )


def shard_result(stats: ServiceStats, expert_bytes: tuple[int, ...]) -> ShardResult:
    """What keeping a policy's hot sets resident did, per layer, from a coordinator's
    statistics; the capacity bound is each layer's largest capacity (a re-split moves it)."""
    return ShardResult(
        shard_capacity(stats.capacity_max, expert_bytes),
        expert_bytes,
        *(
            tuple(getattr(s, key) for s in stats.layers)
            for key in ("resident_bytes_max", "bytes_moved", "late_prefetches", "cold_reads")
        ),
    )

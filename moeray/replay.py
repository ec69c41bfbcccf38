"""Replays a routing trace through each cache policy, per layer, beside the offline optimum.

One cache per layer, empty at the start, persisting across sequences (as ``belady_hits`` does),
so every policy sees exactly the stream the optimum sees. Decisions depend only on the trace;
the timer only measures decisions per second.

Accounting (issue 5), per layer and overall, the same for every policy:
- hit: the expert was hot when its token reached the layer;
- stall: it was not hot and no prefetch for it had been issued before that point (here
  prefetches complete before the use they were issued in time for, so a stall is a use of an
  expert that is not hot: stall rate = 1 - hit rate);
- transfer: every expert brought into the hot set, on demand (a stall) or by prefetch;
  ``transfers_per_token``: transfers of all layers over the number of tokens;
- wasted prefetch: brought in by prefetch and evicted before any use.
A prefetch issued once layer l's routing of token t is known is in time for layer l+1 of token t
and every later token; no policy sees routing that has not happened yet. Demand policies (lru,
lfu, adaptive, affinity-lru) and the oracle (belady) never prefetch: their stalls and transfers
are their misses. ``moeray`` is the predictive policy of ``moeray.policy.predict``.

Engine hints (``ReplayConfig.hint_accuracy``): synthetic hints derived from the trace itself,
for the moeray policy only: for each token and layer, each of the top_k hinted ids is the
expert the token really used in that routing slot with probability ``hint_accuracy``, otherwise
an expert the token did not use there (distinct wrong ones, drawn with ``hint_seed``). A hint
names only the hinted layer's own routing of that token, which is what an engine that computed
the gate ahead would know; nothing else is taken from the future. With re-split on
(``PredictConfig.split``), moeray's result also counts what re-splitting cost (``resplit``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from moeray._progress import Progress
from moeray.native import IS_NATIVE
from moeray.policy.affinity import AffinityConfig, ExpertAffinity
from moeray.policy.belady import belady_hits
from moeray.policy.cache import EvictionPolicy, ExpertCache, ExpertCacheConfig
from moeray.policy.predict import PredictConfig, PredictiveCaches, predictor_report
from moeray.policy.split import CapacitySplit, SplitSchedule
from moeray.traces import Trace

__all__ = [
    "DEMAND_POLICY_NAMES",
    "POLICY_NAMES",
    "ReplayConfig",
    "PolicyResult",
    "ReplayReport",
    "ShardResult",
    "capacity_from_bytes",
    "capacity_from_fraction",
    "synthetic_hints",
    "IN_PROCESS_POLICY_NAMES",
    "replay_predictive",
    "replay_shards",
    "replay_trace",
]

# Names are part of the --json schema: later work adds names, never renames these.
POLICY_NAMES = ("lru", "lfu", "adaptive", "affinity-lru", "belady", "moeray")
# Policies that load only on demand (no prefetch): Belady's hit count bounds theirs.
DEMAND_POLICY_NAMES = ("lru", "lfu", "adaptive", "affinity-lru", "belady")
# Run in this process whatever the backend: an oracle, and the predictive policy (not yet
# hosted by the service's layer actors).
IN_PROCESS_POLICY_NAMES = ("belady",)

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


def capacity_from_bytes(total_bytes: int, expert_bytes, num_experts: int) -> int:
    """Hot-set size in experts per layer for one total byte budget across all layers:
    expert_bytes holds one expert's bytes per layer; every layer gets the same number of
    experts, as many as the budget holds (at most num_experts). ValueError when it cannot hold
    one expert per layer."""
    if isinstance(total_bytes, bool) or not isinstance(total_bytes, int) or total_bytes < 1:
        raise ValueError(f"capacity_bytes: expected a positive int, got {total_bytes!r}")
    per_expert_row = int(sum(expert_bytes))  # one expert of every layer
    if total_bytes < per_expert_row:
        raise ValueError(
            f"capacity_bytes: {total_bytes:,} bytes cannot hold one expert per layer "
            f"({per_expert_row:,} bytes)"
        )
    return min(num_experts, total_bytes // per_expert_row)


@dataclass(frozen=True)
class ReplayConfig:
    """capacity: hot-set size in experts per layer, in [1, num_experts].
    policies: names from POLICY_NAMES. The affinity-lru policy evicts by
    ``suggest_eviction_with_affinity(affinity, affinity_weight)`` over an EMA affinity with
    ``affinity_decay`` and ``affinity_boost``, updated after every token. ``predict``: the
    parameters of the ``moeray`` policy (one set for every trace). hint_accuracy: None (no
    hints) or a float in [0, 1]: the moeray policy gets synthetic engine hints of that accuracy
    (see the module docstring), drawn from ``hint_seed``."""

    capacity: int
    policies: tuple[str, ...] = POLICY_NAMES
    # Chosen by a sweep on the developer split of the gpt-oss-20b and DeepSeek-V2-Lite traces
    # (decay 0.8-0.99, boost 0.05-1, weight 0.3-0.8): good on both, not the best on either.
    affinity_weight: float = 0.8
    affinity_decay: float = 0.95
    affinity_boost: float = 0.05
    predict: PredictConfig = PredictConfig()
    hint_accuracy: float | None = None
    hint_seed: int = 0

    def __post_init__(self):
        if self.hint_accuracy is not None and not (
            isinstance(self.hint_accuracy, (int, float))
            and not isinstance(self.hint_accuracy, bool)
            and 0.0 <= self.hint_accuracy <= 1.0
        ):
            raise ValueError(
                f"hint_accuracy: expected None or a float in [0, 1], got {self.hint_accuracy!r}"
            )
        if (
            isinstance(self.capacity, bool)
            or not isinstance(self.capacity, int)
            or self.capacity < 1
        ):
            raise ValueError(f"capacity: expected an int >= 1, got {self.capacity!r}")
        unknown = [p for p in self.policies if p not in POLICY_NAMES]
        if unknown or not self.policies:
            raise ValueError(
                f"policies: expected names from {POLICY_NAMES}, got {list(self.policies)}"
            )
        if not 0.0 <= self.affinity_weight <= 1.0:
            raise ValueError(
                f"affinity_weight: expected a float in [0, 1], got {self.affinity_weight}"
            )


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
                "stalls",
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


def synthetic_hints(
    expert_ids: np.ndarray,
    num_experts: int,
    accuracy: float,
    rng: np.random.Generator,
    chunk_tokens: int = 1024,
) -> np.ndarray:
    """Engine hints made from the routing itself: expert_ids integer [T, L, top_k] in
    [0, num_experts); returns int32 [T, L, top_k] where each slot is the used expert with
    probability ``accuracy`` and otherwise one of the experts the token did not use at that
    layer (distinct within a token's layer; -1 when fewer than top_k unused experts exist)."""
    expert_ids = np.asarray(expert_ids)
    if expert_ids.ndim != 3:
        raise ValueError(
            f"expert_ids: expected [tokens, layers, top_k], got shape {expert_ids.shape}"
        )
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy: expected a float in [0, 1], got {accuracy}")
    T, L, k = expert_ids.shape
    out = np.empty((T, L, k), dtype=np.int32)
    spare = min(k, num_experts - 1)  # unused experts there are at least num_experts - k of
    for first in range(0, T, chunk_tokens):
        ids = expert_ids[first : first + chunk_tokens].astype(np.intp)
        n = ids.shape[0]
        keys = rng.random((n, L, num_experts), dtype=np.float32)
        np.put_along_axis(keys, ids, 2.0, axis=2)  # used experts sort last
        wrong = np.full((n, L, k), -1, dtype=np.intp)
        wrong[..., :spare] = np.argsort(keys, axis=2, kind="stable")[..., :spare]
        wrong[np.take_along_axis(keys, np.maximum(wrong, 0), axis=2) >= 2.0] = -1
        right = rng.random((n, L, k)) < accuracy
        out[first : first + n] = np.where(right, ids, wrong)
    return out


def replay_predictive(
    trace: Trace,
    config: ReplayConfig,
    timer: Callable[[], float] = time.perf_counter,
    progress: Progress | None = None,
    caches: PredictiveCaches | None = None,
) -> PolicyResult:
    """The ``moeray`` policy over ``trace``, token by token (each token's layers in order),
    with synthetic hints when ``config.hint_accuracy`` is set. caches: fresh hot sets to
    replay with (a variant under study; default: built from ``config``)."""
    if caches is None:
        caches = PredictiveCaches(
            trace.num_layers, trace.num_experts, trace.top_k, config.capacity, config.predict
        )
    hints = None
    if config.hint_accuracy is not None:
        hints = synthetic_hints(
            trace.expert_ids,
            trace.num_experts,
            config.hint_accuracy,
            np.random.default_rng(config.hint_seed),
        )
    done = [0, 0]  # tokens, progress units reported

    def advance(tokens: int) -> None:
        done[0] += tokens
        units = trace.num_layers * done[0] // max(trace.num_tokens, 1)
        if progress is not None and units > done[1]:
            progress.advance(units - done[1], "moeray")
        done[1] = units

    start = timer()
    stats = caches.run(trace.expert_ids, trace.seq_offsets, progress=advance, hints=hints)
    seconds = (timer() - start) / trace.num_layers
    resplit = None
    if config.predict.split is not None:
        resplit = resplit_report(
            stats.resplit_moved, stats.resplit_evictions, stats.resplit_transfers, caches.capacity
        )
    return PolicyResult(
        "moeray",
        tuple(int(h) for h in stats.hits),
        trace.num_tokens * trace.top_k,
        (seconds,) * trace.num_layers,
        per_layer_stalls=tuple(int(x) for x in stats.stalls),
        per_layer_transfers=tuple(int(x) for x in stats.transfers),
        per_layer_wasted=tuple(int(x) for x in stats.wasted_prefetches),
        top_k=trace.top_k,
        prefetches=int(stats.prefetches.sum()),
        prefetch_hits=int(stats.prefetch_hits.sum()),
        predictors=stats.report(),
        resplit=resplit,
    )


def replay_trace(
    trace: Trace,
    config: ReplayConfig,
    timer: Callable[[], float] = time.perf_counter,
    progress: Progress | None = None,
) -> ReplayReport:
    """Hits, stalls and transfers per layer of every policy in ``config.policies`` over ``trace``."""
    if config.capacity > trace.num_experts:
        raise ValueError(
            f"capacity: expected at most num_experts={trace.num_experts}, got {config.capacity}"
        )
    layers = [trace.layer_ids(layer) for layer in range(trace.num_layers)]
    results = {}
    for name in config.policies:
        if name == "moeray":
            results[name] = replay_predictive(trace, config, timer, progress)
            continue
        hits, seconds = [], []
        for ids in layers:
            start = timer()
            hits.append(_layer_hits(name, ids, trace, config))
            seconds.append(timer() - start)
            if progress is not None:
                progress.advance(1, name)
        results[name] = PolicyResult(
            name, tuple(hits), trace.num_tokens * trace.top_k, tuple(seconds), top_k=trace.top_k
        )
    return ReplayReport(trace.name, trace.num_experts, config.capacity, results)


def shard_expert_bytes(shards: str, num_layers: int) -> tuple[int, ...]:
    """One expert's bytes (the largest) per trace layer of the checkpoint at ``shards`` (trace
    layer i is its i-th MoE layer)."""
    from moeray.shards import ShardStore

    with ShardStore(shards) as store:
        layers = store.layers
        if num_layers > len(layers):
            raise ValueError(
                f"shards: {shards} has {len(layers)} MoE layers, the trace {num_layers}"
            )
        return tuple(
            max(store.expert_bytes(layer, e) for e in range(store.num_experts(layer)))
            for layer in layers[:num_layers]
        )


def shard_capacity(capacity, expert_bytes) -> tuple[int, ...]:
    """Per layer, capacity (experts) x one expert's bytes: ShardResult.capacity_bytes."""
    return tuple(int(c) * b for c, b in zip(capacity, expert_bytes))


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


def served_result(
    name: str, layers, trace: Trace, per_layer_seconds, resplit: dict | None = None
) -> PolicyResult:
    """A policy's result from the layer actors' counters per layer (``LayerStats``, summed
    acknowledgements); under ``moeray`` with its stalls (its misses), transfers, wasted
    prefetches and predictors (demand policies: stalls and transfers are their misses), and
    ``resplit`` (``resplit_report``) when the capacity was re-split."""
    prefetching = {}
    if name == "moeray":
        counts = {
            key: [getattr(s, key) for s in layers if getattr(s, key)]
            for key in ("predictor_hits", "predictor_guesses", "predictor_uses")
        }
        prefetching = dict(
            per_layer_stalls=tuple(s.misses for s in layers),
            per_layer_transfers=tuple(s.misses + s.prefetches for s in layers),
            per_layer_wasted=tuple(s.wasted_prefetches for s in layers),
            top_k=trace.top_k,
            prefetches=sum(s.prefetches for s in layers),
            prefetch_hits=sum(s.prefetch_hits for s in layers),
            predictors=(
                predictor_report(*(np.sum(counts[key], axis=0) for key in counts))
                if counts["predictor_uses"]
                else None
            ),  # None: no window acked
        )
    return PolicyResult(
        name,
        tuple(s.hits for s in layers),
        trace.num_tokens * trace.top_k,
        tuple(per_layer_seconds),
        resplit=resplit,
        **prefetching,
    )


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
    are the real peaks. Hits equal ``replay_trace``'s; ``belady`` (an oracle) runs in-process and
    has no shard result. ``moeray`` runs in the layer body too, every layer's window of one
    step together (engine hints, ``hint_accuracy``, with them; with a re-split, the split a
    coordinator would send), and reports its stalls, transfers and predictors as
    ``replay_predictive`` does; its shard bound is then each layer's largest capacity."""
    from moeray.actors.coordinator import LayerStats
    from moeray.actors.layer import LayerCaches, LayerWindow

    if isinstance(step_tokens, bool) or not isinstance(step_tokens, int) or step_tokens < 1:
        raise ValueError(f"step_tokens: expected an int >= 1, got {step_tokens!r}")
    expert_bytes = shard_expert_bytes(shards, trace.num_layers)
    capacity_bytes = shard_capacity([config.capacity] * trace.num_layers, expert_bytes)
    layers = list(range(trace.num_layers))
    ids = [np.ascontiguousarray(trace.layer_ids(layer), dtype=np.int32) for layer in layers]
    affinity = (
        AffinityConfig.with_num_experts(trace.num_experts)
        .with_decay(config.affinity_decay)
        .with_activation_boost(config.affinity_boost)
    )
    results, shard_results = {}, {}
    seq_starts = np.zeros(trace.num_tokens, dtype=bool)
    seq_starts[trace.seq_offsets[trace.seq_offsets < trace.num_tokens]] = True
    budget = config.predict.prefetch_budget  # moeray's, per token, as the coordinator sends it
    budget = trace.top_k if budget is None else budget
    hints = None  # [layers, T, top_k]: moeray's, as replay_trace makes them
    if config.hint_accuracy is not None:
        hints = synthetic_hints(
            trace.expert_ids,
            trace.num_experts,
            config.hint_accuracy,
            np.random.default_rng(config.hint_seed),
        ).transpose(1, 0, 2)
    for name in config.policies:
        if name in IN_PROCESS_POLICY_NAMES:
            results[name] = replay_trace(trace, replace(config, policies=(name,))).results[name]
            if progress is not None:
                progress.advance(trace.num_layers, name)
            continue
        body = LayerCaches(
            layers,
            trace.num_experts,
            dict.fromkeys(layers, config.capacity),
            name,
            affinity,
            config.affinity_weight,
            shards=shards,
            settle=True,
            predict=config.predict,
        )
        stats = [LayerStats(layer) for layer in layers]
        seconds = [0.0] * len(layers)
        split = None  # moeray's re-split, as a coordinator runs it
        if name == "moeray" and config.predict.split is not None:
            split = SplitSchedule(
                CapacitySplit.for_model(
                    trace.num_layers,
                    trace.num_experts,
                    trace.top_k,
                    config.capacity,
                    config.predict.split,
                )
            )
        for seq, first in enumerate(range(0, trace.num_tokens, step_tokens), start=1):
            step = slice(first, first + step_tokens)
            if name == "moeray":  # every layer's window of a step together, one shared time
                resplits = ()
                if split is not None:
                    split.observe(trace.expert_ids[step])
                    resplits = split.window(len(ids[0][step]))
                windows = [
                    [
                        LayerWindow(
                            layer,
                            seq,
                            ids[layer][step],
                            budget,
                            seq_starts=seq_starts[step],
                            hints=None if hints is None else hints[layer, step],
                            resplits=resplits,
                        )
                        for layer in layers
                    ]
                ]
            else:
                windows = [[LayerWindow(layer, seq, ids[layer][step])] for layer in layers]
            for group in windows:
                start = time.perf_counter()
                acks = body.apply(group)
                for ack in acks:
                    seconds[ack.layer] += (time.perf_counter() - start) / len(acks)
                    stats[ack.layer].add(ack)
        del body  # unmaps the shards
        if name == "moeray":  # with its stalls, transfers and predictors
            resplit = (
                None
                if split is None
                else resplit_report(
                    split.moved,
                    [s.resplit_evictions for s in stats],
                    [s.resplit_transfers for s in stats],
                    split.capacity,
                )
            )
            results[name] = served_result(name, stats, trace, seconds, resplit)
        else:
            results[name] = PolicyResult(
                name,
                tuple(s.hits for s in stats),
                trace.num_tokens * trace.top_k,
                tuple(seconds),
                top_k=trace.top_k,
            )
        shard_results[name] = ShardResult(
            capacity_bytes if split is None else shard_capacity(split.capacity_max, expert_bytes),
            expert_bytes,
            *(
                tuple(getattr(s, key) for s in stats)
                for key in ("resident_bytes_max", "bytes_moved", "late_prefetches", "stalls")
            ),
        )
        if progress is not None:
            progress.advance(trace.num_layers, name)
    return ReplayReport(
        trace.name,
        trace.num_experts,
        config.capacity,
        results,
        shards=shard_results,
        shards_path=str(shards),
    )

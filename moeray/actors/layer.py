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

The ``moeray`` policy (``moeray.policy.predict.PredictiveCaches``) runs token by token over all
the actor's layers at once, so it applies the windows of one window number together (every
hosted layer's, in one call, as the coordinator sends them). Its hot sets never interact across
layers, and layer l's predictions use only layer l-1's routing of the same token, layer l's own
earlier routing and layer l's affinity (with ``PredictConfig.split`` the coordinator runs the
re-split over every layer's routing and sends each window its capacities, ``resplits``); so an
actor hosting layers a..b (a > 0) runs it over
a-1..b, feeding the "shadow" layer a-1 with the routing the coordinator attaches to layer a's
window (``previous_layer_ids``) and discarding its counters, and makes exactly the decisions
the whole model's ``PredictiveCaches`` makes for a..b. ``seq_starts`` marks the tokens that
begin a sequence (the previous-token predictor starts afresh there); ``hints`` carries an
engine's predicted experts of each token for that layer. With ``shards`` the bytes
follow its hot sets as they stand after each window, as for the demand policies: the experts it
prefetched and has not used yet are the ones brought in ahead of use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moeray.policy.affinity import AffinityConfig, ExpertAffinity
from moeray.policy.cache import EvictionPolicy, ExpertCache, ExpertCacheConfig
from moeray.policy.predict import PredictConfig, PredictiveCaches

__all__ = [
    "POLICIES",
    "PREDICTIVE_POLICY",
    "SERVICE_POLICY_NAMES",
    "LayerWindow",
    "LayerAck",
    "LayerState",
    "Warmup",
    "WindowGapError",
    "LayerCaches",
]

# policy name -> (base eviction policy, whether misses evict by the affinity blend)
POLICIES = {
    "lru": (EvictionPolicy.LRU, False),
    "lfu": (EvictionPolicy.LFU, False),
    "adaptive": (EvictionPolicy.ADAPTIVE, False),
    "affinity-lru": (EvictionPolicy.LRU, True),
}
# the predictive policy (moeray.policy.predict): prefetches by prediction, token by token
PREDICTIVE_POLICY = "moeray"
SERVICE_POLICY_NAMES = (*POLICIES, PREDICTIVE_POLICY)


@dataclass(frozen=True)
class LayerWindow:
    """expert_ids: int [T, top_k], the layer's routing over one window, tokens in order.
    seq: this layer's window number, from 1. prefetch_budget: experts to prefetch by affinity
    after the window is applied (0: none); under ``moeray``, experts to prefetch per token.
    previous_layer_ids: int [T, top_k], layer - 1's routing of the same tokens (``moeray`` only,
    on the first layer of an actor whose first layer is not 0; else None). seq_starts: bool [T],
    True where a token begins a sequence (None: the window continues one stream). hints: int
    [T, h], an engine's predicted experts of this layer per token, -1 for none (``moeray``
    only; None: no hints). resplits: ``moeray`` with ``predict.split`` only: (token offset in
    the window, every layer's capacity from that token on) pairs, in order, the first at offset 0
    (the split in force when the window begins, so a restarted actor follows it too)."""

    layer: int
    seq: int
    expert_ids: np.ndarray
    prefetch_budget: int = 0
    previous_layer_ids: np.ndarray | None = None
    seq_starts: np.ndarray | None = None
    hints: np.ndarray | None = None
    resplits: tuple[tuple[int, tuple[int, ...]], ...] = ()


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
    # moeray: prefetched experts evicted before any use (its misses are its stalls), and per
    # predictor (PREDICTOR_NAMES) its top-k guesses' hits, guesses and the uses they guessed
    wasted_prefetches: int = 0
    predictor_hits: tuple[int, ...] = ()
    predictor_guesses: tuple[int, ...] = ()
    predictor_uses: tuple[int, ...] = ()
    # moeray with predict.split: hot experts evicted because a re-split shrank the layer, and
    # later loads of those (moeray.policy.predict.PredictStats)
    resplit_evictions: int = 0
    resplit_transfers: int = 0


@dataclass(frozen=True)
class LayerState:
    """The coordinator's copy of a layer: enough to restart its actor.

    seq: last window applied; affinity_scores float64 [E] and activation_counts int64 [E] after it.
    The hot set is not part of it: a restarted actor's memory is empty, as a real process's is
    (under ``moeray`` the coordinator sends the recent routing instead, ``Warmup``, from which
    the predictor relearns its tables and hot sets; the affinity here is then the service's
    affinity EMA of the layer's routing, kept for monitoring, not the policy's own)."""

    layer: int
    seq: int
    affinity_scores: np.ndarray
    activation_counts: np.ndarray


@dataclass(frozen=True)
class Warmup:
    """Routing a restarted ``moeray`` actor relearns from (``moeray`` only): expert_ids int
    [T, rows, top_k], the last tokens up to its last acknowledged window, rows its layers with
    the shadow layer first (when its first layer is not 0); seq_starts bool [T] or None."""

    expert_ids: np.ndarray
    seq_starts: np.ndarray | None = None


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
        predict: PredictConfig | None = None,
    ):
        """shards: checkpoint directory whose bytes follow the hot sets (None: decisions only).
        settle: model the consumer of a replay: read the experts a window stalled on and wait
        for its prefetches before reading resident bytes (exact peaks); otherwise (the service,
        whose consumer is the engine) the reading is taken when the next window arrives,
        without waiting. predict: the ``moeray`` policy's parameters (None: the defaults);
        under ``moeray``, ``layers`` must be consecutive."""
        if policy not in SERVICE_POLICY_NAMES:
            raise ValueError(
                f"policy: expected one of {sorted(SERVICE_POLICY_NAMES)}, got {policy!r}"
            )
        self._layers = list(layers)
        self._weight = affinity_weight
        affinity_config = affinity_config or AffinityConfig.with_num_experts(num_experts)
        # under moeray, the service's affinity EMA of each layer's routing: monitoring and
        # LayerState only (the policy keeps its own)
        self._affinity = {layer: ExpertAffinity(affinity_config) for layer in layers}
        self._applied = {layer: 0 for layer in layers}
        self._settle = settle
        self._predictive: _PredictiveHost | None = None
        if policy == PREDICTIVE_POLICY:
            self._predictive = _PredictiveHost(
                self._layers,
                num_experts,
                capacity,
                predict if predict is not None else PredictConfig(),
            )
            self._caches = {}
        else:
            base, self._blended = POLICIES[policy]
            self._caches = {
                layer: ExpertCache(
                    num_experts, ExpertCacheConfig(capacity[layer], eviction_policy=base)
                )
                for layer in layers
            }
        self._residency = _open_residency(shards, layers, num_experts, capacity) if shards else {}
        # each layer's residency counters as last reported (an ack or settle_shards): the
        # prefetcher's bytes keep arriving between windows, and each is reported once
        self._reported = {layer: r.stats() for layer, r in self._residency.items()}

    def layers(self) -> list[int]:
        return list(self._layers)

    def applied(self) -> dict[int, int]:
        """layer -> seq of the last window applied."""
        return dict(self._applied)

    def restore(self, states: list[LayerState], warmup: Warmup | None = None) -> None:
        """Takes the coordinator's copy after a restart: affinity and the last applied window;
        under ``moeray`` also the recent routing its predictor relearns from (``warmup``)."""
        for state in states:
            self._affinity[state.layer].load_state(state.affinity_scores, state.activation_counts)
            self._applied[state.layer] = state.seq
        if warmup is not None and self._predictive is not None:
            self._predictive.warm_up(warmup)

    def apply(self, windows: list[LayerWindow]) -> list[LayerAck]:
        """Applies windows in order; a window already applied is skipped (a resend after a
        failure), one that skips ahead raises WindowGapError before anything changes.
        Under ``moeray`` every hosted layer's window of one number comes in the same call."""
        if self._predictive is not None:
            return self._apply_predictive(windows)
        acks = []
        for window in windows:
            last = self._applied[window.layer]
            if window.seq <= last:
                continue
            if window.seq != last + 1:
                raise WindowGapError(window.layer, last + 1, window.seq)
            acks.append(self._apply_one(window))
        return acks

    def _shard_begin(self, window: LayerWindow):
        """Before a window is applied: the consumer uses its experts' bytes. Returns what
        ``_shard_end`` needs (None without shards)."""
        residency = self._residency.get(window.layer)
        if residency is None:
            return None
        if not self._settle:
            residency.measure()  # the previous window's prefetches had this window's gap
        return window.layer, residency.use(np.unique(window.expert_ids), wait=self._settle)

    def _shard_end(self, begun, hot, ahead) -> dict:
        """After a window: the bytes follow the hot set (``ahead``: those of its experts brought
        in by prediction); returns the window's shard fields of LayerAck."""
        layer, stalls = begun
        residency = self._residency[layer]
        residency.sync(hot, ahead)
        if self._settle:  # a replay's consumer reads what it stalled on, even if not kept
            residency.read_cold(stalls - {int(e) for e in hot})
            residency.settle()
            residency.measure()
        return self._shard_report(layer)

    def _shard_report(self, layer: int) -> dict:
        """The shard fields of LayerAck since the last report, and the latest reading."""
        now, last = self._residency[layer].stats(), self._reported[layer]
        self._reported[layer] = now
        return dict(
            bytes_moved=now.bytes_moved - last.bytes_moved,
            late_prefetches=now.late - last.late,
            stalls=now.stalls - last.stalls,
            resident_bytes_max=now.resident_bytes,
        )

    def settle_shards(self) -> dict[int, dict]:
        """Waits for every hosted layer's prefetches in flight and reads its resident bytes:
        layer -> the shard fields of LayerAck since the last window (the bytes that arrived
        after it); empty without shards. The service's final count (``Coordinator.stats``)."""
        for residency in self._residency.values():
            residency.settle()
            residency.measure()
        return {layer: self._shard_report(layer) for layer in self._residency}

    def _apply_one(self, window: LayerWindow) -> LayerAck:
        cache, affinity = self._caches[window.layer], self._affinity[window.layer]
        begun = self._shard_begin(window)
        before = cache.stats()
        if self._blended:
            cache.access_batch(window.expert_ids, affinity, self._weight)
        else:
            cache.access_batch(window.expert_ids)
            affinity.update_batch(window.expert_ids)
        prefetched = cache.prefetch_by_affinity(affinity, window.prefetch_budget)
        after = cache.stats()
        self._applied[window.layer] = window.seq
        shard = self._shard_end(begun, cache.hot_experts(), prefetched) if begun is not None else {}
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

    def _apply_predictive(self, windows: list[LayerWindow]) -> list[LayerAck]:
        by_seq: dict[int, dict[int, LayerWindow]] = {}
        for window in windows:
            if window.layer not in self._applied:
                raise ValueError(
                    f"windows: layer {window.layer} is not hosted here ({self._layers})"
                )
            by_seq.setdefault(window.seq, {})[window.layer] = window
        acks = []
        first = self._layers[0]
        for seq in sorted(by_seq):
            last = self._applied[first]  # every hosted layer advances together under moeray
            if seq <= last:
                continue
            if seq != last + 1:
                raise WindowGapError(first, last + 1, seq)
            group = by_seq[seq]
            if sorted(group) != self._layers:
                raise ValueError(
                    f"windows: the moeray policy applies every hosted layer's window "
                    f"together; window {seq} has layers {sorted(group)}, this actor "
                    f"hosts {self._layers}"
                )
            ordered = [group[layer] for layer in self._layers]
            begun = [self._shard_begin(window) for window in ordered]
            counts = self._predictive.apply(ordered)
            sets = self._predictive.hot_sets() if self._residency else [None] * len(ordered)
            for window, count, b, hot_set in zip(ordered, counts, begun, sets):
                affinity = self._affinity[window.layer]
                affinity.update_batch(window.expert_ids)
                self._applied[window.layer] = seq
                shard = self._shard_end(b, *hot_set) if b is not None else {}
                acks.append(
                    LayerAck(
                        layer=window.layer,
                        seq=seq,
                        **count,
                        **shard,
                        affinity_scores=affinity.scores(),
                        activation_counts=affinity.activation_counts(),
                    )
                )
        return acks

    def shard_capacity_bytes(self) -> dict[int, int]:
        """layer -> capacity in bytes (hot experts x an expert's bytes); empty without shards."""
        return {layer: r.stats().capacity_bytes for layer, r in self._residency.items()}

    def ping(self) -> bool:
        return True


class _PredictiveHost:
    """One ``PredictiveCaches`` over an actor's consecutive layers a..b, plus the shadow layer
    a-1 when a > 0 (see the module docstring); built at the first window (top_k from its
    routing)."""

    def __init__(
        self, layers: list[int], num_experts: int, capacity: dict[int, int], config: PredictConfig
    ):
        if not isinstance(config, PredictConfig):
            raise TypeError(f"predict: expected a PredictConfig, got {type(config).__name__}")
        # a re-split couples every layer: the coordinator runs it and sends each window's
        # capacities (LayerWindow.resplits), which this actor applies token by token
        config = replace(config, split=None)
        if layers != list(range(layers[0], layers[0] + len(layers))):
            raise ValueError(f"layers: the moeray policy needs consecutive layers, got {layers}")
        self._layers = layers
        self._shadow = layers[0] > 0
        self._skip = 1 if self._shadow else 0  # the shadow layer's row in the caches
        # the shadow's hot set never touches the others': any valid capacity gives the same
        # decisions for a..b; its own layer's is the faithful one when known
        shadow_capacity = [capacity.get(layers[0] - 1, capacity[layers[0]])] if self._shadow else []
        self._capacity = np.array(shadow_capacity + [capacity[layer] for layer in layers], np.int64)
        self._num_experts = num_experts
        self._config = config
        self._caches: PredictiveCaches | None = None

    def apply(self, windows: list[LayerWindow]) -> list[dict]:
        """Feeds one window of every hosted layer (in layer order), token by token; returns each
        layer's counters of this window."""
        head = windows[0]
        tokens = len(head.expert_ids)
        rows = [w.expert_ids for w in windows]
        if self._shadow:
            previous = head.previous_layer_ids
            if previous is None:
                raise ValueError(
                    f"previous_layer_ids: the moeray policy needs layer "
                    f"{head.layer - 1}'s routing with layer {head.layer}'s window"
                )
            rows.insert(0, previous)
        if any(np.shape(r)[:1] != (tokens,) for r in rows):
            raise ValueError(
                f"windows: every layer's routing of window {head.seq} must cover "
                f"the same {tokens} tokens"
            )
        budget = head.prefetch_budget
        if any(w.prefetch_budget != budget for w in windows):
            # PredictiveCaches takes one budget for all its layers
            raise ValueError(
                f"prefetch_budget: the moeray policy takes one budget per actor, "
                f"got {[w.prefetch_budget for w in windows]} in window {head.seq}"
            )
        ids = np.stack(rows, axis=1)  # [T, layers (+ shadow), top_k]
        if self._caches is None:
            self._caches = PredictiveCaches(
                len(self._capacity), self._num_experts, ids.shape[2], self._capacity, self._config
            )
        caches = self._caches
        if caches.config.prefetch_budget != budget:
            caches.config = replace(caches.config, prefetch_budget=budget)
        hints = self._hints(windows, tokens, len(rows))
        starts = head.seq_starts
        if starts is not None:
            starts = np.asarray(starts, dtype=bool)
            if starts.shape != (tokens,):
                raise ValueError(f"seq_starts: expected bool [{tokens}], got shape {starts.shape}")
        resplits = self._resplits(head, tokens)
        before = _counters(caches)
        if starts is None and hints is None and not resplits:
            for t in range(tokens):
                caches.step(ids[t])
        else:
            for t in range(tokens):
                if t in resplits and not np.array_equal(resplits[t], caches.capacity):
                    caches.set_capacity(resplits[t])
                caches.step(
                    ids[t],
                    new_sequence=starts is not None and bool(starts[t]),
                    hints=None if hints is None else hints[t],
                )
        after = _counters(caches)
        delta = {key: after[key] - before[key] for key in after}
        skip = self._skip
        return [
            dict(
                hits=int(delta["hits"][i]),
                misses=int(delta["stalls"][i]),
                evictions=int(delta["evictions"][i]),
                prefetch_hits=int(delta["prefetch_hits"][i]),
                prefetches=int(delta["prefetches"][i]),
                wasted_prefetches=int(delta["wasted_prefetches"][i]),
                resplit_evictions=int(delta["resplit_evictions"][i]),
                resplit_transfers=int(delta["resplit_transfers"][i]),
                **{key: tuple(int(x) for x in delta[key][:, i]) for key in _PREDICTOR_COUNTERS},
            )
            for i in range(skip, skip + len(windows))
        ]

    def warm_up(self, warmup: Warmup) -> None:
        """Steps the predictor through routing already counted (a restart's): its tables, hot
        sets and affinity learn again what the process that died had learned; no counter of
        a window moves."""
        ids = np.asarray(warmup.expert_ids)
        if ids.ndim != 3 or ids.shape[1] != len(self._capacity) or ids.dtype.kind not in "iu":
            raise ValueError(
                f"warmup: expected int [tokens, {len(self._capacity)}, top_k], got "
                f"{ids.dtype} {ids.shape}"
            )
        if self._caches is None:
            self._caches = PredictiveCaches(
                len(self._capacity), self._num_experts, ids.shape[2], self._capacity, self._config
            )
        starts = warmup.seq_starts
        for t in range(len(ids)):
            self._caches.step(ids[t], new_sequence=starts is not None and bool(starts[t]))

    def _resplits(self, window: LayerWindow, tokens: int) -> dict[int, np.ndarray]:
        """Token offset -> the capacities of this actor's rows (the shadow layer's first) from
        that token on, from the window's re-splits (see LayerWindow)."""
        out = {}
        for offset, capacity in window.resplits if tokens else ():  # an empty window: no token
            if not 0 <= offset < tokens or len(capacity) <= self._layers[-1]:
                raise ValueError(
                    f"resplits: expected (offset in [0, {tokens}), a capacity per "
                    f"layer) pairs, got ({offset}, {capacity})"
                )
            first = self._layers[0] - self._skip
            out[offset] = np.asarray(capacity[first : self._layers[-1] + 1], dtype=np.int64)
        return out

    def _hints(self, windows: list[LayerWindow], tokens: int, rows: int) -> np.ndarray | None:
        """The windows' hints as int [tokens, rows, h] (-1 for none; the shadow layer takes
        none: its decisions are dropped, and a layer's hints change only that layer's), or
        None without any."""
        given = [w.hints for w in windows if w.hints is not None]
        if not given:
            return None
        for w in windows:
            if w.hints is not None and (np.ndim(w.hints) != 2 or len(w.hints) != tokens):
                raise ValueError(
                    f"hints: expected int [{tokens}, h] for layer {w.layer}, got "
                    f"shape {np.shape(w.hints)}"
                )
        out = np.full((tokens, rows, max(h.shape[1] for h in given)), -1, dtype=np.int64)
        for i, w in enumerate(windows):
            if w.hints is not None:
                out[:, self._skip + i, : w.hints.shape[1]] = w.hints
        return out

    def hot_sets(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per hosted layer (in order), its hot experts and, of those, the ones prefetched and
        not used yet; empty before the first window."""
        if self._caches is None:
            return [(np.zeros(0, np.int64),) * 2 for _ in self._layers]
        return [self._caches.hot_set(self._skip + i) for i in range(len(self._layers))]


_PREDICTOR_COUNTERS = ("predictor_hits", "predictor_guesses", "predictor_uses")


def _counters(caches: PredictiveCaches) -> dict[str, np.ndarray]:
    stats = caches.stats
    return {
        key: getattr(stats, key).copy()  # the stats' arrays grow in place
        for key in (
            "hits",
            "stalls",
            "prefetches",
            "prefetch_hits",
            "wasted_prefetches",
            "evictions",
            "resplit_evictions",
            "resplit_transfers",
            *_PREDICTOR_COUNTERS,
        )
    }


def _open_residency(
    path: str, layers: list[int], num_experts: int, capacity: dict[int, int]
) -> dict:
    """layer -> ShardResidency over the checkpoint at ``path`` (its i-th MoE layer for layer i)."""
    from moeray.shards import ShardStore
    from moeray.shards.residency import ShardResidency

    store = ShardStore(path)
    moe_layers = store.layers
    if max(layers) >= len(moe_layers):
        raise ValueError(
            f"shards: {path} has {len(moe_layers)} MoE layers, the service "
            f"{max(layers) + 1} or more"
        )
    out = {}
    for layer in layers:
        stored = moe_layers[layer]
        if store.num_experts(stored) != num_experts:
            raise ValueError(
                f"shards: {path} layer {stored} has {store.num_experts(stored)} "
                f"experts, the service {num_experts}"
            )
        out[layer] = ShardResidency(store, stored, capacity[layer])
    return out

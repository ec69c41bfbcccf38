"""Body of the coordinator: coalesces routing per layer and keeps every layer actor in step.

A plain class (no Ray here): it talks to layer actors through a ``LayerTransport`` (Ray's in
``moeray.actors._ray``, a fake in tests). The coordinator is the source of truth:
- routing is buffered per layer and sent as one ``LayerWindow`` per layer actor per window
  (``window_steps`` submits, or ``window_ms`` since the window opened, whichever comes first),
  ids in the smallest integer type that holds them (a quarter of the bytes for <= 256 experts);
- windows are numbered per layer and kept until acknowledged; on ack their counters join the
  layer's statistics and the ack's affinity becomes the coordinator's copy of the layer's state;
- when a layer actor fails, it is re-created, restored from that copy (last acknowledged window
  and affinity) and sent every unacknowledged window again, so nothing is lost or counted twice.

Accounting rule after a failure: statistics are the sum of acknowledged windows, each counted
once. The restarted actor's hot set starts empty (its memory went with the process), so from
the last acknowledged window on its hits can be lower than an uninterrupted replay's; the
layer's ``restarts`` counter says when this happened.

The ``moeray`` policy (``moeray.policy.predict``) runs in the layer actors, token by token. Each
layer actor whose first layer a is not 0 also gets layer a-1's routing of the window's tokens
(``LayerWindow.previous_layer_ids``: the cross-layer predictor of layer a reads it), and every
window carries the tokens that begin a sequence (``seq_starts``) and, per layer, the engine hints
submitted with its steps (``hints``, narrower steps padded with -1). The coordinator sets each
layer's prefetch budget per window (``prefetch_budgets``: ``predict.prefetch_budget`` experts per
token), a function of the configuration only, never of timing, so a trace replayed through the
service gives ``replay_predictive``'s hits, stalls, prefetches and wasted prefetches exactly.
Restart rule under ``moeray``: the hot sets, transition tables and the policy's affinity went
with the process, so the coordinator keeps the last ``warmup_tokens`` tokens of routing that
every layer acknowledged and sends a re-created actor its rows of them up to its last
acknowledged window (``Warmup``): the predictor steps through them uncounted and relearns its
tables and hot sets (with all of the routing so far, the restart changes no decision; with
``warmup_tokens`` 0 it starts empty). The coordinator's copy of the layer (``LayerState``: the
service's affinity EMA of the routing, for monitoring) is restored as for the other policies, and
the unacknowledged windows are resent, so no window is lost or applied twice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

from moeray.actors.layer import (
    PREDICTIVE_POLICY,
    SERVICE_POLICY_NAMES,
    LayerAck,
    LayerState,
    LayerWindow,
    Warmup,
)
from moeray.policy._validate import as_weights, check_int
from moeray.policy.affinity import AffinityConfig, ExpertAffinity
from moeray.policy.predict import PredictConfig
from moeray.policy.scheduler import ExpertBatches, schedule
from moeray.policy.split import CapacitySplit, SplitConfig, SplitSchedule

__all__ = [
    "ServiceConfig",
    "LayerStats",
    "ServiceStats",
    "LayerTransport",
    "Coordinator",
    "check_step",
    "check_seq_starts",
    "check_hints",
    "join_hints",
    "prefetch_budgets",
    "schedule_step",
]


@dataclass(frozen=True)
class ServiceConfig:
    """Model shape, cache policy and coalescing of one moeray service.

    capacity: hot experts per layer, one int for every layer or a tuple of num_layers ints.
    window_steps: submits per window; window_ms: also close a window this old (None: never;
    a ServiceHandle closes its own window by a timer, the coordinator at the next submit).
    layers_per_actor: consecutive layers hosted by one actor process (1: one actor per layer).
    placement: per layer actor, the Ray custom resource that pins it to a node (None: anywhere).
    shards: a checkpoint directory, at this path on every node, whose expert bytes the layer
    actors keep resident for their hot sets (None: decisions only, no bytes move).
    capacity_bytes: with shards, one byte budget for every layer's hot set instead of
    ``capacity``: the config reads the checkpoint (here, where it is made) and sets ``capacity``
    to as many experts per layer as the budget holds.
    coordinator_placement: the resource that pins the coordinator, e.g. one only the head node
    offers: the coordinator holds the service's state and is not re-created if its node is lost.
    policy: moeray (the default: the predictive policy; its parameters
    are ``predict``, a PredictConfig or a dict of its fields, and its budget, experts per layer
    per token, is ``predict.prefetch_budget``, None for top_k; ``prefetch_budget`` must stay 0;
    engine hints come with a step, ``submit(..., hints=...)``; with ``predict.split`` the
    coordinator re-splits the sum of ``capacity`` across layers) or
    lru | lfu | adaptive | affinity-lru (demand caches, cheaper per token; ``prefetch_budget``
    experts are prefetched by affinity after each window). warmup_tokens: under ``moeray``, the
    routing the coordinator keeps (this many last tokens, every layer) for a restarted layer
    actor to relearn from (0: it restarts with empty tables).
    """

    num_layers: int
    num_experts: int
    top_k: int
    capacity: int | tuple[int, ...] = 8
    policy: str = PREDICTIVE_POLICY
    prefetch_budget: int = 0
    window_steps: int = 1
    window_ms: float | None = None
    layers_per_actor: int = 1
    name: str = "moeray"
    namespace: str = "moeray"
    placement: tuple[str | None, ...] | None = None
    coordinator_placement: str | None = None
    shards: str | None = None
    capacity_bytes: int | None = None
    affinity_decay: float = 0.95
    affinity_boost: float = 0.05
    affinity_weight: float = 0.8
    predict: PredictConfig = PredictConfig()
    warmup_tokens: int = 4096

    def __post_init__(self):
        check_int(self.num_layers, "num_layers", 1)
        check_int(self.num_experts, "num_experts", 1, 2**31 - 1)
        check_int(self.top_k, "top_k", 1, self.num_experts)
        if self.capacity_bytes is not None:
            if self.shards is None:
                raise ValueError(
                    "capacity_bytes: needs shards (an expert's bytes come from the checkpoint)"
                )
            from moeray.replay import capacity_from_bytes, shard_expert_bytes

            expert_bytes = shard_expert_bytes(self.shards, self.num_layers)
            object.__setattr__(
                self,
                "capacity",
                capacity_from_bytes(self.capacity_bytes, expert_bytes, self.num_experts),
            )
        capacity = self.capacity
        if isinstance(capacity, (list, tuple)):
            if len(capacity) != self.num_layers:
                raise ValueError(
                    f"capacity: expected one int or {self.num_layers} ints, got {len(capacity)}"
                )
            capacity = tuple(check_int(c, "capacity", 1, self.num_experts) for c in capacity)
        else:
            capacity = (check_int(capacity, "capacity", 1, self.num_experts),) * self.num_layers
        object.__setattr__(self, "capacity", capacity)
        if self.policy not in SERVICE_POLICY_NAMES:
            raise ValueError(
                f"policy: expected one of {sorted(SERVICE_POLICY_NAMES)}, got {self.policy!r}"
            )
        check_int(self.prefetch_budget, "prefetch_budget", 0, self.num_experts)
        if isinstance(self.predict, dict):  # from a JSON config (moeray serve --config)
            fields = dict(self.predict)
            if isinstance(fields.get("split"), dict):
                try:
                    fields["split"] = SplitConfig(**fields["split"])
                except TypeError as exc:
                    raise ValueError(f"predict.split: {exc}") from None
            try:
                object.__setattr__(self, "predict", PredictConfig(**fields))
            except TypeError as exc:
                raise ValueError(f"predict: {exc}") from None
        if not isinstance(self.predict, PredictConfig):
            raise TypeError(f"predict: expected a PredictConfig or a dict, got {self.predict!r}")
        if self.policy == PREDICTIVE_POLICY:
            if self.prefetch_budget:
                raise ValueError(
                    "prefetch_budget: expected 0 with policy 'moeray' (the default), "
                    "whose budget is predict.prefetch_budget (experts per layer per "
                    "token); the affinity prefetch budget is the demand policies'"
                )
        check_int(self.warmup_tokens, "warmup_tokens", 0)
        check_int(self.window_steps, "window_steps", 1)
        if self.window_ms is not None and not self.window_ms > 0:
            raise ValueError(f"window_ms: expected None or a positive number, got {self.window_ms}")
        check_int(self.layers_per_actor, "layers_per_actor", 1, self.num_layers)
        if not self.name or not self.namespace:
            raise ValueError("name, namespace: expected non-empty strings")
        if self.placement is not None and len(self.placement) != len(self.actor_layers()):
            raise ValueError(
                f"placement: expected one resource (or None) per layer actor "
                f"({len(self.actor_layers())}), got {len(self.placement)}"
            )
        if not 0.0 <= self.affinity_weight <= 1.0:
            raise ValueError(
                f"affinity_weight: expected a float in [0, 1], got {self.affinity_weight}"
            )
        if self.shards is not None and not isinstance(self.shards, str):
            raise TypeError(
                f"shards: expected a checkpoint path (str) or None, got {self.shards!r}"
            )

    def actor_layers(self) -> list[list[int]]:
        """Layers of each layer actor, in actor order."""
        n = self.layers_per_actor
        return [list(range(i, min(i + n, self.num_layers))) for i in range(0, self.num_layers, n)]

    def ids_dtype(self) -> np.dtype:
        """The smallest integer type that holds every expert id: routing travels in it."""
        for dtype in (np.uint8, np.uint16):
            if self.num_experts <= np.iinfo(dtype).max + 1:
                return np.dtype(dtype)
        return np.dtype(np.int32)

    def affinity_config(self) -> AffinityConfig:
        return (
            AffinityConfig.with_num_experts(self.num_experts)
            .with_decay(self.affinity_decay)
            .with_activation_boost(self.affinity_boost)
        )


@dataclass
class LayerStats:
    """Counters of one layer over its acknowledged windows."""

    layer: int
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_hits: int = 0
    prefetches: int = 0
    windows: int = 0
    tokens: int = 0
    restarts: int = 0
    # with shards (ServiceConfig.shards): bytes populated, experts used late or stalled, and the
    # largest resident-bytes reading of the layer's shard
    bytes_moved: int = 0
    late_prefetches: int = 0
    stalls: int = 0
    resident_bytes_max: int = 0
    # moeray: prefetched experts evicted before any use; its misses are its stalls, so
    # misses + prefetches are its transfers. Per predictor (moeray.policy.predict's
    # PREDICTOR_NAMES): experts its top-k guesses named that were used, experts guessed, and
    # the uses it guessed for (recall = hits / uses, precision = hits / guesses)
    wasted_prefetches: int = 0
    predictor_hits: tuple[int, ...] = ()
    predictor_guesses: tuple[int, ...] = ()
    predictor_uses: tuple[int, ...] = ()
    # moeray with predict.split: hot experts a shrinking re-split evicted, later loads of those
    resplit_evictions: int = 0
    resplit_transfers: int = 0

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def add(self, ack: LayerAck) -> None:
        """Adds one acknowledged window's counters (not ``windows`` and ``tokens``)."""
        self.hits += ack.hits
        self.misses += ack.misses
        self.evictions += ack.evictions
        self.prefetch_hits += ack.prefetch_hits
        self.prefetches += ack.prefetches
        self.add_shard(ack.bytes_moved, ack.late_prefetches, ack.stalls, ack.resident_bytes_max)
        self.wasted_prefetches += ack.wasted_prefetches
        self.resplit_evictions += ack.resplit_evictions
        self.resplit_transfers += ack.resplit_transfers
        for key in _PER_PREDICTOR:
            setattr(self, key, _add_counts(getattr(self, key), getattr(ack, key)))

    def add_shard(
        self, bytes_moved: int, late_prefetches: int, stalls: int, resident_bytes_max: int
    ) -> None:
        """Adds shard counters: a window's, or what arrived after the last window (a layer
        actor's ``settle_shards``)."""
        self.bytes_moved += bytes_moved
        self.late_prefetches += late_prefetches
        self.stalls += stalls
        self.resident_bytes_max = max(self.resident_bytes_max, resident_bytes_max)


@dataclass
class ServiceStats:
    layers: list[LayerStats] = field(default_factory=list)
    submits: int = 0
    pending_windows: int = 0
    coordinator_cpu_s: float = 0.0  # CPU time of the coordinator's process so far
    # CPU time of the coordinator's thread inside its methods (submits, windows, acknowledgements),
    # less its blocking waits for layer actors, and without the Ray threads that keep its
    # process busy even while idle: the work that steps cause
    coordinator_method_cpu_s: float = 0.0
    # experts of capacity moved between layers so far (moeray with predict.split), each layer's
    # capacity now (the latest split sent; without a re-split, ServiceConfig.capacity) and its
    # largest so far
    resplit_moved: int = 0
    capacity: tuple[int, ...] = ()
    capacity_max: tuple[int, ...] = ()

    def total(self) -> LayerStats:
        out = LayerStats(layer=-1)
        for s in self.layers:
            for f in fields(LayerStats):
                if f.name in _PER_PREDICTOR:
                    setattr(out, f.name, _add_counts(getattr(out, f.name), getattr(s, f.name)))
                elif f.name != "layer":
                    setattr(out, f.name, getattr(out, f.name) + getattr(s, f.name))
        return out


_PER_PREDICTOR = ("predictor_hits", "predictor_guesses", "predictor_uses")


def _add_counts(mine: tuple[int, ...], theirs) -> tuple[int, ...]:
    """Per-predictor counts added element by element (an empty tuple: none yet)."""
    theirs = tuple(int(x) for x in theirs)
    if not mine or not theirs:
        return mine or theirs
    return tuple(a + b for a, b in zip(mine, theirs, strict=True))


class LayerTransport(Protocol):
    """How the coordinator reaches layer actors; every call is non-blocking."""

    def send(self, actor: int, windows: list[LayerWindow]) -> None: ...

    def restore(
        self, actor: int, states: list[LayerState], warmup: Warmup | None = None
    ) -> None: ...

    def recreate(self, actor: int) -> None: ...

    def poll(self, wait: bool) -> list[tuple[int, int, object]]:
        """Finished calls as (actor, generation, acks or exception), in send order per actor."""
        ...

    def generation(self, actor: int) -> int: ...

    def outstanding(self) -> int: ...

    def settle_shards(self) -> dict[int, dict]:
        """Blocking: every live actor's ``LayerCaches.settle_shards()`` (asked of all at once),
        merged: layer -> shard fields."""
        ...


def check_step(expert_ids, weights, config: ServiceConfig):
    """A step's routing as int32 [num_layers, T, top_k] ids and float32 weights (or None).

    Raises TypeError / ValueError naming the argument; nothing is changed on failure."""
    if not isinstance(expert_ids, np.ndarray):
        raise TypeError(f"expert_ids: expected a numpy array, got {type(expert_ids).__name__}")
    if expert_ids.ndim != 3 or expert_ids.shape[0] != config.num_layers:
        raise ValueError(
            f"expert_ids: expected shape [num_layers={config.num_layers}, T, top_k], "
            f"got {expert_ids.shape}"
        )
    if expert_ids.shape[2] != config.top_k:
        raise ValueError(f"expert_ids: expected top_k={config.top_k}, got {expert_ids.shape[2]}")
    if expert_ids.dtype.kind not in "iu":
        raise TypeError(f"expert_ids: expected an integer dtype (int32), got {expert_ids.dtype}")
    if expert_ids.size and (expert_ids.min() < 0 or expert_ids.max() >= config.num_experts):
        raise ValueError(f"expert_ids: every id must be in [0, {config.num_experts})")
    ids = np.ascontiguousarray(expert_ids, dtype=np.int32)
    if weights is None:
        return ids, None
    w = as_weights(weights, ids.shape)
    if not np.isfinite(w).all():
        raise ValueError("weights: every weight must be finite (no NaN or inf)")
    return ids, w


def check_seq_starts(seq_starts, num_tokens: int) -> np.ndarray | None:
    """seq_starts: bool [T] (True where a token begins a sequence) or None; returned as a bool
    array, or None when no token begins one. TypeError / ValueError naming the argument."""
    if seq_starts is None:
        return None
    if not isinstance(seq_starts, np.ndarray):
        raise TypeError(
            f"seq_starts: expected a numpy bool array or None, got {type(seq_starts).__name__}"
        )
    if seq_starts.dtype != np.bool_:
        raise TypeError(f"seq_starts: expected dtype bool, got {seq_starts.dtype}")
    if seq_starts.shape != (num_tokens,):
        raise ValueError(f"seq_starts: expected shape [T={num_tokens}], got {seq_starts.shape}")
    return seq_starts if seq_starts.any() else None


def check_hints(hints, config: ServiceConfig, num_tokens: int) -> np.ndarray | None:
    """hints: None, or an engine's predicted experts of each token at each layer, int
    [num_layers, T, h], h >= 1, each in [-1, num_experts) (-1: no hint; see
    ``moeray.policy.predict``, "Engine hints"), which only ``moeray`` reads; returned as int32.
    TypeError / ValueError naming the argument."""
    if hints is None:
        return None
    if config.policy != PREDICTIVE_POLICY:
        raise ValueError(
            f"hints: only the moeray policy reads engine hints, this service runs {config.policy!r}"
        )
    if not isinstance(hints, np.ndarray):
        raise TypeError(
            f"hints: expected a numpy integer array or None, got {type(hints).__name__}"
        )
    if hints.dtype.kind not in "iu":
        raise TypeError(f"hints: expected an integer dtype, got {hints.dtype}")
    if hints.ndim != 3 or hints.shape[:2] != (config.num_layers, num_tokens) or hints.shape[2] < 1:
        raise ValueError(
            f"hints: expected shape [num_layers={config.num_layers}, T={num_tokens}, "
            f"h >= 1], got {hints.shape}"
        )
    if hints.size and (hints.min() < -1 or hints.max() >= config.num_experts):
        raise ValueError(f"hints: every id must be in [0, {config.num_experts}) or -1 (no hint)")
    return np.ascontiguousarray(hints, dtype=np.int32)


def join_hints(parts: list[tuple[int, np.ndarray | None]]) -> np.ndarray | None:
    """The hints of consecutive steps, (tokens, validated hints or None) each, as one int32
    [num_layers, tokens, h] array, h the widest step's, -1 where a step had fewer or none; None
    when no step had any."""
    given = [h for _, h in parts if h is not None]
    if not given:
        return None
    out = np.full(
        (given[0].shape[0], sum(n for n, _ in parts), max(h.shape[2] for h in given)),
        -1,
        dtype=np.int32,
    )
    at = 0
    for n, h in parts:
        if h is not None:
            out[:, at : at + n, : h.shape[2]] = h
        at += n
    return out


def prefetch_budgets(config: ServiceConfig) -> tuple[int, ...]:
    """Each layer's prefetch budget for its windows: under moeray ``predict.prefetch_budget``
    experts per token, else ``prefetch_budget`` experts by affinity per window. A function of
    the configuration alone: decisions never depend on when acknowledgements arrive."""
    if config.policy == PREDICTIVE_POLICY:
        budget = config.predict.prefetch_budget
        return (config.top_k if budget is None else budget,) * config.num_layers
    return (config.prefetch_budget,) * config.num_layers


def schedule_step(ids: np.ndarray, weights: np.ndarray, num_experts: int) -> list[ExpertBatches]:
    """Each layer's routing of a checked step grouped by expert (``schedule`` per layer)."""
    return [schedule(ids[layer], weights[layer], num_experts) for layer in range(len(ids))]


class Coordinator:
    """Coalesces routing per layer into windows and keeps layer actors in step (see module doc)."""

    def __init__(
        self,
        config: ServiceConfig,
        transport: LayerTransport,
        timer: Callable[[], float] = time.monotonic,
        on_ack: Callable[[LayerAck], None] | None = None,
    ):
        self.config = config
        self._transport = transport
        self._on_ack_hook = on_ack  # e.g. Prometheus counters (moeray.metrics)
        self._timer = timer
        self._groups = config.actor_layers()
        self._actor_of = {layer: a for a, layers in enumerate(self._groups) for layer in layers}
        layers = range(config.num_layers)
        self._buffer: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
        self._predictive = config.policy == PREDICTIVE_POLICY
        self._starts: list[np.ndarray | None] = []  # per buffered submit (moeray only)
        self._hints: list[tuple[int, np.ndarray | None]] = []  # likewise: (tokens, hints)
        self._budgets = prefetch_budgets(config)
        self._steps_in_window = 0
        self._window_opened: float | None = None
        self._sent_seq = {layer: 0 for layer in layers}
        self._unacked: dict[int, deque[LayerWindow]] = {layer: deque() for layer in layers}
        empty = ExpertAffinity(config.affinity_config())
        self._state = {
            layer: LayerState(layer, 0, empty.scores(), empty.activation_counts())
            for layer in layers
        }
        self._stats = {layer: LayerStats(layer) for layer in layers}
        self._submits = 0
        # One capacity re-split across layers (moeray with predict.split): the split runs over
        # every layer's routing as it comes; its plans go out with the windows of their tokens.
        # Recent windows' routing, every layer (moeray): (window number, layer -> ids [T, top_k],
        # seq_starts or None), at least the last warmup_tokens tokens every layer acknowledged,
        # for a restarted actor to relearn from.
        self._recent: deque[tuple[int, dict[int, np.ndarray], np.ndarray | None]] = deque()
        self._split: SplitSchedule | None = None
        if self._predictive and config.predict.split is not None:
            self._split = SplitSchedule(
                CapacitySplit.for_model(
                    config.num_layers,
                    config.num_experts,
                    config.top_k,
                    config.capacity,
                    config.predict.split,
                )
            )

    # --- submitting ---

    def submit(
        self, expert_ids, weights=None, schedule_batches: bool = True, seq_starts=None, hints=None
    ):
        """Takes one step: expert_ids int [num_layers, T, top_k] (weights float, same shape, or
        None; seq_starts bool [T], True where a token begins a sequence, or None: the step
        continues the stream; hints: an engine's predicted experts, see ``check_hints``).
        Returns each layer's ``ExpertBatches`` (when ``schedule_batches`` and weights are
        given), after buffering the routing; never waits on a layer actor."""
        ids, w = check_step(expert_ids, weights, self.config)
        starts = check_seq_starts(seq_starts, ids.shape[1])
        hinted = check_hints(hints, self.config, ids.shape[1])
        batches = None
        if schedule_batches and w is not None:
            batches = schedule_step(ids, w, self.config.num_experts)
        self.add_routing(ids, seq_starts=starts, hints=hinted)
        return batches

    def add_routing(
        self,
        ids: np.ndarray,
        steps: int = 1,
        close_window: bool = False,
        seq_starts: np.ndarray | None = None,
        hints: np.ndarray | None = None,
    ) -> None:
        """Buffers validated routing (ints [num_layers, T, top_k]) of ``steps`` submits and
        closes the window if due, or at once with ``close_window`` (a client that coalesced a
        whole window itself). seq_starts: validated bool [T] or None; hints: validated int32
        [num_layers, T, h] or None (see ``submit``)."""
        if self._window_opened is None:
            self._window_opened = self._timer()
        ids = ids.astype(self.config.ids_dtype(), copy=False)
        for layer in range(self.config.num_layers):
            self._buffer[layer].append(ids[layer])
        if self._predictive:  # only the predictor reads sequence boundaries
            self._starts.append(
                seq_starts if seq_starts is not None else np.zeros(ids.shape[1], dtype=bool)
            )
            self._hints.append((ids.shape[1], hints))
        if self._split is not None:
            self._split.observe(ids.transpose(1, 0, 2))
        self._steps_in_window += steps
        self._submits += steps
        if close_window or self._window_due():
            self.flush()
        self._collect(wait=False)

    def _window_due(self) -> bool:
        if self._steps_in_window >= self.config.window_steps:
            return True
        ms = self.config.window_ms
        return ms is not None and (self._timer() - self._window_opened) * 1e3 >= ms

    def flush(self) -> None:
        """Sends the open window: one call per layer actor, carrying each of its layers."""
        if self._steps_in_window == 0:
            return
        routing = {
            layer: np.ascontiguousarray(np.concatenate(parts))
            for layer, parts in self._buffer.items()
        }
        starts = hints = None
        if self._predictive:
            starts = np.concatenate(self._starts)
            starts = starts if starts.any() else None
            hints = join_hints(self._hints)
            self._starts, self._hints = [], []
        resplits = self._split.window(len(routing[0])) if self._split is not None else ()
        if self._predictive and self.config.warmup_tokens:
            self._keep_recent(routing, starts)
        for actor, layers in enumerate(self._groups):
            windows = []
            for layer in layers:
                self._sent_seq[layer] += 1
                previous = None
                if self._predictive and layer == layers[0] and layer > 0:
                    previous = routing[layer - 1]  # the actor's cross-layer predictor reads it
                window = LayerWindow(
                    layer=layer,
                    seq=self._sent_seq[layer],
                    expert_ids=routing[layer],
                    prefetch_budget=self._budgets[layer],
                    previous_layer_ids=previous,
                    seq_starts=starts,
                    hints=None if hints is None else hints[layer],
                    resplits=resplits,
                )
                self._buffer[layer] = []
                self._unacked[layer].append(window)
                windows.append(window)
            self._transport.send(actor, windows)
        self._steps_in_window = 0
        self._window_opened = None

    def _keep_recent(self, routing: dict[int, np.ndarray], starts: np.ndarray | None) -> None:
        """Keeps the window about to be sent (number ``_sent_seq + 1``) in ``_recent``, and
        drops the oldest windows while warmup_tokens tokens acknowledged by every layer remain
        (a restart relearns from tokens up to its last acknowledged window)."""
        self._recent.append((self._sent_seq[0] + 1, routing, starts))  # the windows' own arrays
        acked = min(state.seq for state in self._state.values())
        covered = sum(len(ids[0]) for seq, ids, _ in self._recent if seq <= acked)
        while self._recent[0][0] <= acked:
            first = len(self._recent[0][1][0])
            if covered - first < self.config.warmup_tokens:
                break
            self._recent.popleft()
            covered -= first

    def _warmup(self, layers: list[int]) -> Warmup | None:
        """The routing a restarted moeray actor hosting ``layers`` relearns from: its rows (the
        shadow layer's first) of the last warmup_tokens tokens up to its last acknowledged
        window; None without any."""
        acked = self._state[layers[0]].seq  # its layers advance together under moeray
        kept = [(ids, starts) for seq, ids, starts in self._recent if seq <= acked]
        if not self._predictive or not kept:
            return None
        rows = range(max(layers[0] - 1, 0), layers[-1] + 1)
        ids = np.concatenate(
            [np.stack([routing[layer] for layer in rows], axis=1) for routing, _ in kept]
        )[-self.config.warmup_tokens :]
        starts = None
        if any(s is not None for _, s in kept):
            starts = np.concatenate(
                [np.zeros(len(r[0]), dtype=bool) if s is None else s for r, s in kept]
            )[-self.config.warmup_tokens :]
        return Warmup(ids, starts)

    # --- acknowledgements and failures ---

    def sync(self) -> None:
        """Flushes and waits until every window sent so far is acknowledged."""
        self.flush()
        while self._transport.outstanding():
            self._collect(wait=True)

    def _collect(self, wait: bool) -> None:
        for actor, generation, result in self._transport.poll(wait):
            if generation != self._transport.generation(actor):
                continue  # a call to an actor already replaced
            if isinstance(result, BaseException):
                self._recover(actor)
            else:
                for ack in result or ():
                    self._on_ack(ack)

    def _on_ack(self, ack: LayerAck) -> None:
        window = self._unacked[ack.layer].popleft()
        assert window.seq == ack.seq == self._state[ack.layer].seq + 1, "acks arrive in order"
        self._state[ack.layer] = LayerState(
            ack.layer, ack.seq, ack.affinity_scores, ack.activation_counts
        )
        s = self._stats[ack.layer]
        s.add(ack)
        s.windows += 1
        s.tokens += len(window.expert_ids)
        if self._on_ack_hook is not None:
            self._on_ack_hook(ack)

    def _recover(self, actor: int) -> None:
        """Re-creates a failed layer actor, restores it and resends what it had not acked."""
        self._transport.recreate(actor)
        layers = self._groups[actor]
        self._transport.restore(
            actor, [self.layer_state(layer) for layer in layers], self._warmup(layers)
        )
        for layer in layers:
            self._stats[layer].restarts += 1
        resend = [w for layer in layers for w in self._unacked[layer]]
        if resend:
            self._transport.send(actor, sorted(resend, key=lambda w: (w.seq, w.layer)))

    def layer_state(self, layer: int) -> LayerState:
        """The coordinator's copy of ``layer`` as of its last acknowledged window."""
        return self._state[layer]

    # --- reading ---

    def stats(self, sync: bool = True) -> ServiceStats:
        """Per-layer statistics of acknowledged windows (after a sync, of everything submitted;
        with shards, a sync also waits for the layer actors' prefetches in flight and counts
        their bytes and a last resident reading)."""
        if sync:
            self.sync()
            if self.config.shards is not None:
                for layer, fields in self._transport.settle_shards().items():
                    self._stats[layer].add_shard(**fields)
        else:
            self._collect(wait=False)
        pending = sum(len(q) for q in self._unacked.values())
        layers = [LayerStats(**vars(self._stats[layer])) for layer in sorted(self._stats)]
        split = self._split
        return ServiceStats(
            layers=layers,
            submits=self._submits,
            pending_windows=pending,
            resplit_moved=split.moved if split else 0,
            capacity=split.capacity if split else self.config.capacity,
            capacity_max=split.capacity_max if split else self.config.capacity,
        )

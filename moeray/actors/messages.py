"""What the coordinator and the layer actors send each other, and the counters they keep.

Windows go out (``LayerWindow``: one layer's routing coalesced over a window, numbered per layer
from 1), acknowledgements come back (``LayerAck``: that window's ``Counters`` and the layer's
affinity after it); the coordinator keeps a copy of each layer (``LayerState``) to restart its
actor from, with recent routing (``Warmup``) for a policy that relearns, and a restarted
coordinator rebuilds itself from the ``LayerState`` each layer actor reports. A client's windows
are numbered by the client (its sequence numbers, from 1); one that skips ahead is refused with
``ClientGapError``. Every counter list is built from ``Counters``: an ack carries one,
``LayerStats`` sums them per layer, and ``ServiceStats.total`` sums the layers. Plain values,
numpy and the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from moeray.policy.windows import COUNTER_KEYS, PREDICTOR_COUNTER_KEYS

__all__ = [
    "PROTOCOL_VERSION",
    "ClientGapError",
    "Counters",
    "EngineUpdate",
    "LayerAck",
    "LayerState",
    "LayerStats",
    "LayerWindow",
    "PlacementStats",
    "ServiceStats",
    "Warmup",
    "WindowGapError",
]

# The version of the updates engine sessions understand (``EngineUpdate.protocol``): a session
# refuses an update from a newer protocol for that call and goes on with what it has.
PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class EngineUpdate:
    """What the coordinator computes from every engine's routing and sends each engine session
    (``moeray.engine``) when it changes. version: increasing, across coordinator restarts too
    (the restart count in the high 32 bits); protocol: the sender's ``PROTOCOL_VERSION``;
    capacity: hot experts per layer (a re-split) or None (unchanged); prefetch_budget: experts
    per layer per token (predictive policies) or None (unchanged); placement_version: the
    latest expert placement's version (0: none; ``ServiceHandle.placement`` fetches it)."""

    version: int
    protocol: int = PROTOCOL_VERSION
    capacity: tuple[int, ...] | None = None
    prefetch_budget: int | None = None
    placement_version: int = 0


# Counters kept as the largest reading rather than a sum.
_PEAKS = ("resident_bytes_max",)


@dataclass
class Counters:
    """Counts of one window, or sums over windows.

    Decisions (``moeray.policy.windows.COUNTER_KEYS``): hits; stalls (uses of an expert that was
    not hot: a demand cache's misses); evictions; prefetch_hits; prefetches; wasted_prefetches
    (prefetched, evicted before any use); resplit_evictions and resplit_transfers (a capacity
    re-split's evictions and later loads of those). Transfers are stalls + prefetches.
    Per predictor (``PREDICTOR_NAMES``, predictive policies): predictor_hits, _guesses, _uses
    (recall = hits / uses, precision = hits / guesses); empty tuples otherwise.
    With shards: bytes_moved (bytes populated), late_prefetches (experts used while their
    prefetch was in flight), cold_reads (experts read that nobody had asked for ahead) and
    resident_bytes_max (the largest resident-bytes reading, a peak, not a sum)."""

    hits: int = 0
    stalls: int = 0
    evictions: int = 0
    prefetch_hits: int = 0
    prefetches: int = 0
    wasted_prefetches: int = 0
    resplit_evictions: int = 0
    resplit_transfers: int = 0
    predictor_hits: tuple[int, ...] = ()
    predictor_guesses: tuple[int, ...] = ()
    predictor_uses: tuple[int, ...] = ()
    bytes_moved: int = 0
    late_prefetches: int = 0
    cold_reads: int = 0
    resident_bytes_max: int = 0

    def add(self, other: Counters) -> None:
        """Adds ``other``'s counts (element by element per predictor; the peak for peaks)."""
        for name in _COUNTER_NAMES:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name in PREDICTOR_COUNTER_KEYS:
                setattr(self, name, _add_counts(mine, theirs))
            elif name in _PEAKS:
                setattr(self, name, max(mine, theirs))
            else:
                setattr(self, name, mine + theirs)

    def counters(self) -> Counters:
        """A copy of the counters alone."""
        return Counters(**{name: getattr(self, name) for name in _COUNTER_NAMES})

    @property
    def transfers(self) -> int:
        return self.stalls + self.prefetches

    def hit_rate(self) -> float:
        total = self.hits + self.stalls
        return self.hits / total if total else 0.0


_COUNTER_NAMES = tuple(f.name for f in fields(Counters))
assert set(COUNTER_KEYS) | set(PREDICTOR_COUNTER_KEYS) <= set(_COUNTER_NAMES)


def _add_counts(mine: tuple[int, ...], theirs) -> tuple[int, ...]:
    """Per-predictor counts added element by element (an empty tuple: none yet)."""
    theirs = tuple(int(x) for x in theirs)
    if not mine or not theirs:
        return mine or theirs
    return tuple(a + b for a, b in zip(mine, theirs, strict=True))


@dataclass(frozen=True)
class LayerWindow:
    """One layer's routing over one window, tokens in order.

    number: this layer's window number, from 1. expert_ids: int [T, top_k].
    prefetch_budget: experts to prefetch (predictive policies: per token; demand: by affinity
    after the window; 0: none). previous_layer_ids: int [T, top_k], layer - 1's routing of the
    same tokens, on the first layer of an actor whose first layer is not 0, for a predictive
    policy (else None). seq_starts: bool [T], True where a token begins a sequence (None: the
    window continues one stream). hints: int [T, h], an engine's predicted experts of this layer
    per token, -1 for none (None: no hints). resplits: (token offset in the window, every
    layer's capacity from that token on) pairs in order, the first at offset 0 (the split in
    force when the window begins, so a restarted actor follows it too)."""

    layer: int
    number: int
    expert_ids: np.ndarray
    prefetch_budget: int = 0
    previous_layer_ids: np.ndarray | None = None
    seq_starts: np.ndarray | None = None
    hints: np.ndarray | None = None
    resplits: tuple[tuple[int, tuple[int, ...]], ...] = ()
    clients: tuple[tuple[str, int], ...] = ()
    steps: int = 0
    epoch: int = 0


@dataclass(frozen=True)
class LayerAck:
    """What applying one window did: that window's counters alone, and the layer's affinity
    after it (float64 / int64 [E]: a few hundred bytes, cheaper to send than for the
    coordinator to replay the window's routing into its own copy)."""

    layer: int
    number: int
    counters: Counters
    affinity_scores: np.ndarray
    activation_counts: np.ndarray


@dataclass(frozen=True)
class LayerState:
    """The coordinator's copy of a layer: enough to restart its actor.

    window: the number of the last window applied; affinity_scores float64 [E] and
    activation_counts int64 [E] after it. The hot set is not part of it: a restarted actor's
    memory is empty, as a real process's is (a policy that relearns gets ``Warmup``).

    What a restarted coordinator rebuilds itself from (each layer actor keeps it with its state
    and reports it, ``LayerCaches.adopt``): clients, each client's last sequence number in
    windows 1..window; totals, the layer's statistics over those windows (None: zeros);
    submits, the submits those windows held; epoch, the coordinator incarnation the actor
    answers to (windows of an older one are ignored); unrestored: the actor replaced one that
    died, found no report its predecessor saved (``LayerCaches(state_store=)``) and its restore
    never came (its coordinator died first): the layer's state is lost (a report only)."""

    layer: int
    window: int
    affinity_scores: np.ndarray
    activation_counts: np.ndarray
    clients: dict[str, int] = field(default_factory=dict)
    totals: LayerStats | None = None
    submits: int = 0
    epoch: int = 0
    unrestored: bool = False


@dataclass(frozen=True)
class Warmup:
    """Routing a restarted actor's policy relearns from: expert_ids int [T, rows, top_k], the
    last tokens up to its last acknowledged window, rows its layers with the one before them
    first (when its first layer is not 0); seq_starts bool [T] or None."""

    expert_ids: np.ndarray
    seq_starts: np.ndarray | None = None


class ClientGapError(RuntimeError):
    """A client's window skipped ahead of the windows the coordinator has from that client (the
    client resends from ``expected``: ``ServiceHandle`` does, from its journal)."""

    def __init__(self, client: str, expected: int, got: int):
        super().__init__(f"client {client}: expected window {expected}, got {got}")
        self.client, self.expected, self.got = client, expected, got

    def __reduce__(self):  # crosses Ray as itself
        return ClientGapError, (self.client, self.expected, self.got)


class WindowGapError(RuntimeError):
    """A window arrived out of order: the actor needs a restore and the missing windows."""

    def __init__(self, layer: int, expected: int, got: int):
        super().__init__(f"layer {layer}: expected window {expected}, got {got}")
        self.layer, self.expected, self.got = layer, expected, got


@dataclass
class LayerStats(Counters):
    """One layer's counters over its acknowledged windows, with how many windows and tokens
    those were, how often its actor was restarted and at which of its tokens each restart
    resumed (the new actor's first window starts there) (layer -1: the sum of every layer)."""

    layer: int = -1
    windows: int = 0
    tokens: int = 0
    restarts: int = 0
    restart_tokens: tuple[int, ...] = ()


@dataclass
class PlacementStats:
    """The service's expert placement so far (``ServiceConfig.expert_placement``).

    version: the latest published placement's (0: none yet); age_s: seconds since it was
    published (None: none yet; growing while load windows keep coming means a stalled
    balancer); latency_s: seconds from the routing that completed its load window reaching the
    coordinator until it was published (the worker's queue and planning); windows: load
    windows planned (``every_tokens`` routed tokens each); rebalances: placements published
    (the first, full one included); skipped: re-placements whose moves were all zero (the
    gate); errors: load windows whose planning raised (the last good placement stayed);
    last_error: the latest one's line. slots_moved: slots rewritten, summed over layers and
    rebalances (the first placement counts every slot); bytes_moved: that times the expert's
    bytes (None without ``expert_bytes``). forecast_balancedness: per layer, the forecast load
    on the placement in force after the latest load window; realised_balancedness: per layer,
    that window's own load on the placement that served it, split evenly over replicas (empty
    before the second load window)."""

    version: int = 0
    age_s: float | None = None
    latency_s: float | None = None
    windows: int = 0
    rebalances: int = 0
    skipped: int = 0
    errors: int = 0
    last_error: str | None = None
    slots_moved: int = 0
    bytes_moved: int | None = None
    forecast_balancedness: tuple[float, ...] = ()
    realised_balancedness: tuple[float, ...] = ()


@dataclass
class ServiceStats:
    layers: list[LayerStats] = field(default_factory=list)
    submits: int = 0
    pending_windows: int = 0
    coordinator_restarts: int = 0  # times the coordinator was re-created and rebuilt itself
    coordinator_cpu_s: float = 0.0  # CPU time of the coordinator's process so far
    # CPU time of the coordinator's thread inside its methods (submits, windows,
    # acknowledgements), less its blocking waits for layer actors, and without the Ray threads
    # that keep its process busy even while idle: the work that steps cause
    coordinator_method_cpu_s: float = 0.0
    # experts of capacity moved between layers so far (a re-split), each layer's capacity now
    # (the latest split sent; without a re-split, ServiceConfig.capacity) and its largest so far
    resplit_moved: int = 0
    capacity: tuple[int, ...] = ()
    capacity_max: tuple[int, ...] = ()
    # the expert placement (None: ServiceConfig.expert_placement is off)
    expert_placement: PlacementStats | None = None

    def total(self) -> LayerStats:
        """Every layer's counters summed; tokens are the service's (each token passes every
        layer), windows and restarts summed."""
        out = LayerStats(layer=-1)
        for s in self.layers:
            out.add(s)
            out.windows += s.windows
            out.restarts += s.restarts
        out.tokens = max((s.tokens for s in self.layers), default=0)
        return out

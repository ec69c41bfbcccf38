"""The service's re-placement, as a state machine fed routing in order: load windows of
``every_tokens`` routed tokens, a forecast updated once per load window, and a placement
re-planned from it (full the first time, then incremental under a migration budget).

``LoadBalancer.observe(expert_ids)`` cuts the routing into load windows at exact token
boundaries (so the decisions are a function of the routing alone, whatever the service's
windows); ``LoadBalancer.rebalance(counts)`` scores the placement that served the window
(realised balancedness, even split), updates the forecast, plans, and publishes a new version
unless every layer's moves are zero (the gate: a skipped rebalance). A planner that raises
leaves everything as it was: the last good placement stays. No threads and no clock here: the
coordinator runs it off its submit path (``moeray.actors.rebalancer``).

``encode_placement`` / ``decode_placement``: the msgpack map engines read (docs/user-guide.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import numpy as np

from moeray.placement.forecast import LoadForecast
from moeray.placement.placement import Placement, PlacementError, Topology, balancedness
from moeray.placement.planner import default_budget, place_moeray
from moeray.policy._validate import check_float, check_int

__all__ = [
    "LoadBalancer",
    "PlacementConfig",
    "Planner",
    "Rebalance",
    "decode_placement",
    "encode_placement",
]


@dataclass(frozen=True)
class PlacementConfig:
    """Expert placement kept by a service (``ServiceConfig.expert_placement``).

    gpus, nodes: the GPUs serving the model, spread evenly over nodes (gpus % nodes == 0);
    redundant: extra slots per layer for replicas (None: two per GPU plus what makes the
    slots divide over the GPUs, ``Topology.for_experts``); every_tokens: routed tokens per load
    window (one forecast update and one re-placement each); migration_budget: slot moves per
    layer per re-placement (None: a tenth of the slots, at least one); min_gain: the gate, a
    move must lower a layer's peak GPU load by this fraction, in [0, 1); expert_bytes: one
    expert's bytes (None: bytes moved are not counted); shared_budget: the memory of
    ``redundant`` slots per layer shared by all layers (``Topology.shared``: a grid of
    ``headroom`` more slots per GPU, None for room to double a layer's share), split by the
    balance each layer gains (``allocate_redundant``) at the first placement.
    """

    gpus: int
    nodes: int = 1
    redundant: int | None = None
    every_tokens: int = 4096
    migration_budget: int | None = None
    min_gain: float = 0.002
    expert_bytes: int | None = None
    shared_budget: bool = False
    headroom: int | None = None

    def __post_init__(self):
        check_int(self.gpus, "gpus", 1, 65_536)
        check_int(self.nodes, "nodes", 1, 65_536)
        if self.gpus % self.nodes:
            raise ValueError(f"nodes: {self.gpus} GPUs do not divide over {self.nodes} nodes")
        if self.redundant is not None:
            check_int(self.redundant, "redundant", 0, 2**20)
        check_int(self.every_tokens, "every_tokens", 1, 2**31 - 1)
        if self.migration_budget is not None:
            check_int(self.migration_budget, "migration_budget", 0, 2**31 - 1)
        if not 0.0 <= check_float(self.min_gain, "min_gain") < 1.0:
            raise ValueError(f"min_gain: expected a fraction in [0, 1), got {self.min_gain}")
        if self.expert_bytes is not None:
            check_int(self.expert_bytes, "expert_bytes", 1)
        if type(self.shared_budget) is not bool:
            raise ValueError(f"shared_budget: expected a bool, got {self.shared_budget!r}")
        if self.headroom is not None:
            check_int(self.headroom, "headroom", 0, 2**20)

    def topology(self, num_experts: int, num_layers: int = 1) -> Topology:
        """The slots for ``num_experts`` experts (and, with shared_budget, the budget of
        ``num_layers`` layers); PlacementError naming the field when the slots do not divide
        over the GPUs."""
        if self.shared_budget:
            return Topology.shared(
                num_experts,
                self.gpus,
                num_layers,
                self.nodes,
                self.redundant,
                self.headroom,
                self.expert_bytes,
            )
        return Topology.for_experts(
            num_experts, self.gpus, self.nodes, self.redundant, self.expert_bytes
        )

    def budget(self, topology: Topology) -> int:
        """Slot moves per layer per re-placement."""
        if self.migration_budget is None:
            return default_budget(topology)
        return self.migration_budget


@dataclass(frozen=True)
class Rebalance:
    """What one load window did to the placement.

    window: the load window's number, from 1; tokens: routed tokens observed up to its end.
    placement: the placement it published (its ``version`` one more than the last), or None
    (skipped by the gate, or an error); version: the version in force after it (0: none yet).
    moved_slots: int64 [layers], slots rewritten by the published placement (every slot for the
    first; zeros when nothing was published). forecast_balancedness: float64 [layers], the
    forecast load on the placement in force after it (None after an error).
    realised_balancedness: float64 [layers], the window's own load on the placement that served
    it, split evenly over replicas (None before the first placement). error: one line, or None.
    """

    window: int
    tokens: int
    placement: Placement | None
    version: int
    moved_slots: np.ndarray
    forecast_balancedness: np.ndarray | None
    realised_balancedness: np.ndarray | None
    error: str | None = None

    @property
    def skipped(self) -> bool:
        """Planned, and every move was zero: nothing new published."""
        return self.placement is None and self.error is None


Planner = Callable[..., tuple[Placement, np.ndarray]]


class LoadBalancer:
    """Load windows, forecast and versioned placements of one model (see the module doc).

    planner: ``place_moeray``'s signature (load, topology, current, migration_budget, min_gain)
    -> (placement, moved slots per layer); a test passes one that fails.
    """

    def __init__(
        self,
        config: PlacementConfig,
        num_layers: int,
        num_experts: int,
        planner: Planner = place_moeray,
    ):
        self.config = config
        self.num_layers = check_int(num_layers, "num_layers", 1, 4096)
        self.num_experts = check_int(num_experts, "num_experts", 1, 2**20)
        self.topology = config.topology(num_experts, self.num_layers)
        self.topology.check_holds(num_experts)
        self.budget = config.budget(self.topology)
        self._planner = planner
        self._pending = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._pending_tokens = 0
        self.tokens = 0  # routed tokens observed
        self.windows = 0  # load windows completed
        self.forecast: LoadForecast | None = None
        self.current: Placement | None = None  # the last published, its version the count

    def observe(self, expert_ids: np.ndarray) -> list[np.ndarray]:
        """expert_ids: int [num_layers, T, top_k], each in [0, num_experts) (checked routing),
        the next tokens in order. Returns the counts (int64 [layers, experts], routed tokens per
        expert) of each load window these tokens completed, in order."""
        if expert_ids.ndim != 3 or expert_ids.shape[0] != self.num_layers:
            raise PlacementError(
                f"expert_ids: expected shape [{self.num_layers}, T, top_k], got "
                f"{list(expert_ids.shape)}"
            )
        every = self.config.every_tokens
        done = []
        at, tokens = 0, expert_ids.shape[1]
        while at < tokens:
            take = min(tokens - at, every - self._pending_tokens)
            self._pending += self._counts(expert_ids[:, at : at + take])
            self._pending_tokens += take
            at += take
            if self._pending_tokens == every:
                done.append(self._pending)
                self._pending = np.zeros_like(self._pending)
                self._pending_tokens = 0
        self.tokens += tokens
        return done

    def _counts(self, expert_ids: np.ndarray) -> np.ndarray:
        layers, experts = self.num_layers, self.num_experts
        offsets = (np.arange(layers, dtype=np.int64) * experts)[:, None, None]
        flat = expert_ids.astype(np.int64) + offsets
        return np.bincount(flat.ravel(), minlength=layers * experts).reshape(layers, experts)

    def rebalance(self, counts) -> Rebalance:
        """One load window's counts [layers, experts]: realised balancedness of the placement
        that served it, the forecast updated, a re-placement (full the first time, then at most
        ``budget`` slot moves per layer), published unless every move is zero. When the forecast
        or the planner raises, nothing changes (the last good placement stays) and the result
        carries the error."""
        self.windows += 1
        zeros = np.zeros(self.num_layers, dtype=np.int64)
        current = self.current
        version = current.version if current is not None else 0
        realised = None
        try:
            if current is not None:
                realised = balancedness(current.gpu_loads(counts))
            if self.forecast is None:
                forecast = LoadForecast.start(counts)
            else:
                forecast = self.forecast.update(counts)
            placement, moved = self._planner(
                forecast.mean, self.topology, current, self.budget, self.config.min_gain
            )
            moved = np.asarray(moved, dtype=np.int64)
            score = balancedness(placement.gpu_loads(forecast.mean))
        except Exception as exc:  # keep the last good placement whatever the planner did
            lines = str(exc).splitlines()
            message = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
            return Rebalance(
                self.windows, self.tokens, None, version, zeros, None, realised, message
            )
        self.forecast = forecast
        if current is not None and not moved.any():
            score = balancedness(current.gpu_loads(forecast.mean))
            return Rebalance(self.windows, self.tokens, None, version, zeros, score, realised)
        self.current = placement.with_version(version + 1)
        return Rebalance(
            self.windows, self.tokens, self.current, version + 1, moved, score, realised
        )


def encode_placement(placement: Placement | None) -> bytes:
    """A placement as the msgpack map engines read: {"version": int, "physical_to_logical":
    [[int] * slots] * layers, "num_experts": int, "topology": {"num_nodes", "gpus_per_node",
    "slots_per_gpu", "gpu_memory_bytes", "expert_bytes"}} (the last two int or nil; a shared
    budget adds "redundant_budget", and -1 marks an empty slot); None as nil."""
    if placement is None:
        return msgpack.packb(None)
    return msgpack.packb(
        {
            "version": placement.version,
            "physical_to_logical": placement.physical_to_logical.tolist(),
            "num_experts": placement.num_experts,
            "topology": placement.topology.to_dict(),
        }
    )


def decode_placement(payload: bytes) -> Placement | None:
    """The placement of an ``encode_placement`` map (None for nil); PlacementError naming what
    is wrong."""
    try:
        fields = msgpack.unpackb(payload)
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise PlacementError(f"payload: not a msgpack map ({exc})") from None
    if fields is None:
        return None
    if not isinstance(fields, dict):
        raise PlacementError(f"payload: expected a map, got {type(fields).__name__}")
    missing = {"version", "physical_to_logical", "num_experts", "topology"} - set(fields)
    if missing:
        raise PlacementError(f"payload: missing {', '.join(sorted(missing))}")
    topology = fields["topology"]
    if not isinstance(topology, dict):
        raise PlacementError("topology: expected a map")
    try:
        topology = Topology(**topology)
    except TypeError as exc:
        raise PlacementError(f"topology: {exc}") from None
    table = np.asarray(fields["physical_to_logical"])
    return Placement(table, topology, fields["num_experts"], fields["version"])

"""moeray's placement: replicas where the forecast load is, spread so a dispatcher can move load
between GPUs, and re-placed by the few slot moves that lower the peak GPU the most.

- ``place_static``: slot s holds expert s mod num_experts (what an engine starts from).
- ``place_moeray(load, topology)``: a full placement: each extra slot to the expert with the
  largest load per copy, then heaviest replica first onto the least loaded GPU with room that does
  not already hold that expert (``_pack`` with labels), so every hot expert spans GPUs.
- ``place_moeray(load, topology, current=..., migration_budget=...)``: incremental: from the
  current placement, greedy slot rewrites and cross-GPU swaps, the one that removes the most peak
  GPU load per slot moved first (a copy from another node counts ``node_cost`` slots), until the
  budget is spent or the best move gains less than ``min_gain`` of the peak (the gate: a window
  whose forecast barely moved costs no traffic at all).
"""

from __future__ import annotations

import numpy as np

from moeray.native import backend
from moeray.placement.eplb import check_load
from moeray.placement.placement import Placement, PlacementError, Topology
from moeray.policy._validate import check_int

__all__ = ["budget_slots", "default_budget", "place_moeray", "place_static"]


def place_static(topology: Topology, num_layers: int, num_experts: int) -> Placement:
    """Round robin: slot s of every layer holds expert s % num_experts."""
    num_layers = check_int(num_layers, "num_layers", 1, 4096)
    topology.check_holds(num_experts)
    row = np.arange(topology.num_slots, dtype=np.int32) % num_experts
    return Placement(np.tile(row, (num_layers, 1)), topology, num_experts)


def default_budget(topology: Topology) -> int:
    """The migration budget when none is given: a tenth of a layer's slots (at least one)."""
    return max(1, topology.num_slots // 10)


def budget_slots(migration_budget: int | None, topology: Topology, unit: str = "slots") -> int:
    """A migration budget in slot moves per layer: ``unit`` "slots", or "bytes" (needs the
    topology's expert_bytes); None is unbounded (every slot)."""
    if migration_budget is None:
        return topology.num_slots
    if unit == "slots":
        return check_int(migration_budget, "migration_budget", 0, 2**31 - 1)
    if unit != "bytes":
        raise PlacementError(f"unit: expected 'slots' or 'bytes', got {unit!r}")
    if topology.expert_bytes is None:
        raise PlacementError("migration_budget: a budget in bytes needs the expert's bytes")
    return check_int(migration_budget, "migration_budget", 0) // topology.expert_bytes


def place_moeray(
    load,
    topology: Topology,
    current: Placement | None = None,
    migration_budget: int | None = None,
    min_gain: float = 0.002,
    node_cost: float = 2.0,
    candidates: int = 8,
) -> tuple[Placement, np.ndarray]:
    """moeray's placement for ``load`` (float [layers, experts], finite, >= 0: a forecast).

    Without ``current``: a full placement. With it: at most ``migration_budget`` slot moves per
    layer from ``current`` (None: unbounded). Returns the placement and int32 [layers], the slots
    of each layer that differ from ``current`` (the copies to make; all slots for a full one).
    """
    load = check_load(load, "load")
    layers, num_experts = load.shape
    topology.check_holds(num_experts)
    if not 0 <= min_gain < 1:
        raise PlacementError(f"min_gain: expected a fraction in [0, 1), got {min_gain}")
    if current is None:
        table = _full(load, topology)
        moved = np.full(layers, topology.num_slots, dtype=np.int32)
        return Placement(table, topology, num_experts), moved
    if current.physical_to_logical.shape != (layers, topology.num_slots):
        raise PlacementError(
            f"current: expected a placement of {layers} layers x {topology.num_slots} slots, "
            f"got {list(current.physical_to_logical.shape)}"
        )
    if current.num_experts != num_experts:
        raise PlacementError(
            f"current: places {current.num_experts} experts, the load has {num_experts}"
        )
    budget = budget_slots(migration_budget, topology)
    table = np.array(current.physical_to_logical, dtype=np.int32)
    backend._improve(
        table,
        np.ascontiguousarray(load),
        topology.num_gpus,
        topology.gpus_per_node,
        budget,
        candidates,
        min_gain,
        node_cost,
    )
    placement = Placement(table, topology, num_experts)
    # the kernel's count is moves made; a slot rewritten twice is copied once
    return placement, placement.moved_slots(current).astype(np.int32)


def _full(load: np.ndarray, topology: Topology) -> np.ndarray:
    layers, num_experts = load.shape
    weight = np.ascontiguousarray(load, dtype=np.float32)
    experts, _, counts = backend._replicate(weight, topology.num_slots)
    share = np.take_along_axis(weight / counts.astype(np.float32), experts, -1)
    gpu, rank = backend._pack(
        np.ascontiguousarray(share, dtype=np.float32), topology.num_gpus, experts
    )
    table = np.empty_like(experts)
    rows = np.arange(layers)[:, None]
    table[rows, gpu * topology.slots_per_gpu + rank] = experts
    # Greedy packing leaves a peak that a few swaps lower: polish, as an incremental step would.
    backend._improve(
        table,
        np.ascontiguousarray(load),
        topology.num_gpus,
        topology.gpus_per_node,
        topology.num_slots // 4,
        8,
        0.002,
        1.0,
    )
    return table

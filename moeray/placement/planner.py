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
- ``allocate_redundant(load, topology, budget)``: a shared budget's split: each layer's redundant
  slots, given by the bound on its peak GPU load that falls most per slot (greedy over each
  layer's concave hull, so a step that needs several slots, tied experts, is weighed per slot).
  ``place_moeray`` uses it for a full placement on a topology with a ``redundant_budget``;
  an incremental one keeps each layer's count (its moves fill an empty slot only by emptying
  another).
"""

from __future__ import annotations

import numpy as np

from moeray.native import backend
from moeray.placement.eplb import check_load
from moeray.placement.placement import Placement, PlacementError, Topology
from moeray.policy._validate import check_int

__all__ = [
    "allocate_redundant",
    "budget_slots",
    "default_budget",
    "place_moeray",
    "place_static",
]


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
        if topology.redundant_budget is None:
            table = _full(load, topology)
        else:
            table = _full(load, topology, allocate_redundant(load, topology))
        moved = (table >= 0).sum(axis=1).astype(np.int32)
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


def allocate_redundant(load, topology: Topology, budget: int | None = None) -> np.ndarray:
    """int64 [layers]: the redundant slots (beyond one per expert) of each layer of ``load``
    (float [layers, experts], finite, >= 0), summing to at most ``budget`` (None: the topology's
    ``redundant_budget``), each at most the layer's grid (``num_slots - experts``).

    Each layer's peak GPU load is bounded by mean + (1 - 1/G) x the largest load per copy (what
    packing heaviest first onto the least loaded GPU guarantees); with r replicas made as EPLB
    makes them (to the largest load per copy), the bound's balancedness, mean / bound, rises
    with r. Slots go to the layer whose balancedness rises most per slot: each layer's gains as
    the segments of its concave hull, taken steepest first, whole (a step of tied experts gains
    only once each has its replica), then the budget's rest to the steepest that did not fit;
    a layer whose bound no slot lowers takes none, so the budget may be left unspent. Numpy,
    plus one ``_replicate`` call.
    """
    load = check_load(load, "load")
    layers, num_experts = load.shape
    topology.check_holds(num_experts)
    if budget is None:
        budget = topology.redundant_budget
        if budget is None:
            raise PlacementError(
                "budget: expected a redundant-slot budget (the topology has no redundant_budget)"
            )
    budget = check_int(budget, "budget", 0, 2**40)
    cap = min(topology.num_slots - num_experts, budget)
    out = np.zeros(layers, dtype=np.int64)
    if cap == 0:
        return out
    weight = np.ascontiguousarray(load, dtype=np.float32)
    # slot num_experts + r is the (r + 1)-th replica: its expert's load per copy before it was
    # made is the largest after r replicas
    experts, rank, _ = backend._replicate(weight, num_experts + cap + 1)
    tail = slice(num_experts, num_experts + cap + 1)
    largest = np.take_along_axis(load, experts[:, tail], 1) / rank[:, tail]
    gpus = topology.num_gpus
    mean = load.sum(axis=1, keepdims=True) / gpus
    bound = mean + (1.0 - 1.0 / gpus) * largest
    value = np.divide(mean, bound, out=np.ones_like(bound), where=bound > 0)
    segments = []  # (-slope, layer, start, length)
    for layer in range(layers):
        for start, length, slope in _hull(value[layer]):
            if slope > 0:
                segments.append((-slope, layer, start, length))
    segments.sort()
    # whole segments first (a step of tied experts gains only once all its slots are given),
    # then what is left to the first segment that did not fit, part of it
    left = budget
    for whole in (True, False):
        for _, layer, start, length in segments:
            if left == 0:
                return out
            if out[layer] != start or (whole and length > left):
                continue  # not this layer's next segment, or too long for now
            take = min(length, left)
            out[layer] += take
            left -= take
    return out


def _hull(values: np.ndarray) -> list[tuple[int, int, float]]:
    """The upper concave hull of (r, values[r]) from r = 0: (start, length, slope) segments."""
    values = values.tolist()  # Python floats: numpy scalars one at a time are slow
    points: list[int] = []
    for r in range(len(values)):
        while len(points) >= 2:
            a, b = points[-2], points[-1]
            # b lies on or under the chord a -> r: drop it
            if (values[b] - values[a]) * (r - a) <= (values[r] - values[a]) * (b - a):
                points.pop()
            else:
                break
        points.append(r)
    return [(a, b - a, (values[b] - values[a]) / (b - a)) for a, b in zip(points, points[1:])]


def _full(load: np.ndarray, topology: Topology, redundant: np.ndarray | None = None) -> np.ndarray:
    """A full placement's table; ``redundant`` (int [layers]): each layer's redundant slots under
    a shared budget, the rest of its grid left empty (-1); None: every slot filled."""
    layers, num_experts = load.shape
    weight = np.ascontiguousarray(load, dtype=np.float32)
    num_slots = topology.num_slots
    if redundant is None:
        table = _packed(weight, topology, num_slots)
    else:
        table = np.empty((layers, num_slots), dtype=np.int32)
        for extra in np.unique(redundant):  # layers of one count share a kernel call
            rows = np.flatnonzero(redundant == extra)
            table[rows] = _packed(weight[rows], topology, num_experts + int(extra))
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


def _packed(weight: np.ndarray, topology: Topology, filled: int) -> np.ndarray:
    """``filled`` replicas of each row of weight (float32 [X, experts]) packed onto the
    topology's grid, heaviest first, one expert's replicas on different GPUs where room allows;
    slots beyond ``filled`` are empty (-1): zero-weight items packed last."""
    rows, num_experts = weight.shape
    gpus = topology.num_gpus
    # each GPU gets at most ceil(filled / gpus) replicas, so the filled slots spread over the
    # GPUs (each gives dispatch choices); the rest of each GPU's slots stay empty
    num_slots = gpus * -(-filled // gpus)
    experts, _, counts = backend._replicate(weight, filled)
    share = np.take_along_axis(weight / counts.astype(np.float32), experts, -1)
    items = labels = experts
    empty = num_slots - filled
    if empty:  # zero-weight items, each its own label, hold the empty slots
        items = np.concatenate([experts, np.full((rows, empty), -1, dtype=np.int32)], axis=1)
        share = np.concatenate([share, np.zeros((rows, empty), dtype=np.float32)], axis=1)
        labels = items.copy()
        labels[:, filled:] = num_experts + np.arange(empty, dtype=np.int32)
    gpu, rank = backend._pack(np.ascontiguousarray(share, dtype=np.float32), gpus, labels)
    if num_slots == topology.num_slots:
        table = np.empty_like(items)
    else:
        table = np.full((rows, topology.num_slots), -1, dtype=np.int32)
    table[np.arange(rows)[:, None], gpu * topology.slots_per_gpu + rank] = items
    return table

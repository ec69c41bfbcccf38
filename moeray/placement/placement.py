"""The placement value: which slot of which GPU of which node holds each expert of each layer.

A ``Topology`` fixes the slots: ``num_nodes`` nodes of ``gpus_per_node`` GPUs, each GPU with
``slots_per_gpu`` expert slots per layer (GPU g = slot // slots_per_gpu, node = g // gpus_per_node).
A ``Placement`` fills every slot of every layer with one expert: ``physical_to_logical`` int32
[layers, slots]; every expert holds at least one slot, hot experts hold extra slots (replicas).
Both are frozen and validated when built; the arrays of a ``Placement`` are read-only.

A shared budget (``Topology.redundant_budget``): the slot grid is the most a layer may hold, and
the redundant slots filled over all layers (slots beyond one per expert) are at most the budget;
a slot left empty is -1, so layers hold different replica counts (``planner.allocate_redundant``
splits the budget by the balance each layer gains).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from moeray.policy._validate import check_int

__all__ = ["Placement", "PlacementError", "Topology", "balancedness"]

_MAX_SLOTS = 2**20  # bounds every [layers, slots] array before it is allocated
_MAX_LAYERS = 4096
_MAX_EXPERTS = 2**20


class PlacementError(ValueError):
    """A topology, load or map that cannot be placed; the message names the field."""


@dataclass(frozen=True)
class Topology:
    """num_nodes nodes x gpus_per_node GPUs x slots_per_gpu expert slots per layer.

    gpu_memory_bytes (optional): bytes each GPU gives to one layer's expert slots;
    expert_bytes (optional): bytes of one expert's weights (what a slot move transfers);
    redundant_budget (optional): a shared budget, the redundant slots (beyond one per expert)
    a placement fills over all its layers; its slots may then be empty (-1). None: every slot
    of every layer holds an expert (each layer's own fixed budget).
    """

    num_nodes: int
    gpus_per_node: int
    slots_per_gpu: int
    gpu_memory_bytes: int | None = None
    expert_bytes: int | None = None
    redundant_budget: int | None = None

    def __post_init__(self):
        check_int(self.num_nodes, "num_nodes", 1, 65_536)
        check_int(self.gpus_per_node, "gpus_per_node", 1, 65_536)
        check_int(self.slots_per_gpu, "slots_per_gpu", 1, _MAX_SLOTS)
        if self.num_slots > _MAX_SLOTS:
            raise PlacementError(
                f"slots: {self.num_gpus} GPUs x {self.slots_per_gpu} slots is {self.num_slots}, "
                f"more than the {_MAX_SLOTS} a placement holds"
            )
        if self.expert_bytes is not None:
            check_int(self.expert_bytes, "expert_bytes", 1)
        if self.redundant_budget is not None:
            check_int(self.redundant_budget, "redundant_budget", 0, _MAX_LAYERS * _MAX_SLOTS)
        if self.gpu_memory_bytes is not None:
            check_int(self.gpu_memory_bytes, "gpu_memory_bytes", 1)
            if self.expert_bytes is None:
                raise PlacementError("gpu_memory_bytes: needs expert_bytes to size the slots")
            if self.slots_per_gpu * self.expert_bytes > self.gpu_memory_bytes:
                raise PlacementError(
                    f"gpu_memory_bytes: {self.slots_per_gpu} slots of {self.expert_bytes} bytes "
                    f"need {self.slots_per_gpu * self.expert_bytes} bytes per GPU, the budget is "
                    f"{self.gpu_memory_bytes}"
                )

    @classmethod
    def for_experts(
        cls,
        num_experts: int,
        gpus: int,
        nodes: int = 1,
        redundant: int | None = None,
        expert_bytes: int | None = None,
        gpu_memory_bytes: int | None = None,
        redundant_budget: int | None = None,
    ) -> Topology:
        """The topology of ``num_experts + redundant`` slots spread evenly over ``gpus`` GPUs;
        redundant None: two extra slots per GPU, plus what makes the slots divide over the GPUs.

        Raises PlacementError naming the field when the GPUs do not divide over the nodes, the
        slots do not divide over the GPUs, or the slots cannot hold every expert once.
        """
        num_experts = check_int(num_experts, "num_experts", 1, _MAX_EXPERTS)
        gpus = check_int(gpus, "gpus", 1, 65_536)
        nodes = check_int(nodes, "nodes", 1, 65_536)
        if redundant is None:
            redundant = 2 * gpus + (-num_experts) % gpus
        redundant = check_int(redundant, "redundant", 0, _MAX_SLOTS)
        if gpus % nodes:
            raise PlacementError(f"gpus: {gpus} GPUs do not divide over {nodes} nodes")
        slots = num_experts + redundant
        if slots % gpus:
            raise PlacementError(
                f"redundant: {num_experts} experts + {redundant} redundant = {slots} slots do not "
                f"divide over {gpus} GPUs (choose redundant so that the sum is a multiple of {gpus})"
            )
        return cls(
            nodes, gpus // nodes, slots // gpus, gpu_memory_bytes, expert_bytes, redundant_budget
        )

    @classmethod
    def shared(
        cls,
        num_experts: int,
        gpus: int,
        num_layers: int,
        nodes: int = 1,
        redundant: int | None = None,
        headroom: int | None = None,
        expert_bytes: int | None = None,
    ) -> Topology:
        """The memory of ``redundant`` extra slots per layer (as ``for_experts``) over
        ``num_layers`` layers, shared: ``redundant_budget = num_layers * redundant``, and a grid
        of ``headroom`` more slots per GPU (None: enough for twice ``redundant`` per layer) so
        that a layer may hold more than its even share."""
        fixed = cls.for_experts(num_experts, gpus, nodes, redundant, expert_bytes)
        num_layers = check_int(num_layers, "num_layers", 1, _MAX_LAYERS)
        extra = fixed.num_slots - num_experts
        if headroom is None:
            headroom = -(-extra // fixed.num_gpus)
        headroom = check_int(headroom, "headroom", 0, _MAX_SLOTS)
        return cls(
            fixed.num_nodes,
            fixed.gpus_per_node,
            fixed.slots_per_gpu + headroom,
            None,
            expert_bytes,
            num_layers * extra,
        )

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def num_slots(self) -> int:
        return self.num_gpus * self.slots_per_gpu

    @property
    def slot_gpu(self) -> np.ndarray:
        """int32 [slots]: the GPU of each slot."""
        return np.arange(self.num_slots, dtype=np.int32) // self.slots_per_gpu

    @property
    def slot_node(self) -> np.ndarray:
        """int32 [slots]: the node of each slot."""
        return self.slot_gpu // self.gpus_per_node

    def check_holds(self, num_experts: int) -> None:
        """PlacementError unless every one of ``num_experts`` experts can hold a slot."""
        if self.num_slots < num_experts:
            raise PlacementError(
                f"slots: {self.num_slots} slots ({self.num_gpus} GPUs x {self.slots_per_gpu}) "
                f"cannot hold {num_experts} experts once each"
            )

    def to_dict(self) -> dict:
        """The fields as a dict; redundant_budget only when set (a fixed budget's dict, and
        the msgpack map engines read, stay as they were)."""
        out = {
            "num_nodes": self.num_nodes,
            "gpus_per_node": self.gpus_per_node,
            "slots_per_gpu": self.slots_per_gpu,
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "expert_bytes": self.expert_bytes,
        }
        if self.redundant_budget is not None:
            out["redundant_budget"] = self.redundant_budget
        return out


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)  # arrays: compare physical_to_logical, not values
class Placement:
    """Every layer's experts on the topology's slots.

    physical_to_logical: int32 [layers, slots], the expert each slot holds; every expert in
      [0, num_experts) holds at least one slot of every layer. Under a shared budget
      (``topology.redundant_budget``) a slot may be empty (-1), and the slots filled beyond one
      per expert, over all layers, are at most the budget.
    Derived: ``replica_counts`` int32 [layers, experts] (slots per expert, when built) and
    ``logical_to_physical`` int32 [layers, experts, max_replicas], each expert's slots in
    ascending order, padded with -1 (on first use).
    version: a number the publisher raises with every new placement (0 for a computed one).
    """

    physical_to_logical: np.ndarray
    topology: Topology
    num_experts: int
    version: int = 0
    replica_counts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        check_int(self.num_experts, "num_experts", 1, _MAX_EXPERTS)
        check_int(self.version, "version", 0)
        self.topology.check_holds(self.num_experts)
        table = self.physical_to_logical
        if not isinstance(table, np.ndarray) or table.dtype.kind not in "iu":
            raise PlacementError("physical_to_logical: expected an integer numpy array")
        if table.ndim != 2 or table.shape[1] != self.topology.num_slots:
            raise PlacementError(
                f"physical_to_logical: expected shape [layers, {self.topology.num_slots}] "
                f"(the topology's slots), got {list(table.shape)}"
            )
        if not 1 <= table.shape[0] <= _MAX_LAYERS:
            raise PlacementError(
                f"physical_to_logical: expected 1 to {_MAX_LAYERS} layers, got {table.shape[0]}"
            )
        shared = self.topology.redundant_budget is not None
        lowest = -1 if shared else 0
        if table.min() < lowest or table.max() >= self.num_experts:
            bad = table[(table < lowest) | (table >= self.num_experts)].flat[0]
            empty = " (-1, empty, only under a shared redundant_budget)" if bad == -1 else ""
            raise PlacementError(
                f"physical_to_logical: every slot must hold an expert in "
                f"[0, {self.num_experts}), got {int(bad)}{empty}"
            )
        table = np.array(table, dtype=np.int32, order="C")
        layers, num_slots = table.shape
        rows = np.arange(layers)[:, None]
        keys = table + rows * self.num_experts
        empty = shared and bool((table < 0).any())
        if empty:  # only a shared budget's placement pays for the mask
            keys = keys[table >= 0]
        counts = (
            np.bincount(keys.ravel(), minlength=layers * self.num_experts)
            .reshape(layers, self.num_experts)
            .astype(np.int32)
        )
        if (counts == 0).any():
            layer, expert = np.argwhere(counts == 0)[0]
            raise PlacementError(
                f"physical_to_logical: expert {expert} holds no slot in layer {layer} (every "
                "expert needs at least one)"
            )
        if shared:
            used = int(counts.sum()) - layers * self.num_experts
            if used > self.topology.redundant_budget:
                raise PlacementError(
                    f"physical_to_logical: {used} redundant slots filled over {layers} layers, "
                    f"more than the topology's redundant_budget of "
                    f"{self.topology.redundant_budget}"
                )
        object.__setattr__(self, "physical_to_logical", _frozen(table))
        object.__setattr__(self, "replica_counts", _frozen(counts))

    @functools.cached_property
    def logical_to_physical(self) -> np.ndarray:
        """int32 [layers, experts, max_replicas]: each expert's slots in ascending order, padded
        with -1 (built on first use: the planner's hot path never needs it)."""
        table, counts = self.physical_to_logical, self.replica_counts
        layers, num_slots = table.shape
        width = int(counts.max())
        if layers * self.num_experts * width > 64 * table.size + 2**24:  # bounded before allocating
            raise PlacementError(
                f"physical_to_logical: one expert holds {width} slots of a layer, so the inverse "
                f"map would need {layers * self.num_experts * width:,} entries"
            )
        # a stable sort of each row by expert (empty slots last), then each slot's rank among
        # its expert's slots
        keyed = np.where(table >= 0, table, self.num_experts)
        order = np.argsort(keyed, axis=1, kind="stable")
        experts = np.take_along_axis(keyed, order, axis=1)
        starts = np.cumsum(counts, axis=1) - counts
        starts = np.concatenate([starts, np.full((layers, 1), num_slots)], axis=1)
        rank = np.arange(num_slots)[None, :] - np.take_along_axis(starts, experts, axis=1)
        held = experts < self.num_experts
        inverse = np.full((layers, self.num_experts, width), -1, dtype=np.int32)
        rows = np.broadcast_to(np.arange(layers)[:, None], table.shape)
        inverse[rows[held], experts[held], rank[held]] = order[held]
        return _frozen(inverse)

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_slots(self) -> int:
        return self.topology.num_slots

    @property
    def redundant(self) -> np.ndarray:
        """int64 [layers]: the slots each layer fills beyond one per expert (its replicas)."""
        return (self.physical_to_logical >= 0).sum(axis=1) - self.num_experts

    def filled(self) -> Placement:
        """This placement with no empty slot, for engines whose map has one expert in every
        slot of every layer (SGLang, TensorRT-LLM): an empty slot of GPU g takes the lowest
        expert whose every replica is on g (dispatch and an even split then give every GPU the
        load it had), else the expert on g with the fewest replicas, else (g holds none) the
        layer's expert with the most. The engine then holds the full grid in every layer: the
        memory a shared budget saves is saved only by an engine that sizes layers apart.
        Returns ``self`` when no slot is empty; the result's topology has no redundant_budget."""
        table = self.physical_to_logical
        topology = self.topology
        fixed = Topology(
            topology.num_nodes,
            topology.gpus_per_node,
            topology.slots_per_gpu,
            topology.gpu_memory_bytes,
            topology.expert_bytes,
        )
        if (table >= 0).all():
            return (
                self
                if topology.redundant_budget is None
                else Placement(table, fixed, self.num_experts, self.version)
            )
        out = np.array(table)
        width = topology.slots_per_gpu
        for layer, gpu in {(int(l), int(s) // width) for l, s in np.argwhere(table < 0)}:
            counts = self.replica_counts[layer]
            own = out[layer, gpu * width : (gpu + 1) * width]
            held = np.unique(own[own >= 0])
            local = [e for e in held if (own == e).sum() == counts[e]]
            if local:
                filler = int(local[0])
            elif len(held):
                filler = int(held[np.argmin(counts[held])])
            else:
                filler = int(np.argmax(counts))
            own[own < 0] = filler
        return Placement(out, fixed, self.num_experts, self.version)

    def with_version(self, version: int) -> Placement:
        return Placement(self.physical_to_logical, self.topology, self.num_experts, version)

    def gpu_loads(self, load: np.ndarray) -> np.ndarray:
        """float64 [layers, gpus]: each GPU's load when each expert's load ([layers, experts])
        is split evenly over its replicas (what engines without a dispatcher do)."""
        load = np.asarray(load, dtype=np.float64)
        if load.shape != (self.num_layers, self.num_experts):
            raise PlacementError(
                f"load: expected shape [{self.num_layers}, {self.num_experts}], got "
                f"{list(load.shape)}"
            )
        rows = np.arange(self.num_layers)[:, None]
        table = self.physical_to_logical
        held = np.maximum(table, 0)  # an empty slot carries nothing
        share = np.where(table >= 0, load[rows, held] / self.replica_counts[rows, held], 0.0)
        topology = self.topology
        return share.reshape(self.num_layers, topology.num_gpus, topology.slots_per_gpu).sum(-1)

    def moved_slots(self, previous: Placement) -> np.ndarray:
        """int64 [layers]: slots that hold an expert other than ``previous``'s (the weights to
        copy; a slot left empty copies nothing)."""
        if previous.physical_to_logical.shape != self.physical_to_logical.shape:
            raise PlacementError(
                "previous: expected a placement of the same layers and slots, got shape "
                f"{list(previous.physical_to_logical.shape)}"
            )
        table = self.physical_to_logical
        differ = previous.physical_to_logical != table
        if self.topology.redundant_budget is not None:
            differ &= table >= 0
        return differ.sum(axis=1)


def balancedness(gpu_loads: np.ndarray) -> np.ndarray:
    """float64 [...]: mean GPU load / max GPU load over the last axis (1.0 for no load)."""
    gpu_loads = np.asarray(gpu_loads, dtype=np.float64)
    peak = gpu_loads.max(axis=-1)
    safe = np.where(peak > 0, peak, 1.0)
    return np.where(peak > 0, gpu_loads.mean(axis=-1) / safe, 1.0)

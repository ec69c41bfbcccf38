"""The published EPLB method (DeepSeek's expert-parallelism load balancer), the baseline that
moeray's placement is measured against, written from its description.

Hierarchical, when the expert groups divide over the nodes: pack groups of experts onto nodes
(balanced packing of group loads), replicate within each node (each extra slot to the expert with
the largest load per copy), pack each node's replicas onto its GPUs (heaviest first onto the least
loaded GPU with room). Global otherwise: one group, one node. Arithmetic in float32 and the tie
rules (first index, stable order) follow the published code, so its maps are reproduced exactly
when no two loads tie.
"""

from __future__ import annotations

import numpy as np

from moeray.native import backend
from moeray.placement.placement import Placement, PlacementError, Topology
from moeray.policy._validate import check_int

__all__ = ["check_load", "rebalance_eplb"]


def check_load(load, name: str = "weight") -> np.ndarray:
    """load: [layers, experts] counts or rates, finite and >= 0, as float64; else PlacementError."""
    try:
        load = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlacementError(f"{name}: expected a numeric [layers, experts] array") from None
    if load.ndim != 2 or 0 in load.shape:
        raise PlacementError(
            f"{name}: expected a non-empty [layers, experts] array, got {list(load.shape)}"
        )
    if not np.isfinite(load).all():
        raise PlacementError(f"{name}: every load must be finite (found NaN or inf)")
    if (load < 0).any():
        raise PlacementError(f"{name}: every load must be >= 0, got {load.min()}")
    return load


def _inverse(permutation: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(permutation)
    rows = np.arange(permutation.shape[0])[:, None]
    inverse[rows, permutation] = np.arange(permutation.shape[1])
    return inverse


def _hierarchical(weight, num_slots, num_groups, num_nodes, num_gpus) -> np.ndarray:
    layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_slots // num_gpus
    # 1. groups to nodes
    group_load = weight.reshape(layers, num_groups, group_size).sum(-1, dtype=np.float32)
    group_pack, group_rank = backend._pack(np.ascontiguousarray(group_load), num_nodes)
    to_node_order = (
        ((group_pack * groups_per_node + group_rank) * group_size)[..., None]
        + np.arange(group_size)
    ).reshape(layers, num_experts)
    from_node_order = _inverse(to_node_order)
    # 2. replicas within each node
    per_node = np.take_along_axis(weight, from_node_order, -1).reshape(-1, num_experts // num_nodes)
    node_slots, slot_rank, node_counts = backend._replicate(
        np.ascontiguousarray(per_node), num_slots // num_nodes
    )
    # 3. each node's replicas onto its GPUs
    share = np.take_along_axis(per_node / node_counts.astype(np.float32), node_slots, -1)
    gpu, rank = backend._pack(np.ascontiguousarray(share, dtype=np.float32), num_gpus // num_nodes)
    order = _inverse(gpu.astype(np.int64) * slots_per_gpu + rank)
    placed = np.take_along_axis(node_slots, order, -1).reshape(layers, num_nodes, -1)
    placed = placed + (np.arange(num_nodes) * (num_experts // num_nodes))[None, :, None]
    return np.take_along_axis(from_node_order, placed.reshape(layers, -1), -1)


def rebalance_eplb(
    weight,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    expert_bytes: int | None = None,
) -> Placement:
    """The published EPLB placement, as a ``Placement``.

    weight: [layers, num_experts] load per expert (counts or rates, finite, >= 0);
    num_replicas: slots per layer, a multiple of num_gpus and >= num_experts;
    num_groups: expert groups (divides num_experts); num_nodes: nodes (divides num_gpus).
    Hierarchical when num_groups divides over num_nodes, global otherwise. The result's
    ``physical_to_logical`` and ``replica_counts`` are the published method's.
    """
    weight = check_load(weight)
    layers, num_experts = weight.shape
    num_gpus = check_int(num_gpus, "num_gpus", 1, 65_536)
    num_nodes = check_int(num_nodes, "num_nodes", 1, 65_536)
    num_groups = check_int(num_groups, "num_groups", 1, num_experts)
    num_replicas = check_int(num_replicas, "num_replicas", 1, 2**20)
    if num_experts % num_groups:
        raise PlacementError(
            f"num_groups: {num_experts} experts do not divide into {num_groups} groups"
        )
    topology = Topology.for_experts(
        num_experts,
        num_gpus,
        num_nodes,
        num_replicas - num_experts if num_replicas >= num_experts else 0,
        expert_bytes,
    )
    topology.check_holds(num_experts)
    if topology.num_slots != num_replicas:
        raise PlacementError(
            f"num_replicas: {num_replicas} slots are fewer than {num_experts} experts"
        )
    if num_groups % num_nodes == 0:
        table = _hierarchical(
            weight.astype(np.float32), num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        table = _hierarchical(weight.astype(np.float32), num_replicas, 1, 1, num_gpus)
    return Placement(table.astype(np.int32), topology, num_experts)

"""Placement-aware dispatch: which replica serves each token of one batch.

Each expert's tokens are water-filled onto the GPUs that hold it, experts with one replica first,
then the others heaviest first, twice over (the second pass refills each expert knowing where the
rest went), so the batch's peak GPU load is as low as whole tokens allow. Deterministic: ties go
to the lower GPU, and an expert's tokens fill its replicas in token order (tokens whose node
holds a replica with room first, when the engine says where each token comes from).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeray.native import backend
from moeray.placement.placement import Placement, PlacementError
from moeray.policy._validate import as_expert_ids, as_weights, check_int

__all__ = ["GpuBatches", "dispatch", "dispatched_gpu_loads"]


@dataclass(frozen=True)
class GpuBatches:
    """CSR of one layer's batch by GPU.

    offsets: int64 [num_gpus + 1]; GPU g serves entries ``offsets[g]:offsets[g+1]``.
    token_indices: int32 [T * top_k], token order within each GPU; slot_indices: int32, the
    physical slot (replica) serving each entry; weights: float32, its router weight.
    """

    offsets: np.ndarray
    token_indices: np.ndarray
    slot_indices: np.ndarray
    weights: np.ndarray

    @property
    def num_gpus(self) -> int:
        return len(self.offsets) - 1

    def loads(self) -> np.ndarray:
        """int64 [num_gpus]: token-assignments each GPU serves."""
        return np.diff(self.offsets)


def _row(placement: Placement, layer: int) -> np.ndarray:
    layer = check_int(layer, "layer", 0, placement.num_layers - 1)
    return np.ascontiguousarray(placement.physical_to_logical[layer])


def dispatch(expert_ids, weights, placement: Placement, layer: int, token_nodes=None) -> GpuBatches:
    """expert_ids: int [T, top_k] in [0, num_experts); weights: float [T, top_k]; the batch of
    ``layer`` onto ``placement``'s replicas (native: one pass over the tokens, GIL released).

    token_nodes (optional): int [T], the node each token comes from; a token is then served by
    a replica on its own node whenever the batch's allocation leaves one room (the loads are the
    same, fewer tokens cross nodes)."""
    ids = as_expert_ids(expert_ids, placement.num_experts)
    if token_nodes is not None:
        token_nodes = np.asarray(token_nodes)
        if token_nodes.dtype.kind not in "iu" or token_nodes.shape != ids.shape[:1]:
            raise PlacementError(
                f"token_nodes: expected integers of shape [{ids.shape[0]}] (one node per "
                f"token), got {token_nodes.dtype} {list(token_nodes.shape)}"
            )
        token_nodes = np.ascontiguousarray(token_nodes, dtype=np.int32)
    return GpuBatches(
        *backend.dispatch(
            ids,
            as_weights(weights, ids.shape),
            _row(placement, layer),
            placement.topology.num_gpus,
            placement.num_experts,
            token_nodes,
            placement.topology.gpus_per_node,
        )
    )


def dispatched_gpu_loads(counts, placement: Placement) -> np.ndarray:
    """int64 [layers, num_gpus]: each GPU's token-assignments when a batch with ``counts``
    (int [layers, experts], >= 0) is dispatched; the same numbers ``dispatch`` gives."""
    counts = np.asarray(counts)
    if counts.shape != (placement.num_layers, placement.num_experts):
        raise PlacementError(
            f"counts: expected shape [{placement.num_layers}, {placement.num_experts}], got "
            f"{list(counts.shape)}"
        )
    if counts.dtype.kind not in "iu" or (counts.size and counts.min() < 0):
        raise PlacementError("counts: expected integer token counts >= 0")
    topology = placement.topology
    out = np.empty((placement.num_layers, topology.num_gpus), dtype=np.int64)
    for layer in range(placement.num_layers):
        alloc = backend._dispatch_allocation(
            np.ascontiguousarray(counts[layer], dtype=np.int64),
            _row(placement, layer),
            topology.num_gpus,
        )
        out[layer] = alloc.reshape(topology.num_gpus, topology.slots_per_gpu).sum(axis=1)
    return out

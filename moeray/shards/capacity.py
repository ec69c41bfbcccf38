"""Hot-set sizes in bytes: one expert's bytes per layer of a checkpoint, and a byte budget
turned into experts per layer."""

from __future__ import annotations

from moeray.shards.store import ShardStore

__all__ = ["capacity_from_bytes", "shard_capacity", "shard_expert_bytes"]


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


def shard_expert_bytes(shards: str, num_layers: int) -> tuple[int, ...]:
    """One expert's bytes (the largest) per trace layer of the checkpoint at ``shards`` (trace
    layer i is its i-th MoE layer)."""

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

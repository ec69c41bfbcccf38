"""Argument checks shared by the policy modules (the cores re-check ranges at their boundary)."""

from __future__ import annotations

import numpy as np

__all__ = ["as_expert_ids", "as_weights", "check_int"]


def check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (hi None: unbounded), or TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        allowed = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: expected an int {allowed}, got {value}")
    return value


def as_expert_ids(expert_ids, num_experts: int, name: str = "expert_ids") -> np.ndarray:
    """Any integer array [T, top_k] as C-contiguous int32; ids are range-checked by the core.

    Non-integer dtypes raise TypeError; integer dtypes wider than int32 are range-checked here so
    that the cast cannot wrap an out-of-range id into a valid one.
    """
    if not isinstance(expert_ids, np.ndarray):
        if isinstance(expert_ids, (list, tuple)):
            expert_ids = np.asarray(expert_ids)
        else:
            raise TypeError(f"{name}: expected an integer numpy array, got {type(expert_ids).__name__}")
    if expert_ids.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer dtype (int32), got {expert_ids.dtype}")
    if expert_ids.ndim != 2:
        raise ValueError(f"{name}: expected shape [T, top_k], got {expert_ids.shape}")
    if expert_ids.dtype != np.int32 and not np.can_cast(expert_ids.dtype, np.int32):
        if expert_ids.size and (expert_ids.min() < 0 or expert_ids.max() >= num_experts):
            bad = expert_ids[(expert_ids < 0) | (expert_ids >= num_experts)].flat[0]
            raise ValueError(f"{name}: every id must be in [0, {num_experts}), got {bad}")
    return np.ascontiguousarray(expert_ids, dtype=np.int32)


def as_weights(weights, shape: tuple[int, ...], name: str = "weights") -> np.ndarray:
    """Any float array of ``shape`` as C-contiguous float32; finiteness is checked by the core."""
    if not isinstance(weights, np.ndarray):
        if isinstance(weights, (list, tuple)):
            weights = np.asarray(weights, dtype=np.float64)
        else:
            raise TypeError(f"{name}: expected a float numpy array, got {type(weights).__name__}")
    if weights.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float dtype (float32), got {weights.dtype}")
    if weights.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} like expert_ids, got {weights.shape}")
    return np.ascontiguousarray(weights, dtype=np.float32)

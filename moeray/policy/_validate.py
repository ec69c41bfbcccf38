"""Argument checks shared by the policy modules (the cores re-check ranges at their boundary)."""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["as_expert_ids", "as_weights", "check_float", "check_int"]


def check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (hi None: unbounded), or TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        allowed = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: expected an int {allowed}, got {value}")
    return value


def check_float(value, name: str) -> float:
    """``value`` as a float (ints and numpy scalars accepted), never NaN; TypeError otherwise."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (numbers.Real, np.floating)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name}: expected a number, got NaN")
    return value


def _as_array(value, name: str, kind: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a numpy array of {kind}, got {type(value).__name__}")
    try:
        return np.asarray(value)
    except ValueError as exc:  # ragged nesting
        raise ValueError(f"{name}: expected a rectangular [T, top_k] array ({exc})") from None


def as_expert_ids(expert_ids, num_experts: int, name: str = "expert_ids") -> np.ndarray:
    """Any integer array [T, top_k] as C-contiguous int32; ids are range-checked by the core.

    Non-integer dtypes raise TypeError; integer dtypes wider than int32 are range-checked here so
    that the cast cannot wrap an out-of-range id into a valid one.
    """
    expert_ids = _as_array(expert_ids, name, "ints")
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
    weights = _as_array(weights, name, "floats")
    if weights.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float dtype (float32), got {weights.dtype}")
    if weights.shape != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {tuple(shape)} like expert_ids, got {weights.shape}"
        )
    return np.ascontiguousarray(weights, dtype=np.float32)

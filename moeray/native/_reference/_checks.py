"""Argument checks shared by the twin's modules: the same exception types and messages as the
native binding (``src/bindings.cpp``)."""

from __future__ import annotations

import operator

import numpy as np

__all__ = [
    "as_float",
    "check_array",
    "check_ids",
    "check_int",
    "check_num_experts",
    "check_writeable",
    "index",
]


def index(value, name: str) -> int:
    """An int argument as the native binding takes it: ints and numpy ints, never floats."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None


def as_float(value, name: str) -> float:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    return float(value)


def check_num_experts(num_experts: int) -> int:
    if isinstance(num_experts, bool):  # a count: True is a mistake, as in the native binding
        raise TypeError("num_experts: expected an int, got bool")
    num_experts = index(num_experts, "num_experts")
    if not 1 <= num_experts <= 2**31 - 1:
        raise ValueError(f"num_experts: expected an int in [1, 2**31), got {num_experts}")
    return int(num_experts)


def check_ids(expert_ids, num_experts: int, name: str = "expert_ids") -> np.ndarray:
    """int32 [T, top_k], C-contiguous, every id in [0, num_experts): the batch contract."""
    if not isinstance(expert_ids, np.ndarray):
        raise TypeError(f"{name}: expected a numpy int32 array, got {type(expert_ids).__name__}")
    if expert_ids.dtype != np.int32:
        raise TypeError(f"{name}: expected dtype int32, got {expert_ids.dtype}")
    if expert_ids.ndim != 2:
        raise ValueError(f"{name}: expected shape [T, top_k], got {expert_ids.shape}")
    if not expert_ids.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array")
    if expert_ids.size and (expert_ids.min() < 0 or expert_ids.max() >= num_experts):
        bad = expert_ids[(expert_ids < 0) | (expert_ids >= num_experts)].flat[0]
        raise ValueError(f"{name}: every id must be in [0, {num_experts}), got {bad}")
    return expert_ids


def check_int(value, name: str, lo: int, hi: int, expected: str) -> int:
    """An int in [lo, hi] (never a bool), ``expected`` saying so in words."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = operator.index(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return value


def check_array(
    value, label: str, dtype: str, shape: tuple[int, ...], note: str, shape_note: str = ""
) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{label}: expected a numpy {dtype} array, got {type(value).__name__}")
    if value.dtype != np.dtype(dtype):
        raise TypeError(f"{label}: expected dtype {dtype}{note}, got {value.dtype}")
    if value.shape != shape:
        raise ValueError(
            f"{label}: expected shape {list(shape)}{note}{shape_note}, got {list(value.shape)}"
        )
    if not value.flags.c_contiguous:
        raise ValueError(f"{label}: expected a C-contiguous array")
    return value


def check_writeable(value, label: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """``check_array``, and writeable: an array a kernel updates in place."""
    value = check_array(value, label, dtype, shape, "")
    if not value.flags.writeable:
        raise ValueError(f"{label}: expected a writeable array")
    return value

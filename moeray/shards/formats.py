"""Element types of safetensors files and the bfloat16 helpers (numpy has no bfloat16).

A safetensors ``dtype`` is a string of the header (``"BF16"``, ``"F32"``, ...). moeray reads
expert weights in four formats: ``F32``, ``F16``, ``BF16`` (viewed as ``uint16`` raw bits, widened
with :func:`bf16_to_float32`) and ``TERNARY`` (ruvllm's packed ternary, see
``moeray.shards.ternary``). Every other dtype of the table is mapped to byte ranges only.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DTYPE_BITS",
    "FLOAT_FORMATS",
    "NUMPY_DTYPES",
    "TERNARY",
    "bf16_to_float32",
    "float32_to_bf16",
    "tensor_nbytes",
]

# Bits per element of every dtype the safetensors format defines (sub-byte types are packed).
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

# How a view of the mapping sees each dtype moeray computes with; BF16 as raw uint16 bits.
NUMPY_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
}

FLOAT_FORMATS = ("F32", "F16", "BF16")
TERNARY = "TERNARY"


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes of a tensor of ``dtype`` (a key of DTYPE_BITS) and ``shape``; None when the
    element count times the bit width is not a whole number of bytes."""
    count = 1
    for dim in shape:
        count *= dim
    bits = count * DTYPE_BITS[dtype]
    return bits // 8 if bits % 8 == 0 else None


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 [...] raw bfloat16 bits -> float32 [...] (exact: bfloat16 is float32's top half)."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise TypeError(f"bits: expected uint16 raw bfloat16 bits, got {bits.dtype}")
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 [...] -> uint16 [...] bfloat16 bits, rounded to nearest even (NaN stays NaN)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    # rounding a NaN's payload could carry into the exponent and make it infinite
    quiet_nan = (bits >> 16) | 0x0040
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)

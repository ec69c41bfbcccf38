"""ruvllm's packed ternary format: 2-bit weights, one float32 scale per block (docs/design.md).

docs/design.md names the footprint (``expert_memory_footprint(rows, cols, block_size)``: 2-bit packed
ternary weights plus one float32 scale per block); the bit layout is that of ruvllm's
``bitnet/ternary_tensor.rs`` and its quantizer that of ``bitnet/quantizer.rs`` (BitNet b1.58
absmean). For a projection W [rows, cols] with n = rows * cols elements in row-major order:

- ``packed``: uint8 [ceil(n / 4)]; element i sits in byte i // 4 at bits 2*(i % 4) and up
  (least significant pair first), coded 00 = -1, 01 = 0, 10 = +1 (11 is reserved, read as 0);
- ``scales``: float32 [ceil(n / block_size)]; block b is elements [b*block_size, (b+1)*block_size)
  of the flat order (a block may span rows), its scale gamma_b = mean(|W_block|) + 1e-8;
- the weight it stands for: W[i] = code(i) * scales[i // block_size].

The quantizer: t = round(clip(W / gamma, -1, 1)), rounding halves away from zero as Rust does.
In a safetensors checkpoint (see moeray.shards.store) a ternary projection is two tensors,
``<name>`` U8 [rows, cols / 4] (cols a multiple of 4, so the flat order above is unchanged) and
``<name>_scale`` F32 [ceil(n / block_size)], in a file whose ``__metadata__`` holds
``{"quantization": "ruvllm-ternary", "ternary_block_size": "<block_size>"}``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BLOCK_SIZE_KEY",
    "DEFAULT_BLOCK_SIZE",
    "QUANTIZATION_KEY",
    "TERNARY_QUANTIZATION",
    "dequantize_ternary",
    "num_blocks",
    "pack_ternary",
    "quantize_ternary",
    "unpack_ternary",
]

DEFAULT_BLOCK_SIZE = 256
QUANTIZATION_KEY = "quantization"
TERNARY_QUANTIZATION = "ruvllm-ternary"
BLOCK_SIZE_KEY = "ternary_block_size"
_EPSILON = np.float32(1e-8)

# code -> value; the reserved code 11 reads as 0, as in ruvllm's unpack_ternary
_DECODE = np.array([-1, 0, 1, 0], dtype=np.int8)


def num_blocks(num_elements: int, block_size: int) -> int:
    """Scales of a projection of ``num_elements`` weights: ceil(num_elements / block_size)."""
    return -(-num_elements // block_size)


def pack_ternary(values: np.ndarray) -> np.ndarray:
    """int [...] of {-1, 0, +1} -> uint8 [ceil(n / 4)], flat order, 4 values a byte, LSB first.

    Out-of-range values clamp to -1 / +1 as in ruvllm's pack_ternary."""
    flat = (np.clip(np.asarray(values).reshape(-1), -1, 1).astype(np.int8) + 1).astype(np.uint8)
    padded = np.zeros(-(-flat.size // 4) * 4, dtype=np.uint8)  # unused pairs 00, as in ruvllm
    padded[: flat.size] = flat
    quads = padded.reshape(-1, 4)
    return quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)


def unpack_ternary(packed: np.ndarray, num_elements: int) -> np.ndarray:
    """uint8 [>= ceil(num_elements / 4)] -> int8 [num_elements] of {-1, 0, +1}."""
    packed = np.asarray(packed).reshape(-1)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed: expected uint8, got {packed.dtype}")
    if packed.size * 4 < num_elements:
        raise ValueError(
            f"packed: {packed.size} bytes hold {packed.size * 4} weights, "
            f"fewer than num_elements = {num_elements}"
        )
    codes = (packed[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & np.uint8(3)
    return _DECODE[codes.reshape(-1)[:num_elements]]


def _block_means(flat: np.ndarray, block_size: int) -> np.ndarray:
    """float32 [ceil(n / block_size)]: mean |w| of each block, the last one over its own length."""
    blocks = num_blocks(flat.size, block_size)
    padded = np.zeros(blocks * block_size, dtype=np.float32)
    padded[: flat.size] = np.abs(flat)
    sums = padded.reshape(blocks, block_size).sum(axis=1, dtype=np.float32)
    counts = np.full(blocks, block_size, dtype=np.float32)
    counts[-1] = flat.size - (blocks - 1) * block_size
    return sums / counts


def quantize_ternary(
    weights: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Absmean ternary quantizer: float [rows, cols] (any shape, read in flat order) ->
    (packed uint8 [ceil(n / 4)], scales float32 [ceil(n / block_size)]); n >= 1, block_size >= 1."""
    flat = np.asarray(weights, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        raise ValueError("weights: expected at least one element")
    if block_size < 1:
        raise ValueError(f"block_size: expected an int >= 1, got {block_size}")
    if not np.isfinite(flat).all():
        raise ValueError("weights: expected finite values (NaN or infinity found)")
    scales = _block_means(flat, block_size) + _EPSILON
    normalized = np.clip(flat / np.repeat(scales, block_size)[: flat.size], -1.0, 1.0)
    ternary = np.trunc(normalized + np.copysign(np.float32(0.5), normalized))  # half away from 0
    return pack_ternary(ternary.astype(np.int8)), scales


def dequantize_ternary(
    packed: np.ndarray, scales: np.ndarray, shape: tuple[int, ...], block_size: int
) -> np.ndarray:
    """(packed uint8, scales float32 [ceil(n / block_size)]) -> float32 [shape], n = prod(shape)."""
    count = int(np.prod(shape, dtype=np.int64))
    scales = np.asarray(scales, dtype=np.float32).reshape(-1)
    if scales.size != num_blocks(count, block_size):
        raise ValueError(
            f"scales: expected {num_blocks(count, block_size)} for {count} weights "
            f"in blocks of {block_size}, got {scales.size}"
        )
    values = unpack_ternary(packed, count).astype(np.float32)
    return (values * np.repeat(scales, block_size)[:count]).reshape(shape)

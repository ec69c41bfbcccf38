"""Twin of ``src/matvec.hpp``: one MoE expert's FFN over the T tokens routed to it, in numpy.

The numpy reference of the consumer kernel, favouring clarity over speed: each weight matrix is
widened or dequantized to float32 before its product (``to_float32``), then ``ffn`` computes
SWIGLU (Mixtral, Qwen-MoE, DeepSeek, OLMoE): down(silu(gate x) * up x), no biases; or GPT_OSS
(transformers' GptOssExperts): g, u = the even / odd columns of x @ gate_up + bias; g = min(g, 7);
u = clip(u, -7, 7); out = ((u + 1) * g * sigmoid(1.702 g)) @ down + bias. The router weight of each
token is not applied (the caller scales and sums experts). ``moeray.shards.kernels`` serves it
for a ``moeray.shards.ExpertWeights``.
"""

from __future__ import annotations

import numpy as np

from moeray.native._reference._checks import check_array, check_int

__all__ = [
    "GPT_OSS",
    "GPT_OSS_ALPHA",
    "GPT_OSS_LIMIT",
    "SWIGLU",
    "expert_matvec",
    "ffn",
    "silu",
    "to_float32",
]

SWIGLU, GPT_OSS = "swiglu", "gpt-oss"
# gpt-oss's clamped SwiGLU (transformers' GptOssExperts: alpha 1.702, limit 7.0)
GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0

_SIZE_RANGE = "an int in [1, 2**31)"
_MAX_SIZE = 2**31 - 1
_FORMAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "uint16", "TERNARY": "uint8"}
# ternary code -> value; the reserved code 11 reads as 0, as in ruvllm's unpack_ternary
_TERNARY_DECODE = np.array([-1, 0, 1, 0], dtype=np.int8)


def _layout_roles(layout: str, hidden: int, inter: int) -> list[tuple[str, bool, bool, int, int]]:
    """(role, required, is_bias, rows, cols) of each tensor of ``layout``, in checking order."""
    if layout == "swiglu":
        return [
            ("gate", True, False, inter, hidden),
            ("up", True, False, inter, hidden),
            ("down", True, False, hidden, inter),
        ]
    return [
        ("gate_up", True, False, hidden, 2 * inter),
        ("down", True, False, inter, hidden),
        ("gate_up_bias", False, True, 1, 2 * inter),
        ("down_bias", False, True, 1, hidden),
    ]


def _check_weight(value, role: str, is_bias: bool, rows: int, cols: int):
    """(format, data, scales, block_size) of one role, checked; returns it with a logical shape."""
    where = f"tensors[{role!r}]"
    if not isinstance(value, tuple):
        raise TypeError(
            f"{where}: expected a tuple (format, data, scales, block_size), "
            f"got {type(value).__name__}"
        )
    if len(value) != 4:
        raise ValueError(
            f"{where}: expected 4 items (format, data, scales, block_size), got {len(value)}"
        )
    fmt, data, scales, block_size = value
    if not isinstance(fmt, str):
        raise TypeError(f"{where}: format: expected a str, got {type(fmt).__name__}")
    allowed = ("F32", "F16", "BF16") if is_bias else ("F32", "F16", "BF16", "TERNARY")
    if fmt not in allowed:
        raise ValueError(f"{where}: format: expected one of {', '.join(allowed)}, got {fmt!r}")
    ternary = fmt == "TERNARY"
    if ternary:
        block_size = check_int(
            block_size, f"{where}: block_size", 1, _MAX_SIZE, "an int in [1, 2**31) for TERNARY"
        )
    else:
        block_size = check_int(
            block_size, f"{where}: block_size", 0, 0, f"0 for {fmt} (only TERNARY has blocks)"
        )
    shape = (cols,) if is_bias else (rows, cols)
    if ternary:
        if cols % 4:
            raise ValueError(
                f"{where}: TERNARY packs 4 weights a byte along each row: cols must "
                f"be a multiple of 4, got {cols}"
            )
        shape = (rows, cols // 4)
    data = check_array(data, f"{where}: data", _FORMAT_DTYPES[fmt], shape, f" for {fmt}")
    if not ternary:
        if scales is not None:
            raise ValueError(
                f"{where}: scales: expected None for {fmt} (only TERNARY has "
                f"scales), got {type(scales).__name__}"
            )
        return fmt, data, None, block_size, shape
    blocks = -(-(rows * cols) // block_size)
    scales = check_array(
        scales,
        f"{where}: scales",
        "float32",
        (blocks,),
        "",
        f" (ceil({rows} * {cols} / {block_size}))",
    )
    # one block >= the whole matrix: the same weights, and the reference's np.repeat stays small
    return fmt, data, scales, min(block_size, rows * cols), (rows, cols)


def silu(z: np.ndarray) -> np.ndarray:
    """z * sigmoid(z), float32, without overflow warnings for large |z|."""
    return z * _sigmoid(z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def to_float32(fmt: str, data: np.ndarray, scales, block_size: int, shape) -> np.ndarray:
    """float32 [shape], a new array: F32 / F16 data widened, BF16 (uint16 bits) shifted into a
    float32's top half, TERNARY (uint8, 4 codes a byte, LSB first) times its block's scale
    (scales float32 [ceil(n / block_size)], n = prod(shape))."""
    if fmt == "TERNARY":
        count = int(np.prod(shape, dtype=np.int64))
        codes = (data.reshape(-1)[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & np.uint8(3)
        values = _TERNARY_DECODE[codes.reshape(-1)[:count]].astype(np.float32)
        scales = np.asarray(scales, dtype=np.float32).reshape(-1)
        return (values * np.repeat(scales, block_size)[:count]).reshape(shape)
    if fmt == "BF16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32)


def ffn(layout: str, weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The FFN of ``layout`` over x float32 [T, hidden] -> float32 [T, hidden]; weights: role ->
    float32 matrix (shapes as in ``expert_matvec``; the biases optional)."""
    if layout == SWIGLU:
        gate = x @ weights["gate"].T
        up = x @ weights["up"].T
        return (silu(gate) * up) @ weights["down"].T
    gate_up = x @ weights["gate_up"] + weights.get("gate_up_bias", 0.0)
    gate = np.minimum(gate_up[:, 0::2], GPT_OSS_LIMIT)
    up = np.clip(gate_up[:, 1::2], -GPT_OSS_LIMIT, GPT_OSS_LIMIT)
    glu = gate * _sigmoid(GPT_OSS_ALPHA * gate)
    return ((up + 1.0) * glu) @ weights["down"] + weights.get("down_bias", 0.0)


def expert_matvec(layout, hidden_size, intermediate_size, tensors, x) -> np.ndarray:
    """One expert's FFN over T tokens: x float32 [T, hidden], C-contiguous -> float32 [T, hidden].

    ``layout`` 'swiglu' (roles gate, up [intermediate, hidden], down [hidden, intermediate]) or
    'gpt-oss' (gate_up [hidden, 2 * intermediate], down [intermediate, hidden], optional
    gate_up_bias [2 * intermediate] and down_bias [hidden]); ``tensors`` maps each role to
    (format, data, scales, block_size) as a ``moeray.shards.WeightView`` holds them: F32 / F16 /
    BF16 data float32 / float16 / uint16 [rows, cols] with scales None and block_size 0; TERNARY
    data uint8 [rows, cols / 4], scales float32 [ceil(rows * cols / block_size)], block_size >= 1.
    Computes with ``ffn`` (each matrix widened or dequantized first).
    """
    if not isinstance(layout, str):
        raise TypeError(f"layout: expected 'swiglu' or 'gpt-oss', got {type(layout).__name__}")
    if layout not in ("swiglu", "gpt-oss"):
        raise ValueError(f"layout: expected 'swiglu' or 'gpt-oss', got {layout!r}")
    hidden = check_int(hidden_size, "hidden_size", 1, _MAX_SIZE, _SIZE_RANGE)
    inter = check_int(intermediate_size, "intermediate_size", 1, _MAX_SIZE, _SIZE_RANGE)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy float32 array [T, hidden], got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"x: expected dtype float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != hidden:
        raise ValueError(f"x: expected shape [T, {hidden}], got {list(x.shape)}")
    if not x.flags.c_contiguous:
        raise ValueError("x: expected a C-contiguous array")
    if not isinstance(tensors, dict):
        raise TypeError(
            "tensors: expected a dict of role -> (format, data, scales, block_size), "
            f"got {type(tensors).__name__}"
        )
    roles = _layout_roles(layout, hidden, inter)
    names = ", ".join(r[0] for r in roles)
    for key in tensors:
        if key not in [r[0] for r in roles] or not isinstance(key, str):
            raise ValueError(
                f"tensors: unexpected role {key!r} for layout {layout!r} (expected {names})"
            )
    required = ", ".join(r[0] for r in roles if r[1])
    checked = {}
    for role, is_required, is_bias, rows, cols in roles:
        if role not in tensors:
            if is_required:
                raise ValueError(
                    f"tensors: no {role!r} for layout {layout!r} (it needs {required})"
                )
            continue
        checked[role] = _check_weight(tensors[role], role, is_bias, rows, cols)
    weights = {role: to_float32(*spec) for role, spec in checked.items()}
    return ffn(layout, weights, x)

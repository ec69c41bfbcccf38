"""The msgpack form of a step and of its schedules, for clients that do not speak numpy.

A step is a map::

    {"expert_ids": {"shape": [num_layers, T, top_k], "dtype": "int32", "data": <bytes>},
     "weights":    {"shape": [num_layers, T, top_k], "dtype": "float32", "data": <bytes>}}

``data`` is the array in C order, little-endian; ``weights`` may be omitted. The reply to a
step is a list with one map per layer: ``{"offsets": <int64 bytes>, "token_indices": <int32
bytes>, "weights": <float32 bytes>}`` (the CSR ``ExpertBatches``), all little-endian.
"""

from __future__ import annotations

import msgpack
import numpy as np

from moeray.policy.scheduler import ExpertBatches

__all__ = ["encode_step", "decode_step", "encode_batches", "decode_batches"]

_DTYPES = {"int32": np.dtype("<i4"), "float32": np.dtype("<f4")}


def _encode_array(a: np.ndarray, dtype: str) -> dict:
    return {"shape": list(a.shape), "dtype": dtype,
            "data": np.ascontiguousarray(a, dtype=_DTYPES[dtype]).tobytes()}


def _decode_array(obj, name: str) -> np.ndarray:
    if not isinstance(obj, dict) or set(obj) != {"shape", "dtype", "data"}:
        raise ValueError(f"{name}: expected a map with shape, dtype and data")
    shape, dtype, data = obj["shape"], obj["dtype"], obj["data"]
    if dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise ValueError(f"{name}: shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(data, bytes) or len(data) != int(np.prod(shape)) * _DTYPES[dtype].itemsize:
        raise ValueError(f"{name}: data must hold exactly shape x {dtype} bytes")
    return np.frombuffer(data, dtype=_DTYPES[dtype]).reshape(shape).astype(_DTYPES[dtype].newbyteorder("="))


def encode_step(expert_ids: np.ndarray, weights: np.ndarray | None = None) -> bytes:
    step = {"expert_ids": _encode_array(expert_ids, "int32")}
    if weights is not None:
        step["weights"] = _encode_array(weights, "float32")
    return msgpack.packb(step, use_bin_type=True)


def decode_step(payload: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """(expert_ids, weights or None); ValueError naming what is malformed."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"step: expected msgpack bytes, got {type(payload).__name__}")
    try:
        step = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"step: not valid msgpack ({exc})") from None
    if not isinstance(step, dict) or "expert_ids" not in step or not set(step) <= {"expert_ids", "weights"}:
        raise ValueError("step: expected a map with expert_ids and optionally weights")
    ids = _decode_array(step["expert_ids"], "expert_ids")
    weights = _decode_array(step["weights"], "weights") if "weights" in step else None
    return ids, weights


def encode_batches(batches: list[ExpertBatches]) -> bytes:
    return msgpack.packb(
        [{"offsets": b.offsets.astype("<i8").tobytes(),
          "token_indices": b.token_indices.astype("<i4").tobytes(),
          "weights": b.weights.astype("<f4").tobytes()} for b in batches],
        use_bin_type=True,
    )


def decode_batches(payload: bytes) -> list[ExpertBatches]:
    return [
        ExpertBatches(
            offsets=np.frombuffer(b["offsets"], dtype="<i8").astype(np.int64),
            token_indices=np.frombuffer(b["token_indices"], dtype="<i4").astype(np.int32),
            weights=np.frombuffer(b["weights"], dtype="<f4").astype(np.float32),
        )
        for b in msgpack.unpackb(payload, raw=False)
    ]

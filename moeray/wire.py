"""The msgpack form of a step and of its schedules, for clients that do not speak numpy.

A step is one record of the moeray trace format (``moeray.trace``, docs/trace-format.md) sent
without the trace's header::

    {"expert_ids": {"shape": [num_layers, T, top_k], "dtype": "int32", "data": <bytes>},
     "weights":    {"shape": [num_layers, T, top_k], "dtype": "float32", "data": <bytes>},
     "seq": <int>, "positions": {"shape": [T], "dtype": "int32", "data": <bytes>}, "crc32": <int>}

``data`` is the array in C order, little-endian; ``expert_ids`` may also be uint8 or uint16 and
``weights`` float16; every field but ``expert_ids`` may be omitted, so a line of a trace file is
a valid step and a step is a valid record. The reply to a step is a list with one map per layer:
``{"offsets": <int64 bytes>, "token_indices": <int32 bytes>, "weights": <float32 bytes>}`` (the
CSR ``ExpertBatches``), all little-endian.
"""

from __future__ import annotations

import msgpack
import numpy as np

from moeray.policy.scheduler import ExpertBatches
from moeray.trace import DEFAULT_MAX_RECORD_BYTES, decode_record, encode_record

__all__ = ["encode_step", "decode_step", "encode_batches", "decode_batches"]

_MAX_STEP_BYTES = DEFAULT_MAX_RECORD_BYTES


def encode_step(expert_ids: np.ndarray, weights: np.ndarray | None = None) -> bytes:
    """expert_ids: int [num_layers, T, top_k]; weights: float [num_layers, T, top_k] or None."""
    return encode_record(expert_ids, weights, ids_dtype="int32", weights_dtype="float32")


def decode_step(payload: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """(expert_ids int32, weights float32 or None); ValueError naming what is malformed."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"step: expected msgpack bytes, got {type(payload).__name__}")
    if len(payload) > _MAX_STEP_BYTES:
        raise ValueError(f"step: {len(payload)} bytes exceed the limit of {_MAX_STEP_BYTES}")
    try:
        step = msgpack.unpackb(payload, raw=False, max_bin_len=_MAX_STEP_BYTES, max_str_len=1024,
                               max_array_len=16, max_map_len=16, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"step: not valid msgpack ({exc})") from None
    try:
        record = decode_record(step)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"step: {exc}") from None
    weights = None if record.weights is None else record.weights.astype(np.float32)
    return record.expert_ids.astype(np.int32), weights


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

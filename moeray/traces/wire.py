"""The msgpack form of a step and of its schedules, for clients that do not speak numpy.

A step is one record of the moeray trace format (``moeray.traces.mtrace``, docs/trace-format.md) sent
without the trace's header, plus optional engine hints::

    {"expert_ids": {"shape": [num_layers, T, top_k], "dtype": "int32", "data": <bytes>},
     "weights":    {"shape": [num_layers, T, top_k], "dtype": "float32", "data": <bytes>},
     "seq": <int>, "positions": {"shape": [T], "dtype": "int32", "data": <bytes>}, "crc32": <int>,
     "hints":      {"shape": [num_layers, T, h], "dtype": "int32", "data": <bytes>}}

``data`` is the array in C order, little-endian; ``expert_ids`` may also be uint8 or uint16 and
``weights`` float16; every field but ``expert_ids`` may be omitted, so a line of a trace file is
a valid step. ``positions`` marks sequence starts: a token at position 0 begins a sequence (the
``seq_starts`` of ``ServiceHandle.submit``); without it the step continues the stream. ``hints``
are an engine's predicted experts per layer and token, -1 for none (``submit(..., hints=...)``);
``crc32`` does not cover them. The reply to a step is a list with one map per layer:
``{"offsets": <int64 bytes>, "token_indices": <int32 bytes>, "weights": <float32 bytes>}`` (the
CSR ``ExpertBatches``), all little-endian.
"""

from __future__ import annotations

from typing import NamedTuple

import msgpack
import numpy as np

from moeray.policy.scheduler import ExpertBatches
from moeray.traces.mtrace import (
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_MAX_RECORD_TOKENS,
    decode_array,
    decode_record,
    encode_array,
    record_map,
)

__all__ = ["WireStep", "encode_step", "decode_step", "encode_batches", "decode_batches"]

_MAX_STEP_BYTES = DEFAULT_MAX_RECORD_BYTES
# A step builds at most 9 maps and lists (itself, 4 arrays and their shapes); capping them
# bounds the Python objects any payload can make (64 MiB of nested lists would be gigabytes).
_MAX_STEP_CONTAINERS = 64
_HINT_DTYPES = {"int32": np.dtype("<i4")}


class WireStep(NamedTuple):
    """A decoded step: expert_ids int32 [L, T, k]; weights float32 [L, T, k] or None;
    seq_starts bool [T] (from ``positions``) or None; hints int32 [L, T, h] or None."""

    expert_ids: np.ndarray
    weights: np.ndarray | None
    seq_starts: np.ndarray | None
    hints: np.ndarray | None


def encode_step(
    expert_ids: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    seq_starts: np.ndarray | None = None,
    hints: np.ndarray | None = None,
) -> bytes:
    """expert_ids: int [num_layers, T, top_k]; weights: float [num_layers, T, top_k] or None;
    seq_starts: bool [T] or None (sent as ``positions``: tokens since the last start, those
    before the step's first start counted from 1, as continuing); hints: int [num_layers, T, h]
    or None."""
    positions = None
    if seq_starts is not None:
        starts = np.asarray(seq_starts, dtype=bool)
        index = np.arange(len(starts))
        last = np.maximum.accumulate(np.where(starts, index, -1))
        positions = np.where(last >= 0, index - last, index + 1)
    record = record_map(
        expert_ids, weights, positions=positions, ids_dtype="int32", weights_dtype="float32"
    )
    if hints is not None:
        record["hints"] = encode_array(hints, _HINT_DTYPES["int32"], "int32")
    return msgpack.packb(record, use_bin_type=True)


def decode_step(payload: bytes) -> WireStep:
    """The step's arrays; ValueError naming what is malformed (the service checks the shapes
    and ranges against its model, as for ``submit``)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"step: expected msgpack bytes, got {type(payload).__name__}")
    if len(payload) > _MAX_STEP_BYTES:
        raise ValueError(f"step: {len(payload)} bytes exceed the limit of {_MAX_STEP_BYTES}")
    containers = 0

    def count(obj):
        nonlocal containers
        containers += 1
        if containers > _MAX_STEP_CONTAINERS:
            raise ValueError(f"more than {_MAX_STEP_CONTAINERS} maps and lists")
        return obj

    try:
        step = msgpack.unpackb(
            payload,
            raw=False,
            max_bin_len=_MAX_STEP_BYTES,
            max_str_len=1024,
            max_array_len=16,
            max_map_len=16,
            max_ext_len=0,
            list_hook=count,
            object_hook=count,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"step: not valid msgpack ({exc})") from None
    try:
        hints = None
        if isinstance(step, dict) and "hints" in step:
            hints, _ = decode_array(
                step.pop("hints"), "hints", _HINT_DTYPES, DEFAULT_MAX_RECORD_TOKENS
            )
        record = decode_record(step)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"step: {exc}") from None
    weights = None if record.weights is None else record.weights.astype(np.float32)
    seq_starts = record.positions == 0 if "positions" in step else None
    return WireStep(
        record.expert_ids.astype(np.int32),
        weights,
        seq_starts,
        None if hints is None else hints.astype(np.int32),
    )


def encode_batches(batches: list[ExpertBatches]) -> bytes:
    return msgpack.packb(
        [
            {
                "offsets": b.offsets.astype("<i8").tobytes(),
                "token_indices": b.token_indices.astype("<i4").tobytes(),
                "weights": b.weights.astype("<f4").tobytes(),
            }
            for b in batches
        ],
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

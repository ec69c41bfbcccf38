"""The moeray trace format: routing as a versioned msgpack stream, read and written in constant memory.

A trace file is a msgpack stream (docs/trace-format.md has the full specification)::

    header:  {"format": "moeray-trace", "version": 1, "model": str, "num_layers": L,
              "num_experts": E, "top_k": k, "dtypes": {"expert_ids": "uint8", "weights": "float16"},
              "layer_ids": [model layer index of each MoE layer] (optional), "metadata": {} (optional)}
    record:  {"expert_ids": ARRAY [L, T, k], "weights": ARRAY [L, T, k] (optional),
              "seq": int, "positions": ARRAY int32 [T] (optional), "crc32": int (optional)}
    ARRAY:   {"shape": [...], "dtype": str, "data": <bin, little-endian, C order>}

One record is one step: the routing of every MoE layer for T tokens of one sequence. The same
record map, without a header, is the wire format of a step sent to the service
(``moeray.traces.wire``). Decoding never trusts the bytes: msgpack limits bound every buffer, string,
array and map, the number of containers a record may build is capped, and shapes are checked
against the header before any array is allocated. A bad record raises ``TraceFormatError`` naming
the record (or, salvaging, ends the records); every record before it has been returned already.
"""

from __future__ import annotations

import io
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import msgpack
import numpy as np

from moeray.traces.trace import Trace

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TRACE_SUFFIX",
    "ID_DTYPES",
    "WEIGHT_DTYPES",
    "SalvageReport",
    "TraceFormatError",
    "TraceHeader",
    "TraceRecord",
    "TraceWriter",
    "TraceReader",
    "encode_record",
    "record_map",
    "encode_array",
    "decode_array",
    "decode_record",
    "header_for",
    "is_trace_file",
    "read_trace",
    "write_trace",
]

FORMAT_NAME = "moeray-trace"
FORMAT_VERSION = 1
TRACE_SUFFIX = ".mtrace"

# Little-endian on the wire whatever the host; numpy reads them without a copy on x86 and ARM.
ID_DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}
_ID_MAX = {"uint8": 2**8 - 1, "uint16": 2**16 - 1, "int32": 2**31 - 1}
WEIGHT_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_POSITION_DTYPE = np.dtype("<i4")

MAX_LAYERS = 4096
MAX_EXPERTS = 2**31 - 1
MAX_TOP_K = 4096
DEFAULT_MAX_RECORD_BYTES = 64 * 2**20
DEFAULT_MAX_RECORD_TOKENS = 2**20
_MAX_SEQ = 2**63 - 1
_MAX_MODEL_NAME = 1024
_MAX_METADATA_ITEMS = 64
_MAX_METADATA_STR = 4096
# A record builds a handful of maps and lists; a stream that asks for more is not a trace, and
# capping them bounds the Python objects any input of any size can make us build.
_MAX_CONTAINERS = 64

_END = object()  # end of stream (msgpack's nil unpacks to None, so None cannot say it)
_RECORD_KEYS = {"expert_ids", "weights", "seq", "positions", "crc32"}
_HEADER_KEYS = {
    "format",
    "version",
    "model",
    "num_layers",
    "num_experts",
    "top_k",
    "dtypes",
    "layer_ids",
    "metadata",
}


class TraceFormatError(ValueError):
    """A trace (or a step on the wire) is malformed. ``record`` is the 0-based record index, or
    None for the header; ``source`` names the file; ``detail`` is the message without either;
    ``offset`` is the byte at which the bad object starts, when known."""

    def __init__(
        self, message: str, record: int | None = None, source: str = "", offset: int | None = None
    ):
        where = f"{source}: " if source else ""
        where += "header: " if record is None else f"record {record}: "
        super().__init__(where + message)
        self.record = record
        self.source = source
        self.detail = message
        self.offset = offset


def _ids_dtype_for(num_experts: int) -> str:
    return "uint8" if num_experts <= 2**8 else "uint16" if num_experts <= 2**16 else "int32"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TraceHeader:
    """What every record of a trace shares.

    num_layers in [1, 4096] (MoE layers only), num_experts in [1, 2**31 - 1], top_k in
    [1, min(num_experts, 4096)]. ids_dtype: one of ID_DTYPES wide enough for num_experts (default
    the narrowest); weights_dtype: one of WEIGHT_DTYPES, or None when records carry no weights.
    layer_ids: the model's layer index of each MoE layer (e.g. 1..26 when layer 0 is dense), or
    None for 0..num_layers-1. metadata: flat str -> str/int/float/bool.
    """

    num_layers: int
    num_experts: int
    top_k: int
    model: str = ""
    ids_dtype: str = ""
    weights_dtype: str | None = None
    layer_ids: tuple[int, ...] | None = None
    metadata: dict = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __post_init__(self):
        _check_range(self.num_layers, "num_layers", MAX_LAYERS)
        _check_range(self.num_experts, "num_experts", MAX_EXPERTS)
        _check_range(self.top_k, "top_k", min(self.num_experts, MAX_TOP_K))
        if not isinstance(self.model, str) or len(self.model) > _MAX_MODEL_NAME:
            raise ValueError(f"model: expected a string of at most {_MAX_MODEL_NAME} characters")
        if not self.ids_dtype:
            object.__setattr__(self, "ids_dtype", _ids_dtype_for(self.num_experts))
        if not isinstance(self.ids_dtype, str) or self.ids_dtype not in ID_DTYPES:
            raise ValueError(
                f"ids_dtype: expected one of {sorted(ID_DTYPES)}, got {self.ids_dtype!r}"
            )
        if self.num_experts - 1 > _ID_MAX[self.ids_dtype]:
            raise ValueError(
                f"ids_dtype: {self.ids_dtype} cannot hold expert id {self.num_experts - 1}"
            )
        if self.weights_dtype is not None and (
            not isinstance(self.weights_dtype, str) or self.weights_dtype not in WEIGHT_DTYPES
        ):
            raise ValueError(
                f"weights_dtype: expected one of {sorted(WEIGHT_DTYPES)} or None, got {self.weights_dtype!r}"
            )
        if self.layer_ids is not None:
            ids = tuple(self.layer_ids)
            if len(ids) != self.num_layers or not all(_is_int(i) and 0 <= i < 2**31 for i in ids):
                raise ValueError(
                    f"layer_ids: expected {self.num_layers} non-negative ints, got {ids!r}"
                )
            object.__setattr__(self, "layer_ids", ids)
        _check_metadata(self.metadata)
        if self.version != FORMAT_VERSION:
            raise ValueError(
                f"version: this moeray reads version {FORMAT_VERSION}, got {self.version!r}"
            )

    def to_map(self) -> dict:
        header = {
            "format": FORMAT_NAME,
            "version": self.version,
            "model": self.model,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "dtypes": {"expert_ids": self.ids_dtype, "weights": self.weights_dtype},
        }
        if self.layer_ids is not None:
            header["layer_ids"] = list(self.layer_ids)
        if self.metadata:
            header["metadata"] = dict(self.metadata)
        return header

    @classmethod
    def from_map(cls, obj) -> TraceHeader:
        """ValueError naming the field when ``obj`` is not a header map of this format."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} stream (the first object is not its header)")
        if not _is_int(obj.get("version")) or obj["version"] > FORMAT_VERSION:
            raise ValueError(
                f"version: {obj.get('version')!r} is not a version this moeray reads (<= {FORMAT_VERSION})"
            )
        unknown = set(obj) - _HEADER_KEYS
        if unknown:
            raise ValueError(f"unknown fields {sorted(map(str, unknown))}")
        dtypes = obj.get("dtypes")
        if not isinstance(dtypes, dict) or set(dtypes) != {"expert_ids", "weights"}:
            raise ValueError("dtypes: expected a map with expert_ids and weights")
        for key in ("num_layers", "num_experts", "top_k"):
            if key not in obj:
                raise ValueError(f"{key}: missing")
        layer_ids = obj.get("layer_ids")
        if layer_ids is not None and not isinstance(layer_ids, list):
            raise ValueError("layer_ids: expected a list of ints")
        return cls(
            num_layers=obj["num_layers"],
            num_experts=obj["num_experts"],
            top_k=obj["top_k"],
            model=obj.get("model", ""),
            ids_dtype=dtypes["expert_ids"] or "",
            weights_dtype=dtypes["weights"],
            layer_ids=tuple(layer_ids) if layer_ids is not None else None,
            metadata=obj.get("metadata", {}),
            version=obj["version"],
        )


def _check_range(value, name: str, high: int) -> None:
    if not _is_int(value) or not 1 <= value <= high:
        raise ValueError(f"{name}: expected an int in [1, {high}], got {value!r}")


def _check_metadata(metadata) -> None:
    if not isinstance(metadata, dict) or len(metadata) > _MAX_METADATA_ITEMS:
        raise ValueError(f"metadata: expected a map of at most {_MAX_METADATA_ITEMS} items")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float, bool)):
            raise ValueError(
                f"metadata: expected str keys and str/int/float/bool values, got {key!r}"
            )
        if len(key) > _MAX_METADATA_STR or (
            isinstance(value, str) and len(value) > _MAX_METADATA_STR
        ):
            raise ValueError(f"metadata: strings are limited to {_MAX_METADATA_STR} characters")


@dataclass(frozen=True)
class TraceRecord:
    """One step. expert_ids: [num_layers, T, top_k] in the header's ids dtype; weights: the same
    shape in its weights dtype, or None; seq: sequence id >= 0; positions: int32 [T], each
    token's position in its sequence. Arrays decoded from bytes are read-only views."""

    expert_ids: np.ndarray
    weights: np.ndarray | None
    seq: int
    positions: np.ndarray

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[1]


# --------------------------------------------------------------------------- encoding


def encode_array(a: np.ndarray, dtype: np.dtype, name: str) -> dict:
    return {
        "shape": list(a.shape),
        "dtype": name,
        "data": np.ascontiguousarray(a, dtype=dtype).tobytes(),
    }


def encode_record(expert_ids: np.ndarray, weights: np.ndarray | None = None, **fields) -> bytes:
    """msgpack bytes of one record: ``record_map(expert_ids, weights, **fields)`` packed."""
    return msgpack.packb(record_map(expert_ids, weights, **fields), use_bin_type=True)


def record_map(
    expert_ids: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    seq: int | None = None,
    positions: np.ndarray | None = None,
    ids_dtype: str = "int32",
    weights_dtype: str = "float32",
    crc: bool = True,
) -> dict:
    """One record as a map (a step on the wire adds its own fields to it). expert_ids: [L, T, k]
    integers that fit ``ids_dtype``; weights: floats of the same shape; positions: [T]. The
    caller validates ranges (``TraceWriter.write`` does)."""
    record = {"expert_ids": encode_array(expert_ids, ID_DTYPES[ids_dtype], ids_dtype)}
    if weights is not None:
        record["weights"] = encode_array(weights, WEIGHT_DTYPES[weights_dtype], weights_dtype)
    if seq is not None:
        record["seq"] = int(seq)
    if positions is not None:
        record["positions"] = encode_array(positions, _POSITION_DTYPE, "int32")
    if crc:
        record["crc32"] = _crc(record)
    return record


def _crc(record: dict) -> int:
    crc = 0
    for key in ("expert_ids", "weights", "positions"):
        if key in record:
            crc = zlib.crc32(record[key]["data"], crc)
    return crc


def decode_array(obj, name: str, dtypes: dict, max_tokens: int) -> tuple[np.ndarray, str]:
    """A read-only array view of an ARRAY map; checks everything before touching ``data``."""
    if not isinstance(obj, dict) or set(obj) != {"shape", "dtype", "data"}:
        raise ValueError(f"{name}: expected a map with shape, dtype and data")
    shape, dtype, data = obj["shape"], obj["dtype"], obj["data"]
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise ValueError(f"{name}: dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    if not (
        isinstance(shape, list)
        and 1 <= len(shape) <= 3
        and all(_is_int(n) and 0 <= n <= max_tokens * MAX_TOP_K for n in shape)
    ):
        raise ValueError(f"{name}: shape must be a list of 1 to 3 non-negative ints, got {shape!r}")
    expected = math.prod(shape) * dtypes[dtype].itemsize  # Python ints: no overflow
    if not isinstance(data, bytes) or len(data) != expected:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise ValueError(
            f"{name}: data must hold exactly shape x {dtype} = {expected} bytes, got {got}"
        )
    return np.frombuffer(data, dtype=dtypes[dtype]).reshape(shape), dtype


def decode_record(
    obj,
    header: TraceHeader | None = None,
    max_record_tokens: int = DEFAULT_MAX_RECORD_TOKENS,
) -> TraceRecord:
    """A record map (already unpacked) checked against ``header``; ValueError naming the field.

    Without a header (a step on the wire) any dtype of ID_DTYPES / WEIGHT_DTYPES is accepted
    and only the structure is checked; the service checks layers, ids and weights itself.
    """
    if not isinstance(obj, dict) or "expert_ids" not in obj:
        raise ValueError(
            "expected a map with expert_ids and optionally weights, seq, positions, crc32"
        )
    unknown = set(obj) - _RECORD_KEYS
    if unknown:
        raise ValueError(f"unknown fields {sorted(map(str, unknown))}")
    ids_types = ID_DTYPES if header is None else {header.ids_dtype: ID_DTYPES[header.ids_dtype]}
    ids, _ = decode_array(obj["expert_ids"], "expert_ids", ids_types, max_record_tokens)
    if ids.ndim != 3:
        raise ValueError(
            f"expert_ids: expected shape [num_layers, T, top_k], got {list(ids.shape)}"
        )
    num_tokens = ids.shape[1]
    if num_tokens > max_record_tokens:
        raise ValueError(f"expert_ids: {num_tokens} tokens exceed the limit of {max_record_tokens}")
    if header is not None:
        _check_ids_against(ids, header)
    weights = None
    if "weights" in obj:
        if header is not None and header.weights_dtype is None:
            raise ValueError("weights: the header declares no weights")
        w_types = (
            WEIGHT_DTYPES
            if header is None
            else {header.weights_dtype: WEIGHT_DTYPES[header.weights_dtype]}
        )
        weights, _ = decode_array(obj["weights"], "weights", w_types, max_record_tokens)
        if weights.shape != ids.shape:
            raise ValueError(
                f"weights: expected shape {list(ids.shape)}, got {list(weights.shape)}"
            )
        if header is not None and not np.isfinite(weights).all():
            raise ValueError("weights: every router weight must be finite")
    elif header is not None and header.weights_dtype is not None:
        raise ValueError("weights: missing, but the header declares them")
    seq = obj.get("seq", 0)
    if not _is_int(seq) or not 0 <= seq <= _MAX_SEQ:
        raise ValueError(f"seq: expected an int in [0, 2**63), got {seq!r}")
    if "positions" in obj:
        positions, _ = decode_array(
            obj["positions"], "positions", {"int32": _POSITION_DTYPE}, max_record_tokens
        )
        if positions.shape != (num_tokens,):
            raise ValueError(
                f"positions: expected shape [{num_tokens}], got {list(positions.shape)}"
            )
        if num_tokens and positions.min() < 0:
            raise ValueError("positions: every position must be >= 0")
    else:
        positions = np.arange(num_tokens, dtype=np.int32)
    if "crc32" in obj and obj["crc32"] != _crc(obj):
        raise ValueError("crc32: the arrays' bytes do not match their checksum (corrupted data)")
    return TraceRecord(ids, weights, seq, positions)


def _check_ids_against(ids: np.ndarray, header: TraceHeader) -> None:
    if ids.shape[0] != header.num_layers or ids.shape[2] != header.top_k:
        raise ValueError(
            f"expert_ids: expected shape [{header.num_layers}, T, {header.top_k}], got {list(ids.shape)}"
        )
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= header.num_experts:
            bad = low if low < 0 else high
            raise ValueError(f"expert_ids: id {bad} is outside [0, {header.num_experts})")


# --------------------------------------------------------------------------- streams


def _unpacker(stream: BinaryIO, max_record_bytes: int) -> tuple[msgpack.Unpacker, list[int]]:
    """An Unpacker with every limit set, and its container counter (reset it before each object)."""
    containers = [0]

    def count(obj):
        containers[0] += 1
        if containers[0] > _MAX_CONTAINERS:
            raise ValueError(f"more than {_MAX_CONTAINERS} maps and lists in one object")
        return obj

    unpacker = msgpack.Unpacker(
        stream,
        raw=False,
        read_size=min(max_record_bytes, 2**20),
        max_buffer_size=max_record_bytes,
        max_bin_len=max_record_bytes,
        max_str_len=_MAX_METADATA_STR,
        max_array_len=MAX_LAYERS,
        max_map_len=_MAX_METADATA_ITEMS,
        max_ext_len=0,
        list_hook=count,
        object_hook=count,
    )
    return unpacker, containers


def _source_name(source) -> str:
    return (
        str(source)
        if isinstance(source, (str, os.PathLike))
        else getattr(source, "name", "<stream>")
    )


class TraceWriter:
    """Writes a header, then one record per ``write``; constant memory whatever the trace length.

    target: a path (created or truncated; removed again if the ``with`` block raises) or a
    writable binary file. Use as a context manager, or call ``close()``.
    """

    def __init__(self, target: str | os.PathLike | BinaryIO, header: TraceHeader):
        self.header = header
        self.records_written = 0
        self._path = Path(target) if isinstance(target, (str, os.PathLike)) else None
        self._file = open(self._path, "wb") if self._path is not None else target
        self._next_position: dict[int, int] = {}
        self._file.write(msgpack.packb(header.to_map(), use_bin_type=True))

    def write(
        self,
        expert_ids: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        seq: int = 0,
        positions: np.ndarray | None = None,
    ) -> None:
        """expert_ids: integer [num_layers, T, top_k], each in [0, num_experts); weights: finite
        floats of the same shape, required iff the header declares a weights dtype; positions:
        int [T] (default: continuing sequence ``seq`` where its last record stopped)."""
        h = self.header
        ids = np.asarray(expert_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"expert_ids: expected an integer array, got {ids.dtype}")
        if ids.ndim != 3:
            raise ValueError(
                f"expert_ids: expected shape [num_layers, T, top_k], got {list(ids.shape)}"
            )
        _check_ids_against(ids, h)
        if (weights is None) != (h.weights_dtype is None):
            raise ValueError("weights: give them exactly when the header declares a weights dtype")
        if weights is not None:
            weights = np.asarray(weights)
            if weights.shape != ids.shape or weights.dtype.kind != "f":
                raise ValueError(
                    f"weights: expected floats of shape {list(ids.shape)}, got {weights.dtype} {list(weights.shape)}"
                )
            if not np.isfinite(weights).all():
                raise ValueError("weights: every router weight must be finite")
        if not _is_int(seq) or not 0 <= seq <= _MAX_SEQ:
            raise ValueError(f"seq: expected an int in [0, 2**63), got {seq!r}")
        num_tokens = ids.shape[1]
        if positions is None:
            start = self._next_position.get(seq, 0)
            positions = np.arange(start, start + num_tokens, dtype=np.int64)
        positions = np.asarray(positions)
        if positions.shape != (num_tokens,) or positions.dtype.kind not in "iu":
            raise ValueError(
                f"positions: expected ints of shape [{num_tokens}], got {positions.dtype} {list(positions.shape)}"
            )
        if num_tokens and (positions.min() < 0 or positions.max() >= 2**31):
            raise ValueError("positions: expected values in [0, 2**31)")
        if num_tokens:
            self._next_position[seq] = int(positions[-1]) + 1
        self._file.write(
            encode_record(
                ids,
                weights,
                seq=seq,
                positions=positions,
                ids_dtype=h.ids_dtype,
                weights_dtype=h.weights_dtype or "float32",
            )
        )
        self.records_written += 1

    def write_trace(self, trace, record_tokens: int = 1024, progress=None) -> None:
        """Writes a ``moeray.traces.Trace``: each sequence in records of at most ``record_tokens``
        tokens, sequence i as seq i."""
        if record_tokens < 1:
            raise ValueError(f"record_tokens: expected an int >= 1, got {record_tokens}")
        offsets = trace.seq_offsets
        for seq in range(trace.num_sequences):
            for start in range(int(offsets[seq]), int(offsets[seq + 1]), record_tokens):
                stop = min(start + record_tokens, int(offsets[seq + 1]))
                ids = trace.expert_ids[start:stop].transpose(1, 0, 2)
                weights = None
                if self.header.weights_dtype is not None:
                    weights = trace.weights[start:stop].transpose(1, 0, 2)
                self.write(ids, weights, seq=seq)
                if progress is not None:
                    progress.advance(stop - start)

    def close(self) -> None:
        if self._path is not None and not self._file.closed:
            self._file.close()
        elif self._path is None:
            self._file.flush()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close()
        if exc_type is not None and self._path is not None:
            self._path.unlink(missing_ok=True)  # no half-written trace under the final name


class TraceReader:
    """Reads a trace record by record in constant memory: ``header``, then iterate for
    ``TraceRecord``s.

    source: a path or a readable binary file. max_record_bytes bounds the bytes of one record
    (and so every msgpack buffer); max_record_tokens bounds T. A malformed header raises
    TraceFormatError (record None) from the constructor; a malformed, truncated or corrupted
    record raises TraceFormatError naming its index after every earlier record was yielded.
    salvage: a bad record ends the iteration instead, kept in ``dropped``; ``salvage_report()``
    then says what was kept (the way to read a recording that was killed mid-record).
    """

    def __init__(
        self,
        source: str | os.PathLike | BinaryIO,
        *,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        max_record_tokens: int = DEFAULT_MAX_RECORD_TOKENS,
        salvage: bool = False,
    ):
        self.source = _source_name(source)
        self.max_record_tokens = max_record_tokens
        self.salvage = salvage
        self.records_read = 0
        self.tokens_read = 0
        self.dropped: TraceFormatError | None = None
        self._owned = isinstance(source, (str, os.PathLike))
        self._file = open(source, "rb") if self._owned else source
        self._unpacker, self._containers = _unpacker(self._file, max_record_bytes)
        try:
            obj = self._next_object(None)
            if obj is _END:
                raise TraceFormatError("empty file, no header", None, self.source)
            try:
                self.header = TraceHeader.from_map(obj)
            except (ValueError, TypeError) as exc:
                raise TraceFormatError(str(exc), None, self.source) from None
        except BaseException:
            self.close()
            raise

    def _next_object(self, index: int | None):
        """The next msgpack object, or _END at a clean end of the stream."""
        u = self._unpacker
        self._containers[0] = 0
        before = u.tell()
        try:
            return u.unpack()
        except msgpack.OutOfData:
            if u.tell() > before:
                size = self._size()
                ends = (
                    "the stream ends inside"
                    if size is None
                    else f"the file ends {size - before:,} bytes into"
                )
                raise TraceFormatError(
                    f"truncated: {ends} this record (which starts at byte {before:,})",
                    index,
                    self.source,
                    before,
                ) from None
            return _END
        except msgpack.BufferFull:
            raise TraceFormatError(
                "larger than max_record_bytes", index, self.source, before
            ) from None
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise TraceFormatError(
                f"not valid msgpack at byte {before} ({type(exc).__name__}: {exc})",
                index,
                self.source,
                before,
            ) from None

    def __iter__(self) -> Iterator[TraceRecord]:
        while self.dropped is None:
            index = self.records_read
            start = self._unpacker.tell()
            try:
                obj = self._next_object(index)
                if obj is _END:
                    return
                try:
                    record = decode_record(obj, self.header, self.max_record_tokens)
                except (ValueError, TypeError) as exc:
                    raise TraceFormatError(str(exc), index, self.source, start) from None
            except TraceFormatError as exc:
                if not self.salvage:
                    raise
                self.dropped = exc
                return
            self.records_read += 1
            self.tokens_read += record.num_tokens
            yield record

    def _size(self) -> int | None:
        """The file's size in bytes, None for a stream without a file behind it."""
        try:
            return os.fstat(self._file.fileno()).st_size
        except (OSError, AttributeError, ValueError):
            return None

    def salvage_report(self) -> SalvageReport:
        """What the records read so far kept of the file (call it after iterating)."""
        bytes_dropped = None
        if self.dropped is not None and self.dropped.offset is not None:
            size = self._size()
            bytes_dropped = None if size is None else size - self.dropped.offset
        return SalvageReport(
            Path(self.source).name,
            self.records_read,
            self.tokens_read,
            None if self.dropped is None else self.dropped.detail,
            None if self.dropped is None else self.dropped.offset,
            bytes_dropped,
        )

    def to_trace(self, name: str | None = None, progress=None):
        """Every remaining record as one ``moeray.traces.Trace`` (ids [tokens, layers, top_k],
        float32 weights). A new sequence starts wherever ``seq`` changes between records."""
        h = self.header
        # Transposing record by record keeps each copy small and cache-friendly.
        ids = [np.zeros((0, h.num_layers, h.top_k), dtype=ID_DTYPES[h.ids_dtype])]
        weights = [np.zeros((0, h.num_layers, h.top_k), dtype=np.float32)]
        lengths, seqs = [], []
        for record in self:
            ids.append(record.expert_ids.transpose(1, 0, 2))
            if record.weights is not None:
                weights.append(record.weights.transpose(1, 0, 2))
            lengths.append(record.num_tokens)
            seqs.append(record.seq)
            if progress is not None:
                progress.advance(1)
        all_ids = np.concatenate(ids, axis=0)
        all_weights = None
        if h.weights_dtype is not None:
            all_weights = np.concatenate(weights, axis=0, dtype=np.float32)
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        new_seq = [0] + [i for i in range(1, len(seqs)) if seqs[i] != seqs[i - 1]]
        offsets = np.append(starts[new_seq], starts[-1]) if seqs else np.array([0, 0])
        return Trace(
            all_ids,
            all_weights,
            offsets.astype(np.int64),
            h.num_experts,
            name if name is not None else Path(self.source).name,
        )

    def close(self) -> None:
        if self._owned and not self._file.closed:
            self._file.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *_) -> None:
        self.close()


@dataclass(frozen=True)
class SalvageReport:
    """What a salvaging read (``TraceReader(salvage=True)``) kept of a trace: the whole records
    before the first bad one.

    records_kept, tokens_kept: what was read. reason: why the rest was dropped (the first bad
    record's error), None when the file was whole. dropped_at: the byte that record starts at;
    bytes_dropped: from there to the end of the file (None when unknown)."""

    source: str
    records_kept: int
    tokens_kept: int
    reason: str | None = None
    dropped_at: int | None = None
    bytes_dropped: int | None = None

    def __str__(self) -> str:
        kept = f"{self.records_kept:,} whole records ({self.tokens_kept:,} tokens) of {self.source}"
        if self.reason is None:
            return f"kept all {kept}: nothing to drop"
        span = "the rest of the file"
        if self.bytes_dropped is not None:
            span = f"its last {self.bytes_dropped:,} bytes"
        return f"kept {kept}; dropped {span}, from record {self.records_kept} on: {self.reason}"


def is_trace_file(path: str | os.PathLike) -> bool:
    """True when the file starts with a header of this format (reads at most 64 KiB)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 2**10)
    except OSError:
        return False
    if not head or not (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return False
    try:
        obj = _unpacker(io.BytesIO(head), 2**16)[0].unpack()
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT_NAME


def read_trace(path: str | os.PathLike, progress=None):
    """The whole trace file as a ``moeray.traces.Trace``; TraceFormatError on a bad file."""
    with TraceReader(path) as reader:
        return reader.to_trace(progress=progress)


def header_for(
    trace, model: str = "", weights_dtype: str | None = "auto", layer_ids=None
) -> TraceHeader:
    """The header for writing ``trace``: ``weights_dtype`` "auto" is float32 when it has weights."""
    if weights_dtype == "auto":
        weights_dtype = "float32" if trace.weights is not None else None
    if weights_dtype is not None and trace.weights is None:
        raise ValueError("weights_dtype: the trace has no weights to store")
    return TraceHeader(
        num_layers=trace.num_layers,
        num_experts=trace.num_experts,
        top_k=trace.top_k,
        model=model,
        weights_dtype=weights_dtype,
        layer_ids=layer_ids,
    )


def write_trace(
    trace,
    path: str | os.PathLike,
    model: str = "",
    weights_dtype: str | None = "auto",
    layer_ids=None,
    record_tokens: int = 1024,
    progress=None,
) -> TraceHeader:
    """Writes a ``moeray.traces.Trace`` to ``path`` in this format; returns the header written."""
    header = header_for(trace, model, weights_dtype, layer_ids)
    with TraceWriter(path, header) as writer:
        writer.write_trace(trace, record_tokens, progress)
    return header

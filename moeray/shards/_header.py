"""Reads and validates one safetensors file's header before anything of the file is mapped.

The format: 8 bytes little-endian header length N; N bytes of JSON, an object mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section that follows the header) plus an optional ``"__metadata__"`` of strings.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from moeray.shards.errors import ShardFormatError, ShardNotFoundError
from moeray.shards.formats import DTYPE_BITS, tensor_nbytes

__all__ = ["FileHeader", "TensorEntry", "read_header", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 100_000_000  # the bound the safetensors library itself enforces


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: ``offset`` and ``length`` in bytes from the start of the file."""

    name: str
    path: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class FileHeader:
    path: str
    size_bytes: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: str) -> FileHeader:
    """Parses and validates ``path``'s header; raises ShardFormatError naming file and tensor."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header_bytes = _read_header_bytes(f, path, size)
    except FileNotFoundError:
        raise ShardNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ShardFormatError(f"{path}: is a directory, not a safetensors file") from None
    data_start = 8 + len(header_bytes)
    fields, metadata = _parse_json(header_bytes, path)
    tensors = {
        name: _entry(name, spec, path, data_start, size - data_start)
        for name, spec in fields.items()
    }
    _check_no_overlap(tensors.values(), path)
    return FileHeader(path, size, tensors, metadata)


def _read_header_bytes(f, path: str, size: int) -> bytes:
    if size < 8:
        raise ShardFormatError(
            f"{path}: truncated: {size} bytes, shorter than the 8-byte header length"
        )
    (length,) = struct.unpack("<Q", f.read(8))
    if length > MAX_HEADER_BYTES:
        raise ShardFormatError(
            f"{path}: header length {length} exceeds the limit of "
            f"{MAX_HEADER_BYTES} bytes (corrupt or not a safetensors file)"
        )
    if 8 + length > size:
        raise ShardFormatError(
            f"{path}: truncated: the header of {length} bytes runs past the "
            f"end of the file ({size} bytes)"
        )
    return f.read(length)


def _no_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_json(header_bytes: bytes, path: str) -> tuple[dict, dict[str, str]]:
    try:
        fields = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ShardFormatError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ShardFormatError(f"{path}: header is JSON but not an object of tensors")
    metadata = fields.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ShardFormatError(f"{path}: __metadata__ must map strings to strings")
    return fields, metadata


def _entry(name: str, spec, path: str, data_start: int, data_bytes: int) -> TensorEntry:
    where = f"{path}: tensor '{name}'"
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise ShardFormatError(f"{where}: expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise ShardFormatError(
            f"{where}: unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BITS))}"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ShardFormatError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ShardFormatError(
            f"{where}: data_offsets must be [begin, end] of non-negative ints, got {offsets!r}"
        )
    begin, end = offsets
    if end < begin:
        raise ShardFormatError(f"{where}: data_offsets end {end} is before begin {begin}")
    if end > data_bytes:
        raise ShardFormatError(
            f"{where}: data_offsets [{begin}, {end}] run past the end of the "
            f"data section ({data_bytes} bytes; file truncated?)"
        )
    expected = tensor_nbytes(dtype, tuple(shape))
    if expected is None:
        raise ShardFormatError(f"{where}: {dtype} {shape} is not a whole number of bytes")
    if expected != end - begin:
        raise ShardFormatError(
            f"{where}: data_offsets span {end - begin} bytes but {dtype} {shape} needs {expected}"
        )
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, end - begin)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(entries, path: str) -> None:
    previous = None
    for entry in sorted((e for e in entries if e.length), key=lambda e: e.offset):
        if previous is not None and entry.offset < previous.offset + previous.length:
            raise ShardFormatError(
                f"{path}: tensor '{entry.name}' overlaps tensor "
                f"'{previous.name}' (data_offsets share bytes)"
            )
        previous = entry

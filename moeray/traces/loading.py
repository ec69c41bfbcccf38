"""Routing traces: what a real model's routers chose, token by token, at every MoE layer.

``load_trace`` reads both formats moeray writes: the moeray trace format (a msgpack stream,
``moeray.traces.mtrace``, docs/trace-format.md), recognised by its header whatever the file's name, and
the ``.npz`` layout below.

The ``.npz`` layout (that of ``shared/traces/``, read with ``allow_pickle=False``):
- ``expert_ids``: integer [tokens, layers, top_k], each in [0, num_experts);
- ``expert_probs`` (optional): float [tokens, layers, top_k], router weights of the chosen experts;
- ``seq_offsets`` (optional): int64 [sequences + 1], sequence i is rows
  ``seq_offsets[i]:seq_offsets[i+1]`` in time order (default: one sequence);
- ``num_experts`` (optional): scalar; without it, num_experts = max id + 1.
Other keys are ignored. Every size either format declares is bounded by the bytes that hold it
or a documented limit before anything that size is allocated (docs/trace-format.md, "Limits").
"""

from __future__ import annotations

import io
import math
import os
import warnings
import zipfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import numpy as np

from moeray.policy._validate import check_int
from moeray.traces.mtrace import (
    FORMAT_NAME,
    MAX_EXPERTS,
    MAX_LAYERS,
    MAX_TOP_K,
    SalvageReport,
    TraceFormatError,
    TraceReader,
    is_trace_file,
)
from moeray.traces.trace import Trace, TraceNotFoundError

__all__ = ["default_trace_path", "load_trace", "read_mtrace", "read_npy", "read_npz", "trace_kind"]

_SNIFF_BYTES = 64 * 2**10
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a member first, or an empty archive
_NPY_MAGIC = b"\x93NUMPY"
_MTRACE_MARKER = FORMAT_NAME.encode()
# The most a member's bytes can expand to: stored as is, or deflate's ceiling of 1032:1.
_MAX_RATIO = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1032}
_NPY_HEADER_LENGTH = {(1, 0): 2, (2, 0): 4}  # bytes of the header-length field per version
_MAX_NPY_HEADER = 10_000  # numpy's own limit on a header it parses safely


def default_trace_path() -> Path:
    """The bundled slice of the gpt-oss-20b decode trace (see moeray/data/NOTICE)."""
    return Path(str(resources.files("moeray") / "data" / "gpt-oss-20b-slice.npz"))


def trace_kind(path: str | os.PathLike) -> str:
    """ "mtrace" or "npz", told by the file's first bytes whatever its name: an .npz is a zip
    archive, a moeray trace a msgpack stream opening with its header map.

    Raises ValueError naming the file and saying what it is instead: empty, a bare .npy array,
    an .mtrace whose header is damaged (TraceFormatError), or neither kind.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if not head:
        raise ValueError(f"path: '{path}' is empty (0 bytes), not a routing trace")
    if head.startswith(_ZIP_MAGIC):
        return "npz"
    if head.startswith(_NPY_MAGIC):
        raise ValueError(
            f"path: '{path}' is a bare .npy array, not a routing trace (an .npz of named "
            "arrays, expert_ids first, or a moeray trace)"
        )
    if 0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF):  # a msgpack map opens the stream
        try:
            with TraceReader(path):
                return "mtrace"
        except TraceFormatError as exc:
            if is_trace_file(path):
                raise  # the header decodes, but a field of it is wrong: exc names the field
            # Our writer puts "format" first; either sign says the file meant to be a trace.
            if _MTRACE_MARKER in head or head[1:8] == b"\xa6format":
                raise TraceFormatError(
                    f"the moeray trace's header is damaged: {exc.detail}", None, str(path)
                ) from None
    looks = "; it looks like text (a CSV? `moeray convert` reads those)" if _is_text(head) else ""
    raise ValueError(
        f"path: '{path}' is not a routing trace: neither a moeray trace (a msgpack stream "
        "opening with a moeray-trace header) nor an .npz (a zip archive); its first bytes are "
        f"{head[:8].hex(' ')}{looks}"
    )


def _is_text(head: bytes) -> bool:
    try:
        text = head[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def load_trace(
    path: str | os.PathLike,
    num_experts: int | None = None,
    *,
    salvage: bool = False,
    on_salvage: Callable[[SalvageReport], None] | None = None,
) -> Trace:
    """Reads a routing trace (a moeray trace file, or an ``.npz`` in the layout of the module
    docstring; told apart by content) and checks its shapes.

    num_experts: overrides the file's (or inferred) expert count; must exceed every id.
    salvage: read a damaged moeray trace (a recording that was killed) up to its last whole
    record, and pass ``on_salvage`` what was kept; an .npz cannot be salvaged.
    Raises TraceNotFoundError for a missing file and ValueError, naming the file, for one that
    is empty, not a trace, damaged, truncated, inconsistent or holds no tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceNotFoundError(2, f"path: no trace file at '{path}'", str(path))
    if trace_kind(path) == "mtrace":
        return _with_num_experts(read_mtrace(path, salvage, on_salvage), num_experts)
    return read_npz(path, num_experts, salvage)[0]


def read_mtrace(
    path: str | os.PathLike,
    salvage: bool = False,
    on_salvage: Callable[[SalvageReport], None] | None = None,
    progress=None,
) -> Trace:
    """A moeray trace file, whole, as a ``Trace`` (see ``load_trace`` for ``salvage``); a bad
    record's error says what ``--salvage`` would keep, and a trace of no tokens is an error."""
    with TraceReader(path, salvage=salvage) as reader:
        try:
            trace = reader.to_trace(progress=progress)
        except TraceFormatError as exc:
            raise salvage_hint(exc, reader.tokens_read) from None
        report = reader.salvage_report()
    if trace.num_tokens == 0:
        raise empty_trace_error(path, report)
    if salvage and on_salvage is not None:
        on_salvage(report)
    return trace


def salvage_hint(exc: TraceFormatError, tokens_before: int) -> TraceFormatError:
    """``exc`` (a bad record) with what ``--salvage`` would keep of the records before it."""
    if exc.record is None:
        return exc
    if exc.record == 0:
        hint = "no whole record precedes it, so --salvage would keep nothing"
    else:
        hint = (
            f"--salvage keeps the {exc.record:,} whole records ({tokens_before:,} tokens) before it"
        )
    return TraceFormatError(f"{exc.detail}; {hint}", exc.record, exc.source, exc.offset)


def empty_trace_error(path: str | os.PathLike, report: SalvageReport) -> ValueError:
    """The error for a moeray trace that holds no tokens (after salvaging, if it was)."""
    if report.reason is not None:
        return ValueError(
            f"path: '{path}': nothing to salvage, the trace is empty: record "
            f"{report.records_kept} is already damaged ({report.reason})"
        )
    what = (
        "no records" if report.records_kept == 0 else f"{report.records_kept:,} records of 0 tokens"
    )
    return ValueError(f"path: '{path}': the trace is empty (a header and {what})")


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """A bare ``.npy`` file, its declared size checked against the file's before anything is
    allocated; object arrays are refused, never unpickled. ValueError naming the file."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _read_npy(f, os.fstat(f.fileno()).st_size, "the file")
        except Exception as exc:  # numpy's header parser raises several types on garbage
            raise ValueError(
                f"path: '{path}' is not a readable .npy array ({_one_line(str(exc))})"
            ) from None


def _npz_arrays(path: Path, salvage: bool) -> dict[str, np.ndarray]:
    """Every ``.npy`` member of the archive, its declared size checked before anything is
    allocated (docs/trace-format.md, "Limits"); object arrays are refused, never unpickled.
    A damaged archive or member is a ValueError naming the file (and the member)."""
    no_salvage = " (--salvage reads moeray traces only)" if salvage else ""
    # zipfile raises many unrelated types on damaged bytes (BadZipFile, zlib.error, EOFError,
    # struct.error, NotImplementedError, RuntimeError, ...): every one of them means "damaged".
    try:
        archive = zipfile.ZipFile(path)
        members = archive.infolist()
    except Exception:
        raise ValueError(
            f"path: '{path}' is a truncated or damaged .npz: it starts as a zip archive but has "
            f"no readable zip directory at its end{no_salvage}"
        ) from None
    archive_bytes = path.stat().st_size
    arrays = {}
    with archive:
        for info in members:
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            try:
                arrays[key] = _read_member(archive, info, key, archive_bytes)
            except _LimitError as exc:
                raise ValueError(f"path: '{path}': {exc}") from None
            except Exception as exc:
                raise ValueError(
                    f"path: '{path}' is a damaged .npz: array {key!r} cannot be "
                    f"read ({_one_line(str(exc))}){no_salvage}"
                ) from None
    return arrays


def _one_line(text: str) -> str:
    """``text`` (an error from a library, a name from the file) fit for a one-line message:
    whitespace runs as one space, other unprintable characters escaped."""
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _LimitError(ValueError):
    """A well-formed size beyond a documented limit (not damage)."""


def _read_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, archive_bytes: int
) -> np.ndarray:
    """One member; what it may expand to is bounded by the bytes the archive really holds."""
    if info.flag_bits & 0x1:
        raise ValueError("it is encrypted")
    if info.compress_type not in _MAX_RATIO:
        raise ValueError(f"compression method {info.compress_type} (an .npz is stored or deflated)")
    if info.compress_size > archive_bytes:
        raise ValueError(
            f"it declares {info.compress_size:,} compressed bytes, the file has {archive_bytes:,}"
        )
    available = min(info.file_size, info.compress_size * _MAX_RATIO[info.compress_type])
    with archive.open(info) as member:
        return _read_npy(member, available, "the archive", key)


def _read_npy(stream: BinaryIO, available: int, where: str, key: str = "") -> np.ndarray:
    """An .npy array from ``stream``, which holds at most ``available`` bytes (header included):
    the header's length, then its shape x dtype, are checked against that (and ``expert_ids``
    against the layer and top_k limits) before anything that size is read."""
    version = np.lib.format.read_magic(stream)
    if version not in _NPY_HEADER_LENGTH:
        raise ValueError(f"npy format version {version} is not one moeray reads")
    length_bytes = stream.read(_NPY_HEADER_LENGTH[version])
    length = int.from_bytes(length_bytes, "little")
    if length > _MAX_NPY_HEADER:
        raise ValueError(f"its header declares {length:,} bytes, more than {_MAX_NPY_HEADER:,}")
    header = io.BytesIO(length_bytes + stream.read(length))
    with warnings.catch_warnings():  # a Python 2 header warns; it is read all the same
        warnings.simplefilter("ignore")
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(header)
    if dtype.hasobject:
        raise ValueError("it holds Python objects (a pickle), which moeray never loads")
    if any(d < 0 for d in shape):
        raise ValueError(f"negative shape {shape}")
    if key == "expert_ids" and len(shape) == 3:
        _check_ids_shape(shape)
    size = math.prod(shape) * dtype.itemsize
    if size > available:
        raise ValueError(
            f"its header declares {dtype} {list(shape)} ({size:,} bytes) but {where} "
            f"holds {available:,} bytes"
        )
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"truncated: {len(data):,} of its {size:,} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _check_ids_shape(shape: tuple[int, ...]) -> None:
    """expert_ids [tokens, layers, top_k] within the limits of the moeray trace format."""
    for axis, name, limit in ((1, "layers", MAX_LAYERS), (2, "top_k", MAX_TOP_K)):
        if shape[axis] > limit:
            raise _LimitError(
                f"expert_ids: {shape[axis]:,} {name} exceed the limit of {limit:,} "
                "(docs/trace-format.md, Limits)"
            )


def read_npz(
    path: str | os.PathLike, num_experts: int | None = None, salvage: bool = False
) -> tuple[Trace, dict[str, np.ndarray]]:
    """An ``.npz`` in the layout of the module docstring: the checked trace, and every array of
    the archive (read-only; a converter keeps ``moe_layer_ids`` and the weights' stored dtype).
    Sizes are bounded as docs/trace-format.md, "Limits", says; ValueError naming the file."""
    path = Path(path)
    arrays = _npz_arrays(path, salvage)
    try:
        return _npz_trace(arrays, num_experts, path.name), arrays
    except ValueError as exc:
        raise ValueError(f"path: '{path}': {exc}") from None


def _npz_trace(arrays: dict[str, np.ndarray], num_experts: int | None, name: str) -> Trace:
    if "expert_ids" not in arrays:
        raise ValueError(f"no 'expert_ids' array (keys: {sorted(arrays)})")
    ids = arrays["expert_ids"]
    if ids.dtype.kind not in "iu":
        raise ValueError(f"expert_ids: expected an integer dtype, got {ids.dtype}")
    if ids.ndim != 3 or ids.shape[1] < 1 or ids.shape[2] < 1:
        raise ValueError(f"expert_ids: expected shape [tokens, layers, top_k], got {ids.shape}")
    if ids.shape[0] == 0:
        raise ValueError("the trace is empty (expert_ids has 0 tokens)")
    if ids.min() < 0:
        raise ValueError(f"expert_ids: ids must be >= 0, got {ids.min()}")
    max_id = int(ids.max())

    if num_experts is not None:
        num_experts = check_int(num_experts, "num_experts", 1, 2**31 - 1)
    elif "num_experts" in arrays:
        stored = arrays["num_experts"]
        if stored.shape != () or stored.dtype.kind not in "iu":
            raise ValueError(f"num_experts: expected an integer scalar in the file, got {stored!r}")
        num_experts = int(stored)
    if num_experts is None:
        num_experts = max_id + 1
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts: expected an int in [1, {MAX_EXPERTS}], got {num_experts}")
    if num_experts <= max_id:
        raise ValueError(f"num_experts: {num_experts} experts but the trace uses id {max_id}")

    weights = arrays.get("expert_probs")
    if weights is not None:
        if weights.dtype.kind != "f" or weights.shape != ids.shape:
            raise ValueError(
                f"expert_probs: expected floats of shape {ids.shape}, got {weights.dtype} {weights.shape}"
            )
        weights = weights.astype(np.float32)
        if not np.isfinite(weights).all():
            raise ValueError("expert_probs: every router weight must be finite")

    offsets = arrays.get("seq_offsets", np.array([0, ids.shape[0]], dtype=np.int64))
    offsets = np.asarray(offsets)
    if (
        offsets.dtype.kind not in "iu"
        or offsets.ndim != 1
        or len(offsets) < 2
        or offsets[0] != 0
        or offsets[-1] != ids.shape[0]
        or (np.diff(offsets) < 0).any()
    ):
        raise ValueError(
            f"seq_offsets: expected non-decreasing int64 [sequences + 1] from 0 to {ids.shape[0]}"
        )
    return Trace(
        expert_ids=ids,
        weights=weights,
        seq_offsets=offsets.astype(np.int64),
        num_experts=int(num_experts),
        name=name,
    )


def _with_num_experts(trace: Trace, num_experts: int | None) -> Trace:
    """``trace`` with its expert count overridden (it must exceed every id)."""
    if num_experts is None:
        return trace
    num_experts = check_int(num_experts, "num_experts", 1, 2**31 - 1)
    max_id = int(trace.expert_ids.max()) if trace.expert_ids.size else 0
    if num_experts <= max_id:
        raise ValueError(f"num_experts: {num_experts} experts but the trace uses id {max_id}")
    return Trace(trace.expert_ids, trace.weights, trace.seq_offsets, num_experts, trace.name)

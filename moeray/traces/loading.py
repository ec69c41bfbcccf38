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
Other keys are ignored.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from moeray.policy._validate import check_int
from moeray.traces.mtrace import (
    FORMAT_NAME,
    SalvageReport,
    TraceFormatError,
    TraceReader,
    is_trace_file,
)
from moeray.traces.trace import Trace, TraceNotFoundError

__all__ = ["default_trace_path", "load_trace", "read_mtrace", "trace_kind"]

_SNIFF_BYTES = 64 * 2**10
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a member first, or an empty archive
_NPY_MAGIC = b"\x93NUMPY"
_MTRACE_MARKER = FORMAT_NAME.encode()


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
    return _read_npz(path, num_experts, salvage)


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


def _npz_arrays(path: Path, salvage: bool) -> dict[str, np.ndarray]:
    """Every ``.npy`` member of the archive, its declared size checked against the member's
    before anything is allocated; object arrays are refused, never unpickled."""
    no_salvage = " (--salvage reads moeray traces only)" if salvage else ""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise ValueError(
            f"path: '{path}' is a truncated or damaged .npz: it starts as a zip archive but has "
            f"no readable zip directory at its end{no_salvage}"
        ) from None
    arrays = {}
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            try:
                arrays[key] = _read_member(archive, info)
            except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as exc:
                raise ValueError(
                    f"path: '{path}' is a damaged .npz: array '{key}' cannot be read "
                    f"({exc}){no_salvage}"
                ) from None
    return arrays


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"npy format version {version} is not one moeray reads")
        if dtype.hasobject:
            raise ValueError("it holds Python objects (a pickle), which moeray never loads")
        if any(d < 0 for d in shape):
            raise ValueError(f"negative shape {shape}")
        size = math.prod(shape) * dtype.itemsize
        if size > info.file_size:
            raise ValueError(
                f"its header declares {dtype} {list(shape)} ({size:,} bytes) but the archive "
                f"holds {info.file_size:,} bytes"
            )
        data = member.read(size)
    if len(data) != size:
        raise ValueError(f"truncated: {len(data):,} of its {size:,} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _read_npz(path: Path, num_experts: int | None, salvage: bool) -> Trace:
    arrays = _npz_arrays(path, salvage)
    if "expert_ids" not in arrays:
        raise ValueError(f"path: '{path}' has no 'expert_ids' array (keys: {sorted(arrays)})")
    ids = arrays["expert_ids"]
    if ids.dtype.kind not in "iu":
        raise ValueError(f"expert_ids: expected an integer dtype, got {ids.dtype}")
    if ids.ndim != 3 or ids.shape[1] < 1 or ids.shape[2] < 1:
        raise ValueError(f"expert_ids: expected shape [tokens, layers, top_k], got {ids.shape}")
    if ids.shape[0] == 0:
        raise ValueError(f"path: '{path}': the trace is empty (expert_ids has 0 tokens)")
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
        name=path.name,
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

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

import os
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np

from moeray.policy._validate import check_int
from moeray.traces.mtrace import is_trace_file, read_trace
from moeray.traces.trace import Trace, TraceNotFoundError

__all__ = ["default_trace_path", "load_trace"]


def default_trace_path() -> Path:
    """The bundled slice of the gpt-oss-20b decode trace (see moeray/data/NOTICE)."""
    return Path(str(resources.files("moeray") / "data" / "gpt-oss-20b-slice.npz"))


def load_trace(path: str | os.PathLike, num_experts: int | None = None) -> Trace:
    """Reads a routing trace (a moeray trace file, or an ``.npz`` in the layout of the module
    docstring) and checks its shapes.

    num_experts: overrides the file's (or inferred) expert count; must exceed every id.
    Raises TraceNotFoundError for a missing file and ValueError for an unreadable, truncated or
    inconsistent one.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceNotFoundError(2, f"path: no trace file at '{path}'", str(path))
    if is_trace_file(path):
        return _with_num_experts(read_trace(path), num_experts)
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("expected an .npz archive of named arrays")
        with data:
            arrays = {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"path: '{path}' is not a readable .npz trace ({exc})") from exc

    if "expert_ids" not in arrays:
        raise ValueError(f"path: '{path}' has no 'expert_ids' array (keys: {sorted(arrays)})")
    ids = arrays["expert_ids"]
    if ids.dtype.kind not in "iu":
        raise ValueError(f"expert_ids: expected an integer dtype, got {ids.dtype}")
    if ids.ndim != 3 or ids.shape[1] < 1 or ids.shape[2] < 1:
        raise ValueError(f"expert_ids: expected shape [tokens, layers, top_k], got {ids.shape}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"expert_ids: ids must be >= 0, got {ids.min()}")
    max_id = int(ids.max()) if ids.size else 0

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

"""``moeray convert``: routing from the formats engines and papers already produce, to moeray's.

Sources (``--from``, or guessed from the file):
- ``trace``: a moeray trace file (docs/trace-format.md);
- ``npz``: the ``.npz`` layout of ``moeray.traces`` (that of ``shared/traces/``);
- ``csv``: rows of (layer, token, expert ids), see ``read_csv``;
- ``sglang``: SGLang's ``per_token`` expert-distribution dump (``torch.save`` of
  ``{"records": [{"topk_ids_of_layer": [layer, token, top_k], ...}]}``, read with
  ``weights_only=True``), or a ``.npy`` of one ``[layer, token, top_k]`` array; see ``read_sglang``.
The destination is an ``.npz`` when its name ends so, else a moeray trace file.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeray.traces.loading import load_trace, read_npy, read_npz, trace_kind
from moeray.traces.mtrace import (
    MAX_EXPERTS,
    MAX_LAYERS,
    MAX_TOP_K,
    SalvageReport,
    TraceHeader,
    TraceReader,
    TraceWriter,
)
from moeray.traces.trace import Trace

__all__ = ["SOURCE_FORMATS", "ConvertResult", "convert", "guess_format", "read_csv", "read_sglang"]

SOURCE_FORMATS = ("trace", "npz", "csv", "sglang")

_SEQ_COLUMNS = (
    "seq",
    "sequence",
    "sequence_id",
    "seq_id",
    "prompt",
    "prompt_num",
    "request",
    "rid",
)
_LIST_SPLIT = re.compile(r"[\s;|,]+")


@dataclass(frozen=True)
class ConvertResult:
    """What was written: the trace as read, the model's layer index of each MoE layer (None:
    0..num_layers-1) and how the weights were stored (None: not at all)."""

    trace: Trace
    layer_ids: tuple[int, ...] | None
    weights_dtype: str | None
    destination: Path


def guess_format(path: Path) -> str:
    """The source format of ``path`` from its content or, failing that, its suffix (an .mtrace
    or .npz that is neither goes to ``load_trace``, which says what is wrong with it)."""
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):  # torch.save files are zip archives too
        return "sglang"
    try:
        kind = trace_kind(path)
    except ValueError:
        kind = {".mtrace": "mtrace", ".npz": "npz"}.get(suffix)
    if kind is not None:
        return "trace" if kind == "mtrace" else "npz"
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    if suffix == ".npy":
        return "sglang"
    raise ValueError(f"--from: cannot tell the format of '{path}'; give one of {SOURCE_FORMATS}")


# --------------------------------------------------------------------------- CSV


def _is_int_text(text: str) -> bool:
    return bool(re.fullmatch(r"\s*-?\d+\s*", text))


def read_csv(
    path: str | os.PathLike, num_experts: int | None = None
) -> tuple[Trace, tuple[int, ...]]:
    """Rows of (layer, token, expert ids): one row per token and MoE layer.

    Without a header the columns are ``layer, token, ids...``; with one, the columns named
    ``layer`` and ``token`` (or ``token_idx``/``position``), an optional sequence column (one of
    ``seq, sequence, sequence_id, seq_id, prompt, prompt_num, request, rid``; any text), and
    the ids: every other column, or one column holding them separated by spaces, ``;``, ``|`` or
    ``,``. Tokens are ordered by token number within a sequence, sequences by first appearance;
    every token needs every layer exactly once. Returns the trace and the layer numbers found.
    """
    path = Path(path)
    with open(path, newline="") as f:
        line = f.readline()
        # csv.Sniffer guesses wrong on short numeric samples; the first line tells enough.
        delimiter = "\t" if "\t" in line else ";" if ";" in line and "," not in line else ","
        f.seek(0)
        rows = csv.reader(f, delimiter=delimiter)
        first = next(rows, None)
        if first is None:
            raise ValueError(f"{path}: empty CSV")
        layer_col, token_col, seq_col, id_cols, start = _csv_columns(first, path)
        seqs, tokens, layers, ids = [], [], [], []
        seq_index: dict[str, int] = {}
        all_rows = rows if start else _chain([first], rows)
        for line, row in enumerate(all_rows, start=1 + start):
            if not row or not "".join(row).strip():
                continue
            try:
                layers.append(int(row[layer_col]))
                tokens.append(int(row[token_col]))
                key = row[seq_col].strip() if seq_col is not None else ""
                seqs.append(seq_index.setdefault(key, len(seq_index)))
                cells = (
                    [row[c] for c in id_cols] if id_cols else row[max(layer_col, token_col) + 1 :]
                )
                ids.append([int(x) for cell in cells for x in _LIST_SPLIT.split(cell.strip()) if x])
            except (ValueError, IndexError) as exc:
                raise ValueError(
                    f"{path}: line {line}: expected layer, token and expert ids ({exc})"
                ) from None
    if not ids:
        raise ValueError(f"{path}: no rows")
    top_k = len(ids[0])
    bad = next((i for i, r in enumerate(ids) if len(r) != top_k or top_k == 0), None)
    if bad is not None:
        raise ValueError(
            f"{path}: row {bad + 1 + start}: {len(ids[bad])} expert ids, the first row has {top_k}"
        )
    try:
        columns = [np.array(c, dtype=np.int64) for c in (seqs, tokens, layers, ids)]
    except OverflowError:
        raise ValueError(f"{path}: a layer, token or expert id does not fit 64 bits") from None
    return _assemble(*columns, path, num_experts)


def _chain(*iterables):
    for it in iterables:
        yield from it


def _csv_columns(first: list[str], path: Path):
    """(layer column, token column, sequence column or None, id columns or None, header rows)."""
    if all(_is_int_text(c) or _LIST_SPLIT.sub("", c).isdigit() for c in first[:2]):
        return 0, 1, None, None, 0  # no header: layer, token, ids...
    names = [c.strip().lower() for c in first]

    def find(*options):
        return next((names.index(o) for o in options if o in names), None)

    layer, token = (
        find("layer", "layer_id", "layer_idx"),
        find("token", "token_idx", "token_id", "position"),
    )
    if layer is None or token is None:
        raise ValueError(f"{path}: the header needs 'layer' and 'token' columns, got {first}")
    seq = find(*_SEQ_COLUMNS)
    used = {layer, token, seq}
    id_cols = [
        i
        for i, n in enumerate(names)
        if i not in used and ("expert" in n or n.startswith("id") or n.startswith("e"))
    ]
    if not id_cols:
        id_cols = [i for i in range(len(names)) if i not in used]
    return layer, token, seq, id_cols, 1


def _assemble(seqs, tokens, layers, ids, source, num_experts) -> tuple[Trace, tuple[int, ...]]:
    """Rows of (seq, token, layer, ids[k]) into a Trace ordered by sequence, then token, then layer."""
    layer_ids, layer_index = np.unique(layers, return_inverse=True)
    num_layers = len(layer_ids)
    order = np.lexsort((layer_index, tokens, seqs))
    seqs, tokens, layer_index, ids = seqs[order], tokens[order], layer_index[order], ids[order]
    # Each (sequence, token) group must hold layers 0..L-1 once each, in order after the sort.
    starts = np.flatnonzero(np.concatenate([[True], (np.diff(seqs) != 0) | (np.diff(tokens) != 0)]))
    sizes = np.diff(np.append(starts, len(ids)))
    rank = np.arange(len(ids)) - np.repeat(starts, sizes)
    bad_groups = (sizes != num_layers) | np.add.reduceat(layer_index != rank, starts).astype(bool)
    if bad_groups.any():
        row = starts[int(np.argmax(bad_groups))]
        raise ValueError(
            f"{source}: token {tokens[row]} of sequence {seqs[row]} does not have each of the "
            f"{num_layers} layers {layer_ids.tolist()} exactly once"
        )
    expert_ids = ids.reshape(-1, num_layers, ids.shape[1])
    token_seqs = seqs[::num_layers]
    starts = np.flatnonzero(np.diff(token_seqs)) + 1
    offsets = np.concatenate([[0], starts, [len(token_seqs)]]).astype(np.int64)
    return _trace(expert_ids, None, offsets, source, num_experts), tuple(int(x) for x in layer_ids)


def _trace(expert_ids, weights, offsets, source, num_experts) -> Trace:
    if expert_ids.size and expert_ids.min() < 0:
        raise ValueError(f"{source}: expert ids must be >= 0, got {expert_ids.min()}")
    max_id = int(expert_ids.max()) if expert_ids.size else 0
    if num_experts is None:
        num_experts = max_id + 1
    if num_experts <= max_id:
        raise ValueError(f"num_experts: {num_experts} experts but {source} uses id {max_id}")
    if num_experts > MAX_EXPERTS:
        raise ValueError(
            f"{source}: num_experts: expected an int in [1, {MAX_EXPERTS}], got {num_experts}"
        )
    for axis, name, limit in ((1, "layers", MAX_LAYERS), (2, "top_k", MAX_TOP_K)):
        if expert_ids.shape[axis] > limit:
            raise ValueError(
                f"{source}: {expert_ids.shape[axis]:,} {name} exceed the limit of {limit:,}"
            )
    dtype = np.uint8 if num_experts <= 256 else np.uint16 if num_experts <= 2**16 else np.int32
    return Trace(
        expert_ids.astype(dtype), weights, offsets, int(num_experts), Path(str(source)).name
    )


# --------------------------------------------------------------------------- SGLang


def _load_sglang(path: Path):
    if path.suffix.lower() == ".npy":
        return {"records": [{"topk_ids_of_layer": read_npy(path)}]}
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{path}: reading a torch.save dump needs torch (pip install 'moeray[hf]')"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on a bad or unsafe file
        raise ValueError(
            f"{path}: not a readable SGLang dump ({type(exc).__name__}: {exc})"
        ) from None


def _numpy(value) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def read_sglang(
    path: str | os.PathLike, num_experts: int | None = None
) -> tuple[Trace, tuple[int, ...]]:
    """SGLang's ``per_token`` expert-distribution dump: records of ``topk_ids_of_layer``
    [layer, token, top_k] (-1 where a layer is dense or a token is padding), in forward order.

    Layers that are -1 throughout (dense) are dropped, then tokens that are -1 on every
    remaining layer (padding). Physical ids map to logical ones through
    ``last_physical_to_logical_map`` [layer, physical] when the dump has it. With ``rids``,
    ``forward_mode`` (1 extend, 2 decode) and ``extend_seq_lens``, each request's tokens form
    its own sequence; otherwise each record does. Returns the trace and the kept layer numbers.
    """
    path = Path(path)
    dump = _load_sglang(path)
    records = dump.get("records") if isinstance(dump, dict) else None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a dump with a non-empty 'records' list")
    arrays = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "topk_ids_of_layer" not in record:
            raise ValueError(f"{path}: record {i} has no 'topk_ids_of_layer'")
        a = _numpy(record["topk_ids_of_layer"])
        if (
            a.ndim != 3
            or a.dtype.kind not in "iu"
            or (arrays and a.shape[::2] != arrays[0].shape[::2])
        ):
            raise ValueError(
                f"{path}: record {i}: expected integer [layer, token, top_k], got {a.dtype} {a.shape}"
            )
        arrays.append(a.astype(np.int64))
    mapping = dump.get("last_physical_to_logical_map")
    if mapping is not None:
        mapping = _numpy(mapping).astype(np.int64)
    moe_layers = np.flatnonzero(np.stack([(a >= 0).any(axis=(1, 2)) for a in arrays]).any(axis=0))
    if not len(moe_layers):
        raise ValueError(f"{path}: every id is -1: no MoE routing in the dump")
    ids, seqs, request_seq = [], [], {}
    for i, (record, a) in enumerate(zip(records, arrays)):
        a = a[moe_layers]
        if mapping is not None:
            a = np.where(
                a >= 0,
                np.take_along_axis(
                    mapping[moe_layers], np.maximum(a, 0).reshape(len(moe_layers), -1), axis=1
                ).reshape(a.shape),
                a,
            )
        keep = (a >= 0).any(axis=(0, 2))
        a = a[:, keep]
        if (a < 0).any():
            raise ValueError(
                f"{path}: record {i}: a token has -1 on some MoE layers and not others"
            )
        for seq_key, part in _split_requests(record, a, i, int(keep.sum())):
            ids.append(part.transpose(1, 0, 2))
            seqs.extend([request_seq.setdefault(seq_key, len(request_seq))] * part.shape[1])
    expert_ids = np.concatenate(ids, axis=0)
    seqs = np.array(seqs)
    starts = np.flatnonzero(np.diff(seqs)) + 1 if len(seqs) else np.array([], dtype=np.int64)
    offsets = np.concatenate([[0], starts, [len(seqs)]]).astype(np.int64)
    if num_experts is None and mapping is not None:
        num_experts = int(mapping.max()) + 1
    return _trace(expert_ids, None, offsets, path, num_experts), tuple(int(x) for x in moe_layers)


def _split_requests(record: dict, a: np.ndarray, index: int, num_tokens: int):
    """(sequence key, [layer, tokens, top_k]) per request of one forward pass, in token order."""
    rids, mode = record.get("rids"), record.get("forward_mode")
    if rids is None or mode is None:
        yield ("record", index), a
        return
    lengths = (
        [1] * len(rids)
        if int(mode) == 2
        else [int(n) for n in _numpy(record.get("extend_seq_lens", []))]
    )
    if len(lengths) != len(rids) or sum(lengths) != num_tokens:
        yield ("record", index), a  # padding or a layout we do not know: keep the pass whole
        return
    start = 0
    for rid, length in zip(rids, lengths):
        yield ("rid", str(rid)), a[:, start : start + length]
        start += length


# --------------------------------------------------------------------------- convert


def _read_source(src: Path, fmt: str, num_experts: int | None, salvage: bool, on_salvage):
    """(trace, layer_ids or None, the dtype its weights are stored in or None)."""
    if fmt == "trace":
        trace = load_trace(src, num_experts, salvage=salvage, on_salvage=on_salvage)
        with TraceReader(src) as reader:
            return trace, reader.header.layer_ids, reader.header.weights_dtype
    if fmt == "npz":
        trace, arrays = read_npz(src, num_experts, salvage)
        probs = arrays.get("expert_probs")
        stored = None if probs is None else "float16" if probs.dtype == np.float16 else "float32"
        return trace, _npz_layer_ids(arrays, trace.num_layers, src), stored
    if fmt == "csv":
        return *read_csv(src, num_experts), None
    if fmt == "sglang":
        return *read_sglang(src, num_experts), None
    raise ValueError(f"--from: expected one of {SOURCE_FORMATS}, got {fmt!r}")


def _npz_layer_ids(arrays: dict, num_layers: int, src: Path) -> tuple[int, ...] | None:
    """``moe_layer_ids`` of an npz (as in shared/traces/deepseek-v2-lite-chat), if any."""
    layer_ids = arrays.get("moe_layer_ids")
    if layer_ids is None:
        return None
    if layer_ids.dtype.kind not in "iu" or layer_ids.shape != (num_layers,):
        raise ValueError(
            f"path: '{src}': moe_layer_ids: expected {num_layers} ints, got "
            f"{layer_ids.dtype} {list(layer_ids.shape)}"
        )
    return tuple(int(x) for x in layer_ids)


def _weights_dtype(trace: Trace, requested: str, stored: str | None) -> str | None:
    """How to write the weights: ``requested``, or for auto the dtype the source stores them in
    (float16 router weights stay float16: exact, and half the bytes)."""
    if trace.weights is None or requested == "none":
        return None
    if requested != "auto":
        return requested
    return stored or "float32"


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    source_format: str = "auto",
    model: str = "",
    num_experts: int | None = None,
    weights_dtype: str = "auto",
    record_tokens: int = 1024,
    progress: bool | None = False,
    salvage: bool = False,
    on_salvage: Callable[[SalvageReport], None] | None = None,
) -> ConvertResult:
    """Reads ``src`` (``source_format`` one of SOURCE_FORMATS, or auto) and writes ``dst``: an
    ``.npz`` in the layout of ``moeray.traces`` when its name ends in .npz, else a moeray trace
    with records of at most ``record_tokens`` tokens of one sequence. weights_dtype: auto (the
    source's), float16, float32 or none. progress: a bar on stderr while writing (None: when
    stderr is a terminal). salvage, on_salvage: as ``load_trace``'s, for a damaged moeray trace."""
    from moeray._progress import Progress

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise ValueError(f"SRC: no such file '{src}'")
    if src.resolve() == dst.resolve():
        raise ValueError("DST: must differ from SRC")
    fmt = guess_format(src) if source_format == "auto" else source_format
    if fmt in ("trace", "npz"):  # the content decides between the two, as in load_trace
        fmt = "trace" if trace_kind(src) == "mtrace" else "npz"
    trace, layer_ids, stored_dtype = _read_source(src, fmt, num_experts, salvage, on_salvage)
    dtype = _weights_dtype(trace, weights_dtype, stored_dtype)
    if dst.suffix.lower() == ".npz":
        arrays = {
            "expert_ids": trace.expert_ids,
            "seq_offsets": trace.seq_offsets,
            "num_experts": np.array(trace.num_experts),
        }
        if dtype is not None:
            arrays["expert_probs"] = trace.weights.astype(dtype)
        if layer_ids is not None:
            arrays["moe_layer_ids"] = np.array(layer_ids)
        with open(dst, "wb") as f:
            np.savez(f, **arrays)
    else:
        header = TraceHeader(
            num_layers=trace.num_layers,
            num_experts=trace.num_experts,
            top_k=trace.top_k,
            model=model or src.stem,
            weights_dtype=dtype,
            layer_ids=layer_ids,
            metadata={"converted_from": src.name, "source_format": fmt},
        )
        with (
            TraceWriter(dst, header) as writer,
            Progress(trace.num_tokens, "convert", enabled=progress) as bar,
        ):
            writer.write_trace(trace, record_tokens, bar)
    return ConvertResult(trace, layer_ids, dtype, dst)

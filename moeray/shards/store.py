"""ShardStore: a checkpoint of safetensors files, memory-mapped read-only, indexed by expert.

Every (layer, expert) maps to the byte ranges of its weight tensors, which is what a prefetcher
needs (``expert_ranges``: path, offset from the start of the file, length), and to zero-copy
numpy views of those bytes, which is what a kernel needs (``expert_weights``).

Recognised tensor names (``model.`` prefix optional; l = layer, e = expert):

- Mixtral: ``model.layers.{l}.block_sparse_moe.experts.{e}.w1|w2|w3.weight``
  (w1 = gate, w3 = up: [intermediate, hidden]; w2 = down: [hidden, intermediate]);
- Qwen-MoE, DeepSeek, OLMoE: ``model.layers.{l}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight``
  (same shapes);
- stacked, gpt-oss: ``model.layers.{l}.mlp.experts.gate_up_proj`` [E, hidden, 2 * intermediate]
  (gate and up interleaved along the last axis), ``...down_proj`` [E, intermediate, hidden],
  optional ``..._bias`` [E, 2 * intermediate] and [E, hidden]; expert e is slice e of the
  leading axis. The MXFP4 form (``..._blocks`` and ``..._scales``, U8) gives byte ranges only.

A projection stored in ruvllm's packed ternary format (``moeray.shards.ternary``) is a U8 tensor
[rows, cols / 4] with an F32 ``<name>_scale`` beside it, in a file whose ``__metadata__`` declares
``"quantization": "ruvllm-ternary"`` and its ``ternary_block_size``.

Other tensors (attention, routers, norms, shared experts, dense MLPs) are ignored; a tensor whose
name contains ``.experts.`` but matches no pattern is an error. A ``model.safetensors.index.json``
in the directory decides which files are read and which file holds each tensor.

Nothing is read out of bounds: every header is validated against its file's size (see
``moeray.shards._header``) before the file is mapped. A file truncated *after* it was opened
makes reads of the lost pages fail with SIGBUS, as with any memory mapping.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeray.shards import ternary
from moeray.shards._header import FileHeader, TensorEntry, read_header
from moeray.shards.errors import ShardFormatError, ShardNotFoundError
from moeray.shards.formats import FLOAT_FORMATS, NUMPY_DTYPES, TERNARY, bf16_to_float32

__all__ = [
    "ByteRange",
    "ExpertWeights",
    "GPT_OSS",
    "INDEX_NAME",
    "LayerSpec",
    "MXFP4",
    "RECOGNISED_PATTERNS",
    "SWIGLU",
    "ShardStore",
    "WeightView",
]

INDEX_NAME = "model.safetensors.index.json"
SWIGLU = "swiglu"  # one tensor per expert and projection: gate, up, down
GPT_OSS = "gpt-oss"  # stacked experts, gate and up interleaved, biases, clamped activation
MXFP4 = "MXFP4"

RECOGNISED_PATTERNS = (
    "model.layers.{l}.block_sparse_moe.experts.{e}.w1|w2|w3.weight (Mixtral)",
    "model.layers.{l}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight "
    "(Qwen-MoE, DeepSeek, OLMoE)",
    "model.layers.{l}.mlp.experts.gate_up_proj|down_proj[_bias|_blocks|_scales] (stacked, gpt-oss)",
    "any of these with a _scale tensor beside a U8 weight (ruvllm packed ternary)",
)

_MIXTRAL = re.compile(
    r"^(?:model\.)?layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\."
    r"(w1|w2|w3)\.weight(_scale)?$"
)
_MLP = re.compile(
    r"^(?:model\.)?layers\.(\d+)\.mlp\.experts\.(\d+)\."
    r"(gate_proj|up_proj|down_proj)\.weight(_scale)?$"
)
_STACKED = re.compile(
    r"^(?:model\.)?layers\.(\d+)\.mlp\.experts\."
    r"(gate_up_proj|down_proj)(_bias|_scale|_blocks|_scales)?$"
)
_ROLES = {
    "w1": "gate",
    "w3": "up",
    "w2": "down",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "gate_up_proj": "gate_up",
}


@dataclass(frozen=True)
class ByteRange:
    """``length`` bytes at ``offset`` from the start of the file at ``path`` (absolute)."""

    path: str
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class LayerSpec:
    """What one MoE layer of a checkpoint holds: ``layout`` SWIGLU or GPT_OSS; ``format`` F32,
    F16, BF16, TERNARY (``block_size`` weights per scale), MXFP4 or another safetensors dtype
    (the last two: byte ranges only)."""

    layer: int
    num_experts: int
    layout: str
    format: str
    hidden_size: int
    intermediate_size: int
    block_size: int = 0


@dataclass(frozen=True, eq=False)  # arrays do not compare as one bool
class WeightView:
    """One tensor of one expert, a read-only zero-copy view of the mapping.

    ``shape`` is the logical shape as stored; ``data`` is float32 / float16 [shape] for F32 / F16,
    uint16 [shape] raw bits for BF16 (widen with ``moeray.shards.formats.bf16_to_float32``), and
    uint8 [rows, cols / 4] packed codes for TERNARY, with ``scales`` float32
    [ceil(rows * cols / block_size)] (layout: ``moeray.shards.ternary``)."""

    name: str
    format: str
    shape: tuple[int, ...]
    data: np.ndarray
    scales: np.ndarray | None = None
    block_size: int = 0

    def to_float32(self) -> np.ndarray:
        """float32 [shape], a new array (dequantized for TERNARY, widened for F16 / BF16)."""
        if self.format == TERNARY:
            return ternary.dequantize_ternary(self.data, self.scales, self.shape, self.block_size)
        if self.format == "BF16":
            return bf16_to_float32(self.data)
        return self.data.astype(np.float32)


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """The weights of expert ``expert`` of layer ``layer``, views of the mapping.

    SWIGLU: ``gate``, ``up`` [intermediate, hidden] and ``down`` [hidden, intermediate] (the
    [out, in] layout of a linear layer). GPT_OSS: ``gate_up`` [hidden, 2 * intermediate]
    ([in, out]; column 2j is gate j, 2j + 1 is up j), ``down`` [intermediate, hidden], and when
    the checkpoint has them ``gate_up_bias`` [2 * intermediate] and ``down_bias`` [hidden]."""

    layer: int
    expert: int
    layout: str
    hidden_size: int
    intermediate_size: int
    tensors: Mapping[str, WeightView] = field(repr=False)

    def __getitem__(self, role: str) -> WeightView:
        return self.tensors[role]

    def __contains__(self, role: str) -> bool:
        return role in self.tensors


@dataclass(frozen=True)
class _Part:
    """A tensor of one expert: the whole ``entry``, or slice ``index`` of its leading axis."""

    entry: TensorEntry
    index: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape if self.index is None else self.entry.shape[1:]

    def byte_range(self) -> ByteRange:
        if self.index is None:
            return ByteRange(self.entry.path, self.entry.offset, self.entry.length)
        length = self.entry.length // self.entry.shape[0]
        return ByteRange(self.entry.path, self.entry.offset + self.index * length, length)

    def label(self) -> str:
        suffix = "" if self.index is None else f"[{self.index}]"
        return f"{self.entry.name}{suffix}"


@dataclass(frozen=True)
class _Layer:
    spec: LayerSpec
    experts: tuple[dict[str, _Part], ...]  # role (gate, gate_scale, down_bias, ...) -> part


class ShardStore:
    """A checkpoint directory (or one ``.safetensors`` file), mapped read-only.

    Raises ShardNotFoundError for a missing directory or file and ShardFormatError (a
    ValueError) for anything malformed, naming the file and tensor. Close it (or use it as a
    context manager) to unmap; views handed out keep their mapping alive until dropped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        files, weight_map = _checkpoint_files(self.path)
        headers = [read_header(str(f)) for f in files]
        if weight_map is not None:
            _check_index(weight_map, headers, self.path / INDEX_NAME)
        self._layers = _build_layers(headers, weight_map)
        self.files = tuple(h.path for h in headers)
        self._maps: dict[str, mmap.mmap] = {}
        try:
            for header in headers:
                self._maps[header.path] = _map(header)
        except BaseException:
            self.close()
            raise

    # -- layout --------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        """The checkpoint's MoE layer numbers, ascending (DeepSeek-V2-Lite: 1..26, layer 0 is
        dense)."""
        return tuple(self._layers)

    def layer_spec(self, layer: int) -> LayerSpec:
        return self._layer(layer).spec

    def num_experts(self, layer: int) -> int:
        return self._layer(layer).spec.num_experts

    def expert_ranges(self, layer: int, expert: int) -> tuple[ByteRange, ...]:
        """The bytes of one expert's tensors, ordered by (path, offset), adjacent ranges merged."""
        return _merge(p.byte_range() for p in self._parts(layer, expert).values())

    def expert_bytes(self, layer: int, expert: int) -> int:
        return sum(r.length for r in self.expert_ranges(layer, expert))

    def layer_ranges(self, layer: int) -> tuple[ByteRange, ...]:
        """The bytes of every expert of ``layer`` (its shard), ordered and merged."""
        experts = self._layer(layer).experts
        return _merge(p.byte_range() for parts in experts for p in parts.values())

    def layer_bytes(self, layer: int) -> int:
        return sum(r.length for r in self.layer_ranges(layer))

    # -- weights -------------------------------------------------------------------------
    def expert_weights(
        self, layer: int, expert: int, mapped: Mapping[str, np.ndarray] | None = None
    ) -> ExpertWeights:
        """Zero-copy views of one expert's weights (formats F32, F16, BF16 and TERNARY).

        mapped: path -> uint8 array of that whole file mapped elsewhere (a prefetcher's
        ``file_array``), to read through the mapping whose page tables the prefetcher populated
        rather than this store's own, which would take a page fault per 4 KiB on first touch."""
        spec = self.layer_spec(layer)
        if spec.format not in (*FLOAT_FORMATS, TERNARY):
            raise ShardFormatError(
                f"{self.path}: layer {layer} is {spec.format}: byte ranges only; expert_weights "
                "reads F32, F16, BF16 and ruvllm ternary"
            )
        parts = self._parts(layer, expert)
        tensors = {
            role: self._view(part, spec, parts.get(f"{role}_scale"), mapped)
            for role, part in parts.items()
            if not role.endswith("_scale")
        }
        return ExpertWeights(
            layer, expert, spec.layout, spec.hidden_size, spec.intermediate_size, tensors
        )

    def release_pages(self, ranges) -> None:
        """Unmaps from this store's mappings the whole pages inside ``ranges`` (MADV_DONTNEED):
        a page some mapping still maps cannot leave the page cache, so a prefetcher's release
        needs this when a kernel has read the same bytes through ``expert_weights``."""
        page = mmap.PAGESIZE
        for r in ranges:
            mapping = self._maps.get(r.path)
            start, end = -(-r.offset // page) * page, r.end // page * page
            if mapping is not None and end > start:
                mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Unmaps every file whose views are gone; the rest unmap when their last view goes."""
        for mapping in self._maps.values():
            try:
                mapping.close()
            except BufferError:  # numpy views still export the buffer
                pass
        self._maps = {}

    def __enter__(self) -> ShardStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ShardStore({str(self.path)!r}, layers={len(self._layers)}, files={len(self.files)})"
        )

    # -- internals -----------------------------------------------------------------------
    def _layer(self, layer: int) -> _Layer:
        try:
            return self._layers[layer]
        except (KeyError, TypeError):
            raise ValueError(
                f"layer: expected one of the checkpoint's MoE layers "
                f"{_span(self.layers)}, got {layer!r}"
            ) from None

    def _parts(self, layer: int, expert: int) -> dict[str, _Part]:
        experts = self._layer(layer).experts
        if (
            isinstance(expert, bool)
            or not isinstance(expert, (int, np.integer))
            or not 0 <= expert < len(experts)
        ):
            raise ValueError(
                f"expert: expected an int in [0, {len(experts)}) for layer {layer}, got {expert!r}"
            )
        return experts[int(expert)]

    def _array(self, part: _Part, dtype: np.dtype, mapped=None) -> np.ndarray:
        if not self._maps:
            raise ValueError(f"{self.path}: the store is closed")
        byte_range = part.byte_range()
        count = byte_range.length // dtype.itemsize
        if mapped is None:
            buffer = self._maps[byte_range.path]
        else:
            buffer = mapped[byte_range.path]
            if buffer.dtype != np.uint8 or buffer.shape != (len(self._maps[byte_range.path]),):
                raise ValueError(
                    f"mapped: {byte_range.path} must be a uint8 array of the whole "
                    f"file ({len(self._maps[byte_range.path])} bytes)"
                )
        flat = np.frombuffer(buffer, dtype=dtype, count=count, offset=byte_range.offset)
        return flat.reshape(part.shape)

    def _view(self, part: _Part, spec: LayerSpec, scale: _Part | None, mapped=None) -> WeightView:
        entry = part.entry
        data = self._array(part, NUMPY_DTYPES[entry.dtype], mapped)
        if scale is None:
            return WeightView(part.label(), entry.dtype, part.shape, data)
        rows, packed_cols = part.shape
        return WeightView(
            part.label(),
            TERNARY,
            (rows, packed_cols * 4),
            data,
            self._array(scale, NUMPY_DTYPES["F32"], mapped),
            spec.block_size,
        )


# -- finding the files ---------------------------------------------------------------------
def _checkpoint_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    if root.is_file():
        return [root], None
    if not root.is_dir():
        raise ShardNotFoundError(f"{root}: no such checkpoint directory or file")
    index = root / INDEX_NAME
    if index.is_file():
        weight_map = _read_index(index)
        files = []
        for name in sorted(set(weight_map.values())):
            if not (root / name).is_file():
                tensor = next(t for t, f in weight_map.items() if f == name)
                raise ShardNotFoundError(
                    f"{index}: lists file '{name}' (holding tensor "
                    f"'{tensor}'), which does not exist in {root}"
                )
            files.append(root / name)
        return files, {t: str(root / f) for t, f in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ShardNotFoundError(f"{root}: no *.safetensors files and no {INDEX_NAME}")
    return files, None


def _read_index(index: Path) -> dict[str, str]:
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ShardFormatError(f"{index}: not valid JSON ({exc})") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ShardFormatError(
            f"{index}: expected an object with a 'weight_map' of tensor name -> file name"
        )
    for tensor, name in weight_map.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise ShardFormatError(
                f"{index}: tensor '{tensor}': file '{name}' is not a name "
                "inside the checkpoint directory"
            )
    return weight_map


def _check_index(weight_map: dict[str, str], headers: list[FileHeader], index: Path) -> None:
    by_path = {h.path: h for h in headers}
    for tensor, path in weight_map.items():
        if tensor not in by_path[path].tensors:
            raise ShardFormatError(
                f"{index}: lists tensor '{tensor}' in {path}, whose header has no such tensor"
            )


def _map(header: FileHeader) -> mmap.mmap:
    with open(header.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != header.size_bytes:
            raise ShardFormatError(
                f"{header.path}: changed size while being opened "
                f"({header.size_bytes} -> {size} bytes)"
            )
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


# -- from tensor names to experts --------------------------------------------------------------
@dataclass(frozen=True)
class _Named:
    """A recognised expert tensor: ``expert`` None for stacked tensors; ``role`` e.g. gate,
    gate_scale, gate_up_bias, down_blocks."""

    layer: int
    expert: int | None
    role: str
    layout: str
    entry: TensorEntry


def _recognise(entry: TensorEntry) -> _Named | None:
    for pattern in (_MIXTRAL, _MLP):
        match = pattern.match(entry.name)
        if match:
            layer, expert, projection, suffix = match.groups()
            role = _ROLES[projection] + ("_scale" if suffix else "")
            return _Named(int(layer), int(expert), role, SWIGLU, entry)
    match = _STACKED.match(entry.name)
    if match:
        layer, projection, suffix = match.groups()
        return _Named(int(layer), None, _ROLES[projection] + (suffix or ""), GPT_OSS, entry)
    if ".experts." in entry.name:
        raise ShardFormatError(
            f"{entry.path}: tensor '{entry.name}' looks like an expert weight but matches no "
            f"recognised name pattern; recognised: {'; '.join(RECOGNISED_PATTERNS)}"
        )
    return None


def _build_layers(
    headers: list[FileHeader], weight_map: dict[str, str] | None
) -> dict[int, _Layer]:
    by_layer: dict[int, list[_Named]] = {}
    for header in headers:
        for entry in header.tensors.values():
            if weight_map is not None and weight_map.get(entry.name) != header.path:
                continue  # the index attributes this tensor to another file, or to none
            named = _recognise(entry)
            if named is not None:
                by_layer.setdefault(named.layer, []).append(named)
    if not by_layer:
        files = ", ".join(h.path for h in headers)
        raise ShardFormatError(
            f"{files}: no expert tensors found; recognised name patterns: "
            f"{'; '.join(RECOGNISED_PATTERNS)}"
        )
    metadata = {h.path: h.metadata for h in headers}
    return {layer: _build_layer(layer, by_layer[layer], metadata) for layer in sorted(by_layer)}


def _build_layer(layer: int, named: list[_Named], metadata: dict[str, dict]) -> _Layer:
    layouts = {n.layout for n in named}
    if len(layouts) > 1:
        one, other = (next(n for n in named if n.layout == x) for x in sorted(layouts))
        raise ShardFormatError(
            f"layer {layer} mixes stacked and per-expert tensors: "
            f"'{one.entry.name}' ({one.entry.path}) and '{other.entry.name}' "
            f"({other.entry.path})"
        )
    if layouts == {GPT_OSS}:
        experts = _stacked_experts(layer, named)
    else:
        experts = _separate_experts(layer, named)
    spec = _layer_spec(layer, experts, layouts.pop(), metadata)
    return _Layer(spec, experts)


def _separate_experts(layer: int, named: list[_Named]) -> tuple[dict[str, _Part], ...]:
    by_expert: dict[int, dict[str, _Part]] = {}
    for n in named:
        parts = by_expert.setdefault(n.expert, {})
        if n.role in parts:
            raise ShardFormatError(
                f"{n.entry.path}: tensor '{n.entry.name}': layer {layer} "
                f"expert {n.expert} already has a {n.role} tensor, "
                f"'{parts[n.role].entry.name}'"
            )
        parts[n.role] = _Part(n.entry)
    num_experts = max(by_expert) + 1
    for expert in range(num_experts):
        parts = by_expert.get(expert)
        if parts is None:
            raise ShardFormatError(
                f"layer {layer}: expert {expert} has no tensors, yet experts "
                f"up to {num_experts - 1} do"
            )
        _require(layer, expert, parts, ("gate", "up", "down"))
    return tuple(by_expert[e] for e in range(num_experts))


def _stacked_experts(layer: int, named: list[_Named]) -> tuple[dict[str, _Part], ...]:
    stacked = {n.role: n.entry for n in named}
    if len(stacked) < len(named):
        raise ShardFormatError(f"layer {layer}: a stacked expert tensor appears twice")
    for entry in stacked.values():
        if not entry.shape or entry.shape[0] < 1:
            raise ShardFormatError(
                f"{entry.path}: tensor '{entry.name}': a stacked expert tensor "
                f"needs a leading expert axis, got shape {list(entry.shape)}"
            )
    leading = {e.shape[0] for e in stacked.values()}
    if len(leading) > 1:
        shapes = ", ".join(f"'{e.name}' {list(e.shape)}" for e in stacked.values())
        raise ShardFormatError(
            f"layer {layer}: stacked tensors disagree on the number of "
            f"experts (leading axis): {shapes}"
        )
    parts = tuple(
        {role: _Part(entry, e) for role, entry in stacked.items()} for e in range(leading.pop())
    )
    if "gate_up_blocks" in stacked or "down_blocks" in stacked:
        _require(
            layer, 0, parts[0], ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales")
        )
    else:
        _require(layer, 0, parts[0], ("gate_up", "down"))
    return parts


def _require(layer: int, expert: int, parts: dict[str, _Part], roles: tuple[str, ...]) -> None:
    missing = [r for r in roles if r not in parts]
    if missing:
        seen = next(iter(parts.values())).entry
        raise ShardFormatError(
            f"layer {layer} expert {expert}: no {' / '.join(missing)} tensor (has "
            f"{', '.join(sorted(parts))}; e.g. '{seen.name}' in {seen.path})"
        )


def _layer_spec(
    layer: int, experts: tuple[dict[str, _Part], ...], layout: str, metadata: dict[str, dict]
) -> LayerSpec:
    first = experts[0]
    if "gate_up_blocks" in first:  # [2 * intermediate, hidden / 32, 16] and [hidden, ...]
        for role in ("gate_up_blocks", "down_blocks"):
            if len(first[role].shape) != 3:
                entry = first[role].entry
                raise ShardFormatError(
                    f"{entry.path}: tensor '{entry.name}': MXFP4 blocks must "
                    f"be [E, rows, blocks, 16], got {list(entry.shape)}"
                )
        hidden, intermediate = first["down_blocks"].shape[0], first["gate_up_blocks"].shape[0] // 2
        return LayerSpec(layer, len(experts), layout, MXFP4, hidden, intermediate)
    main_roles = ("gate", "up", "down") if layout == SWIGLU else ("gate_up", "down")
    specs = [
        _expert_shapes(layer, e, parts, main_roles, layout, metadata)
        for e, parts in enumerate(experts)
    ]
    for expert, spec in enumerate(specs[1:], start=1):
        if spec != specs[0]:
            raise ShardFormatError(
                f"layer {layer}: expert {expert} has format and sizes {spec}, expert 0 {specs[0]}"
            )
    fmt, hidden, intermediate, block_size = specs[0]
    return LayerSpec(layer, len(experts), layout, fmt, hidden, intermediate, block_size)


def _expert_shapes(layer, expert, parts, main_roles, layout, metadata):
    """(format, hidden, intermediate, block_size) of one expert, every tensor checked."""
    dtypes = {parts[r].entry.dtype for r in main_roles}
    if len(dtypes) > 1:
        listed = ", ".join(f"'{parts[r].label()}' {parts[r].entry.dtype}" for r in main_roles)
        raise ShardFormatError(
            f"layer {layer} expert {expert}: projections differ in dtype "
            f"({listed}; in {parts[main_roles[0]].entry.path})"
        )
    dtype = dtypes.pop()
    shapes = {r: parts[r].shape for r in main_roles}
    fmt, block_size = dtype, 0
    if dtype == "U8":
        block_size = _ternary_block_size(parts[main_roles[0]], metadata)
        shapes = {r: _ternary_shape(parts, r, block_size) for r in main_roles}
        fmt = TERNARY
    else:
        for role in parts:
            if role.endswith("_scale"):
                raise ShardFormatError(
                    f"{parts[role].entry.path}: tensor '{parts[role].label()}': "
                    f"a ternary scale beside a {dtype} weight (ternary weights "
                    "are U8)"
                )
    hidden, intermediate = _check_shapes(layer, expert, parts, shapes, layout)
    return fmt, hidden, intermediate, block_size


def _ternary_block_size(part: _Part, metadata: dict[str, dict]) -> int:
    entry = part.entry
    meta = metadata[entry.path]
    if meta.get(ternary.QUANTIZATION_KEY) != ternary.TERNARY_QUANTIZATION:
        raise ShardFormatError(
            f"{entry.path}: tensor '{entry.name}' is U8 but the file's __metadata__ does not "
            f"declare {ternary.QUANTIZATION_KEY}={ternary.TERNARY_QUANTIZATION!r}"
        )
    text = meta.get(ternary.BLOCK_SIZE_KEY, "")
    if not text.isdigit() or int(text) < 1:
        raise ShardFormatError(
            f"{entry.path}: __metadata__ {ternary.BLOCK_SIZE_KEY} must be an int >= 1, got {text!r}"
        )
    return int(text)


def _ternary_shape(parts: dict[str, _Part], role: str, block_size: int) -> tuple[int, int]:
    """Logical [rows, cols] of a packed ternary projection, its scale tensor checked."""
    part, scale = parts[role], parts.get(f"{role}_scale")
    where = f"{part.entry.path}: tensor '{part.label()}'"
    if scale is None:
        raise ShardFormatError(
            f"{where}: a U8 (ternary) weight without its '{part.entry.name}_scale' tensor"
        )
    if len(part.shape) != 2:
        raise ShardFormatError(
            f"{where}: a ternary weight must be [rows, cols / 4], got {list(part.shape)}"
        )
    rows, cols = part.shape[0], part.shape[1] * 4
    expected = (ternary.num_blocks(rows * cols, block_size),)
    if scale.entry.dtype != "F32" or scale.shape != expected:
        raise ShardFormatError(
            f"{scale.entry.path}: tensor '{scale.label()}': expected F32 "
            f"{list(expected)} scales for a [{rows}, {cols}] ternary weight in "
            f"blocks of {block_size}, got {scale.entry.dtype} "
            f"{list(scale.shape)}"
        )
    return rows, cols


def _check_shapes(layer, expert, parts, shapes, layout) -> tuple[int, int]:
    """(hidden, intermediate) implied by the projections' shapes, or ShardFormatError."""

    def fail(why):
        listed = ", ".join(f"'{parts[r].label()}' {list(s)}" for r, s in shapes.items())
        raise ShardFormatError(
            f"layer {layer} expert {expert}: {why} ({listed}; in "
            f"{next(iter(parts.values())).entry.path})"
        )

    if any(len(s) != 2 for s in shapes.values()):
        fail("projections must be matrices")
    if layout == SWIGLU:
        intermediate, hidden = shapes["gate"]
        if shapes["up"] != (intermediate, hidden) or shapes["down"] != (hidden, intermediate):
            fail("expected gate, up [intermediate, hidden] and down [hidden, intermediate]")
        return hidden, intermediate
    hidden, double = shapes["gate_up"]
    intermediate = double // 2
    if double % 2 or shapes["down"] != (intermediate, hidden):
        fail("expected gate_up [hidden, 2 * intermediate] and down [intermediate, hidden]")
    for role, size in (("gate_up_bias", double), ("down_bias", hidden)):
        if role in parts and (
            parts[role].shape != (size,) or parts[role].entry.dtype not in FLOAT_FORMATS
        ):
            fail(
                f"{role} must be a float vector [{size}], got {parts[role].entry.dtype} "
                f"{list(parts[role].shape)}"
            )
    return hidden, intermediate


def _merge(ranges) -> tuple[ByteRange, ...]:
    merged: list[ByteRange] = []
    for r in sorted(ranges, key=lambda r: (r.path, r.offset)):
        if r.length == 0:
            continue
        if merged and merged[-1].path == r.path and merged[-1].end == r.offset:
            merged[-1] = ByteRange(r.path, merged[-1].offset, merged[-1].length + r.length)
        else:
            merged.append(r)
    return tuple(merged)


def _span(layers: tuple[int, ...]) -> str:
    if layers and layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return str(list(layers))

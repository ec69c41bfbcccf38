"""Synthetic checkpoints: the real tensor names and per-expert shapes of an MoE family, random
weights (real weights cannot be downloaded here), written with the ``safetensors`` package.

Shapes (``MODEL_SHAPES``; each from the model's published ``config.json``):

==================  ======  =======  ======  ============  =====================================
family              layers  experts  hidden  intermediate  also written
==================  ======  =======  ======  ============  =====================================
gpt-oss-20b         24      32       2880    2880          stacked experts with biases, router
mixtral-8x7b        32      8        4096    14336         router
deepseek-v2-lite    27      64       2048    1408          layer 0 dense (10944), 2 shared
                                                           experts (2816), router
qwen1.5-moe         24      60       2048    1408          shared expert (5632) and its gate,
                                                           router
==================  ======  =======  ======  ============  =====================================

``scale`` divides hidden and intermediate sizes (rounded down to a multiple of 4, at least 4) to
keep checkpoints small; ``num_layers`` keeps the first layers. Weights are normal with standard
deviation 1 / sqrt(fan_in), so an expert's output stays of order one. Each file holds
``layers_per_file`` layers; several files come with a ``model.safetensors.index.json``.
``plan_checkpoint`` gives the bytes a checkpoint takes on disk from the shapes alone, and
``write_checkpoint`` refuses (``check_free_space``) one larger than its filesystem's free space.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from moeray._progress import Progress
from moeray.policy._validate import check_int
from moeray.shards import ternary
from moeray.shards.formats import float32_to_bf16
from moeray.shards.store import INDEX_NAME

__all__ = [
    "DTYPES",
    "MODEL_SHAPES",
    "ModelShape",
    "SynthCheckpoint",
    "SynthConfig",
    "SynthPlan",
    "check_free_space",
    "format_bytes",
    "free_bytes_for",
    "plan_checkpoint",
    "planned_tensors",
    "write_checkpoint",
]

DTYPES = ("bf16", "f16", "f32", "ternary")
NAMINGS = ("mixtral", "mlp", "stacked")


@dataclass(frozen=True)
class ModelShape:
    """One MoE family's layout. ``naming``: mixtral (block_sparse_moe.experts.{e}.w1|w2|w3),
    mlp (mlp.experts.{e}.gate_proj|up_proj|down_proj) or stacked (gpt-oss mlp.experts.gate_up_proj).
    Sizes are per expert; 0 means the family has no such part."""

    name: str
    naming: str
    num_layers: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    first_dense_layers: int = 0
    dense_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    shared_name: str = ""

    def __post_init__(self):
        if self.naming not in NAMINGS:
            raise ValueError(f"naming: expected one of {', '.join(NAMINGS)}, got {self.naming!r}")
        check_int(self.num_layers, "num_layers", 1)
        check_int(self.num_experts, "num_experts", 1)
        for name in ("hidden_size", "intermediate_size"):
            check_int(getattr(self, name), name, 1)
        check_int(self.first_dense_layers, "first_dense_layers", 0, self.num_layers - 1)

    def scaled(self, scale: int) -> ModelShape:
        """Hidden and intermediate sizes divided by ``scale`` (>= 1), kept multiples of 4."""
        scale = check_int(scale, "scale", 1)
        if scale == 1:
            return self
        size = lambda n: n and max(4, n // scale // 4 * 4)  # noqa: E731 (0 stays 0)
        return replace(
            self,
            hidden_size=size(self.hidden_size),
            intermediate_size=size(self.intermediate_size),
            dense_intermediate_size=size(self.dense_intermediate_size),
            shared_intermediate_size=size(self.shared_intermediate_size),
        )


MODEL_SHAPES = {
    # openai/gpt-oss-20b: hidden_size 2880, intermediate_size 2880, num_local_experts 32
    "gpt-oss-20b": ModelShape("gpt-oss-20b", "stacked", 24, 32, 2880, 2880),
    # mistralai/Mixtral-8x7B-v0.1: hidden_size 4096, intermediate_size 14336, 8 local experts
    "mixtral-8x7b": ModelShape("mixtral-8x7b", "mixtral", 32, 8, 4096, 14336),
    # deepseek-ai/DeepSeek-V2-Lite: first_k_dense_replace 1, intermediate_size 10944,
    # moe_intermediate_size 1408, n_routed_experts 64, n_shared_experts 2
    "deepseek-v2-lite": ModelShape(
        "deepseek-v2-lite",
        "mlp",
        27,
        64,
        2048,
        1408,
        first_dense_layers=1,
        dense_intermediate_size=10944,
        shared_intermediate_size=2 * 1408,
        shared_name="shared_experts",
    ),
    # Qwen/Qwen1.5-MoE-A2.7B: moe_intermediate_size 1408, num_experts 60,
    # shared_expert_intermediate_size 5632
    "qwen1.5-moe": ModelShape(
        "qwen1.5-moe",
        "mlp",
        24,
        60,
        2048,
        1408,
        shared_intermediate_size=5632,
        shared_name="shared_expert",
    ),
}


@dataclass(frozen=True)
class SynthConfig:
    """What to write: ``shape`` (already scaled), its first ``num_layers`` layers, expert weights
    as ``dtype`` (bf16, f16, f32 or ruvllm ternary in blocks of ``block_size``)."""

    shape: ModelShape
    num_layers: int
    dtype: str = "bf16"
    block_size: int = ternary.DEFAULT_BLOCK_SIZE
    layers_per_file: int = 1
    seed: int = 0

    def __post_init__(self):
        check_int(self.num_layers, "num_layers", self.shape.first_dense_layers + 1)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_int(self.block_size, "block_size", 1)
        check_int(self.layers_per_file, "layers_per_file", 1)
        check_int(self.seed, "seed", 0)
        if self.dtype == "ternary":
            for name in ("hidden_size", "intermediate_size"):
                if getattr(self.shape, name) % 4:
                    raise ValueError(
                        f"{name}: ternary rows pack 4 weights a byte, so it must be "
                        f"a multiple of 4, got {getattr(self.shape, name)}"
                    )


@dataclass(frozen=True)
class SynthCheckpoint:
    """A written checkpoint: its directory, files and size."""

    path: Path
    files: tuple[Path, ...]
    total_bytes: int
    config: SynthConfig


@dataclass(frozen=True)
class SynthPlan:
    """What ``write_checkpoint(config, out)`` writes into ``out``, known before anything is
    allocated: ``files`` (names) with ``file_bytes`` (each file's size on disk, its safetensors
    header included), ``index_bytes`` (``model.safetensors.index.json``; 0 when there is one file)
    and ``tensor_bytes`` (the tensors' data alone, ``SynthCheckpoint.total_bytes``)."""

    config: SynthConfig
    files: tuple[str, ...]
    file_bytes: tuple[int, ...]
    index_bytes: int
    tensor_bytes: int

    @property
    def total_bytes(self) -> int:
        """Every byte written: the files and the index."""
        return sum(self.file_bytes) + self.index_bytes

    @property
    def names(self) -> tuple[str, ...]:
        """Every file written, the index last when there is one."""
        return self.files + ((INDEX_NAME,) if self.index_bytes else ())


@dataclass(frozen=True)
class _Planned:
    name: str
    dtype: str  # safetensors' numpy-style name: bfloat16, float16, ...
    shape: tuple[int, ...]
    make: Callable[[np.random.Generator], np.ndarray]  # stored array (uint16 for bfloat16)


def planned_tensors(config: SynthConfig, layer: int) -> list[_Planned]:
    """The tensors of one layer, names and stored shapes as in the real checkpoint."""
    shape, prefix = config.shape, f"model.layers.{layer}"
    hidden = shape.hidden_size
    if layer < shape.first_dense_layers:
        return _mlp(config, f"{prefix}.mlp", hidden, shape.dense_intermediate_size, dense=True)
    if shape.naming == "stacked":
        return _stacked_layer(config, prefix)
    if shape.naming == "mixtral":
        tensors = [
            _float(config, f"{prefix}.block_sparse_moe.gate.weight", (shape.num_experts, hidden))
        ]
        for e in range(shape.num_experts):
            base = f"{prefix}.block_sparse_moe.experts.{e}"
            tensors += _projection(config, f"{base}.w1.weight", shape.intermediate_size, hidden)
            tensors += _projection(config, f"{base}.w2.weight", hidden, shape.intermediate_size)
            tensors += _projection(config, f"{base}.w3.weight", shape.intermediate_size, hidden)
        return tensors
    tensors = [_float(config, f"{prefix}.mlp.gate.weight", (shape.num_experts, hidden))]
    for e in range(shape.num_experts):
        tensors += _mlp(config, f"{prefix}.mlp.experts.{e}", hidden, shape.intermediate_size)
    if shape.shared_intermediate_size:
        tensors += _mlp(
            config,
            f"{prefix}.mlp.{shape.shared_name}",
            hidden,
            shape.shared_intermediate_size,
            dense=True,
        )
        if shape.shared_name == "shared_expert":  # Qwen's sigmoid gate of the shared expert
            tensors.append(_float(config, f"{prefix}.mlp.shared_expert_gate.weight", (1, hidden)))
    return tensors


def _mlp(config, base, hidden, intermediate, dense=False) -> list[_Planned]:
    """gate_proj, up_proj [intermediate, hidden], down_proj [hidden, intermediate]."""
    project = (
        (lambda name, rows, cols: [_float(config, name, (rows, cols))])
        if dense
        else (lambda name, rows, cols: _projection(config, name, rows, cols))
    )
    return (
        project(f"{base}.gate_proj.weight", intermediate, hidden)
        + project(f"{base}.up_proj.weight", intermediate, hidden)
        + project(f"{base}.down_proj.weight", hidden, intermediate)
    )


def _stacked_layer(config: SynthConfig, prefix: str) -> list[_Planned]:
    """gpt-oss: router, gate_up_proj [E, hidden, 2I] (+ bias [E, 2I]), down_proj [E, I, hidden]
    (+ bias [E, hidden]); stored [in, out], unlike the per-expert families."""
    shape = config.shape
    experts, hidden, inter = shape.num_experts, shape.hidden_size, shape.intermediate_size
    base = f"{prefix}.mlp.experts"
    return [
        _float(config, f"{prefix}.mlp.router.weight", (experts, hidden)),
        _float(config, f"{prefix}.mlp.router.bias", (experts,)),
        *_projection(config, f"{base}.gate_up_proj", hidden, 2 * inter, experts, fan_in=hidden),
        _float(config, f"{base}.gate_up_proj_bias", (experts, 2 * inter), std=0.1),
        *_projection(config, f"{base}.down_proj", inter, hidden, experts, fan_in=inter),
        _float(config, f"{base}.down_proj_bias", (experts, hidden), std=0.1),
    ]


def _aux_dtype(config: SynthConfig) -> str:
    """Non-expert tensors: the checkpoint's float type; float16 beside ternary experts, as
    ruvllm keeps routers in FP16."""
    names = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "ternary": "float16"}
    return names[config.dtype]


def _float(config, name, shape, std=None) -> _Planned:
    dtype = _aux_dtype(config)
    std = std if std is not None else 1.0 / float(np.sqrt(shape[-1]))  # a float64 would widen
    return _Planned(
        name,
        dtype,
        shape,
        lambda rng: _encode(rng.standard_normal(shape, dtype=np.float32) * std, dtype),
    )


def _encode(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return float32_to_bf16(values)
    return values.astype(dtype)


def _projection(config, name, rows, cols, experts=None, fan_in=None) -> list[_Planned]:
    """An expert projection [rows, cols] (stacked: [experts, rows, cols]) in ``config.dtype``;
    ternary adds ``<name>_scale``. Per-expert families are [out, in], so fan_in = cols."""
    fan_in = fan_in or cols
    lead = () if experts is None else (experts,)
    count = experts or 1

    def weights(rng):  # one expert at a time: bounds memory at one float32 projection
        std = np.float32(1.0 / np.sqrt(fan_in))  # keeps the product float32
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std for _ in range(count))

    if config.dtype != "ternary":
        dtype = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[config.dtype]
        store = np.uint16 if dtype == "bfloat16" else dtype

        def make(rng):
            out = np.empty((count, rows, cols), dtype=store)
            for e, w in enumerate(weights(rng)):
                out[e] = _encode(w, dtype)
            return out.reshape(lead + (rows, cols))

        return [_Planned(name, dtype, lead + (rows, cols), make)]

    blocks = ternary.num_blocks(rows * cols, config.block_size)
    quantized: dict[str, np.ndarray] = {}

    def make_packed(rng):  # quantizes once; the scale tensor, written after, reads the result
        packed = np.empty((count, rows, cols // 4), dtype=np.uint8)
        scales = np.empty((count, blocks), dtype=np.float32)
        for e, w in enumerate(weights(rng)):
            codes, scales[e] = ternary.quantize_ternary(w, config.block_size)
            packed[e] = codes.reshape(rows, cols // 4)
        quantized["scales"] = scales.reshape(lead + (blocks,))
        return packed.reshape(lead + (rows, cols // 4))

    return [
        _Planned(name, "uint8", lead + (rows, cols // 4), make_packed),
        _Planned(f"{name}_scale", "float32", lead + (blocks,), lambda rng: quantized.pop("scales")),
    ]


# safetensors' name of each dtype written, its size, and its rank in the library's Dtype order:
# a file's tensors are laid out by descending rank (larger alignment first), then by name.
_SAFETENSORS_DTYPES = {
    "uint8": ("U8", 1, 0),
    "float16": ("F16", 2, 1),
    "bfloat16": ("BF16", 2, 2),
    "float32": ("F32", 4, 3),
}


def _file_groups(config: SynthConfig) -> list[tuple[str, range]]:
    """(file name, its layers) for every file of the checkpoint."""
    groups = [
        range(first, min(first + config.layers_per_file, config.num_layers))
        for first in range(0, config.num_layers, config.layers_per_file)
    ]
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    return [
        (f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", layers)
        for i, layers in enumerate(groups)
    ]


def _index_text(total_bytes: int, weight_map: dict[str, str]) -> str:
    return (
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2)
        + "\n"
    )


def _safetensors_file_bytes(tensors: list[_Planned], metadata: dict[str, str]) -> int:
    """A safetensors file's size: 8-byte header length, the compact JSON header padded with
    spaces to a multiple of 8, the tensors' data (serialize_file's layout)."""
    ordered = sorted(tensors, key=lambda t: (-_SAFETENSORS_DTYPES[t.dtype][2], t.name))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in ordered:
        name, itemsize, _ = _SAFETENSORS_DTYPES[t.dtype]
        end = offset + itemsize * int(np.prod(t.shape, dtype=np.int64))
        header[t.name] = {"dtype": name, "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + text + (-text) % 8 + offset


def plan_checkpoint(config: SynthConfig) -> SynthPlan:
    """The files ``write_checkpoint(config, ...)`` writes and their sizes, from the shapes alone
    (no tensor is made)."""
    metadata = _file_metadata(config)
    files, file_bytes, weight_map, tensor_bytes = [], [], {}, 0
    for file_name, layers in _file_groups(config):
        tensors = [t for layer in layers for t in planned_tensors(config, layer)]
        files.append(file_name)
        file_bytes.append(_safetensors_file_bytes(tensors, metadata))
        for t in tensors:
            weight_map[t.name] = file_name
            tensor_bytes += _SAFETENSORS_DTYPES[t.dtype][1] * int(np.prod(t.shape, dtype=np.int64))
    index_bytes = len(_index_text(tensor_bytes, weight_map).encode()) if len(files) > 1 else 0
    return SynthPlan(config, tuple(files), tuple(file_bytes), index_bytes, tensor_bytes)


def free_bytes_for(plan: SynthPlan, out: str | os.PathLike) -> int:
    """Bytes the plan may take in ``out``: the free space of the filesystem of ``out`` (or of
    its nearest existing parent), plus the files of an earlier checkpoint it replaces."""
    out = Path(out).absolute()
    existing = next(p for p in (out, *out.parents) if p.exists())
    replaced = sum((out / name).stat().st_size for name in plan.names if (out / name).is_file())
    return shutil.disk_usage(existing).free + replaced


def check_free_space(needed_bytes: int, free_bytes: int, out: str | os.PathLike) -> None:
    """Raises ValueError (one line, both numbers) when ``needed_bytes`` > ``free_bytes``."""
    if needed_bytes > free_bytes:
        raise ValueError(
            f"{out}: the checkpoint takes {format_bytes(needed_bytes)} but only "
            f"{format_bytes(free_bytes)} is free there; write fewer layers (--layers) or smaller "
            "ones (--scale)"
        )


def format_bytes(num_bytes: int) -> str:
    """'599,439,390 bytes (571.7 MiB)'; GiB from 1 GiB on."""
    unit, scale = ("GiB", 2**30) if num_bytes >= 2**30 else ("MiB", 2**20)
    return f"{num_bytes:,} bytes ({num_bytes / scale:,.1f} {unit})"


def write_checkpoint(
    config: SynthConfig,
    out: str | os.PathLike,
    rng: np.random.Generator | None = None,
    progress: bool | None = None,
) -> SynthCheckpoint:
    """Writes ``config``'s checkpoint into directory ``out`` (created; existing checkpoint files
    there are replaced). Holds one file's tensors in memory at a time. Raises ValueError before
    writing anything when ``plan_checkpoint(config)`` needs more than the free disk space."""
    out = Path(out)
    plan = plan_checkpoint(config)
    check_free_space(plan.total_bytes, free_bytes_for(plan, out), out)
    out.mkdir(parents=True, exist_ok=True)
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    weight_map, files, total = {}, [], 0
    with Progress(config.num_layers, label=f"synth {config.shape.name}", enabled=progress) as bar:
        for file_name, layers in _file_groups(config):
            tensors = {}
            for layer in layers:
                for planned in planned_tensors(config, layer):
                    tensors[planned.name] = (planned.dtype, planned.make(rng))
                    weight_map[planned.name] = file_name
                bar.advance(1, note=f"layer {layer}")
            _save(tensors, out / file_name, _file_metadata(config))
            files.append(out / file_name)
            total += sum(array.nbytes for _, array in tensors.values())
    index = out / INDEX_NAME
    if len(files) > 1:
        index.write_text(_index_text(total, weight_map))
    elif index.exists():
        index.unlink()  # a stale index would point the store at files of an earlier run
    return SynthCheckpoint(out, tuple(files), total, config)


def _file_metadata(config: SynthConfig) -> dict[str, str]:
    metadata = {"format": "pt", "moeray_synth": config.shape.name}
    if config.dtype == "ternary":
        metadata[ternary.QUANTIZATION_KEY] = ternary.TERNARY_QUANTIZATION
        metadata[ternary.BLOCK_SIZE_KEY] = str(config.block_size)
    return metadata


def _save(tensors: dict[str, tuple[str, np.ndarray]], path: Path, metadata: dict[str, str]) -> None:
    """safetensors.serialize_file with raw buffers, so bfloat16 needs no framework."""
    import safetensors

    arrays = {name: np.ascontiguousarray(array) for name, (_, array) in tensors.items()}
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8
        specs = {
            name: safetensors.TensorSpec(
                dtype=dtype,
                shape=list(arrays[name].shape),
                data_ptr=arrays[name].ctypes.data,
                data_len=arrays[name].nbytes,
            )
            for name, (dtype, _) in tensors.items()
        }
    else:
        specs = {
            name: {
                "dtype": dtype,
                "shape": list(arrays[name].shape),
                "data": arrays[name].tobytes(),
            }
            for name, (dtype, _) in tensors.items()
        }
    safetensors.serialize_file(specs, str(path), metadata=metadata)
    del arrays  # the specs point into these buffers until serialize_file returned
    fd = os.open(path, os.O_RDONLY)
    try:  # clean pages: a prefetcher's release can drop only those from the page cache
        os.fsync(fd)
    finally:
        os.close(fd)

"""Expert weight shards: safetensors checkpoints mapped read-only and indexed by (layer, expert).

A ``shard`` (docs/design.md) is the bytes of one layer's experts held by one node, files
on disk, memory-mapped. ``ShardStore(path)`` maps a checkpoint and gives, per (layer, expert),
the byte ranges a prefetcher populates (``expert_ranges``) and zero-copy views a kernel reads
(``expert_weights``); ``expert_matvec`` is the numpy reference of the consumer kernel,
``expert_matvec_native`` the same through ``moeray.native`` (weights read in place).
Formats: F32, F16, BF16 (as uint16 bits; ``bf16_to_float32``) and ruvllm's packed ternary
(2-bit weights, one float32 scale per block; ``moeray.shards.ternary``). ``write_checkpoint``
writes synthetic checkpoints with the real names and shapes of gpt-oss-20b, Mixtral-8x7B,
DeepSeek-V2-Lite and Qwen1.5-MoE (``moeray shards synth``).

``capacity`` turns a byte budget into experts per layer. Imports only the standard library,
numpy, ``moeray.native`` and ``moeray.policy`` (``safetensors`` only to write); never Ray.
"""

from moeray.shards.errors import ShardFormatError, ShardNotFoundError
from moeray.shards.formats import bf16_to_float32, float32_to_bf16
from moeray.shards.kernels import expert_matvec, expert_matvec_native
from moeray.shards.store import (
    GPT_OSS,
    SWIGLU,
    ByteRange,
    ExpertWeights,
    LayerSpec,
    ShardStore,
    WeightView,
)
from moeray.shards.synth import MODEL_SHAPES, ModelShape, SynthConfig, write_checkpoint
from moeray.shards.ternary import dequantize_ternary, quantize_ternary

__all__ = [
    "GPT_OSS",
    "MODEL_SHAPES",
    "SWIGLU",
    "ByteRange",
    "ExpertWeights",
    "LayerSpec",
    "ModelShape",
    "ShardFormatError",
    "ShardNotFoundError",
    "ShardStore",
    "SynthConfig",
    "WeightView",
    "bf16_to_float32",
    "dequantize_ternary",
    "expert_matvec",
    "expert_matvec_native",
    "float32_to_bf16",
    "quantize_ternary",
    "write_checkpoint",
]

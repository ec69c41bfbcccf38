"""The consumer kernel: one expert's FFN over the tokens routed to it.

This is the workload a prefetcher serves: it reads every byte of one expert's weights.
``expert_matvec`` computes it with the numpy twin of the native kernel
(``moeray.native._reference.matvec``: weights widened or dequantized to float32 before each
product); ``expert_matvec_native`` through ``moeray.native.backend`` (the C++ kernel reads the
weights in place, each row once for all T tokens; under ``MOERAY_PURE_PYTHON=1``, the twin).
"""

from __future__ import annotations

import numpy as np

from moeray import native
from moeray.native._reference.matvec import GPT_OSS_ALPHA, GPT_OSS_LIMIT, silu
from moeray.shards.store import ExpertWeights

__all__ = ["GPT_OSS_ALPHA", "GPT_OSS_LIMIT", "expert_matvec", "expert_matvec_native", "silu"]


def expert_matvec(weights: ExpertWeights, x: np.ndarray) -> np.ndarray:
    """One expert's output for the T tokens routed to it: float [T, hidden] -> float32 [T, hidden].

    SWIGLU (Mixtral, Qwen-MoE, DeepSeek, OLMoE): down(silu(gate x) * up x), no biases.
    GPT_OSS (transformers' GptOssExperts): g, u = the even / odd columns of x @ gate_up + bias;
    g = min(g, 7); u = clip(u, -7, 7); out = ((u + 1) * g * sigmoid(1.702 g)) @ down + bias.
    The router weight of each token is not applied (the caller scales and sums experts).
    """
    return expert_matvec_native(weights, x, core=native.reference)


def expert_matvec_native(weights: ExpertWeights, x: np.ndarray, core=None) -> np.ndarray:
    """``expert_matvec`` through a core's ``expert_matvec``: same contract, same result within
    float32 rounding (the summation order differs). float [T, hidden] -> float32 [T, hidden].

    ``core``: ``moeray.native.backend`` when None (the C++ core, or its twin under
    ``MOERAY_PURE_PYTHON=1``); tests pass each core module in turn."""
    core = native.backend if core is None else core
    x = np.ascontiguousarray(_as_tokens(x, weights.hidden_size))
    tensors = {
        role: (view.format, view.data, view.scales, view.block_size)
        for role, view in weights.tensors.items()
    }
    return core.expert_matvec(
        weights.layout, weights.hidden_size, weights.intermediate_size, tensors, x
    )


def _as_tokens(x, hidden_size: int) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x: expected a float array [T, hidden], got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != hidden_size:
        raise ValueError(f"x: expected shape [T, {hidden_size}], got {list(x.shape)}")
    return x.astype(np.float32, copy=False)

"""The consumer kernel: one expert's FFN over the tokens routed to it.

This is the workload a prefetcher serves: it reads every byte of one expert's weights.
``expert_matvec`` is the numpy reference, favouring clarity over speed (weights are widened or
dequantized to float32 before each product); ``expert_matvec_native`` computes the same through
``moeray.native.backend`` (the C++ kernel reads the weights in place, each row once for all T
tokens; under ``MOERAY_PURE_PYTHON=1`` the twin calls the reference).
"""

from __future__ import annotations

import numpy as np

from moeray import native
from moeray.shards.store import GPT_OSS, SWIGLU, ExpertWeights

__all__ = ["GPT_OSS_ALPHA", "GPT_OSS_LIMIT", "expert_matvec", "expert_matvec_native", "silu"]

# gpt-oss's clamped SwiGLU (transformers' GptOssExperts: alpha 1.702, limit 7.0)
GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0


def silu(z: np.ndarray) -> np.ndarray:
    """z * sigmoid(z), float32, without overflow warnings for large |z|."""
    return z * _sigmoid(z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def expert_matvec(weights: ExpertWeights, x: np.ndarray) -> np.ndarray:
    """One expert's output for the T tokens routed to it: float [T, hidden] -> float32 [T, hidden].

    SWIGLU (Mixtral, Qwen-MoE, DeepSeek, OLMoE): down(silu(gate x) * up x), no biases.
    GPT_OSS (transformers' GptOssExperts): g, u = the even / odd columns of x @ gate_up + bias;
    g = min(g, 7); u = clip(u, -7, 7); out = ((u + 1) * g * sigmoid(1.702 g)) @ down + bias.
    The router weight of each token is not applied (the caller scales and sums experts).
    """
    x = _as_tokens(x, weights.hidden_size)
    if weights.layout == SWIGLU:
        gate = x @ weights["gate"].to_float32().T
        up = x @ weights["up"].to_float32().T
        return (silu(gate) * up) @ weights["down"].to_float32().T
    if weights.layout == GPT_OSS:
        gate_up = x @ weights["gate_up"].to_float32() + _bias(weights, "gate_up_bias")
        gate = np.minimum(gate_up[:, 0::2], GPT_OSS_LIMIT)
        up = np.clip(gate_up[:, 1::2], -GPT_OSS_LIMIT, GPT_OSS_LIMIT)
        glu = gate * _sigmoid(GPT_OSS_ALPHA * gate)
        return ((up + 1.0) * glu) @ weights["down"].to_float32() + _bias(weights, "down_bias")
    raise ValueError(f"weights.layout: expected {SWIGLU!r} or {GPT_OSS!r}, got {weights.layout!r}")


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


def _bias(weights: ExpertWeights, role: str) -> np.ndarray | float:
    return weights[role].to_float32() if role in weights else 0.0

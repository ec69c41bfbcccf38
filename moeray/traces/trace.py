"""The ``Trace`` value: the routing of a whole trace in memory (a leaf: numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_TRACE_NAME", "Trace", "TraceNotFoundError"]

DEFAULT_TRACE_NAME = "gpt-oss-20b (bundled slice)"


class TraceNotFoundError(FileNotFoundError, ValueError):
    """The trace path does not exist (both a FileNotFoundError and a ValueError)."""


@dataclass(frozen=True)
class Trace:
    """expert_ids: uint8/int [tokens, layers, top_k]; weights: float32 of the same shape or None;
    seq_offsets: int64 [sequences + 1]."""

    expert_ids: np.ndarray
    weights: np.ndarray | None
    seq_offsets: np.ndarray
    num_experts: int
    name: str = ""

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    def layer_ids(self, layer: int) -> np.ndarray:
        """int32 [tokens, top_k], C-contiguous: the routing of one layer."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected a layer in [0, {self.num_layers}), got {layer}")
        return np.ascontiguousarray(self.expert_ids[:, layer, :], dtype=np.int32)

    def layer_weights(self, layer: int) -> np.ndarray | None:
        """float32 [tokens, top_k], C-contiguous, or None when the trace has no router weights."""
        if self.weights is None:
            return None
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected a layer in [0, {self.num_layers}), got {layer}")
        return np.ascontiguousarray(self.weights[:, layer, :], dtype=np.float32)

    def head(self, tokens: int) -> Trace:
        """The first ``tokens`` tokens (all of them when the trace is shorter), sequences cut
        at that point."""
        if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
            raise ValueError(f"tokens: expected an int >= 1, got {tokens!r}")
        n = min(int(tokens), self.num_tokens)
        offsets = np.append(self.seq_offsets[self.seq_offsets < n], n).astype(np.int64)
        weights = None if self.weights is None else self.weights[:n]
        return Trace(self.expert_ids[:n], weights, offsets, self.num_experts, self.name)

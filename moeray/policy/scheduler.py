"""Groups a token batch by expert so each expert's weights are read once per batch.

``schedule`` is the array form (CSR): a stable counting sort of the T x top_k assignments.
``MoeBatchScheduler.schedule`` is the seed's list form, built on the same sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeray.native import backend
from moeray.policy._validate import as_expert_ids, as_weights, check_int

__all__ = ["ExpertBatch", "ExpertBatches", "MoeBatchScheduler", "schedule"]


@dataclass(frozen=True)
class ExpertBatch:
    """The tokens routed to one expert, in token order, with their router weights."""

    expert_id: int
    token_indices: list[int]
    weights: list[float]


@dataclass(frozen=True)
class ExpertBatches:
    """CSR grouping of one layer's batch by expert.

    offsets: int64 [num_experts + 1]; expert e's assignments are ``offsets[e]:offsets[e+1]``.
    token_indices: int32 [T * top_k], token order within each expert.
    weights: float32 [T * top_k], the router weight of each assignment.
    """

    offsets: np.ndarray
    token_indices: np.ndarray
    weights: np.ndarray

    @property
    def num_experts(self) -> int:
        return len(self.offsets) - 1

    def tokens_of(self, expert_id: int) -> np.ndarray:
        return self.token_indices[self.offsets[expert_id] : self.offsets[expert_id + 1]]

    def weights_of(self, expert_id: int) -> np.ndarray:
        return self.weights[self.offsets[expert_id] : self.offsets[expert_id + 1]]

    def counts(self) -> np.ndarray:
        """int64 [num_experts]: assignments per expert."""
        return np.diff(self.offsets)


def schedule(expert_ids, weights, num_experts: int) -> ExpertBatches:
    """Groups one layer's routing by expert.

    expert_ids: integer [T, top_k], each in [0, num_experts); weights: float [T, top_k], finite.
    Returns the CSR ``ExpertBatches`` (native: one counting sort, GIL released).
    """
    num_experts = check_int(num_experts, "num_experts", 1, 2**31 - 1)
    ids = as_expert_ids(expert_ids, num_experts)
    return ExpertBatches(*backend.schedule(ids, as_weights(weights, ids.shape), num_experts))


class MoeBatchScheduler:
    """The seed's list form of ``schedule``."""

    @staticmethod
    def schedule(routing) -> list[ExpertBatch]:
        """routing: ``[(token_index, [(expert_id, weight), ...]), ...]``.

        Returns one ``ExpertBatch`` per expert that appears, sorted by expert id, with tokens in
        input order. Weights are passed through unchanged (no float32 rounding).
        """
        token_of: list[int] = []
        expert_of: list[int] = []
        weight_of: list[float] = []
        for token_index, experts in routing:
            for expert_id, weight in experts:
                token_of.append(check_int(token_index, "token_index", 0))
                expert_of.append(check_int(expert_id, "expert_id", 0, 2**31 - 2))
                weight_of.append(float(weight))
        if not expert_of:
            return []
        ids = np.asarray(expert_of, dtype=np.int32).reshape(-1, 1)
        grouped = schedule(
            ids, np.asarray(weight_of, dtype=np.float64).reshape(-1, 1), int(ids.max()) + 1
        )
        # Row i of the [N, 1] grouping is assignment i: map rows back to tokens and weights.
        rows = grouped.token_indices.tolist()
        offsets = grouped.offsets.tolist()
        return [
            ExpertBatch(
                expert_id=e,
                token_indices=[token_of[r] for r in rows[offsets[e] : offsets[e + 1]]],
                weights=[weight_of[r] for r in rows[offsets[e] : offsets[e + 1]]],
            )
            for e in range(len(offsets) - 1)
            if offsets[e + 1] > offsets[e]
        ]

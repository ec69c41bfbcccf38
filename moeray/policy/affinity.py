"""Per-expert EMA affinity: the semantics of ruvllm's ``moe/affinity.rs`` (ADR-092).

``update(activated)`` multiplies every score by ``decay``, then adds ``activation_boost`` to each
activated expert (clamped to ``max_score``) and counts the activation; ids >= num_experts are
ignored as in the seed, negative ids raise ValueError. Scores are float64 (the seed's f32).
Rankings put non-finite scores last and break ties by the lower id.

With the usual parameters the core decays lazily (``native/src/affinity.hpp``): an update costs
O(top_k), not O(num_experts), and scores agree with the eager form within a few ulps; a score
never reads above ``max_score`` (a state loaded with higher scores reads them as ``max_score``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moeray.native import backend
from moeray.policy._validate import as_expert_ids, check_float, check_int

__all__ = ["AffinityConfig", "ExpertAffinity"]


@dataclass(frozen=True)
class AffinityConfig:
    """num_experts >= 1; decay in [0, 1]; activation_boost >= 0; max_score >= 0.

    The constructor rejects values out of range; the ``with_*`` builders clamp them as the seed
    does (decay to [0, 1], boost and max_score to >= 0) and return a new config.
    """

    num_experts: int = 8
    decay: float = 0.99
    activation_boost: float = 1.0
    max_score: float = 1.0

    def __post_init__(self):
        check_int(self.num_experts, "num_experts", 1, 2**31 - 1)
        decay = check_float(self.decay, "decay")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: expected a float in [0, 1], got {decay}")
        for name in ("activation_boost", "max_score"):
            if check_float(getattr(self, name), name) < 0.0:
                raise ValueError(f"{name}: expected a float >= 0, got {getattr(self, name)}")

    @classmethod
    def with_num_experts(cls, num_experts: int) -> AffinityConfig:
        return cls(num_experts=num_experts)

    def with_decay(self, decay: float) -> AffinityConfig:
        return replace(self, decay=min(max(check_float(decay, "decay"), 0.0), 1.0))

    def with_activation_boost(self, activation_boost: float) -> AffinityConfig:
        boost = check_float(activation_boost, "activation_boost")
        return replace(self, activation_boost=max(boost, 0.0))

    def with_max_score(self, max_score: float) -> AffinityConfig:
        return replace(self, max_score=max(check_float(max_score, "max_score"), 0.0))


class ExpertAffinity(backend.AffinityCore):
    """EMA affinity of one layer's experts. Core methods: ``update``, ``score``,
    ``activation_count``, ``top_k_by_affinity``, ``top_k_by_frequency``, ``least_affinity``,
    ``frequency_percentile``, ``reset``, ``num_experts``."""

    def __init__(self, config: AffinityConfig = AffinityConfig()):
        if not isinstance(config, AffinityConfig):
            raise TypeError(f"config: expected an AffinityConfig, got {type(config).__name__}")
        super().__init__(
            config.num_experts,
            float(config.decay),
            float(config.activation_boost),
            float(config.max_score),
        )
        self._config = config

    def config(self) -> AffinityConfig:
        return self._config

    def get_score(self, expert_id: int) -> float:
        return self.score(expert_id)

    def get_scores(self) -> np.ndarray:
        """float64 [num_experts], a copy."""
        return self.scores()

    def get_activation_counts(self) -> np.ndarray:
        """int64 [num_experts], a copy."""
        return self.activation_counts()

    def update_batch(self, expert_ids) -> None:
        """One ``update`` per row of ``expert_ids``: integer [T, top_k], each in [0, num_experts)."""
        super().update_batch(as_expert_ids(expert_ids, self.num_experts()))

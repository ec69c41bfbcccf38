"""``ReplayConfig``: what a replay runs (capacity, policies and their parameters, engine hints)."""

from __future__ import annotations

from dataclasses import dataclass

from moeray.policy.predict import PredictConfig
from moeray.policy.registry import POLICIES

__all__ = ["POLICY_NAMES", "ReplayConfig", "capacity_from_fraction"]

# Names are part of the --json schema: later work adds names, never renames these.
POLICY_NAMES = tuple(POLICIES)


def capacity_from_fraction(fraction: float, num_experts: int) -> int:
    """Hot-set size in experts for a fraction in (0, 1] of num_experts (rounded, at least 1)."""
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"capacity: expected a fraction in (0, 1], got {fraction!r}")
    return max(1, min(num_experts, int(round(fraction * num_experts))))


@dataclass(frozen=True)
class ReplayConfig:
    """capacity: hot-set size in experts per layer, in [1, num_experts].
    policies: names from POLICY_NAMES (``moeray.policy.registry``). The affinity-lru policy evicts by
    ``suggest_eviction_with_affinity(affinity, affinity_weight)`` over an EMA affinity with
    ``affinity_decay`` and ``affinity_boost``, updated after every token. ``predict``: the
    parameters of the ``moeray`` policy (one set for every trace). hint_accuracy: None (no
    hints) or a float in [0, 1]: the moeray policy gets synthetic engine hints of that accuracy
    (see the module docstring), drawn from ``hint_seed``."""

    capacity: int
    policies: tuple[str, ...] = POLICY_NAMES
    # Chosen by a sweep on the developer split of the gpt-oss-20b and DeepSeek-V2-Lite traces
    # (decay 0.8-0.99, boost 0.05-1, weight 0.3-0.8): good on both, not the best on either.
    affinity_weight: float = 0.8
    affinity_decay: float = 0.95
    affinity_boost: float = 0.05
    predict: PredictConfig = PredictConfig()
    hint_accuracy: float | None = None
    hint_seed: int = 0

    def __post_init__(self):
        if self.hint_accuracy is not None and not (
            isinstance(self.hint_accuracy, (int, float))
            and not isinstance(self.hint_accuracy, bool)
            and 0.0 <= self.hint_accuracy <= 1.0
        ):
            raise ValueError(
                f"hint_accuracy: expected None or a float in [0, 1], got {self.hint_accuracy!r}"
            )
        if (
            isinstance(self.capacity, bool)
            or not isinstance(self.capacity, int)
            or self.capacity < 1
        ):
            raise ValueError(f"capacity: expected an int >= 1, got {self.capacity!r}")
        unknown = [p for p in self.policies if p not in POLICY_NAMES]
        if unknown or not self.policies:
            raise ValueError(
                f"policies: expected names from {POLICY_NAMES}, got {list(self.policies)}"
            )
        if not 0.0 <= self.affinity_weight <= 1.0:
            raise ValueError(
                f"affinity_weight: expected a float in [0, 1], got {self.affinity_weight}"
            )

"""A per-layer load forecast from routing history: what each expert will carry next.

Measured on the shared traces (docs/design.md, "Placement"): the load of the coming window is
best told by an exponential average over past windows with a half-life of a few windows, better
than the previous window alone (noisy) or all history (stale); its spread per expert (the
exponential variance) says how much of that load a placement cannot count on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeray.placement.eplb import check_load
from moeray.placement.placement import PlacementError

__all__ = ["LoadForecast"]


@dataclass(frozen=True)
class LoadForecast:
    """mean, variance: float64 [layers, experts], expert load per routed token (a rate) and its
    exponential variance over windows; windows: how many windows it has seen."""

    mean: np.ndarray
    variance: np.ndarray
    windows: int
    half_life_windows: float = 4.0

    def __post_init__(self):
        if not self.half_life_windows > 0:
            raise PlacementError(
                f"half_life_windows: expected a number > 0, got {self.half_life_windows}"
            )

    @classmethod
    def start(cls, counts, half_life_windows: float = 4.0) -> LoadForecast:
        """The forecast after one window of counts ([layers, experts], >= 0)."""
        rate = _rate(counts)
        return cls(rate, np.zeros_like(rate), 1, half_life_windows)

    def update(self, counts) -> LoadForecast:
        """The forecast after one more window of counts [layers, experts] (a new value)."""
        rate = _rate(counts, self.mean.shape)
        alpha = 1.0 - 0.5 ** (1.0 / self.half_life_windows)
        delta = rate - self.mean
        mean = self.mean + alpha * delta
        variance = (1.0 - alpha) * (self.variance + alpha * delta * delta)
        return LoadForecast(mean, variance, self.windows + 1, self.half_life_windows)


def _rate(counts, shape: tuple[int, ...] | None = None) -> np.ndarray:
    counts = check_load(counts, "counts")
    if shape is not None and counts.shape != shape:
        raise PlacementError(f"counts: expected shape {list(shape)}, got {list(counts.shape)}")
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)

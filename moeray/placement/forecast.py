"""A per-layer load forecast from routing history: what each expert will carry next.

Several horizons at once: an exponential average of each expert's share of the layer's routing
per horizon (half-lives of 1 to 16 windows), and per layer the horizon whose forecasts of the
last windows erred least (an exponential average of the L1 error, half-life 4 windows) is the
forecast. Measured on the shared traces (docs/design.md, "Placement"), no single horizon is best
everywhere: decode streams whose sequences span windows want the short ones, prefill batches of
new prompts the long ones; picking per layer by the recent error matches the best single one
within 0.002 and beats it on the bundled slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeray.placement.eplb import check_load
from moeray.placement.placement import PlacementError

__all__ = ["HORIZONS", "LoadForecast"]

HORIZONS = (1.0, 2.0, 4.0, 8.0, 16.0)
"""Half-lives, in windows, of the averages a forecast keeps."""

_ERROR_HALF_LIFE = 4.0  # windows: how long a horizon's past errors count


@dataclass(frozen=True)
class LoadForecast:
    """means: float64 [horizons, layers, experts], each expert's share of its layer's routing
    averaged at each horizon; errors: float64 [horizons, layers], each horizon's recent L1
    forecast error; windows: how many windows it has seen."""

    means: np.ndarray
    errors: np.ndarray
    windows: int
    horizons: tuple[float, ...] = HORIZONS

    def __post_init__(self):
        if not self.horizons or not all(h > 0 for h in self.horizons):
            raise PlacementError(f"horizons: expected half-lives > 0, got {self.horizons}")

    @classmethod
    def start(cls, counts, horizons: tuple[float, ...] = HORIZONS) -> LoadForecast:
        """The forecast after one window of counts ([layers, experts], >= 0)."""
        rate = _rate(counts)
        horizons = tuple(float(h) for h in horizons)
        means = np.repeat(rate[None], len(horizons), axis=0)
        return cls(means, np.zeros((len(horizons), rate.shape[0])), 1, horizons)

    @property
    def mean(self) -> np.ndarray:
        """float64 [layers, experts]: per layer, the horizon that erred least (the shorter on
        ties)."""
        best = np.argmin(self.errors, axis=0)
        return self.means[best, np.arange(self.means.shape[1])]

    def update(self, counts) -> LoadForecast:
        """The forecast after one more window of counts [layers, experts] (a new value)."""
        rate = _rate(counts, self.means.shape[1:])
        error = np.abs(self.means - rate[None]).sum(axis=-1)
        if self.windows == 1:
            errors = error
        else:
            beta = 1.0 - 0.5 ** (1.0 / _ERROR_HALF_LIFE)
            errors = self.errors + beta * (error - self.errors)
        alpha = (1.0 - 0.5 ** (1.0 / np.asarray(self.horizons)))[:, None, None]
        means = self.means + alpha * (rate[None] - self.means)
        return LoadForecast(means, errors, self.windows + 1, self.horizons)


def _rate(counts, shape: tuple[int, ...] | None = None) -> np.ndarray:
    counts = check_load(counts, "counts")
    if shape is not None and counts.shape != tuple(shape):
        raise PlacementError(f"counts: expected shape {list(shape)}, got {list(counts.shape)}")
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)

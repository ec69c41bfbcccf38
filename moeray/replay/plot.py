"""``moeray replay --plot``: hit and stall rate per layer for each policy, and a capacity curve.

matplotlib is an optional extra (``pip install 'moeray[plot]'``); it is imported only when a
plot is drawn, and its absence is a ValueError naming the extra.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moeray._progress import Progress
from moeray.replay.config import POLICY_NAMES, ReplayConfig, capacity_from_fraction
from moeray.replay.inprocess import replay_trace
from moeray.replay.report import ReplayReport
from moeray.traces.trace import Trace

__all__ = [
    "PLOT_FRACTIONS",
    "CURVE_POLICIES",
    "capacity_curve",
    "plot_replay",
    "require_matplotlib",
]

# Capacities (fractions of each layer's experts) of the capacity curve, and its policies.
PLOT_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.75)
CURVE_POLICIES = ("lru", "moeray", "belady")


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or ValueError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot: needs matplotlib (pip install 'moeray[plot]')") from None
    return plt


def capacity_curve(
    trace: Trace,
    config: ReplayConfig,
    fractions=PLOT_FRACTIONS,
    policies=CURVE_POLICIES,
    progress: Progress | None = None,
) -> dict[str, list[tuple[float, float, float]]]:
    """Per policy, (capacity fraction, hit rate, stall rate) at each distinct capacity of
    ``fractions`` (experts per layer, rounded as ``moeray replay --capacity`` does)."""
    capacities = sorted({capacity_from_fraction(f, trace.num_experts) for f in fractions})
    curve: dict[str, list[tuple[float, float, float]]] = {name: [] for name in policies}
    for capacity in capacities:
        report = replay_trace(
            trace, replace(config, capacity=capacity, policies=tuple(policies)), progress=progress
        )
        for name, r in report.results.items():
            curve[name].append((capacity / trace.num_experts, r.hit_rate, r.stall_rate))
    return curve


def plot_replay(
    report: ReplayReport, trace: Trace, config: ReplayConfig, path, progress: Progress | None = None
) -> Path:
    """Draws ``report`` (per layer hit and stall rates of each policy) and the capacity curve of
    ``trace`` into the PNG at ``path``; returns the path."""
    plt = require_matplotlib()
    path = Path(path)
    curve = capacity_curve(trace, config, progress=progress)
    fig, (ax_hit, ax_stall, ax_curve) = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, r in report.results.items():
        layers = range(len(r.per_layer_hits))
        ax_hit.plot(layers, r.per_layer_hit_rate, marker=".", label=name, color=_color(name))
        ax_stall.plot(layers, r.per_layer_stall_rate, marker=".", label=name, color=_color(name))
    for ax, what in ((ax_hit, "hit rate"), (ax_stall, "stall rate")):
        ax.set_xlabel("MoE layer")
        ax.set_ylabel(what)
        ax.set_ylim(0, 1)
        ax.set_title(f"{what} per layer, capacity {report.capacity} of {report.num_experts}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for name, points in curve.items():
        ax_curve.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            label=name,
            color=_color(name),
        )
    ax_curve.set_xlabel("capacity (fraction of experts, every layer)")
    ax_curve.set_ylabel("hit rate (moeray: 1 - stall rate)")
    ax_curve.set_ylim(0, 1)
    ax_curve.set_title("capacity curve")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    fig.suptitle(f"moeray replay: {report.trace}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _color(name: str) -> str:
    """One colour per policy in every panel."""
    return f"C{POLICY_NAMES.index(name) % 10}"

"""``moeray place --plot``: balancedness per window for each algorithm, and each algorithm's
per-GPU load over the windows as a heat map.

matplotlib is an optional extra (``pip install 'moeray[plot]'``), imported only when a plot is
drawn; its absence is a ValueError naming the extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_placement", "require_matplotlib"]


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or ValueError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot: needs matplotlib (pip install 'moeray[plot]')") from None
    return plt


def plot_placement(report: dict, path) -> Path:
    """Draws ``report`` (``replay_placement``'s dict) into the PNG at ``path``: (a) each
    algorithm's window balancedness (as served) per scored window; (b) per algorithm, GPU x
    window, each GPU's load over the mean GPU load (as served, averaged over layers).
    Returns the path."""
    plt = require_matplotlib()
    path = Path(path)
    algorithms = report["algorithms"]
    names = list(algorithms)
    ratios = {name: np.asarray(algorithms[name]["gpu_load_ratio"]).T for name in names}
    peak = max(float(r.max()) for r in ratios.values() if r.size) if names else 1.0
    fig = plt.figure(figsize=(max(10.0, 3.6 * len(names)), 8.5))
    grid = fig.add_gridspec(2, len(names), height_ratios=(1.0, 1.1), hspace=0.4)
    series_ax = fig.add_subplot(grid[0, :])
    for i, name in enumerate(names):
        series = algorithms[name]["window_series"]
        series_ax.plot(
            range(1, len(series) + 1),
            series,
            marker=".",
            color=f"C{i}",
            label=f"{name} ({algorithms[name]['served']})",
        )
    series_ax.set_xlabel("scored window")
    series_ax.set_ylabel("balancedness (mean / max GPU load)")
    series_ax.set_ylim(0, 1.02)
    series_ax.grid(alpha=0.3)
    series_ax.legend(fontsize=8, loc="lower right")
    series_ax.set_title(
        f"balancedness per window of {report['every']:,} tokens, each placement scored on the "
        "window after it"
    )
    # centred on 1 (a GPU at the mean load): red above, blue below
    high = max(peak, 1.05)
    image = None
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[1, i])
        ratio = ratios[name]
        windows, gpus = (ratio.shape[1], ratio.shape[0]) if ratio.size else (1, 1)
        image = ax.imshow(
            ratio,
            aspect="auto",
            cmap="RdBu_r",
            vmin=max(0.0, 2.0 - high),
            vmax=high,
            origin="lower",
            interpolation="nearest",
            extent=(0.5, windows + 0.5, -0.5, gpus - 0.5),
        )
        ax.set_title(f"{name} ({algorithms[name]['served']})", fontsize=9)
        ax.set_xlabel("scored window")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        if i == 0:
            ax.set_ylabel("GPU")
    if image is not None:
        fig.colorbar(image, ax=fig.axes[1:], shrink=0.9, label="load / mean GPU load (as served)")
    fig.suptitle(f"moeray place: {report['trace']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Speed of the moeray policy's own work (moeray.policy.predict), in-process: its native step
beside its numpy twin and beside its defaults before the pair tables, side by side in one run.

Each row replays the first N tokens of a real trace through ``PredictiveCaches.run`` at 1/4
of each layer's experts; the rows alternate, and the table shows the median of the repeats.
`moeray` has today's defaults on the native window step (``run_window``: the tokens in one
kernel call, moeray/native/src/predict.hpp); `moeray per-token step` the same decisions with
one ``step`` call (and its Python) per token, the path before the window step; `moeray on
numpy` the same policy and decisions on the twin's phases (`moeray.native._reference.predict`,
what MOERAY_PURE_PYTHON=1 runs); `moeray before pairs`, on the native window step, the
defaults before the pair tables (bench_quality.BEFORE_PAIRS: single-expert tables, victims
valued by this token alone, budget 4). The layer actors of the service run this same code, so it bounds what they
serve under `policy="moeray"`.

usage: python benchmarks/bench_policy.py [--traces DIR] [--tokens N] [--repeats R]
Without ../shared/traces (or --traces) it uses the bundled gpt-oss-20b slice only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_quality import BEFORE_PAIRS, BEFORE_PAIRS_NAME, head, traces

from moeray.policy.predict import PredictConfig, PredictiveCaches
from moeray.replay import capacity_from_fraction


class _TokenByToken(PredictiveCaches):
    """One ``step`` per token (the path before the window step)."""

    def _windowed(self) -> bool:
        return False


# row name -> (config, the native step on, caches class); native only where it is in use
ROWS = {
    "moeray": (PredictConfig(), True, PredictiveCaches),
    "moeray per-token step": (PredictConfig(), True, _TokenByToken),
    "moeray on numpy": (PredictConfig(), False, PredictiveCaches),
    BEFORE_PAIRS_NAME: (BEFORE_PAIRS, True, PredictiveCaches),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", help="folder of the real traces (default ../shared/traces)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=1500,
        help="replay the first N tokens of each trace (default 1,500)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats per row (default 3)")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats: expected ints >= 1")
    print(f"native step: {'in use' if PredictiveCaches._native else 'not in use (numpy only)'}")
    print("| trace | tokens | policy | tokens/s (median) | us/token | repeats |")
    print("|---|---|---|---|---|---|")
    for trace in traces(Path(args.traces) if args.traces else None):
        trace = head(trace, args.tokens)
        capacity = capacity_from_fraction(0.25, trace.num_experts)
        rates = {name: [] for name in ROWS}
        for _ in range(args.repeats):
            for name, (config, native, cls) in ROWS.items():
                caches = cls(trace.num_layers, trace.num_experts, trace.top_k, capacity, config)
                caches._native = native and PredictiveCaches._native
                start = time.perf_counter()
                caches.run(trace.expert_ids, trace.seq_offsets)
                rates[name].append(trace.num_tokens / (time.perf_counter() - start))
        for name, values in rates.items():
            rate = statistics.median(values)
            print(
                f"| {trace.name} | {trace.num_tokens:,} | {name} | {rate:,.0f} | "
                f"{1e6 / rate:,.0f} | {len(values)} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

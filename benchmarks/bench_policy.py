"""Speed of the moeray policy's own work (moeray.policy.predict), in-process: its native step
beside its numpy twin and beside its defaults before the pair tables, side by side in one run.

Each row replays the first N tokens of a real trace through ``PredictiveCaches.run`` at 1/4
of each layer's experts; the rows alternate, and the table shows the median of the repeats.
`moeray` has today's defaults on the native window step (``run_window``: the tokens in one
kernel call, moeray/native/src/predict.hpp); `moeray per-token step` the same decisions with
one ``step`` call (and its Python) per token, the path before the window step; `moeray per
layer (batches of 1)` the same decisions as an engine's decode feeds them (per token
``open_batch``, one ``serve_layer`` call per layer, ``close_batch``); `moeray on
numpy` the same policy and decisions on the twin's phases (`moeray.native._reference.predict`,
what MOERAY_PURE_PYTHON=1 runs); `moeray before pairs`, on the native window step, the
defaults before the pair tables (bench_quality.BEFORE_PAIRS: single-expert tables, victims
valued by this token alone, budget 4). The layer actors of the service run this same code
(the window step), so it bounds what they serve under `policy="moeray"`. CPU us/token: the
process's CPU time, steadier than the wall clock on a shared machine.

usage: python benchmarks/bench_policy.py [--traces DIR] [--tokens N] [--repeats R]
Without ../shared/traces (or --traces) it uses the bundled gpt-oss-20b slice only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from bench_quality import BEFORE_PAIRS, BEFORE_PAIRS_NAME, head, traces

from moeray.policy.predict import PredictConfig, PredictiveCaches
from moeray.replay import capacity_from_fraction


def _by_steps(caches: PredictiveCaches, ids, starts) -> None:
    """One ``step`` call per token (the path before the window step)."""
    for t in range(len(ids)):
        caches.step(ids[t], new_sequence=bool(starts[t]))


def _by_layers(caches: PredictiveCaches, ids, starts) -> None:
    """An engine's decode: per token a batch of one, one ``serve_layer`` call per layer."""
    rows = [[ids[t, layer][None] for layer in range(ids.shape[1])] for t in range(len(ids))]
    for t, row in enumerate(rows):
        caches.open_batch(starts[t : t + 1])
        for layer, layer_ids in enumerate(row):
            caches.serve_layer(layer, layer_ids)
        caches.close_batch()


# row name -> (config, the native kernel on, how the tokens are fed); native only where in use
ROWS = {
    "moeray": (PredictConfig(), True, PredictiveCaches.run_window),
    "moeray per-token step": (PredictConfig(), True, _by_steps),
    "moeray per layer (batches of 1)": (PredictConfig(), True, _by_layers),
    "moeray on numpy": (PredictConfig(), False, PredictiveCaches.run_window),
    BEFORE_PAIRS_NAME: (BEFORE_PAIRS, True, PredictiveCaches.run_window),
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
    print("| trace | tokens | policy | tokens/s (median) | us/token | CPU us/token | repeats |")
    print("|---|---|---|---|---|---|---|")
    for trace in traces(Path(args.traces) if args.traces else None):
        trace = head(trace, args.tokens)
        capacity = capacity_from_fraction(0.25, trace.num_experts)
        ids = np.ascontiguousarray(trace.expert_ids, dtype=np.int64)
        starts = np.isin(np.arange(trace.num_tokens), trace.seq_offsets)
        rates = {name: [] for name in ROWS}
        cpu = {name: [] for name in ROWS}
        for _ in range(args.repeats):
            for name, (config, native, feed) in ROWS.items():
                caches = PredictiveCaches(
                    trace.num_layers, trace.num_experts, trace.top_k, capacity, config
                )
                caches._native = native and PredictiveCaches._native
                start, start_cpu = time.perf_counter(), time.process_time()
                feed(caches, ids, starts)
                rates[name].append(trace.num_tokens / (time.perf_counter() - start))
                cpu[name].append((time.process_time() - start_cpu) / trace.num_tokens)
        for name, values in rates.items():
            rate = statistics.median(values)
            print(
                f"| {trace.name} | {trace.num_tokens:,} | {name} | {rate:,.0f} | "
                f"{1e6 / rate:,.0f} | {1e6 * statistics.median(cpu[name]):,.0f} | "
                f"{len(values)} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

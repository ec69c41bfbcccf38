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

With ``--core-baseline REV``, a second table: the window step in C++ without Python
(``session_harness.cpp``'s window mode: ``PredictKernel.run_window`` in windows of 4,096 tokens,
every token timed from a cold start, no sequence starts), built against this tree's native
headers and against those of git revision REV, run alternately on each trace's tokens; the two
kernels' stalls, evictions and prefetches are checked equal to each other and to
``PredictiveCaches.run_window``'s on the same tokens. CPU us per layer and token, medians.

usage: python benchmarks/bench_policy.py [--traces DIR] [--tokens N] [--repeats R]
                                        [--core-baseline REV]
Without ../shared/traces (or --traces) it uses the bundled gpt-oss-20b slice only.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_quality import BEFORE_PAIRS, BEFORE_PAIRS_NAME, head, traces
from bench_session import baseline_headers, build_harness, run_harness

from moeray.actors.config import ServiceConfig
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


def window_totals(trace, capacity: int, ids: np.ndarray) -> dict[str, int]:
    """Stalls, evictions and prefetches of PredictiveCaches.run_window on ids, no sequence
    starts: what the window harness must count."""
    caches = PredictiveCaches(trace.num_layers, trace.num_experts, trace.top_k, capacity)
    caches.run_window(ids)
    st = caches.stats
    return {
        "loads": int(st.stalls.sum()),
        "evictions": int(st.evictions.sum()),
        "prefetches": int(st.prefetches.sum()),
    }


def core_table(trace_list, tokens: int, repeats: int, rev: str) -> None:
    """The window step in C++, this tree's headers beside REV's (module doc)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench_policy_"))
    try:
        harness = build_harness(workdir)
        if harness is None:
            raise SystemExit("--core-baseline: no C++ compiler (set CXX)")
        try:
            base = build_harness(workdir, baseline_headers(rev, workdir), "harness_baseline")
        except subprocess.CalledProcessError:
            raise SystemExit(f"--core-baseline {rev}: the harness does not build there") from None
        print()
        print(
            f"| trace | tokens | window step in C++ (us per layer and token) | at {rev} | x faster |"
        )
        print("|---|---|---|---|---|")
        for trace in trace_list:
            trace = head(trace, tokens)
            capacity = capacity_from_fraction(0.25, trace.num_experts)
            ids = np.ascontiguousarray(trace.expert_ids, dtype=np.int64)
            expected = window_totals(trace, capacity, ids)
            config = ServiceConfig(
                num_layers=trace.num_layers,
                num_experts=trace.num_experts,
                top_k=trace.top_k,
                capacity=capacity,
                policy="moeray",
            )
            ours, theirs = [], []
            for _ in range(repeats):  # alternating, one run a process
                for out, binary in ((ours, harness), (theirs, base)):
                    result = run_harness(binary, config, ids, 0, 1, workdir, mode="window")
                    got = {key: result[key] for key in expected}
                    if got != expected:
                        raise SystemExit(
                            f"{trace.name}: the window harness counted {got}, "
                            f"PredictiveCaches.run_window {expected}"
                        )
                    out += result["ns_per_call"]
            now, before = statistics.median(ours), statistics.median(theirs)
            print(
                f"| {trace.name} | {trace.num_tokens:,} | {now / 1000:.3f} | {before / 1000:.3f} | "
                f"{before / now:.2f} |"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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
    parser.add_argument(
        "--core-baseline",
        metavar="REV",
        help="also time the window step in C++ against the native headers of git revision REV",
    )
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats: expected ints >= 1")
    print(f"native step: {'in use' if PredictiveCaches._native else 'not in use (numpy only)'}")
    print("| trace | tokens | policy | tokens/s (median) | us/token | CPU us/token | repeats |")
    print("|---|---|---|---|---|---|---|")
    trace_list = traces(Path(args.traces) if args.traces else None)
    for trace in trace_list:
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
    if args.core_baseline:
        core_table(trace_list, args.tokens, args.repeats, args.core_baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())

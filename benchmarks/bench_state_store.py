"""What saving a layer actor's report in the GCS costs per window (``GcsStateStore``).

A layer actor saves its report (each layer's last window, affinity and statistics, the client
marks) in Ray's GCS before it acknowledges a window, so that a layer actor dying with the
coordinator loses nothing (docs/design.md, "Two failures at once"). This times
``LayerCaches.apply`` in one Ray worker on a local, loopback-only Ray, without and with the
store, in alternating rounds (the same process, the same windows): ``--layers`` layers of the
bundled gpt-oss-20b slice (32 experts, top-4, lru, 8 hot), windows of ``--window-tokens``
tokens; and the report's size.

usage: python benchmarks/bench_state_store.py [--layers 12] [--window-tokens 128]
       [--windows 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time

import numpy as np
import ray

from moeray.actors import _ray
from moeray.actors.config import ServiceConfig
from moeray.actors.layer import LayerCaches
from moeray.actors.messages import LayerWindow
from moeray.traces import default_trace_path, load_trace


def _config() -> ServiceConfig:
    return ServiceConfig(num_layers=24, num_experts=32, top_k=4, capacity=8, name="bench-store")


def time_apply(layers: int, window_tokens: int, windows: int, store: bool) -> dict:
    """Runs in a Ray worker: seconds per ``apply`` of ``windows`` windows (median, p99)."""
    trace = load_trace(default_trace_path())
    ids = np.ascontiguousarray(trace.expert_ids.transpose(1, 0, 2), dtype=np.int32)
    hosted = list(range(layers))
    saver = _ray.GcsStateStore(_config(), 0) if store else None
    body = LayerCaches(hosted, 32, dict.fromkeys(hosted, 8), "lru", state_store=saver)
    seconds = []
    span = ids.shape[1] - window_tokens
    for number in range(1, windows + 1):
        lo = (number * window_tokens) % span
        batch = [
            LayerWindow(layer, number, ids[layer, lo : lo + window_tokens]) for layer in hosted
        ]
        start = time.perf_counter()
        body.apply(batch)
        seconds.append(time.perf_counter() - start)
    report = len(pickle.dumps(body.adopt(), protocol=pickle.HIGHEST_PROTOCOL))
    return dict(
        median=float(np.median(seconds)), p99=float(np.percentile(seconds, 99)), report=report
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="layers of the actor (default 12)")
    parser.add_argument("--window-tokens", type=int, default=128, help="default 128")
    parser.add_argument("--windows", type=int, default=2000, help="per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=2, help="default 2")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= 24 or args.window_tokens < 1 or args.windows < 1:
        parser.error("--layers in [1, 24], --window-tokens and --windows >= 1")
    rows = []
    with _ray.local_session(num_cpus=1):
        timed = ray.remote(time_apply)
        try:
            for round_ in range(1, args.rounds + 1):
                for store in (False, True):
                    got = ray.get(
                        timed.remote(args.layers, args.window_tokens, args.windows, store)
                    )
                    rows.append((round_, "GCS" if store else "none", got))
        finally:
            _ray.GcsStateStore(_config(), 0).delete()
    print(
        f"LayerCaches.apply, {args.layers} layers x {args.window_tokens} tokens per window, "
        f"{args.windows} windows per round, one Ray worker"
    )
    print("| round | report saved to | apply median (ms) | apply p99 (ms) | report (bytes) |")
    print("|---|---|---|---|---|")
    for round_, where, got in rows:
        report = f"{got['report']:,}" if where == "GCS" else "-"
        print(
            f"| {round_} | {where} | {got['median'] * 1e3:.3f} | {got['p99'] * 1e3:.3f} | {report} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

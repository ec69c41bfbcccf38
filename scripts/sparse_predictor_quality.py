"""Would a sparse predictor keep the moeray policy's quality? The evidence for issue 18's next step.

The predictive policy's tables are dense: each source expert's row of the cross-layer,
previous-token and pair tables holds a number for every expert, so a layer's prediction reads
(k + k(k-1)/2 + k) rows of E numbers (about 11,000 at 256 experts, top-8) and cannot reach the
engine session's 1 us per layer call. A sparse table would keep each row's M largest entries
only. This replays the policy on the twin (numpy) with every row it reads cut to its M largest
entries before use (the learning itself unchanged, so this bounds the loss of the cut, not of a
table that also forgets the entries it drops), the dense policy beside it, at a quarter of each
layer's experts, on the shared traces.

    python scripts/sparse_predictor_quality.py [--traces ../shared/traces] [--tokens N] [--m M ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from moeray.native._reference import predict as twin
from moeray.policy.predict import PredictiveCaches
from moeray.policy.registry import POLICIES as REGISTRY
from moeray.policy.registry import predictive_variant
from moeray.replay import ReplayConfig, capacity_from_fraction, replay_trace
from moeray.traces import load_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shared_traces import REAL_TRACES, SHARED_TRACES  # noqa: E402

TINY = 1e-300  # the twin's


def top(x: np.ndarray, m: int) -> np.ndarray:
    """x with all but the m largest entries of each last-axis row set to 0."""
    if m >= x.shape[-1]:
        return x
    out = x.copy()
    np.put_along_axis(out, np.argpartition(x, -m, axis=-1)[..., :-m], 0.0, axis=-1)
    return out


def sparse_functions(m: int) -> dict:
    """The twin's table_scores, cross_scores and hot_value with every table row cut to m."""

    def table_scores(table, counts, ids):
        rows = np.arange(len(ids))[:, None]
        den = counts[rows, ids][..., None]
        return (top(table[rows, ids], m) / np.maximum(den, TINY)).sum(axis=1) / ids.shape[1]

    def cross_scores(kernel, src, scale, layers=slice(1, None)):
        k, rows = kernel, np.arange(len(src))[:, None]
        den = np.maximum(k.cross_n[layers][rows, src], TINY)[..., None]
        cond = top(k.cross[layers][rows, src], m) / den
        if not k.buckets:
            return cond.mean(axis=1)
        back = 0.5 * (cond[:, k.pair_a] + cond[:, k.pair_b])
        index = twin.pair_index(k, src)
        prior = k.pair_prior * scale
        num = top(k.pair[layers][rows, index], m) + prior * back
        den = k.pair_n[layers][rows, index][..., None] + prior
        return (num / np.maximum(den, TINY)).mean(axis=1)

    def hot_value(kernel, p):
        k, value = kernel, p
        if k.victim_next_weight:
            cond = top(k.prev, m) / np.maximum(k.prev_n, TINY)[..., None]
            next_use = np.einsum("le,lef->lf", top(p, m), cond)
            value = value + k.victim_next_weight / k.top_k * next_use
        if k.victim_affinity_weight:
            value = value + k.victim_affinity_weight * k.affinity
        return value

    return dict(table_scores=table_scores, cross_scores=cross_scores, hot_value=hot_value)


class TwinCaches(PredictiveCaches):
    """PredictiveCaches on the twin, whose module functions this script swaps."""

    _native = False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=Path, default=SHARED_TRACES)
    parser.add_argument("--tokens", type=int, default=5000, help="first tokens of each trace")
    parser.add_argument("--m", type=int, nargs="+", default=[8, 16, 24], help="entries kept")
    args = parser.parse_args(argv)
    dense = {name: getattr(twin, name) for name in sparse_functions(1)}
    variant = predictive_variant(
        "moeray", lambda _l, _e, _k, cap, cfg: TwinCaches(_l, _e, _k, cap, cfg), "twin"
    )
    print("| trace | experts, top-k | rows cut to | stall rate | transfers/token |")
    print("|---|---|---|---|---|")
    for relative in REAL_TRACES:
        path = args.traces / relative
        if not path.is_file():
            print(f"(no {path}: skipped)", file=sys.stderr)
            continue
        trace = load_trace(path).head(args.tokens)
        config = ReplayConfig(
            capacity=capacity_from_fraction(0.25, trace.num_experts), policies=("moeray",)
        )
        for m in [None, *args.m]:
            functions = dense if m is None else sparse_functions(m)
            for name, fn in functions.items():
                setattr(twin, name, fn)
            start = time.perf_counter()
            r = replay_trace(trace, config, policies={**REGISTRY, "moeray": variant})
            r = r.results["moeray"]
            print(
                f"| {trace.name} ({trace.num_tokens} tokens) | {trace.num_experts}, "
                f"{trace.top_k} | {'dense' if m is None else m} | {r.stall_rate:.4f} | "
                f"{r.transfers_per_token:.2f} |",
                flush=True,
            )
            print(f"  ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    for name, fn in dense.items():
        setattr(twin, name, fn)
    return 0


if __name__ == "__main__":
    sys.exit(main())

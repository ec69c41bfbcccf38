"""Would a sparse predictor keep the moeray policy's quality? The evidence for issue 18's next step.

The predictive policy's tables are dense: each source expert's row of the cross-layer,
previous-token and pair tables holds a number for every expert, so a layer's prediction reads
(k + k(k-1)/2 + k) rows of E numbers (about 11,000 at 256 experts, top-8) and cannot reach the
engine session's 1 us per layer call. A sparse table would keep each row's M largest entries
only. This replays the policy on the twin (numpy), the dense policy beside it, at a quarter of
each layer's experts, on the shared traces, two ways:

- "read M": every row it reads cut to its M largest entries before use, the learning itself
  unchanged (so this bounds the loss of the cut, not of a table that forgets what it drops);
- "learned M": the tables themselves keep M entries a row, as a space-saving table would: an
  event for an expert not in a full row takes the place of the row's smallest entry and adds
  to its count (ties to the lower expert id; a row's total, the quotients' denominator, is
  unchanged). This is what a sparse kernel would learn.

    python scripts/sparse_predictor_quality.py [--traces ../shared/traces] [--tokens N] [--m M ...]
        [--modes read learned]
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


def top(x: np.ndarray, m: int) -> np.ndarray:
    """x with all but the m largest entries of each last-axis row set to 0."""
    if m >= x.shape[-1]:
        return x
    out = x.copy()
    np.put_along_axis(out, np.argpartition(x, -m, axis=-1)[..., :-m], 0.0, axis=-1)
    return out


def sparse_functions(m: int) -> dict:
    """The twin's table_scores, cross_scores and hot_value with every table row cut to m."""
    reciprocal = twin.reciprocal

    def table_scores(table, counts, ids):
        rows = np.arange(len(ids))[:, None]
        inv = reciprocal(counts[rows, ids])[..., None]
        return (top(table[rows, ids], m) * inv).sum(axis=1) * (1.0 / ids.shape[1])

    def cross_scores(kernel, src, scale, layers=slice(1, None)):
        k, rows = kernel, np.arange(len(src))[:, None]
        cond = (
            top(k.cross[layers][rows, src], m) * reciprocal(k.cross_n[layers][rows, src])[..., None]
        )
        if not k.buckets:
            return cond.sum(axis=1) * (1.0 / src.shape[1])
        back = 0.5 * (cond[:, k.pair_a] + cond[:, k.pair_b])
        index = twin.pair_index(k, src)
        prior = k.pair_prior * scale
        num = top(k.pair[layers][rows, index], m) + prior * back
        den = k.pair_n[layers][rows, index] + prior
        return (num * reciprocal(den)[..., None]).sum(axis=1) * (1.0 / index.shape[1])

    def hot_value(kernel, p):
        k, value = kernel, p
        if k.victim_next_weight:
            cond = top(k.prev, m) * reciprocal(k.prev_n)[..., None]
            next_use = np.einsum("le,lef->lf", top(p, m), cond)
            value = value + k.victim_next_weight / k.top_k * next_use
        if k.victim_affinity_weight:
            value = value + k.victim_affinity_weight * k.affinity
        return value

    return dict(table_scores=table_scores, cross_scores=cross_scores, hot_value=hot_value)


def space_saving(row: np.ndarray, old: np.ndarray, m: int) -> None:
    """Row (learned, in place) as a space-saving table of m entries whose state before the
    token was ``old`` (at most m nonzero): each new entry, in expert order, takes the place of
    the smallest entry when the row is full, adding that entry's count to its own."""
    new = np.flatnonzero((old == 0) & (row > 0))
    held = int(np.count_nonzero(old))
    if held + len(new) <= m:
        return
    increments = row[new].copy()
    row[new] = 0.0
    for e, inc in zip(new, increments):
        if held < m:
            row[e] = inc
            held += 1
            continue
        nonzero = np.flatnonzero(row)
        smallest = nonzero[np.argmin(row[nonzero])]  # the first of equals: the lower id
        row[e] = row[smallest] + inc
        row[smallest] = 0.0


def learned_sparse(m: int, dense_learn):
    """The twin's learn with every table row it touches kept to m entries (space_saving)."""

    def learn(kernel, ids, last_ids, next_scale, next_prev_scale):
        k = kernel
        touched = []  # (table, layers [n], source rows [n]) of the rows this token learns
        if k.layers > 1:
            below = np.repeat(k.rows[1:], ids.shape[1])
            touched.append((k.cross, below, ids[:-1].ravel()))
            if k.buckets:
                index = twin.pair_index(k, ids[:-1])
                touched.append((k.pair, np.repeat(k.rows[1:], index.shape[1]), index.ravel()))
        if last_ids is not None:
            touched.append((k.prev, np.repeat(k.rows, ids.shape[1]), last_ids.ravel()))
        before = []
        for table, layers, sources in touched:
            pairs = np.unique(np.stack([layers, sources], axis=1), axis=0)
            before.append((table, pairs, table[pairs[:, 0], pairs[:, 1]].copy()))
        dense_learn(kernel, ids, last_ids, next_scale, next_prev_scale)
        for table, pairs, old in before:
            scale = next_prev_scale if table is k.prev else next_scale
            if scale > 1e200:  # the dense learn divided the tables by it
                old = old / scale
            for (layer, source), row_old in zip(pairs, old):
                space_saving(table[layer, source], row_old, m)

    return learn


class TwinCaches(PredictiveCaches):
    """PredictiveCaches on the twin, whose module functions this script swaps."""

    _native = False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=Path, default=SHARED_TRACES)
    parser.add_argument("--tokens", type=int, default=5000, help="first tokens of each trace")
    parser.add_argument("--m", type=int, nargs="+", default=[8, 16, 24], help="entries kept")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("read", "learned"),
        default=["read", "learned"],
        help="rows cut when read, or tables that keep m entries a row (default both)",
    )
    args = parser.parse_args(argv)
    if args.tokens < 1 or min(args.m) < 1:
        parser.error("--tokens and --m: expected ints >= 1")
    dense = {name: getattr(twin, name) for name in (*sparse_functions(1), "learn")}
    variant = predictive_variant(
        "moeray", lambda _l, _e, _k, cap, cfg: TwinCaches(_l, _e, _k, cap, cfg), "twin"
    )
    settings = [("dense", None)] + [(mode, m) for mode in args.modes for m in args.m]
    print("| trace | experts, top-k | rows | stall rate | transfers/token |")
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
        for mode, m in settings:
            functions = dict(dense)
            if mode == "read":
                functions.update(sparse_functions(m))
            elif mode == "learned":
                functions["learn"] = learned_sparse(m, dense["learn"])
            for name, fn in functions.items():
                setattr(twin, name, fn)
            start = time.perf_counter()
            r = replay_trace(trace, config, policies={**REGISTRY, "moeray": variant})
            r = r.results["moeray"]
            print(
                f"| {trace.name} ({trace.num_tokens} tokens) | {trace.num_experts}, "
                f"{trace.top_k} | {mode if m is None else f'{mode} {m}'} | {r.stall_rate:.4f} | "
                f"{r.transfers_per_token:.2f} |",
                flush=True,
            )
            print(f"  ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    for name, fn in dense.items():
        setattr(twin, name, fn)
    return 0


if __name__ == "__main__":
    sys.exit(main())

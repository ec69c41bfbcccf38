"""Speed of moeray's native core beside its baselines, measured side by side in one run.

Every row times the native core, the pure-Python reference (the same API, `_reference/`) and,
where one exists, a plain numpy version, on the same inputs; times are medians of repeats.
Goals (on a 2-core VM): batched access <= 5 ns at 256 experts / 64 hot / top-8 for LRU
and LFU; schedule <= 6 ns per assignment at T=65,536, top-8, 256 experts;
top_k_by_affinity(16) over 256 experts <= 1 us; prefetch_by_affinity(budget=2) <= 2 us;
affinity update_batch <= 15 ns per token at 256 experts.

usage: python benchmarks/bench_core.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from shared_traces import SHARED_TRACES

from moeray.native import _core, _reference
from moeray.traces import default_trace_path, load_trace

E, HOT, TOP_K, T = 256, 64, 8, 65_536
REAL_TRACES = (  # (file under --traces, capacity in experts: a quarter of each layer's)
    ("gpt-oss-20b/gpt_oss_20b_decode_routing.npz", 8),
    ("deepseek-v2-lite-chat/deepseek_v2_lite_chat_prefill_routing.npz", 16),
)


def median_seconds(fn, repeats: int, setup=None) -> float:
    """Median wall time of fn(state) over repeats; setup() builds fresh state outside the timing."""
    times = []
    for _ in range(repeats):
        state = setup() if setup else None
        start = time.perf_counter()
        fn(state)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_chunk_ns(make, streams, repeats: int, chunk_rows: int = 4096, call=None) -> float:
    """Median ns per access over chunks of chunk_rows tokens, each stream fed in order to one
    fresh cache per repeat: many short samples, so a noisy neighbour only shifts a few of them."""
    call = call or (lambda state, chunk: state.access_batch(chunk))
    samples = []
    for _ in range(repeats):
        for stream in streams:
            state = make()
            for start in range(0, len(stream), chunk_rows):
                chunk = stream[start : start + chunk_rows]
                begin = time.perf_counter()
                call(state, chunk)
                samples.append((time.perf_counter() - begin) / chunk.size * 1e9)
    return statistics.median(samples)


def routing_stream(rng: np.random.Generator, tokens: int, skew: float = 0.8) -> np.ndarray:
    """int32 [tokens, TOP_K]: distinct experts per token, skewed popularity drifting over time
    (Gumbel top-k over a Zipf-like prior of exponent `skew` that rotates every 1,024 tokens)."""
    prior = -skew * np.log(np.arange(1, E + 1, dtype=np.float32))
    out = np.empty((tokens, TOP_K), dtype=np.int32)
    for start in range(0, tokens, 1024):
        stop = min(start + 1024, tokens)
        logits = np.roll(prior, (start // 1024) * 7)
        noisy = logits + rng.gumbel(size=(stop - start, E)).astype(np.float32)
        out[start:stop] = np.argpartition(-noisy, TOP_K, axis=1)[:, :TOP_K]
    return out


def numpy_schedule(ids: np.ndarray, weights: np.ndarray, num_experts: int):
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    offsets = np.zeros(num_experts + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=num_experts), out=offsets[1:])
    return offsets, (order // ids.shape[1]).astype(np.int32), weights.ravel()[order]


def numpy_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(-scores, k)[:k]
    return part[np.lexsort((part, -scores[part]))]


def row(name, unit, native, reference, numpy_value, goal, note=""):
    """One measurement, as a dict (``--json``); ``format_row`` prints it."""
    return {
        "name": name,
        "unit": unit,
        "native": native,
        "reference": reference,
        "numpy": numpy_value,
        "goal": goal,
        "note": note,
    }


def fmt(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if v < 100 else f"{v:,.0f}")


def format_row(r: dict) -> str:
    native, reference, numpy_value, goal = r["native"], r["reference"], r["numpy"], r["goal"]
    speedup = f"{reference / native:,.0f}x" if reference else "-"
    vs_numpy = f"{numpy_value / native:.1f}x" if numpy_value else "-"
    met = "-" if goal is None else ("yes" if native <= goal else "NO")
    goal_text = "-" if goal is None else f"<= {goal:g}"
    return (
        f"| {r['name']} | {r['unit']} | {fmt(native)} | {fmt(reference)} | {fmt(numpy_value)} | "
        f"{speedup} | {vs_numpy} | {goal_text} | {met} | {r['note']} |"
    )


def bench_access(policy: int, name: str, ids: np.ndarray, ref_ids: np.ndarray, repeats: int):
    def run(module, stream, chunk_rows):
        return median_chunk_ns(
            lambda: module.ExpertCacheCore(E, HOT, 0.1, policy), [stream], repeats, chunk_rows
        )

    hit_rate = _core.ExpertCacheCore(E, HOT, 0.1, policy).access_batch(ids).mean()
    goal = 5.0 if policy in (_core.LRU, _core.LFU) else None
    return row(
        f"access_batch {name}",
        "ns/access",
        run(_core, ids, 4096),
        run(_reference, ref_ids, 128),
        None,
        goal,
        f"hit rate {hit_rate:.3f}",
    )


def bench_blended(ids: np.ndarray, ref_ids: np.ndarray, repeats: int):
    def run(module, stream, chunk_rows):
        return median_chunk_ns(
            lambda: (
                module.ExpertCacheCore(E, HOT, 0.1, module.LRU),
                module.AffinityCore(E, 0.95, 0.05, 1.0),
            ),
            [stream],
            repeats,
            chunk_rows,
            call=lambda state, chunk: state[0].access_batch(chunk, state[1], 0.8),
        )

    return row(
        "access_batch affinity-LRU (w=0.8)",
        "ns/access",
        run(_core, ids, 1024),
        run(_reference, ref_ids, 64),
        None,
        None,
        "blend O(hot) per miss + an affinity update per token",
    )


def bench_schedule(rng, repeats: int):
    ids = rng.integers(0, E, size=(T, TOP_K), dtype=np.int32)
    weights = rng.random((T, TOP_K), dtype=np.float32)
    n = ids.size
    native = median_seconds(lambda _: _core.schedule(ids, weights, E), repeats) / n * 1e9
    numpy_value = median_seconds(lambda _: numpy_schedule(ids, weights, E), repeats) / n * 1e9
    # The reference *is* a numpy stable argsort; timed on the same input as its own column.
    reference = median_seconds(lambda _: _reference.schedule(ids, weights, E), repeats) / n * 1e9
    return row(
        f"schedule T={T:,} top-{TOP_K}",
        "ns/assignment",
        native,
        reference,
        numpy_value,
        6.0,
        f"{native and 1e3 / native:.0f} M assignments/s",
    )


def bench_update_batch(rng, repeats: int):
    """Two rows: the lazy decay (the usual parameters, O(top-8) a token) and, beside it, the
    eager form (every score decayed every token) that parameters outside the lazy bounds take:
    the same work with max_score 2^600, which boosts of 1 never reach."""
    ids = routing_stream(rng, 4096)
    small = ids[:256].copy()

    def numpy_update(_):
        scores = np.zeros(E)
        for r in ids:
            scores *= 0.99
            scores[r] = np.minimum(scores[r] + 1.0, 1.0)

    def per_token(module, batch, params):
        def warm():  # a core 4,000 tokens in: the timed batch folds the lazy scale once (at 4,410)
            a = module.AffinityCore(E, *params)
            a.update_batch(ids[:4000] if module is _core else ids[:1])
            return a

        seconds = median_seconds(lambda a: a.update_batch(batch), repeats, warm)
        return seconds / len(batch) * 1e9

    numpy_value = median_seconds(numpy_update, repeats) / len(ids) * 1e9
    lazy, eager = (0.99, 1.0, 1.0), (0.99, 1.0, 2.0**600)
    return [
        row(
            "affinity update_batch (per token)",
            "ns/token",
            per_token(_core, ids, lazy),
            per_token(_reference, small, lazy),
            numpy_value,
            15.0,
            f"{E} experts, lazy decay: top-{TOP_K} boosts and one scale per token, one fold",
        ),
        row(
            "affinity update_batch, eager form",
            "ns/token",
            per_token(_core, ids, eager),
            per_token(_reference, small, eager),
            numpy_value,
            None,
            f"{E} experts decayed per token (max_score 2^600: outside the lazy bounds)",
        ),
    ]


def bench_top_k(rng, repeats: int):
    scores = rng.random(E)
    cores = []
    for module in (_core, _reference):
        a = module.AffinityCore(E, 1.0, 1.0, 1e9)
        # Give the tracker the random scores through its own update rule (boost per count).
        counts = (scores * 20).astype(int)
        for e in range(E):
            for _ in range(counts[e]):
                a.update([e])
        cores.append(a)
    inner = 2000
    native = (
        median_seconds(lambda _: [cores[0].top_k_by_affinity(16) for _ in range(inner)], repeats)
        / inner
        * 1e6
    )
    reference = (
        median_seconds(lambda _: [cores[1].top_k_by_affinity(16) for _ in range(20)], repeats)
        / 20
        * 1e6
    )
    s = cores[0].scores()
    numpy_value = (
        median_seconds(lambda _: [numpy_top_k(s, 16) for _ in range(inner)], repeats) / inner * 1e6
    )
    return row(
        "top_k_by_affinity(16)",
        "us/call",
        native,
        reference,
        numpy_value,
        1.0,
        "includes the Python call",
    )


def bench_prefetch(rng, repeats: int):
    stream = routing_stream(rng, 2048)

    def setup(module):
        def make():
            cache = module.ExpertCacheCore(E, HOT, 0.1, module.LRU)
            affinity = module.AffinityCore(E, 0.95, 0.2, 1.0)
            cache.access_batch(stream[:512], affinity, 0.5)
            return cache, affinity, stream[512:]

        return make

    def prefetch_seconds(state, n) -> float:
        """A step: one token's routing updates the affinity (untimed), then a prefetch of 2
        by affinity, timed call by call: the calls' own time, nothing subtracted."""
        cache, affinity, rows = state
        clock, spent = time.perf_counter, 0.0
        for i in range(n):
            affinity.update(rows[i].tolist())
            start = clock()
            cache.prefetch_by_affinity(affinity, 2)
            spent += clock() - start
        return spent

    def median_per_call(module, n) -> float:
        make = setup(module)
        return statistics.median(prefetch_seconds(make(), n) for _ in range(repeats)) / n * 1e6

    native = median_per_call(_core, 1024)
    reference = median_per_call(_reference, 64)
    return row(
        "prefetch_by_affinity(budget=2)",
        "us/call",
        native,
        reference,
        None,
        2.0,
        f"{HOT} of {E} hot, full: 2 blended evictions per call",
    )


def bench_belady(repeats: int):
    trace = load_trace(default_trace_path())
    layers = [trace.layer_ids(layer) for layer in range(trace.num_layers)]
    n = sum(x.size for x in layers)
    native = (
        median_seconds(lambda _: [_core.belady_hits(x, 32, 8) for x in layers], repeats) / n * 1e9
    )
    ref_layers = layers[:2]
    ref_n = sum(x.size for x in ref_layers)
    reference = (
        median_seconds(lambda _: [_reference.belady_hits(x, 32, 8) for x in ref_layers], 1)
        / ref_n
        * 1e9
    )
    return row(
        "belady_hits (bundled trace, 8 of 32)",
        "ns/access",
        native,
        reference,
        None,
        None,
        f"{n:,} accesses",
    )


def bench_real_trace(path, capacity: int, repeats: int):
    """LRU and LFU batched access over the first 8 layers of a real routing trace."""
    trace = load_trace(path)
    layers = [trace.layer_ids(layer) for layer in range(min(8, trace.num_layers))]
    ref_layers = [x[:1024].copy() for x in layers[:2]]
    rows = []
    for policy, name in ((_core.LRU, "LRU"), (_core.LFU, "LFU")):

        def run(module, streams, chunk_rows, policy=policy):
            return median_chunk_ns(
                lambda: module.ExpertCacheCore(trace.num_experts, capacity, 0.1, policy),
                streams,
                repeats,
                chunk_rows,
            )

        hit_rate = np.mean(
            [
                _core.ExpertCacheCore(trace.num_experts, capacity, 0.1, policy)
                .access_batch(x)
                .mean()
                for x in layers
            ]
        )
        rows.append(
            row(
                f"access_batch {name}, {trace.name.split('_')[0]}",
                "ns/access",
                run(_core, layers, 8192),
                run(_reference, ref_layers, 256),
                None,
                None,
                f"{trace.num_experts} experts, {capacity} hot, top-{trace.top_k}, "
                f"hit rate {hit_rate:.3f}",
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=7, help="repeats per measurement (median)")
    parser.add_argument(
        "--traces",
        type=Path,
        default=SHARED_TRACES,
        help="folder of the shared real traces, for the real-routing rows "
        "(skipped when absent; default: ../shared/traces beside the repo)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    rng = np.random.default_rng(2026)
    tokens = 8192 if args.quick else T
    ids = routing_stream(rng, tokens)
    ref_ids = ids[:1024].copy()
    local_ids = routing_stream(rng, tokens, skew=2.0)

    print(
        f"moeray core benchmark: {E} experts, {HOT} hot, top-{TOP_K}, {tokens:,} tokens per "
        f"access batch; medians of {repeats} repeats",
        file=sys.stderr,
    )
    rows = [
        bench_access(_core.LRU, "LRU", ids, ref_ids, repeats),
        bench_access(_core.LFU, "LFU", ids, ref_ids, repeats),
        bench_access(_core.LRU, "LRU, high locality", local_ids, local_ids[:1024].copy(), repeats),
        bench_access(_core.LFU, "LFU, high locality", local_ids, local_ids[:1024].copy(), repeats),
        bench_access(_core.ADAPTIVE, "Adaptive", ids, ref_ids, repeats),
        bench_blended(ids, ref_ids, repeats),
        bench_schedule(rng, repeats),
        *bench_update_batch(rng, repeats),
        bench_top_k(rng, repeats),
        bench_prefetch(rng, repeats),
        bench_belady(repeats),
    ]
    for relative, capacity in REAL_TRACES:
        if (args.traces / relative).is_file():
            rows += bench_real_trace(args.traces / relative, capacity, repeats)
    print(
        "| operation | unit | native | reference | numpy | native vs reference | "
        "native vs numpy | goal | met | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(format_row(r))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real bytes, real kernel: decode over a memory-mapped checkpoint with and without moeray's
prefetcher, and with every expert resident, side by side in one run.

A synthetic gpt-oss-20b checkpoint (its tensor names and stacked layout, bf16, hidden and
intermediate sizes divided by ``--scale``, the first ``--layers`` MoE layers) is written once
under ``--work-dir`` unless ``--shards`` names one. Routing is the real gpt-oss-20b decode trace
in ``../shared/traces`` (the bundled slice of it without that folder). Token by token and layer by
layer, the consumer kernel ``expert_matvec`` computes each routed expert's FFN, reading its
weights straight from the mapping, and the layer's LRU cache of ``capacity`` experts decides what
stays. Every mode starts with the shards dropped from the page cache.

Modes, at each capacity (the same cache in every mode):
  (a) demand  no prefetch: a missed expert is loaded when its kernel needs it (the prefetcher's
              populate, run synchronously), an evicted expert is released
  (b) moeray  at a layer's gate the misses go to the prefetch thread and the hot experts compute
              first, overlapping the loads; and the next layer's likely experts (an online
              cross-layer transition table: which experts of layer l+1 followed these of layer l)
              are prefetched into its cache, ``--ahead`` of them per token
  (c) hot     every expert resident, nothing released: the bound
Reported per mode: ms per token (median of ``--repeats`` runs), bytes moved (populated), waits
(experts the kernel had to wait for), hit rate, and the ratios to (c) and from (a).
Goal: (b) within 1.3x of (c), and at least 3x faster than (a).

usage: python benchmarks/bench_prefetch.py [--tokens N] [--capacities 0.25,0.5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from shared_traces import GPT_OSS_20B_TRACE

from moeray._progress import Progress
from moeray.native import IS_NATIVE
from moeray.policy import ExpertCache, ExpertCacheConfig
from moeray.shards import ShardStore, expert_matvec
from moeray.shards.kernels import expert_matvec_native
from moeray.shards.residency import ShardResidency
from moeray.traces import default_trace_path, load_trace

MODES = ("demand", "moeray", "hot")


def ensure_checkpoint(args) -> Path:
    if args.shards:
        return Path(args.shards)
    from moeray.shards.synth import MODEL_SHAPES, SynthConfig, write_checkpoint

    out = Path(args.work_dir) / f"gpt-oss-20b-scale{args.scale}-layers{args.layers}"
    if not (out / "model.safetensors.index.json").exists():
        shape = MODEL_SHAPES["gpt-oss-20b"].scaled(args.scale)
        write_checkpoint(SynthConfig(shape, num_layers=args.layers), out, progress=None)
    return out


class CrossLayer:
    """Counts of (expert e at layer l -> expert e' at layer l+1) over the tokens seen so far."""

    def __init__(self, num_layers: int, num_experts: int):
        self.counts = np.zeros((num_layers, num_experts, num_experts), np.float32)

    def learn(self, layer: int, ids: np.ndarray, next_ids: np.ndarray) -> None:
        self.counts[layer][np.ix_(ids, next_ids)] += 1.0

    def predict(self, layer: int, ids: np.ndarray, n: int) -> list[int]:
        """Up to n experts of layer+1 most often seen after ``ids`` at ``layer``."""
        scores = self.counts[layer][ids].sum(axis=0)
        best = np.argsort(-scores, kind="stable")[:n]
        return [int(e) for e in best if scores[e] > 0]


KERNELS = {"native": expert_matvec_native, "numpy": expert_matvec}


def run_mode(
    mode: str,
    store: ShardStore,
    layers: list[int],
    routing: np.ndarray,
    capacity: int,
    ahead: int,
    x: np.ndarray,
    kernel,
    progress: Progress,
) -> dict:
    """routing: int32 [tokens, len(layers), top_k]. Returns the mode's seconds and counters."""
    num_experts = store.num_experts(layers[0])
    hot = mode == "hot"
    residency = [ShardResidency(store, layer, num_experts if hot else capacity) for layer in layers]
    caches = [ExpertCache(num_experts, ExpertCacheConfig(max_hot_experts=capacity)) for _ in layers]
    weights = [[r.expert_weights(e) for e in range(num_experts)] for r in residency]
    if hot:
        for r in residency:
            r.sync(range(num_experts))
            r.settle()
    cross = CrossLayer(len(layers), num_experts)
    waits, waited = 0, 0.0
    # the counters' difference over the timed loop (hot mode's preload above is not part of it)
    moved_before = sum(r.stats().bytes_moved for r in residency)
    start = time.perf_counter()
    for token in range(routing.shape[0]):
        for pos in range(len(layers)):
            ids = routing[token, pos]
            res, cache = residency[pos], caches[pos]
            if not hot:
                res.use(ids, wait=False)  # in time / late / stall, as the gate sees them
                cache.access_batch(ids[None, :])
                res.sync(cache.hot_experts(), fetch=mode == "moeray")
            if mode == "moeray" and pos + 1 < len(layers) and ahead:
                following = caches[pos + 1]
                guess = [e for e in cross.predict(pos, ids, ahead) if not following.is_hot(e)]
                for e in guess:
                    following.prefetch_admit(e)
                residency[pos + 1].sync(following.hot_experts(), ahead=guess)
            order = sorted(ids.tolist(), key=lambda e: not res.ready(e))  # ready ones first
            for e in order:
                if not res.ready(e):
                    began = time.perf_counter()
                    res.wait(e)
                    waited += time.perf_counter() - began
                    waits += 1
                kernel(weights[pos][e], x[token : token + 1])
            if pos + 1 < len(layers):
                cross.learn(pos, ids, routing[token, pos + 1])
        progress.advance(1, mode)
    seconds = time.perf_counter() - start
    stats = [r.stats() for r in residency]
    return {
        "seconds_per_token": seconds / routing.shape[0],
        "bytes_moved": sum(s.bytes_moved for s in stats) - moved_before,
        "waits": waits,
        "wait_seconds": waited,
        "late_prefetches": sum(s.late for s in stats),
        "hit_rate": None if hot else float(np.mean([c.stats().hit_rate() for c in caches])),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--shards",
        help="an existing gpt-oss-20b-style checkpoint (default: synthesize one under --work-dir)",
    )
    parser.add_argument(
        "--work-dir",
        default=".bench_prefetch",
        help="where the synthetic checkpoint is written once (default .bench_prefetch)",
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=16,
        help="divide gpt-oss-20b's hidden and intermediate sizes by this "
        "(default 16: experts of 191 KiB, 8 layers of 48 MiB)",
    )
    parser.add_argument("--layers", type=int, default=8, help="MoE layers (default 8)")
    parser.add_argument(
        "--tokens", type=int, default=128, help="decode tokens replayed (default 128)"
    )
    parser.add_argument(
        "--capacities",
        default="0.25,0.5",
        help="hot fractions of each layer's experts (default 0.25,0.5)",
    )
    parser.add_argument(
        "--ahead",
        type=int,
        default=2,
        help="experts of the next layer prefetched per token in (b) (default 2)",
    )
    parser.add_argument(
        "--kernel",
        choices=tuple(KERNELS),
        default="native",
        help="consumer kernel: the C++ one reading bf16 in place, or the numpy "
        "reference that widens each matrix first (default native)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode; medians (default 3)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs per mode first (default 1: on this VM the first passes "
        "over freshly allocated memory run up to 10x slower)",
    )
    parser.add_argument("--json", type=Path, help="also write each mode's results as JSON")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    args = parser.parse_args(argv)
    if (
        min(args.scale, args.layers, args.tokens, args.repeats) < 1
        or min(args.ahead, args.warmup) < 0
    ):
        parser.error(
            "--scale, --layers, --tokens and --repeats must be >= 1, --ahead and --warmup >= 0"
        )

    root = ensure_checkpoint(args)
    store = ShardStore(root)
    trace = load_trace(GPT_OSS_20B_TRACE if GPT_OSS_20B_TRACE.exists() else default_trace_path())
    layers = list(store.layers)[: args.layers]
    if trace.num_experts != store.num_experts(layers[0]) or trace.num_layers < len(layers):
        parser.error(
            f"the trace routes {trace.num_experts} experts over {trace.num_layers} layers; "
            f"the checkpoint has {store.num_experts(layers[0])} over {len(layers)}"
        )
    routing = np.ascontiguousarray(trace.expert_ids[: args.tokens, : len(layers)], dtype=np.int32)
    hidden = store.layer_spec(layers[0]).hidden_size
    x = np.random.default_rng(0).standard_normal((len(routing), hidden), dtype=np.float32)
    expert_mib = store.expert_bytes(layers[0], 0) / 2**20
    print(
        f"checkpoint {root}: {len(layers)} layers x {store.num_experts(layers[0])} experts of "
        f"{expert_mib:.1f} MiB; trace {trace.name}: {len(routing)} decode tokens, top-"
        f"{trace.top_k}; prefetch ahead {args.ahead}; kernel {args.kernel}; "
        f"core {'native' if IS_NATIVE else 'pure Python'}; "
        f"ms per token are medians of {args.repeats} runs after {args.warmup} untimed"
    )
    print(
        "| capacity | mode | ms / token | MiB moved / token | waits / token | late | hit rate "
        "| vs hot | demand / mode |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    capacities = [float(c) for c in args.capacities.split(",")]
    results = {}
    total = len(capacities) * len(MODES) * (args.warmup + args.repeats) * len(routing)
    with Progress(total, "decode", enabled=args.progress) as progress:
        for fraction in capacities:
            capacity = max(
                1, min(store.num_experts(layers[0]), round(fraction * store.num_experts(layers[0])))
            )
            row = {}
            for mode in MODES:
                runs = [
                    run_mode(
                        mode,
                        store,
                        layers,
                        routing,
                        capacity,
                        args.ahead,
                        x,
                        KERNELS[args.kernel],
                        progress,
                    )
                    for _ in range(args.warmup + args.repeats)
                ][args.warmup :]
                row[mode] = dict(
                    runs[-1],
                    seconds_per_token=statistics.median(r["seconds_per_token"] for r in runs),
                )
            results[f"{fraction:g}"] = dict(capacity_experts=capacity, modes=row)
            for mode, r in row.items():
                ms = r["seconds_per_token"] * 1e3
                hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
                print(
                    f"| {fraction:g} ({capacity}) | {mode} | {ms:.2f} | "
                    f"{r['bytes_moved'] / 2**20 / len(routing):.1f} | {r['waits'] / len(routing):.2f} | "
                    f"{r['late_prefetches']} | {hit} | "
                    f"{r['seconds_per_token'] / row['hot']['seconds_per_token']:.2f}x | "
                    f"{row['demand']['seconds_per_token'] / r['seconds_per_token']:.2f}x |",
                    flush=True,
                )
    store.close()
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "checkpoint": str(root),
                    "tokens": len(routing),
                    "ahead": args.ahead,
                    "kernel": args.kernel,
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

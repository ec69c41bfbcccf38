"""Expert placement beside its baselines, in one run: how fast moeray plans and dispatches, and how
balanced it keeps the GPUs on the real traces.

(a) Planner speed at DeepSeek-V3's shape: 58 MoE layers, 256 experts, 32 GPUs in 4 nodes, 288
    slots (32 redundant), loads from a seeded Zipf-like generator: the published EPLB method
    (``rebalance_eplb``, DeepSeek-V3's 8 expert groups, hierarchical over the 4 nodes),
    ``place_moeray`` full, and ``place_moeray`` incremental (migration budget 8 slots per layer)
    from the full placement of the previous load to a drifted one; and under a shared budget
    (the same memory, 58 x 32 redundant slots over all layers, a grid of 320 slots):
    ``allocate_redundant`` (each layer's share) and ``place_moeray`` full. Median ms over
    repeats.
(b) Dispatch speed: ns per token-assignment of ``moeray.placement.dispatch`` for one layer's
    batch of 65,536 tokens x top-8 over 256 experts on 288 slots (the full placement of (a)),
    beside a numpy even split: ``moeray.policy.schedule`` groups the batch by expert, numpy
    splits each expert's tokens evenly over its replicas and groups them by GPU (what an engine
    without a dispatcher does).
(a) and (b) time the native core and, in a subprocess with ``MOERAY_PURE_PYTHON=1``, the
pure-Python twin on the same inputs (fewer repeats).
(c) Quality on the shared traces, as ``moeray place`` replays them (moeray/placement/replay.py;
    every placement scored on the window after it): DeepSeek-V2-Lite (64 experts) at 8 GPUs, 16
    redundant slots, gpt-oss-20b (32 experts) at 4 GPUs, 8 redundant; a re-placement every
    4,096 tokens, batches of 256, moeray's default migration budget (a tenth of the slots).
    The row ``shared`` is moeray with the same memory shared by the layers (``--shared-budget``:
    layers x redundant slots in all, each layer up to twice its share), beside ``moeray``'s
    fixed budget per layer in the same replay.

Goals: moeray's served window balancedness >= 0.94 on both traces while moving <= 25 % of the
slots EPLB moves over the trace; per-batch served balancedness >= 0.84 on DeepSeek-V2-Lite;
planner <= 2 ms (full) and <= 1 ms (incremental) at DeepSeek-V3's shape; dispatch <= 10 ns per
token-assignment (native).

usage: python benchmarks/bench_placement.py [--quick] [--repeats N] [--traces DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from shared_traces import SHARED_TRACES

from moeray._progress import Progress
from moeray.native import IS_NATIVE, backend
from moeray.placement import (
    PlaceConfig,
    Topology,
    allocate_redundant,
    dispatch,
    place_moeray,
    rebalance_eplb,
    replay_placement,
)
from moeray.placement.cli import print_report
from moeray.policy import schedule
from moeray.traces import load_trace

# DeepSeek-V3: 58 MoE layers (3 dense first), 256 routed experts in 8 groups, top-8;
# its published EPLB example deployment: 4 nodes x 8 GPUs, 32 redundant experts (288 slots).
LAYERS, EXPERTS, GROUPS, TOP_K = 58, 256, 8, 8
NODES, GPUS, REDUNDANT = 4, 32, 32
BUDGET = 8
TOKENS = 65_536
# (file under --traces, label, gpus, redundant, one expert's bytes in bf16 from config.json)
QUALITY = (
    (
        "deepseek-v2-lite-chat/deepseek_v2_lite_chat_prefill_routing.npz",
        "DeepSeek-V2-Lite",
        8,
        16,
        3 * 2048 * 1408 * 2,  # gate, up, down: hidden 2048 x moe_intermediate 1408
    ),
    (
        "gpt-oss-20b/gpt_oss_20b_decode_routing.npz",
        "gpt-oss-20b",
        4,
        8,
        (2880 * 5760 + 2880 * 2880) * 2,  # gate_up 2880 x 5760, down 2880 x 2880
    ),
)
EVERY, BATCH = 4096, 256
GOAL_WINDOW, GOAL_MOVED, GOAL_BATCH = 0.94, 0.25, 0.84
GOAL_FULL_MS, GOAL_INCREMENTAL_MS, GOAL_DISPATCH_NS = 2.0, 1.0, 10.0


# --------------------------------------------------------------------------- inputs


def zipf_loads(rng: np.random.Generator, skew: float = 1.0) -> np.ndarray:
    """float64 [LAYERS, EXPERTS]: each layer's routed-token counts of TOKENS x TOP_K assignments,
    drawn from a Zipf-like popularity (rank r gets r**-skew) over a random order of experts."""
    weight = np.arange(1, EXPERTS + 1, dtype=np.float64) ** -skew
    rows = [
        rng.multinomial(TOKENS * TOP_K, rng.permutation(weight) / weight.sum())
        for _ in range(LAYERS)
    ]
    return np.asarray(rows, dtype=np.float64)


def drifted(rng: np.random.Generator, load: np.ndarray, spread: float = 0.3) -> np.ndarray:
    """``load`` with every expert's count scaled by exp(N(0, spread)): the next window's load."""
    return load * np.exp(rng.normal(0.0, spread, load.shape))


def routing(rng: np.random.Generator, load_row: np.ndarray, tokens: int) -> np.ndarray:
    """int32 [tokens, TOP_K]: distinct experts per token, drawn in proportion to ``load_row``
    (Gumbel top-k of the log-popularity)."""
    logits = np.log(load_row + 1.0).astype(np.float32)
    out = np.empty((tokens, TOP_K), dtype=np.int32)
    for start in range(0, tokens, 4096):
        stop = min(start + 4096, tokens)
        noisy = logits + rng.gumbel(size=(stop - start, EXPERTS)).astype(np.float32)
        out[start:stop] = np.argpartition(-noisy, TOP_K, axis=1)[:, :TOP_K]
    return out


def even_split(ids: np.ndarray, weights: np.ndarray, placement, layer: int):
    """The numpy baseline of ``dispatch``: the batch grouped by expert (``schedule``), each
    expert's tokens cut into equal runs, one per replica, then grouped by GPU. Returns the same
    per-GPU CSR: offsets, token_indices, slot_indices, weights."""
    batches = schedule(ids, weights, placement.num_experts)
    counts = batches.counts()
    experts = np.repeat(np.arange(placement.num_experts), counts)
    rank = np.arange(len(experts)) - np.repeat(batches.offsets[:-1], counts)
    replicas = placement.replica_counts[layer][experts]
    replica = rank * replicas // counts[experts]
    slots = placement.logical_to_physical[layer, experts, replica]
    gpus = slots // placement.topology.slots_per_gpu
    order = np.argsort(gpus, kind="stable")
    offsets = np.zeros(placement.topology.num_gpus + 1, dtype=np.int64)
    np.cumsum(np.bincount(gpus, minlength=placement.topology.num_gpus), out=offsets[1:])
    return offsets, batches.token_indices[order], slots[order], batches.weights[order]


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# --------------------------------------------------------------------------- (a) and (b)


def measure_speed(repeats: int, tokens: int, seed: int = 2026) -> dict:
    """Planner and dispatch timings with the core this process imported (``moeray.native``)."""
    rng = np.random.default_rng(seed)
    topology = Topology.for_experts(EXPERTS, GPUS, NODES, REDUNDANT)
    load = zipf_loads(rng)
    later = drifted(rng, load)
    current, _ = place_moeray(load, topology)
    _, moved = place_moeray(later, topology, current, BUDGET)
    ids = routing(rng, later[0], tokens)  # a batch of the next window, not of the forecast
    weights = rng.random(ids.shape, dtype=np.float32)
    dispatched = dispatch(ids, weights, current, 0)
    baseline = even_split(ids, weights, current, 0)

    def peak(offsets) -> float:
        loads = np.diff(offsets)
        return float(loads.max() / loads.mean())

    shared = Topology.shared(EXPERTS, GPUS, LAYERS, NODES, REDUNDANT)
    split = allocate_redundant(load, shared)
    result = {
        "core": "native" if IS_NATIVE else "pure Python",
        "allocate_ms": median_ms(lambda: allocate_redundant(load, shared), repeats),
        "allocated": [int(split.min()), int(split.max()), int(split.sum())],
        "shared_full_ms": median_ms(lambda: place_moeray(load, shared), repeats),
        "eplb_full_ms": median_ms(
            lambda: rebalance_eplb(load, topology.num_slots, GROUPS, NODES, GPUS), repeats
        ),
        "moeray_full_ms": median_ms(lambda: place_moeray(load, topology), repeats),
        "moeray_incremental_ms": median_ms(
            lambda: place_moeray(later, topology, current, BUDGET), repeats
        ),
        "incremental_moved_slots": int(np.asarray(moved).sum()),
        "dispatch_tokens": tokens,
        "dispatch_ns": median_ms(lambda: dispatch(ids, weights, current, 0), repeats)
        * 1e6
        / ids.size,
        "dispatch_peak_over_mean": peak(dispatched.offsets),
        "even_split_peak_over_mean": peak(baseline[0]),
    }
    if IS_NATIVE:  # the baseline's grouping is the native schedule: timed beside native only
        result["even_split_ns"] = (
            median_ms(lambda: even_split(ids, weights, current, 0), repeats) * 1e6 / ids.size
        )
    return result


def pure_speed(repeats: int, tokens: int) -> dict:
    """``measure_speed`` with the pure-Python twin, in a subprocess (the core is chosen when
    ``moeray.native`` is first imported)."""
    env = {**os.environ, "MOERAY_PURE_PYTHON": "1"}
    argv = [sys.executable, __file__, "--speed-only", "--repeats", str(repeats)]
    argv += ["--dispatch-tokens", str(tokens)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def speed_rows(native: dict | None, pure: dict) -> list[dict]:
    def row(name, unit, key, goal, note, numpy_key=None):
        return {
            "name": name,
            "unit": unit,
            "native": native[key] if native else None,
            "pure": pure[key],
            "numpy": native.get(numpy_key) if native and numpy_key else None,
            "goal": goal,
            "note": note,
        }

    shape = f"{LAYERS} layers x {EXPERTS} experts, {GPUS} GPUs in {NODES} nodes, {EXPERTS + REDUNDANT} slots"
    source = native or pure
    return [
        row(
            "rebalance_eplb (full)",
            "ms",
            "eplb_full_ms",
            None,
            f"{shape}; {GROUPS} groups, hierarchical",
        ),
        row("place_moeray (full)", "ms", "moeray_full_ms", GOAL_FULL_MS, shape),
        row(
            f"place_moeray (incremental, budget {BUDGET})",
            "ms",
            "moeray_incremental_ms",
            GOAL_INCREMENTAL_MS,
            f"to a drifted load: moved {source['incremental_moved_slots']} slots over "
            f"{LAYERS} layers",
        ),
        row(
            "allocate_redundant (shared budget)",
            "ms",
            "allocate_ms",
            None,
            f"{LAYERS} x {REDUNDANT} redundant slots over {LAYERS} layers, grid "
            f"{EXPERTS + 2 * REDUNDANT}: {source['allocated'][0]} to {source['allocated'][1]} "
            f"per layer, {source['allocated'][2]} in all",
        ),
        row(
            "place_moeray (full, shared budget)",
            "ms",
            "shared_full_ms",
            None,
            "the allocation, then each layer's replicas packed and polished",
        ),
        row(
            f"dispatch T={source['dispatch_tokens']:,} top-{TOP_K}",
            "ns/assignment",
            "dispatch_ns",
            GOAL_DISPATCH_NS,
            f"peak / mean GPU load of the batch: dispatched "
            f"{source['dispatch_peak_over_mean']:.3f}, even split "
            f"{source['even_split_peak_over_mean']:.3f}; numpy: schedule + even split",
            "even_split_ns",
        ),
    ]


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def format_row(r: dict) -> str:
    native, pure, numpy_value, goal = r["native"], r["pure"], r["numpy"], r["goal"]
    speedup = f"{pure / native:,.0f}x" if native else "-"
    vs_numpy = f"{numpy_value / native:.1f}x" if native and numpy_value else "-"
    goal_text = "-" if goal is None else f"<= {goal:g}"
    measured = native if native is not None else pure
    met = "-" if goal is None else ("PASS" if measured <= goal else "MISS")
    return (
        f"| {r['name']} | {r['unit']} | {fmt(native)} | {fmt(pure)} | {fmt(numpy_value)} | "
        f"{speedup} | {vs_numpy} | {goal_text} | {met} | {r['note']} |"
    )


# --------------------------------------------------------------------------- (c)


def quality(traces: Path, tokens: int | None, progress: bool | None) -> list[tuple]:
    """[(label, trace, report)] of the shared traces found under ``traces``."""
    out = []
    for relative, label, gpus, redundant, expert_bytes in QUALITY:
        path = traces / relative
        if not path.is_file():
            continue
        trace = load_trace(path)
        if tokens:
            trace = trace.head(tokens)
        config = PlaceConfig(
            gpus=gpus,
            redundant=redundant,
            every=EVERY,
            batch=BATCH,
            expert_bytes=expert_bytes,
            shared_budget=True,
        )
        windows = trace.num_tokens // EVERY
        with Progress(windows, label, enabled=progress) as bar:
            report = replay_placement(
                trace, config, progress=lambda done, total: bar.advance(done - bar.done)
            )
        out.append((label, trace, {**report, "core": "native" if IS_NATIVE else "pure Python"}))
    return out


def goal_lines(reports: list[tuple], native: dict | None, pure: dict) -> list[dict]:
    goals = []

    def goal(what: str, value: float, text: str, target: str, met: bool) -> None:
        goals.append(
            {"goal": what, "value": value, "text": text, "target": target, "met": bool(met)}
        )

    for label, _, report in reports:
        algorithms = report["algorithms"]
        moeray, eplb = algorithms["moeray"], algorithms["eplb"]
        window = moeray["balancedness"]["mean"]
        goal(
            f"{label}: moeray's served window balancedness",
            window,
            f"{window:.3f}",
            f">= {GOAL_WINDOW}",
            window >= GOAL_WINDOW,
        )
        moved = moeray["slots_moved_per_rebalance"] * moeray["rebalances"]
        eplb_moved = eplb["slots_moved_per_rebalance"] * eplb["rebalances"]
        fraction = moved / eplb_moved if eplb_moved else float("inf")
        per_rebalance = (
            moeray["slots_moved_per_rebalance"] / eplb["slots_moved_per_rebalance"]
            if eplb["slots_moved_per_rebalance"]
            else float("inf")
        )
        goal(
            f"{label}: slots moeray moves, as a fraction of eplb's",
            fraction,
            f"{100 * fraction:.1f} % ({moved:,.0f} of {eplb_moved:,.0f} slots over the trace; "
            f"{100 * per_rebalance:.1f} % per rebalance, {moeray['skipped']} of moeray's "
            f"{moeray['rebalances'] + moeray['skipped']} re-placements skipped)",
            f"<= {100 * GOAL_MOVED:.0f} %",
            fraction <= GOAL_MOVED,
        )
        if label == "DeepSeek-V2-Lite":
            batch = moeray["batch_balancedness"]["mean"]
            goal(
                f"{label}: moeray's served per-batch balancedness",
                batch,
                f"{batch:.3f}",
                f">= {GOAL_BATCH}",
                batch >= GOAL_BATCH,
            )
    timed = native or pure
    core = "native" if native else "pure Python (native placement kernels not measured)"
    for key, name, target in (
        ("moeray_full_ms", "planner, full placement", GOAL_FULL_MS),
        ("moeray_incremental_ms", "planner, incremental", GOAL_INCREMENTAL_MS),
    ):
        goal(
            f"{name} at DeepSeek-V3's shape, {core}",
            timed[key],
            f"{fmt(timed[key])} ms",
            f"<= {target:g} ms",
            timed[key] <= target,
        )
    goal(
        f"dispatch per token-assignment, {core}",
        timed["dispatch_ns"],
        f"{fmt(timed['dispatch_ns'])} ns",
        f"<= {GOAL_DISPATCH_NS:g} ns",
        timed["dispatch_ns"] <= GOAL_DISPATCH_NS,
    )
    return goals


# --------------------------------------------------------------------------- main


def _commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and tokens (a smoke run)"
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="repeats per timing, native (median; default 15)"
    )
    parser.add_argument(
        "--traces",
        type=Path,
        default=SHARED_TRACES,
        help="folder of the shared real traces, for (c) (skipped when absent; default: "
        "../shared/traces beside the repo)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dispatch-tokens", type=int, default=TOKENS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if IS_NATIVE and not hasattr(backend, "_improve"):
        print(
            "bench_placement: the native core has no placement kernels (_improve): rebuild it "
            "(pip install --no-build-isolation -e .) or run with MOERAY_PURE_PYTHON=1",
            file=sys.stderr,
        )
        return 2
    if args.speed_only:  # the pure-Python side of (a) and (b), run by pure_speed
        json.dump(measure_speed(args.repeats, args.dispatch_tokens), sys.stdout)
        return 0
    repeats = 3 if args.quick else args.repeats
    pure_repeats = 1 if args.quick else 3
    tokens = 8192 if args.quick else TOKENS
    printed: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        printed.extend(text.splitlines() or [""])

    print("timing the planner and dispatch ...", file=sys.stderr, flush=True)
    native = measure_speed(repeats, tokens) if IS_NATIVE else None
    pure = pure_speed(pure_repeats, tokens) if IS_NATIVE else measure_speed(pure_repeats, tokens)
    rows = speed_rows(native, pure)
    emit(
        f"(a) planner and (b) dispatch at DeepSeek-V3's shape; core: "
        f"{'native' if native else 'pure Python only (the native placement kernels are not built)'}"
        f"; medians of {repeats if native else pure_repeats} repeats (pure Python: "
        f"{pure_repeats}), both on the same inputs"
    )
    emit()
    emit(
        "| operation | unit | native | pure Python | numpy | native vs pure | native vs numpy | "
        "goal | met | note |"
    )
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        emit(format_row(r))
    emit()
    reports = quality(args.traces, 40_000 if args.quick else None, args.progress)
    if not reports:
        emit(f"(c) skipped: no shared traces under {args.traces}")
    for label, trace, report in reports:
        buffer = io.StringIO()
        print_report(report, trace.top_k, buffer)
        emit(f"(c) {label}: moeray place, {trace.num_tokens:,} tokens")
        emit(buffer.getvalue().rstrip("\n"))
        emit()
    goals = goal_lines(reports, native, pure)
    emit("goals:")
    for g in goals:
        emit(f"- {g['goal']}: {g['text']} {g['target']}: {'PASS' if g['met'] else 'MISS'}")
    if args.json:
        record = {
            "script": "benchmarks/bench_placement.py",
            "command": " ".join(
                ["python", "benchmarks/bench_placement.py", *(argv or sys.argv[1:])]
            ),
            "commit": _commit(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "core": "native" if IS_NATIVE else "pure Python",
            "printed": printed,
            "speed": {"native": native, "pure": pure, "rows": rows},
            "quality": {label: report for label, _, report in reports},
            "goals": goals,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

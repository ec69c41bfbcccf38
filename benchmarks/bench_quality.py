"""Policy quality on the real traces: hit rate, stall rate, transfers per token and wasted
prefetches of lru, affinity-lru, belady and moeray, at several capacities, in one run.

Accounting as in `moeray replay` (moeray/replay/inprocess.py): a stall is a use of an expert that was not
hot and not prefetched in time; a transfer is every expert brought into a hot set, on demand or
by prefetch; transfers/token counts all layers. Belady is the offline optimum of demand caching
(its stalls and transfers are its misses). moeray runs with its default parameters
(moeray.policy.predict.PredictConfig), the same for every trace.

Goals (at 25 % of experts per layer): moeray's stall rate at or below Belady's miss
rate on both traces, with transfers per token at most 1.5x Belady's.

At 25 % only, more rows of the moeray policy (not policy names of `moeray replay`):
`moeray thrifty` (two thrift knobs turned, the other end of the stalls-for-transfers trade),
`moeray before eviction retune` (the defaults of the previous release: affinity in the demand
eviction score, no prefetch threshold, one decay for both tables), `moeray before pairs` (the
release before: also single-expert cross-layer tables, victims valued by this token alone,
budget 4), `moeray re-split` (one total capacity re-split
across layers, moeray.policy.split, its SplitConfig defaults), `moeray hints P` (synthetic
engine hints from the trace itself, each hinted id right with probability P, seed 0:
`moeray replay --hint-accuracy P`) and `moeray, oracle evictions, threshold X`: not a policy
but a bound, moeray's predictions and prefetches (above a blended probability X) with every
victim chosen by the true next use (Belady's rule, from the future), which shows how much of
the gap to the goals is eviction.

usage: python benchmarks/bench_quality.py [--traces DIR] [--tokens N] [--json PATH]
Without ../shared/traces (or --traces) it uses the bundled gpt-oss-20b slice only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from shared_traces import REAL_TRACES, SHARED_TRACES

from moeray._progress import Progress
from moeray.native import IS_NATIVE
from moeray.policy.predict import PredictConfig, PredictiveCaches
from moeray.policy.registry import POLICIES as REGISTRY
from moeray.policy.registry import predictive_variant
from moeray.policy.split import SplitConfig
from moeray.replay import ReplayConfig, capacity_from_fraction, replay_trace
from moeray.traces import Trace, default_trace_path, load_trace

FRACTIONS = (0.125, 0.25, 0.5)
POLICIES = ("lru", "affinity-lru", "belady", "moeray")
GOAL_FRACTION = 0.25
GOAL_TRANSFER_RATIO = 1.5
# Not a policy of `moeray replay`: the moeray policy with its two thrift knobs turned, to show
# the other end of the stalls-for-transfers trade (same for every trace).
THRIFTY = replace(PredictConfig(), prefetch_threshold=0.3, victim_affinity_weight=0.5)
THRIFTY_NAME = "moeray thrifty"
# The defaults of the two previous releases, to measure each change in the same run: before the
# eviction retune (affinity in the eviction score, no prefetch threshold, one decay for both
# tables), and before that, before the pair tables.
PREVIOUS = replace(
    PredictConfig(), previous_decay=0.999, keep_affinity_weight=0.5, prefetch_threshold=0.0
)
PREVIOUS_NAME = "moeray before eviction retune"
BEFORE_PAIRS = replace(PREVIOUS, prefetch_budget=4, cross_pairs=False, victim_next_weight=0.0)
RESPLIT = replace(PredictConfig(), split=SplitConfig())
RESPLIT_NAME = "moeray re-split"
HINT_ACCURACIES = (0.9, 0.6)
# The oracle row's prefetch thresholds: at the default 0 its free evictions buy stalls with
# transfers; 0.3 and 0.4 show where both goals come within reach.
ORACLE_THRESHOLDS = (0.3, 0.4)
ORACLE_NAMES = tuple(f"moeray, oracle evictions, threshold {t:g}" for t in ORACLE_THRESHOLDS)
# Extra rows at GOAL_FRACTION: name -> ReplayConfig fields for the moeray policy.
BEFORE_PAIRS_NAME = "moeray before pairs"
EXTRAS = {
    THRIFTY_NAME: {"predict": THRIFTY},
    PREVIOUS_NAME: {"predict": PREVIOUS},
    BEFORE_PAIRS_NAME: {"predict": BEFORE_PAIRS},
    RESPLIT_NAME: {"predict": RESPLIT},
    **{f"moeray hints {p:g}": {"hint_accuracy": p} for p in HINT_ACCURACIES},
}


class OracleEvictions(PredictiveCaches):
    """Not a policy (it reads the future): moeray's predictions and prefetches, with every
    victim, of a prefetch or of a demand load, chosen by the true next use of each hot expert
    (Belady's rule). Hooks: ``_hot_value`` and ``_keep_scores`` of PredictiveCaches, which
    only its numpy step calls, so this runs on numpy."""

    _native = False

    def __init__(self, trace: Trace, capacity: int, config: PredictConfig):
        super().__init__(trace.num_layers, trace.num_experts, trace.top_k, capacity, config)
        T, L, E = trace.num_tokens, trace.num_layers, trace.num_experts
        used = np.zeros((T, L, E), dtype=bool)
        np.put_along_axis(used, trace.expert_ids.astype(np.intp), True, axis=2)
        self._next_use = np.full((T + 1, L, E), 2**30, dtype=np.int32)  # first use at or after t
        for t in range(T - 1, -1, -1):
            self._next_use[t] = np.where(used[t], t, self._next_use[t + 1])

    def _hot_value(self, p):
        t = self._clock - 1  # this token: step advances the clock before its prefetches
        return 1.0 / (1.0 + (self._next_use[t] - t))  # 1 when this token uses it

    def _keep_scores(self, ids):
        t = self._clock - 1
        return -(self._next_use[t + 1] - t).astype(np.float64)  # later next use: evict first


def head(trace: Trace, tokens: int) -> Trace:
    """The first ``tokens`` tokens of ``trace`` (all of it when tokens is 0), sequences kept."""
    return trace if tokens <= 0 else trace.head(tokens)


def traces(folder: Path | None) -> list[Trace]:
    folder = folder if folder is not None else SHARED_TRACES
    found = [folder / name for name in REAL_TRACES if (folder / name).is_file()]
    if not found:
        print(f"no traces under {folder}: using the bundled gpt-oss-20b slice", file=sys.stderr)
        found = [default_trace_path()]
    return [load_trace(path) for path in found]


def measure(trace: Trace, progress: Progress) -> list[dict]:
    rows = []
    for fraction in FRACTIONS:
        capacity = capacity_from_fraction(fraction, trace.num_experts)
        report = replay_trace(
            trace, ReplayConfig(capacity=capacity, policies=POLICIES), progress=progress
        )
        results = dict(report.results)
        if fraction == GOAL_FRACTION:
            for name, fields in EXTRAS.items():
                extra = replay_trace(
                    trace,
                    ReplayConfig(capacity=capacity, policies=("moeray",), **fields),
                    progress=progress,
                )
                results[name] = extra.results["moeray"]
            for name, threshold in zip(ORACLE_NAMES, ORACLE_THRESHOLDS):
                config = replace(PredictConfig(), prefetch_threshold=threshold)
                oracle = predictive_variant(
                    "moeray",
                    lambda _layers, _experts, _top_k, cap, cfg: OracleEvictions(trace, cap, cfg),
                    "moeray with Belady's victims",
                )
                results[name] = replay_trace(
                    trace,
                    ReplayConfig(capacity=capacity, policies=("moeray",), predict=config),
                    progress=progress,
                    policies={**REGISTRY, "moeray": oracle},
                ).results["moeray"]
        for name, r in results.items():
            rows.append(
                {
                    "trace": trace.name,
                    "tokens": trace.num_tokens,
                    "capacity": fraction,
                    "capacity_experts": capacity,
                    "policy": name,
                    "hit_rate": r.hit_rate,
                    "stall_rate": r.stall_rate,
                    "transfers_per_token": r.transfers_per_token,
                    "wasted_prefetches": r.wasted_prefetches,
                    "prefetches": r.prefetches,
                    "per_layer_stall_rate": r.per_layer_stall_rate,
                    **({"predictors": r.predictors} if r.predictors else {}),
                    **({"resplit": r.resplit} if r.resplit else {}),
                }
            )
    return rows


def goals(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["trace"] for r in rows):
        at = {r["policy"]: r for r in rows if r["trace"] == name and r["capacity"] == GOAL_FRACTION}
        for policy in ("moeray", *EXTRAS, *ORACLE_NAMES):
            if policy in at and "belady" in at:
                out.append(_goal(name, policy, at[policy], at["belady"]))
    return out


def _goal(name: str, policy: str, m: dict, b: dict) -> dict:
    ratio = m["transfers_per_token"] / b["transfers_per_token"]
    return {
        "trace": name,
        "policy": policy,
        "moeray_stall_rate": m["stall_rate"],
        "belady_miss_rate": b["stall_rate"],
        "stall_goal_met": m["stall_rate"] <= b["stall_rate"],
        "transfer_ratio": ratio,
        "transfer_goal_met": ratio <= GOAL_TRANSFER_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--traces", type=Path, help="folder of the real traces (default ../shared/traces)"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=20_000,
        help="replay the first N tokens of each trace (default 20,000; 0: all)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    chosen = [head(t, args.tokens) for t in traces(args.traces)]
    total = sum(
        (len(FRACTIONS) * len(POLICIES) + len(EXTRAS) + len(ORACLE_NAMES)) * t.num_layers
        for t in chosen
    )
    rows = []
    with Progress(total, "quality", enabled=args.progress) as progress:
        for trace in chosen:
            rows += measure(trace, progress)
    print(
        f"core: {'native' if IS_NATIVE else 'pure Python'}; moeray parameters: "
        f"{asdict(PredictConfig())}; {THRIFTY_NAME}: the same with prefetch_threshold "
        f"{THRIFTY.prefetch_threshold}, victim_affinity_weight {THRIFTY.victim_affinity_weight}; "
        f"{PREVIOUS_NAME}: the same with previous_decay {PREVIOUS.previous_decay}, "
        f"keep_affinity_weight {PREVIOUS.keep_affinity_weight}, prefetch_threshold "
        f"{PREVIOUS.prefetch_threshold}; {BEFORE_PAIRS_NAME}: the latter with prefetch_budget "
        f"{BEFORE_PAIRS.prefetch_budget}, cross_pairs {BEFORE_PAIRS.cross_pairs}, "
        f"victim_next_weight {BEFORE_PAIRS.victim_next_weight}; "
        f"{RESPLIT_NAME}: split {asdict(RESPLIT.split)}\n"
    )
    print(
        "| trace | tokens | capacity | policy | hit rate | stall rate | transfers/token | "
        "wasted prefetches |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['trace']} | {r['tokens']:,} | {r['capacity']:g} ({r['capacity_experts']}) | "
            f"{r['policy']} | {r['hit_rate']:.3f} | {r['stall_rate']:.3f} | "
            f"{r['transfers_per_token']:.2f} | {r['wasted_prefetches']:,} |"
        )
    print()
    for r in rows:  # the predictors do not depend on capacity: one line per trace
        if (
            r.get("predictors")
            and r["capacity"] == GOAL_FRACTION
            and (
                r["policy"] in ("moeray", PREVIOUS_NAME, BEFORE_PAIRS_NAME)
                or r["policy"].startswith("moeray hints")
            )
        ):
            guesses = ", ".join(
                f"{n} {v['recall']:.3f}/{v['precision']:.3f}" for n, v in r["predictors"].items()
            )
            print(
                f"- {r['trace']}: {r['policy']} predictors, recall/precision of each top-k "
                f"guess: {guesses}"
            )
    for r in rows:
        if r.get("resplit"):
            s = r["resplit"]
            print(
                f"- {r['trace']}: {r['policy']} at {r['capacity']:g}: moved {s['moved']:,} "
                f"experts of capacity, evicted {s['evictions']:,} by shrinking, "
                f"{s['transfers']:,} later loads of those "
                f"({s['transfers'] / r['tokens']:.3f} transfers/token); final capacity per "
                f"layer {s['final_capacity']}"
            )
    print()
    met = goals(rows)
    for g in met:
        print(
            f"- goal at {GOAL_FRACTION:g}, {g['trace']}, {g['policy']}: stall rate "
            f"{g['moeray_stall_rate']:.3f} "
            f"<= Belady's miss rate {g['belady_miss_rate']:.3f}: "
            f"{'met' if g['stall_goal_met'] else 'NOT met'}; transfers/token "
            f"{g['transfer_ratio']:.2f}x Belady's <= {GOAL_TRANSFER_RATIO}x: "
            f"{'met' if g['transfer_goal_met'] else 'NOT met'}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": rows, "goals": met, "moeray_parameters": asdict(PredictConfig())}, indent=2
            )
            + "\n"
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

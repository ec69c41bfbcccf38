"""An engine that joins a running service: how many tokens until it stalls at the steady rate,
warm (it starts from the tables the service learned) against cold, side by side in one run.

The service's learning is stood in for by a session that has routed the stream's first
``--before`` tokens (the layer actors run the same ``PredictiveCaches`` on every engine's
routing: ``ServiceHandle.predictor_tables`` hands exactly its tables). At that point three
sessions route the next ``--after`` tokens: the one that learned (the steady rate), a new one
that loaded its tables (``EngineSession.load_tables``, what ``EngineSession.attach`` does), and a
new cold one. Stalls are counted per window of ``--window`` tokens; a joiner has reached the
steady rate at the end of the first window from which its stall rate, over every later window
together, is within ``--tolerance`` (relative) of the steady session's over the same tokens.

Goal (issue "The engine's side"): a warm joiner at its steady stall rate within 256 tokens; the
cold one's count is measured and reported.

usage: python benchmarks/bench_join.py [--traces DIR] [--before N] [--after N] [--window W]
                                      [--horizon H] [--tolerance F] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from bench_quality import traces

from moeray.actors.config import ServiceConfig
from moeray.engine import EngineSession
from moeray.replay import capacity_from_fraction
from moeray.replay.inprocess import trace_seq_starts


def route(session: EngineSession, ids: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Routes tokens one at a time (decode); returns each token's stalls (all layers)."""
    out = np.empty(len(ids), np.int64)
    for t in range(len(ids)):
        before = sum(c["stalls"] for c in session.stats())
        for layer in range(ids.shape[1]):
            session.route(
                layer, ids[t, layer][None], new_sequence=bool(starts[t]) if layer == 0 else None
            )
        out[t] = sum(c["stalls"] for c in session.stats()) - before
    return out


def tokens_to_steady(
    joiner: np.ndarray, steady: np.ndarray, window: int, horizon: int, tolerance: float
) -> int:
    """Tokens until the joiner's stalls over the next ``horizon`` tokens are within
    ``tolerance`` of the steady session's on the same tokens (len(joiner) when never)."""
    for start in range(0, len(joiner) - horizon + 1, window):
        span = slice(start, start + horizon)
        if joiner[span].sum() <= (1.0 + tolerance) * steady[span].sum():
            return start
    return len(joiner)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", help="folder of the real traces (default ../shared/traces)")
    parser.add_argument("--before", type=int, default=2000, help="tokens learned before (2,000)")
    parser.add_argument("--after", type=int, default=1024, help="tokens routed after (1,024)")
    parser.add_argument("--window", type=int, default=32, help="tokens per window (32)")
    parser.add_argument("--horizon", type=int, default=256, help="tokens compared (256)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative (0.05)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if min(args.before, args.window, args.horizon) < 1 or args.tolerance < 0:
        parser.error("--before, --window, --horizon: ints >= 1; --tolerance >= 0")
    if args.after < args.horizon:
        parser.error("--after: expected at least --horizon tokens")
    rows = []
    print(
        "| trace | capacity | steady stalls/token | warm: tokens to steady | "
        "cold: tokens to steady | steady / warm / cold stalls, first 256 tokens |"
    )
    print("|---|---|---|---|---|---|")
    for trace in traces(Path(args.traces) if args.traces else None):
        need = args.before + args.after
        if trace.num_tokens < need:
            print(f"| {trace.name} | skipped: {trace.num_tokens} tokens < {need} | | | | |")
            continue
        ids = trace.expert_ids[:need].astype(np.int64)
        starts = trace_seq_starts(trace)[:need]
        capacity = max(trace.top_k, capacity_from_fraction(0.25, trace.num_experts))
        config = ServiceConfig(
            num_layers=trace.num_layers,
            num_experts=trace.num_experts,
            top_k=trace.top_k,
            capacity=capacity,
        )
        steady = EngineSession(config)
        route(steady, ids[: args.before], starts[: args.before])
        warm, cold = EngineSession(config), EngineSession(config)
        warm.load_tables(steady.tables())
        after = slice(args.before, need)
        start_after = starts[after].copy()
        rates = {
            name: route(session, ids[after], start_after)
            for name, session in (("steady", steady), ("warm", warm), ("cold", cold))
        }
        warm_n, cold_n = (
            tokens_to_steady(
                rates[name], rates["steady"], args.window, args.horizon, args.tolerance
            )
            for name in ("warm", "cold")
        )
        row = {
            "trace": trace.name,
            "capacity": capacity,
            "steady_stalls_per_token": float(rates["steady"].mean()),
            "warm_tokens_to_steady": warm_n,
            "cold_tokens_to_steady": cold_n,
            "warm_stalls_first_256": int(rates["warm"][:256].sum()),
            "cold_stalls_first_256": int(rates["cold"][:256].sum()),
            "steady_stalls_first_256": int(rates["steady"][:256].sum()),
        }
        rows.append(row)
        never = lambda n: f"{n}" if n < args.after else f"> {args.after}"  # noqa: E731
        print(
            f"| {trace.name} | {capacity} | {row['steady_stalls_per_token']:.2f} | "
            f"{never(warm_n)} | {never(cold_n)} | {row['steady_stalls_first_256']:,} / "
            f"{row['warm_stalls_first_256']:,} / {row['cold_stalls_first_256']:,} |"
        )
    print(
        f"\n(tokens to steady: the first multiple of {args.window} tokens from which the joiner's "
        f"stalls over the next {args.horizon} tokens are within {args.tolerance:.0%} of the steady "
        f"session's; {args.before} tokens learned before, {args.after} routed after)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

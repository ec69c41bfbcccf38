"""The ``moeray`` command line: ``moeray replay`` compares cache policies on a routing trace."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]

_EPILOG = """\
examples:
  moeray replay                                  # bundled gpt-oss-20b slice, 1/4 of experts hot
  moeray replay trace.npz --capacity 0.5 --policy lru --policy belady
  moeray replay --json results.json

The trace is an .npz with expert_ids [tokens, layers, top_k] (optional expert_probs,
seq_offsets, num_experts); see moeray.traces. Hit rates are per layer, averaged over layers;
Belady is the offline optimum for the same capacity.
"""


def _parser() -> argparse.ArgumentParser:
    from moeray.replay import POLICY_NAMES

    parser = argparse.ArgumentParser(
        prog="moeray",
        description="moeray keeps the right MoE expert weights hot across layers and nodes.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    replay = commands.add_parser(
        "replay",
        help="replay a routing trace through each cache policy and the offline optimum",
        description="Replays a routing trace through one expert cache per layer for each policy "
        "and prints hit rates beside Belady's offline optimum.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("trace", nargs="?", help="trace .npz (default: the bundled gpt-oss-20b slice)")
    replay.add_argument("--capacity", type=float, default=0.25, metavar="FRACTION",
                        help="hot-set size as a fraction of each layer's experts, in (0, 1] "
                        "(default 0.25: 8 of 32 for gpt-oss-20b)")
    replay.add_argument("--policy", action="append", choices=POLICY_NAMES, dest="policies",
                        help="policy to replay; repeat for several (default: all)")
    replay.add_argument("--affinity-weight", type=float, default=0.8,
                        help="weight of affinity in affinity-lru eviction, in [0, 1] (default 0.8)")
    replay.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    replay.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    return parser


def _print_report(report, trace, out) -> None:
    print(
        f"trace {report.trace}: {trace.num_tokens:,} tokens x {trace.num_layers} layers x "
        f"top-{trace.top_k}, {trace.num_experts} experts; capacity {report.capacity} of "
        f"{report.num_experts} per layer ({report.capacity_fraction:.3g}); "
        f"core: {'native' if report.native else 'pure Python'}",
        file=out,
    )
    print(f"{'policy':<14}{'hit rate':>10}{'worst layer':>16}{'decisions/s':>14}", file=out)
    for name, r in report.results.items():
        worst = f"{r.per_layer_hit_rate[r.worst_layer]:.3f} (L{r.worst_layer})"
        print(f"{name:<14}{r.hit_rate:>10.3f}{worst:>16}{r.decisions_per_s / 1e6:>12.1f} M", file=out)


def _replay(args) -> int:
    from moeray._progress import Progress
    from moeray.replay import POLICY_NAMES, ReplayConfig, capacity_from_fraction, replay_trace
    from moeray.traces import default_trace_path, load_trace

    trace = load_trace(args.trace if args.trace else default_trace_path())
    config = ReplayConfig(
        capacity=capacity_from_fraction(args.capacity, trace.num_experts),
        policies=tuple(dict.fromkeys(args.policies or POLICY_NAMES)),
        affinity_weight=args.affinity_weight,
    )
    total = len(config.policies) * trace.num_layers
    with Progress(total, "replay", enabled=args.progress) as progress:
        report = replay_trace(trace, config, progress=progress)
    _print_report(report, trace, sys.stdout)
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "replay":
            return _replay(args)
    except (ValueError, OSError) as exc:
        print(f"moeray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())

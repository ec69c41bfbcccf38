"""``moeray place``: replays a routing trace through each placement algorithm and prints how
balanced the GPUs were, how many slots each re-placement moved and how long it took to plan.

Wired into ``moeray.cli`` by ``add_parser(commands)`` and ``run(args)``; also runs alone as
``python -m moeray.placement.cli``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

__all__ = ["add_parser", "main", "run"]

_EPILOG = """\
examples:
  moeray place                                  # bundled gpt-oss-20b slice: 8 GPUs, every algorithm
  moeray place trace.npz --gpus 4 --every 128 --batch 64 --json place.json
  moeray place --algorithm eplb,moeray --expert-bytes 49766400 \\
      --migration-budget 400MiB                 # a bf16 gpt-oss-20b expert: 8 moves per layer
  moeray place --gpus 8 --nodes 2 --redundant 16 --plot place.png
  moeray place --write-map sglang placement.json   # moeray's placement after the trace
  moeray place --load counts.csv --gpus 4 --write-map trtllm balancer.yaml   # needs: a load table
  moeray place ../shared/traces/deepseek-v2-lite-chat/deepseek_v2_lite_chat_prefill_routing.npz \\
      --gpus 8 --redundant 16 --every 4096          # needs: the shared traces

Every --every tokens (a window) each algorithm re-places from what it has seen, and the
placement is scored on the next window, never on the tokens it was computed from:
  static  round robin (slot s holds expert s mod experts), never moved;
  eplb    the published EPLB method on all load seen so far, re-placed from scratch;
  moeray  moeray's planner on its load forecast: one full placement, then at most
          --migration-budget slot moves per layer, none when the forecast barely moved;
  oracle  the published EPLB method given each coming window's own load, known in advance:
          a bound no online planner reaches;
  shared  (--shared-budget) moeray with the same memory, all layers' redundant slots, split
          across layers by the balance each gains (a grid of twice the redundant slots).
Balancedness is mean GPU load / max GPU load of a layer (1 is perfect), averaged over layers:
window over each scored window's load, batch over each --batch tokens of it. served is how the
algorithm's system sends tokens to replicas: even (each expert's tokens split evenly over its
replicas, what engines do with a map) or dispatched (moeray's dispatch water-fills each batch
onto the replicas); the table also shows each placement served the other way, so eplb's row
shows eplb + moeray's dispatch. moved: slots rewritten per re-placement over all layers (each a
copy of one expert's weights), and their bytes with --expert-bytes; skipped: re-placements that
moved nothing; planner ms: the median time of one re-placement of all layers.
--json writes the report (docs/placement.md has its schema); --write-map writes the placement
moeray would publish after the trace in an engine's format (docs/placement-formats.md).
"""


def add_parser(commands) -> argparse.ArgumentParser:
    """Adds ``place`` to the subparsers ``commands``."""
    from moeray.placement.formats import MAP_FORMATS
    from moeray.placement.replay import ALGORITHMS

    place = commands.add_parser(
        "place",
        help="replay a routing trace through expert placement algorithms (static, EPLB, moeray, "
        "an oracle) and compare GPU balance and slots moved",
        description="Replays a routing trace through expert placement on a topology of GPUs and\n"
        "nodes: every window each algorithm re-places the experts (replicas included) from what\n"
        "it has seen, and the placement is scored on the next window.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    place.add_argument(
        "trace",
        nargs="?",
        help="trace file, .mtrace or .npz (default: the bundled gpt-oss-20b slice)",
    )
    place.add_argument(
        "--gpus", type=int, default=8, metavar="N", help="GPUs in all (default 8; expert parallel)"
    )
    place.add_argument(
        "--nodes",
        type=int,
        default=1,
        metavar="N",
        help="nodes the GPUs are spread over, dividing --gpus (default 1); with more than one, "
        "eplb packs expert groups onto nodes and moeray counts a copy from another node double",
    )
    place.add_argument(
        "--redundant",
        type=int,
        metavar="N",
        help="extra expert slots per layer, for replicas of hot experts; experts + N must be a "
        "multiple of --gpus (default: two per GPU, plus what makes the slots divide)",
    )
    place.add_argument(
        "--every",
        type=int,
        default=1024,
        metavar="TOKENS",
        help="tokens between re-placements, a window (default 1024); the trace needs two",
    )
    place.add_argument(
        "--batch",
        type=int,
        default=256,
        metavar="TOKENS",
        help="tokens per served batch, at most --every (default 256): dispatch decides per batch",
    )
    place.add_argument(
        "--migration-budget",
        metavar="SLOTS|BYTES",
        help="moeray's slot moves per layer per re-placement: a count (8) or bytes with a unit "
        "(512MiB, 2GB; needs --expert-bytes; whole experts) (default: a tenth of the slots)",
    )
    place.add_argument(
        "--algorithm",
        action="append",
        dest="algorithms",
        metavar="NAMES",
        help=f"algorithms to compare, comma-separated or repeated (default: all: "
        f"{','.join(ALGORITHMS)})",
    )
    place.add_argument(
        "--groups",
        type=int,
        default=1,
        metavar="N",
        help="eplb's expert groups, dividing the experts (default 1); hierarchical (groups to "
        "nodes first) when they divide over --nodes",
    )
    place.add_argument(
        "--expert-bytes",
        metavar="SIZE",
        help="bytes of one expert's weights (24MiB, 1.5GB, 25165824): adds bytes moved per "
        "re-placement and allows a --migration-budget in bytes",
    )
    place.add_argument(
        "--shared-budget",
        action="store_true",
        help="add the row shared: moeray with the layers' redundant slots (--redundant per "
        "layer, in all) shared, each layer given what gains the most balance, up to twice its "
        "share (with --load: the placement scored beside the others); --write-map then writes "
        "the shared placement, its empty slots filled (sglang, trtllm; vllm refuses)",
    )
    place.add_argument(
        "--json",
        metavar="PATH",
        help="also write the report as JSON (- for stdout; the table then goes to stderr)",
    )
    place.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="draw balancedness per window for each algorithm and a heat map of each GPU's "
        "load over windows (load / mean GPU load, as served); needs matplotlib "
        "(pip install 'moeray[plot]')",
    )
    place.add_argument(
        "--write-map",
        nargs=2,
        metavar=("FORMAT", "PATH"),
        help=f"write the placement moeray would publish after the trace (a full placement of "
        f"its forecast over every window) as an engine's map: {', '.join(MAP_FORMATS)}",
    )
    place.add_argument(
        "--load",
        metavar="FILE",
        help="instead of replaying a trace, place once from a load table: an SGLang expert "
        "distribution dump (logical_count, .json or .pt), a routing trace (its counts), or a CSV "
        "of counts (one row per layer, one column per expert); prints how balanced each "
        "algorithm's placement is on that same load, and --write-map writes moeray's",
    )
    place.add_argument(
        "--first-layer",
        type=int,
        default=0,
        metavar="N",
        help="with --write-map sglang or trtllm: the engine's index of the first MoE layer, "
        "where dense layers come first (3 for DeepSeek-V3; default 0)",
    )
    place.add_argument(
        "--salvage",
        action="store_true",
        help="read a damaged moeray trace (a recording that was killed) up to its last whole "
        "record and say on stderr how many records and tokens were kept; without it, such a "
        "file is an error",
    )
    place.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr, one step per window (default: when stderr is a terminal)",
    )
    return place


def run(args: argparse.Namespace) -> int:
    """Runs a parsed ``place`` command; ValueError (PlacementError included) on bad input."""
    from moeray._progress import Progress
    from moeray.placement.formats import MAP_FORMATS, write_map
    from moeray.placement.placement import PlacementError
    from moeray.placement.planner import budget_slots
    from moeray.placement.replay import PlaceConfig, final_placement, replay_placement
    from moeray.traces import TraceNotFoundError, default_trace_path, load_trace

    if args.write_map is not None and args.write_map[0] not in MAP_FORMATS:
        raise PlacementError(
            f"--write-map: format expected one of {', '.join(MAP_FORMATS)}, got "
            f"{args.write_map[0]!r}"
        )
    if args.plot is not None:
        from moeray.placement.plot import require_matplotlib

        require_matplotlib()  # before the replay, not after
    budget, budget_unit = _migration_budget(args.migration_budget)
    expert_bytes = None if args.expert_bytes is None else _size("--expert-bytes", args.expert_bytes)
    if args.load is not None:
        if args.trace is not None:
            raise PlacementError("--load: give a trace to replay or --load, not both")
        return _place_load(args, expert_bytes)
    if budget_unit == "bytes" and expert_bytes is None:
        raise PlacementError(
            f"--migration-budget: {args.migration_budget} is bytes, which needs --expert-bytes "
            "(one expert's bytes) to count slots"
        )
    try:
        trace = load_trace(
            args.trace if args.trace else default_trace_path(),
            salvage=args.salvage,
            on_salvage=lambda report: print(f"moeray place: salvage: {report}", file=sys.stderr),
        )
    except TraceNotFoundError as exc:
        raise ValueError(exc.strerror) from None  # the message alone, without "[Errno 2]"
    if args.redundant is not None and args.redundant < 0:
        raise PlacementError(
            f"--redundant: {args.redundant} leaves {trace.num_experts + args.redundant} slots per "
            f"layer, which cannot hold the trace's {trace.num_experts} experts once each "
            "(expected >= 0 extra slots)"
        )
    config = PlaceConfig(
        gpus=args.gpus,
        nodes=args.nodes,
        redundant=args.redundant,
        every=args.every,
        batch=args.batch,
        algorithms=_algorithms(args.algorithms),
        groups=args.groups,
        expert_bytes=expert_bytes,
        shared_budget=args.shared_budget,
    )
    topology = config.topology(trace.num_experts)
    if budget is not None:
        config = replace(config, migration_budget=budget_slots(budget, topology, budget_unit))
    windows = trace.num_tokens // config.every
    with Progress(windows, "place", enabled=args.progress) as bar:
        report = replay_placement(
            trace, config, progress=lambda done, total: bar.advance(done - bar.done)
        )
    report = {**report, "core": _core()}
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print_report(report, trace.top_k, table_out)
    if args.json is not None:
        text = json.dumps(report, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            Path(args.json).write_text(text)
            print(f"wrote {args.json}", file=table_out)
    if args.plot is not None:
        from moeray.placement.plot import plot_placement

        print(f"wrote {plot_placement(report, args.plot)}", file=table_out)
    if args.write_map is not None:
        format, path = args.write_map
        placement = final_placement(trace, config)
        written = write_map(placement, format, path, first_layer=args.first_layer)
        empty = int((placement.physical_to_logical < 0).sum())
        filled = f" ({empty} empty slots of the shared budget filled)" if empty else ""
        print(
            f"wrote {written}: moeray's placement after the trace, {format} map, "
            f"{placement.num_layers} layers x {placement.num_slots} slots{filled}",
            file=table_out,
        )
    return 0


def _place_load(args: argparse.Namespace, expert_bytes: int | None) -> int:
    """``--load``: one placement per algorithm from a load table, scored on that same load."""

    from moeray.placement.balancer import PlacementConfig
    from moeray.placement.eplb import rebalance_eplb
    from moeray.placement.formats import read_load, write_map
    from moeray.placement.placement import balancedness
    from moeray.placement.planner import place_moeray, place_static
    from moeray.placement.replay import PlaceConfig

    load, source = read_load(args.load, first_layer=args.first_layer)
    layers, num_experts = load.shape
    config = PlaceConfig(
        gpus=args.gpus,
        nodes=args.nodes,
        redundant=args.redundant,
        groups=args.groups,
        expert_bytes=expert_bytes,
    )
    topology = config.topology(num_experts)
    placements = {
        "static": place_static(topology, layers, num_experts),
        "eplb": rebalance_eplb(
            load,
            topology.num_slots,
            config.groups,
            topology.num_nodes,
            topology.num_gpus,
            expert_bytes,
        ),
        "moeray": place_moeray(load, topology)[0],
    }
    if args.shared_budget:
        shared = PlacementConfig(
            args.gpus, args.nodes, args.redundant, expert_bytes=expert_bytes, shared_budget=True
        )
        placements["shared"] = place_moeray(load, shared.topology(num_experts, layers))[0]
    wanted = _algorithms(args.algorithms)
    report = {
        "load": source,
        "layers": layers,
        "num_experts": num_experts,
        "topology": topology.to_dict(),
        "algorithms": {},
    }
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print(
        f"{source}; {topology.num_gpus} GPUs x "
        f"{topology.slots_per_gpu} slots = {topology.num_slots} slots per layer",
        file=table_out,
    )
    print(f"{'algorithm':<10}{'balancedness':>13}{'worst layer':>13}", file=table_out)
    for name, placement in placements.items():
        if name not in wanted and name != "shared":
            continue
        per_layer = balancedness(placement.gpu_loads(load))
        report["algorithms"][name] = {
            "balancedness": {
                "mean": float(per_layer.mean()),
                "min": float(per_layer.min()),
                "per_layer": [float(v) for v in per_layer],
            },
        }
        print(f"{name:<10}{per_layer.mean():>13.3f}{per_layer.min():>13.3f}", file=table_out)
    print(
        "scored on the same load it was placed from (in sample), tokens split evenly over "
        "replicas; replay a trace to score placements on the tokens that follow",
        file=table_out,
    )
    if args.json is not None:
        text = json.dumps(report, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            Path(args.json).write_text(text)
    if args.write_map is not None:
        format, path = args.write_map
        name = "shared" if args.shared_budget else "moeray"
        written = write_map(placements[name], format, path, first_layer=args.first_layer)
        print(f"wrote {written}: {name}'s placement of {args.load}, {format} map", file=table_out)
    return 0


def _migration_budget(text: str | None) -> tuple[int | None, str]:
    """(budget, unit): a bare count is slots, a size with a unit is bytes."""
    if text is None:
        return None, "slots"
    if re.fullmatch(r"\s*[0-9]+\s*", text):
        return int(text), "slots"
    what = "a slot count such as 8, or bytes with a unit such as 512MiB or 2GB"
    return _size("--migration-budget", text, what), "bytes"


def _size(flag: str, text: str, what: str = "bytes such as 24MiB, 1.5GB or 25165824") -> int:
    from moeray._units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError:
        raise ValueError(f"{flag}: expected {what}, got {text!r}") from None


def _algorithms(given: list[str] | None) -> tuple[str, ...]:
    from moeray.placement.placement import PlacementError
    from moeray.placement.replay import ALGORITHMS

    if not given:
        return ALGORITHMS
    names = [name.strip() for text in given for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALGORITHMS]
    if unknown or not names:
        raise PlacementError(
            f"--algorithm: expected some of {', '.join(ALGORITHMS)}, got "
            f"{', '.join(unknown) or 'none'}"
        )
    return tuple(dict.fromkeys(names))


def _core() -> str:
    from moeray import native

    return "native" if native.IS_NATIVE else "pure Python"


def _format_bytes(num_bytes: float) -> str:
    for scale, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"


def print_report(report: dict, top_k: int, out) -> None:
    """The ``moeray place`` table of ``report`` (``replay_placement``'s dict) and its notes."""
    topology = report["topology"]
    gpus = topology["num_nodes"] * topology["gpus_per_node"]
    slots = gpus * topology["slots_per_gpu"]
    layers = report["layers"]
    head = (
        f"trace {report['trace']}: {report['tokens']:,} tokens x {layers} layers x top-{top_k}, "
        f"{report['num_experts']} experts; {gpus} GPUs ({topology['num_nodes']} x "
        f"{topology['gpus_per_node']} per node) x {topology['slots_per_gpu']} slots = {slots} "
        f"slots per layer ({slots - report['num_experts']} redundant); a window every "
        f"{report['every']:,} tokens ({report['windows_scored']} scored), batches of "
        f"{report['batch']:,}; moeray moves at most {report['migration_budget']} slots per layer "
        f"per window; core: {report.get('core', '?')}"
    )
    print(textwrap.fill(head, 100, subsequent_indent="  "), file=out)
    with_bytes = topology["expert_bytes"] is not None
    moved_width = 16 + (11 if with_bytes else 0)
    print(
        f"{'':<21}{'window balancedness':^27}{'batch':^14}{'':3}{'other mode':^25}"
        f"{'moved per rebalance':^{moved_width}}".rstrip(),
        file=out,
    )
    print(
        f"{'algorithm':<10}{'served':<11}{'mean':>7}{'p10':>7}{'worst layer':>13}"
        f"{'mean':>7}{'p10':>7}{'':3}{'served':<11}{'window':>7}{'batch':>7}"
        f"{'slots':>16}{f'{chr(32) * 6}bytes' if with_bytes else ''}"
        f"{'rebalances':>12}{'skipped':>9}{'planner ms':>12}",
        file=out,
    )
    for name, result in report["algorithms"].items():
        window, batch = result["balancedness"], result["batch_balancedness"]
        per_layer = window["per_layer"]
        worst = min(range(len(per_layer)), key=per_layer.__getitem__)
        other = "even" if result["served"] == "dispatched" else "dispatched"
        moved = result["slots_moved_per_rebalance"]
        moved_text = f"{moved:,.0f} ({100 * moved / (layers * slots):.1f}%)"
        bytes_text = ""
        if with_bytes:
            bytes_text = f"{_format_bytes(result['bytes_moved_per_rebalance'] or 0):>11}"
        print(
            f"{name:<10}{result['served']:<11}{window['mean']:>7.3f}{window['p10']:>7.3f}"
            f"{f'{per_layer[worst]:.3f} L{worst}':>13}{batch['mean']:>7.3f}{batch['p10']:>7.3f}"
            f"{'':3}{other:<11}{result[other]['window']['mean']:>7.3f}"
            f"{result[other]['batch']['mean']:>7.3f}{moved_text:>16}{bytes_text}"
            f"{result['rebalances']:>12}{result['skipped']:>9}{result['planner_ms']:>12.2f}",
            file=out,
        )
    note = (
        "served: even = each expert's tokens split evenly over its replicas (an engine with a "
        "map); dispatched = moeray's dispatch fills each batch's replicas to the lowest peak "
        "GPU; other mode: the same placements served the other way. Balancedness = mean / max "
        "GPU load per layer, averaged over layers; each placement is scored on the window after "
        "it (p10: over windows x layers; worst layer: the lowest layer mean). The oracle knows "
        "each window's load in advance: a bound, not a planner. moved: slots rewritten per "
        f"re-placement over all {layers} layers (% of their {layers * slots:,} slots); skipped: "
        "re-placements that moved nothing; planner ms: median per re-placement."
    )
    print(textwrap.fill(note, 100, break_on_hyphens=False), file=out)
    if "shared" in report:
        shared = report["shared"]
        counts = shared["redundant_per_layer"]
        grid = shared["topology"]["slots_per_gpu"] * gpus
        text = (
            f"shared: the same {shared['topology']['redundant_budget']:,} redundant slots over "
            f"{layers} layers, shared on a grid of {grid} slots per layer; redundant per layer "
            f"{min(counts)} to {max(counts)} (moved % is of the fixed grid's slots)"
        )
        print(textwrap.fill(text, 100), file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeray")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as exc:
        print(f"moeray place: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

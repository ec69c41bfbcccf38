"""The ``moeray`` command line: ``moeray replay`` compares cache policies on a routing trace;
``moeray place`` compares expert placements on one (``moeray.placement.cli``); ``convert``,
``record`` and ``trace info`` bring routing in from other tools and describe it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main"]

_EPILOG = """\
examples:
  moeray replay                                  # bundled gpt-oss-20b slice, 1/4 of experts hot,
                                                 # through a moeray service on a local Ray
  moeray replay --backend local                  # the same decisions in-process, no Ray
  moeray replay trace.npz --capacity 0.5 --policy lru --policy belady
  moeray replay --json results.json
  moeray replay --backend local --per-layer --plot replay.png   # per-layer stalls, capacity curve
  moeray shards synth --shape gpt-oss-20b --layers 24 --scale 8 --out ckpt   # 572 MiB
  moeray replay --backend local --shards ckpt --policy lru --tokens 200  # hot sets in real bytes
  moeray replay --realtime 5 --backend local     # 64 tokens paced at 5 ms per layer, plans
                                                 # streamed to a prefetcher (without --backend
                                                 # local: a prefetch actor on a local Ray)

The trace is an .npz with expert_ids [tokens, layers, top_k] (optional expert_probs,
seq_offsets, num_experts); see moeray.traces. Hit and stall rates are per layer, averaged over
layers; transfers/token counts experts brought into the hot sets of all layers (on demand or by
prefetch) per token; wasted: prefetched experts evicted before any use. Belady is the offline
optimum of demand caching for the same capacity; moeray is the predictive policy (cross-layer
and previous-token prediction, prefetch): with --backend service its layer actors run it (with
--hint-accuracy the service gets the hints with each step; with --resplit-every the coordinator
re-splits the capacity); belady always runs in-process.
"""


def _parser() -> argparse.ArgumentParser:
    from moeray.replay import POLICY_NAMES

    parser = argparse.ArgumentParser(
        prog="moeray",
        description="moeray keeps the right MoE expert weights hot across layers and nodes.",
    )
    parser.add_argument(
        "--version", action="version", version=f"moeray {_version()}", help="print the version"
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
    replay.add_argument(
        "trace",
        nargs="?",
        help="trace file, .mtrace or .npz (default: the bundled gpt-oss-20b slice)",
    )
    replay.add_argument(
        "--salvage",
        action="store_true",
        help="read a damaged moeray trace (a recording that was killed) up to its last whole "
        "record and say on stderr how many records and tokens were kept; without it, such a "
        "file is an error",
    )
    size = replay.add_mutually_exclusive_group()
    size.add_argument(
        "--capacity",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="hot-set size as a fraction of each layer's experts, in (0, 1] "
        "(default 0.25: 8 of 32 for gpt-oss-20b); the total, with --resplit-every",
    )
    size.add_argument(
        "--capacity-bytes",
        type=_byte_size,
        metavar="SIZE",
        help="with --shards: one byte budget for the hot sets of all layers (e.g. "
        "6GiB, 512MiB, 1500000000), as many experts per layer as it holds",
    )
    replay.add_argument(
        "--policy",
        action="append",
        choices=POLICY_NAMES,
        dest="policies",
        help="policy to replay; repeat for several (default: all)",
    )
    replay.add_argument(
        "--affinity-weight",
        type=float,
        default=0.8,
        help="weight of affinity in affinity-lru eviction, in [0, 1] (default 0.8)",
    )
    replay.add_argument(
        "--hint-accuracy",
        type=float,
        metavar="P",
        help="give the moeray policy synthetic engine hints made from the trace: "
        "each hinted expert is the used one with probability P in [0, 1], else a "
        "random unused one (default: no hints)",
    )
    replay.add_argument(
        "--resplit-every",
        type=int,
        metavar="N",
        help="moeray policy: re-split the total capacity across layers by "
        "marginal benefit every N tokens (0: fixed per-layer capacity; default: "
        "moeray's default)",
    )
    replay.add_argument(
        "--backend",
        choices=("service", "local"),
        default="service",
        help="service: through a moeray service on Ray (a local Ray unless "
        "--address is given); local: in this process, no Ray (default: service)",
    )
    replay.add_argument(
        "--address",
        metavar="ADDRESS",
        help="join this Ray cluster (e.g. auto, or 127.0.0.1:6379) instead of starting a local one",
    )
    replay.add_argument(
        "--step-tokens",
        type=int,
        metavar="T",
        help="tokens per step: per submit with --backend service (default 256), "
        "per window with --backend local --shards (default 1, decode-like)",
    )
    replay.add_argument(
        "--window-steps",
        type=int,
        default=16,
        metavar="N",
        help="steps coalesced into one call per layer actor (default 16: on a "
        "2-core machine per-call overhead, not decisions, bounds throughput)",
    )
    replay.add_argument(
        "--layers-per-actor",
        type=int,
        metavar="N",
        help="layers hosted by one actor process (default: layers / CPUs)",
    )
    replay.add_argument(
        "--tokens",
        type=int,
        metavar="N",
        help="replay only the first N tokens of the trace (default: all)",
    )
    replay.add_argument(
        "--shards",
        type=Path,
        metavar="DIR",
        help="a safetensors checkpoint (e.g. from `moeray shards synth`) whose "
        "expert bytes follow each policy's hot sets: reports per layer resident "
        "bytes (mincore) against capacity, bytes moved and late prefetches",
    )
    replay.add_argument(
        "--realtime",
        type=float,
        metavar="MS",
        help="pace one policy (--policy, default moeray) at MS ms of compute per layer, one "
        "token at a time: each layer's plan streams to a prefetch actor on this node, experts "
        "are read from a mapped checkpoint (--shards, else a small synthesised one, cold), and "
        "late prefetches and route-to-prefetch-start latency are reported (default --tokens 64)",
    )
    replay.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    replay.add_argument(
        "--per-layer", action="store_true", help="also print each layer's stall rate per policy"
    )
    replay.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="draw hit and stall rate per layer for each policy and a capacity "
        "curve (hit rate against capacity for lru, moeray, belady: replays the "
        "trace at several capacities, in-process); needs matplotlib "
        "(pip install 'moeray[plot]')",
    )
    replay.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    serve = commands.add_parser(
        "serve",
        help="start (or attach to) a named moeray service and keep it up: a `ray job submit` entrypoint",
        description="Starts the service described by a JSON config file (the fields of "
        "moeray.service.ServiceConfig), or attaches to it if it already runs, and stays up until "
        "stopped (SIGINT/SIGTERM, e.g. `ray job stop`). A service it started is shut down on exit.",
        epilog='example config: {"num_layers": 24, "num_experts": 32, "top_k": 4, '
        '"capacity": 8, "name": "gpt-oss"}',
    )
    serve.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="JSON file with ServiceConfig fields",
    )
    serve.add_argument(
        "--address",
        metavar="ADDRESS",
        help="Ray cluster to join (default: RAY_ADDRESS, as in a Ray job, else a local Ray)",
    )
    serve.add_argument(
        "--report-s",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="print statistics this often (default 60; 0: never)",
    )
    serve.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="write the service name here once it answers (for scripts and tests)",
    )
    for flag, metavar, text in _SERVE_PLACEMENT_FLAGS:
        serve.add_argument(flag, type=int, metavar=metavar, help=text)
    status = commands.add_parser(
        "status",
        help="print per-layer statistics of a running service",
        description="Joins a Ray cluster (--address, else RAY_ADDRESS, else the cluster `ray start` "
        "started on this machine), finds the named moeray service and prints each layer's hits, "
        "stalls, evictions, prefetches, tokens and restarts, and the service's totals. A cluster "
        "started with token auth is joined with its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
        "~/.ray/auth_token).",
    )
    status.add_argument("--name", default="moeray", help="service name (default moeray)")
    status.add_argument("--namespace", default="moeray", help="Ray namespace (default moeray)")
    status.add_argument(
        "--address", metavar="ADDRESS", help="Ray cluster to join (default: RAY_ADDRESS, else auto)"
    )
    _add_trace_commands(commands)
    from moeray.shards import cli as shards_cli  # numpy and the standard library only

    shards_cli.add_parser(commands)
    from moeray.placement import cli as placement_cli  # numpy and the standard library only

    placement_cli.add_parser(commands)
    return parser


_CONVERT_EPILOG = """\
examples:
  moeray convert trace.npz trace.mtrace
  moeray convert routing.csv routing.mtrace --num-experts 64
  moeray convert expert_distribution_recorder_per_token.pt sglang.mtrace  # needs: a dump, torch
  moeray convert trace.mtrace trace-again.npz     # back to the .npz layout

Sources: a moeray trace, the .npz layout of moeray.traces, CSV rows of (layer, token, expert
ids) with an optional sequence column, or an SGLang per_token expert-distribution dump (.pt,
read with torch, or an .npy of [layer, token, top_k]). See moeray/traces/convert.py and
docs/trace-format.md.
"""

_RECORD_EPILOG = """\
examples:
  moeray record --model ./Qwen3-30B-A3B --prompts prompts.txt --out qwen3.mtrace  # needs: the model
  moeray record --model tiny-olmoe --prompts prompts.txt --out olmoe.mtrace \\
      --max-new-tokens 16                      # needs: the hf extra

MODEL is a local Hugging Face model directory (config.json and weights; nothing is downloaded),
or tiny-FAMILY for a small randomly initialised model of one of the families (for trying the
pipeline without weights): FAMILIES. The prompts file holds one prompt per line (or JSONL with a
"prompt" or "text" field). Needs the hf extra: pip install 'moeray[hf]'.
"""


def _add_trace_commands(commands) -> None:
    from moeray.traces.convert import SOURCE_FORMATS

    convert = commands.add_parser(
        "convert",
        help="convert routing from .npz, CSV or SGLang dumps to a moeray trace (or back)",
        description="Reads routing in another format and writes it as a moeray trace (a versioned "
        "msgpack stream), or as an .npz when DST ends in .npz.",
        epilog=_CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("src", metavar="SRC", type=Path, help="routing to read")
    convert.add_argument(
        "dst", metavar="DST", type=Path, help="file to write (.npz: the npz layout)"
    )
    convert.add_argument(
        "--from",
        dest="source_format",
        choices=("auto",) + SOURCE_FORMATS,
        default="auto",
        help="format of SRC (default: guessed from its content and name)",
    )
    convert.add_argument(
        "--model", default="", help="model name for the trace header (default: SRC's name)"
    )
    convert.add_argument(
        "--num-experts",
        type=int,
        metavar="N",
        help="experts per layer (default: from SRC, else the largest id + 1)",
    )
    convert.add_argument(
        "--weights-dtype",
        choices=("auto", "float16", "float32", "none"),
        default="auto",
        help="how to store router weights (default auto: as in SRC)",
    )
    convert.add_argument(
        "--record-tokens",
        type=int,
        default=1024,
        metavar="T",
        help="at most this many tokens of one sequence per record (default 1024)",
    )
    convert.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    convert.add_argument(
        "--salvage",
        action="store_true",
        help="read a damaged moeray trace (a recording that was killed) up to its last whole "
        "record and say on stderr how many records and tokens were kept; without it, such a "
        "file is an error",
    )

    from moeray.traces.record import FAMILIES

    record = commands.add_parser(
        "record",
        help="run a Hugging Face MoE model on prompts and record every MoE layer's routing",
        description="Runs a transformers MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
        "DeepSeek-V2/V3, gpt-oss) on each prompt and records every MoE layer's top-k expert ids "
        "and router weights, as the model used them, through forward hooks on its routers.",
        epilog=_RECORD_EPILOG.replace("FAMILIES", ", ".join(FAMILIES)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    record.add_argument(
        "--model",
        required=True,
        metavar="PATH_OR_NAME",
        help="local model directory, or tiny-FAMILY for a small random model",
    )
    record.add_argument(
        "--prompts",
        required=True,
        type=Path,
        metavar="FILE",
        help="one prompt per line, or JSONL with a prompt or text field",
    )
    record.add_argument(
        "--out", required=True, type=Path, metavar="TRACE", help="trace file to write"
    )
    record.add_argument(
        "--max-new-tokens",
        type=int,
        default=0,
        metavar="N",
        help="after each prompt's prefill, greedily decode N tokens and record them "
        "too, one record per step (default 0: prefill only)",
    )
    record.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=2048,
        metavar="N",
        help="truncate longer prompts to N tokens (default 2048)",
    )
    record.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="torch dtype to run the model in (default float32)",
    )
    record.add_argument(
        "--seed", type=int, default=0, help="torch seed for tiny random models (default 0)"
    )
    record.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )

    trace = commands.add_parser(
        "trace",
        help="describe routing traces (trace info)",
        description="Commands that look at a routing trace.",
    )
    trace_commands = trace.add_subparsers(dest="trace_command", required=True, metavar="COMMAND")
    info = trace_commands.add_parser(
        "info",
        help="shape, per-layer expert load and previous-token overlap of a trace",
        description="Prints a trace's shape, each layer's expert load (busiest expert over the mean: "
        "1 is balanced), the fraction of a token's experts shared with the previous token of its "
        "sequence (beside top_k / num_experts, its value for random routing) and a summary. Reads "
        "moeray trace files record by record and .npz traces whole.",
    )
    info.add_argument("trace", metavar="TRACE", type=Path, help="trace file (.mtrace or .npz)")
    info.add_argument(
        "--plot",
        nargs="?",
        const=True,
        default=None,
        metavar="PNG",
        help="also draw the per-layer load heat map (default file: TRACE.load.png)",
    )
    info.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON")
    info.add_argument(
        "--salvage",
        action="store_true",
        help="read a damaged moeray trace (a recording that was killed) up to its last whole "
        "record and say on stderr how many records and tokens were kept; without it, such a "
        "file is an error",
    )


def _convert(args) -> int:
    from moeray.traces.convert import convert

    if args.record_tokens < 1:
        raise ValueError("--record-tokens: expected an int >= 1")
    result = convert(
        args.src,
        args.dst,
        source_format=args.source_format,
        model=args.model,
        num_experts=args.num_experts,
        weights_dtype=args.weights_dtype,
        record_tokens=args.record_tokens,
        progress=args.progress,
        salvage=args.salvage,
        on_salvage=lambda report: print(f"moeray convert: salvage: {report}", file=sys.stderr),
    )
    t = result.trace
    print(
        f"wrote {args.dst}: {t.num_tokens:,} tokens x {t.num_layers} layers x top-{t.top_k}, "
        f"{t.num_experts} experts, {t.num_sequences:,} sequences, router weights: "
        f"{'yes' if result.weights_dtype else 'no'}"
    )
    return 0


def _record(args) -> int:
    from moeray._progress import Progress
    from moeray.traces.record import read_prompts, record_trace

    prompts = read_prompts(args.prompts)
    steps = len(prompts) * (1 + max(args.max_new_tokens, 0))
    with Progress(steps, "record", enabled=args.progress) as progress:
        header, tokens = record_trace(
            args.model,
            prompts,
            args.out,
            max_new_tokens=args.max_new_tokens,
            max_prompt_tokens=args.max_prompt_tokens,
            dtype=args.dtype,
            seed=args.seed,
            progress=progress,
        )
    print(
        f"wrote {args.out}: {len(prompts)} prompts, {tokens:,} tokens x {header.num_layers} MoE layers "
        f"x top-{header.top_k}, {header.num_experts} experts (model {header.model})"
    )
    return 0


def _trace_info(args) -> int:
    from moeray.traces.info import format_summary, plot_load, summarize_trace

    summary = summarize_trace(
        args.trace,
        salvage=args.salvage,
        on_salvage=lambda report: print(f"moeray trace info: salvage: {report}", file=sys.stderr),
    )
    print(format_summary(summary))
    if args.plot is not None:
        target = Path(str(args.trace) + ".load.png") if args.plot is True else Path(args.plot)
        print(f"wrote {plot_load(summary, target)}")
    if args.json:
        args.json.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _load_service_config(path: Path):
    from moeray.actors.config import ServiceConfig  # not moeray.service: no Ray for a config

    try:
        fields = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--config: no such file '{path}'") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config: '{path}' is not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ValueError("--config: expected a JSON object of ServiceConfig fields")
    try:
        return ServiceConfig.from_dict(fields)
    except ValueError as exc:
        raise ValueError(f"--config: {exc}") from None


def _print_stats(stats, out) -> None:
    print(
        f"{'layer':>5}{'hit rate':>10}{'hits':>12}{'stalls':>12}{'evictions':>12}"
        f"{'prefetches':>12}{'tokens':>12}{'restarts':>10}",
        file=out,
    )
    for s in stats.layers + [stats.total()]:
        label = "all" if s.layer < 0 else str(s.layer)
        print(
            f"{label:>5}{s.hit_rate():>10.3f}{s.hits:>12,}{s.stalls:>12,}{s.evictions:>12,}"
            f"{s.prefetches:>12,}{s.tokens:>12,}{s.restarts:>10}",
            file=out,
        )
    print(
        f"submits: {stats.submits:,}; windows not yet acknowledged: {stats.pending_windows}; "
        f"coordinator CPU: {stats.coordinator_cpu_s:.1f} s",
        file=out,
    )
    if stats.resplit_moved:
        print(
            f"capacity re-split across layers: {stats.resplit_moved:,} experts moved; now "
            f"{list(stats.capacity)}",
            file=out,
        )
    placement = stats.expert_placement
    if placement is not None:
        age = "none yet" if placement.age_s is None else f"{placement.age_s:.1f} s old"
        print(
            f"expert placement: version {placement.version} ({age}); balancedness, mean of layers: "
            f"forecast {_mean(placement.forecast_balancedness)}, last load window "
            f"{_mean(placement.realised_balancedness)}; {placement.rebalances} rebalances, "
            f"{placement.skipped} skipped, {placement.errors} errors; "
            f"{placement.slots_moved:,} slots moved",
            file=out,
        )


# moeray serve's expert placement flags: (flag, metavar, help); each sets the
# PlacementConfig field its dest names, over the config file's expert_placement
_SERVE_PLACEMENT_FLAGS = (
    (
        "--place-gpus",
        "N",
        "keep an expert placement over N GPUs, re-planned from every client's "
        "routing and published in versions (ServiceConfig.expert_placement)",
    ),
    ("--place-nodes", "M", "nodes the GPUs are spread over (default 1)"),
    ("--place-every", "T", "routed tokens between re-placements (default 4096)"),
    (
        "--place-redundant",
        "R",
        "extra slots per layer for replicas (default: 2 per GPU, plus "
        "what makes the slots divide over the GPUs)",
    ),
    (
        "--migration-budget",
        "S",
        "slot moves per layer per re-placement (default: a tenth of the slots)",
    ),
)
_PLACEMENT_FIELDS = {
    "place_gpus": "gpus",
    "place_nodes": "nodes",
    "place_every": "every_tokens",
    "place_redundant": "redundant",
    "migration_budget": "migration_budget",
}


def _with_placement_flags(config, args):
    """``config`` with serve's --place-* and --migration-budget over its expert_placement."""
    from dataclasses import asdict, replace

    given = {d: getattr(args, d) for d in _PLACEMENT_FIELDS if getattr(args, d) is not None}
    if not given:
        return config
    if "place_gpus" not in given and config.expert_placement is None:
        flags = ", ".join(f"--{d.replace('_', '-')}" for d in given)
        raise ValueError(f"{flags}: expert placement needs --place-gpus N")
    fields = asdict(config.expert_placement) if config.expert_placement else {}
    fields.update({_PLACEMENT_FIELDS[d]: value for d, value in given.items()})
    try:
        return replace(config, expert_placement=fields)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for dest, name in _PLACEMENT_FIELDS.items():  # name the flag, not the field
            message = message.replace(f"expert_placement.{name}:", f"--{dest.replace('_', '-')}:")
        raise ValueError(message) from None


def _mean(values) -> str:
    return f"{sum(values) / len(values):.3f}" if values else "-"


def _serve(args) -> int:
    import signal
    import threading
    import time

    config = _with_placement_flags(_load_service_config(args.config), args)  # before Ray loads

    from moeray import service
    from moeray.actors import _ray

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with _ray.local_session(args.address, job=True, say=_say):
        try:
            handle, started = service.connect(config.name, config.namespace), False
            print(f"attached to running service {config.name!r}", flush=True)
        except ValueError:
            actors = len(config.actor_layers())
            _say(f"starting service {config.name!r}: a coordinator and {actors} layer actors ...")
            begin = time.monotonic()
            handle, started = service.start(config), True
            print(
                f"started service {config.name!r}: {config.num_layers} layers, {actors} layer "
                f"actors, in {time.monotonic() - begin:.1f} s",
                flush=True,
            )
        if args.ready_file:
            args.ready_file.write_text(config.name + "\n")
        try:
            while not stop.wait(args.report_s if args.report_s > 0 else None):
                _print_stats(handle.stats(), sys.stdout)
                sys.stdout.flush()
        finally:
            if started:
                handle.shutdown()
                print(f"service {config.name!r} shut down", flush=True)
    return 0


def _status(args) -> int:
    from moeray import service
    from moeray.actors import _ray

    with _ray.local_session(args.address or "auto", job=True, say=_say):
        handle = service.connect(args.name, args.namespace)
        _print_stats(handle.stats(), sys.stdout)
    return 0


def _print_report(report, trace, out) -> None:
    print(
        f"trace {report.trace}: {trace.num_tokens:,} tokens x {trace.num_layers} layers x "
        f"top-{trace.top_k}, {trace.num_experts} experts; capacity {report.capacity} of "
        f"{report.num_experts} per layer ({report.capacity_fraction:.3g}); "
        f"core: {'native' if report.native else 'pure Python'}",
        file=out,
    )
    print(
        f"{'policy':<14}{'hit rate':>10}{'stall rate':>12}{'transfers/token':>17}{'wasted':>10}"
        f"{'worst layer':>16}{'decisions/s':>14}",
        file=out,
    )
    for name, r in report.results.items():
        worst = f"{r.per_layer_hit_rate[r.worst_layer]:.3f} (L{r.worst_layer})"
        per_token = r.transfers_per_token
        per_token = f"{per_token:.2f}" if per_token is not None else "-"
        print(
            f"{name:<14}{r.hit_rate:>10.3f}{r.stall_rate:>12.3f}{per_token:>17}"
            f"{r.wasted_prefetches:>10,}{worst:>16}{_rate(r.decisions_per_s):>14}",
            file=out,
        )
    for name, r in report.results.items():
        if r.predictors:
            guesses = ", ".join(
                f"{p} {v['recall']:.3f}/{v['precision']:.3f}" for p, v in r.predictors.items()
            )
            print(
                f"{name} predictors, recall/precision of each top-{trace.top_k} guess: {guesses}; "
                f"prefetches {r.prefetches:,}, used {r.prefetch_hits:,}",
                file=out,
            )
        if r.resplit:
            print(
                f"{name} re-split: moved {r.resplit['moved']:,} experts of capacity, evicted "
                f"{r.resplit['evictions']:,}, reloaded {r.resplit['transfers']:,}; final "
                f"capacity {r.resplit['final_capacity']}",
                file=out,
            )


def _print_per_layer(report, out) -> None:
    names = list(report.results)
    print("stall rate per layer:", file=out)
    print(f"{'layer':>5}" + "".join(f"{n:>14}" for n in names), file=out)
    rates = {n: r.per_layer_stall_rate for n, r in report.results.items()}
    for layer in range(len(next(iter(rates.values())))):
        print(f"{layer:>5}" + "".join(f"{rates[n][layer]:>14.3f}" for n in names), file=out)


def _print_shards(report, out) -> None:
    print(
        f"shards {report.shards_path}: resident bytes (largest mincore reading) against "
        "capacity; goal: at most capacity + one expert",
        file=out,
    )
    print(
        f"{'policy':<14}{'capacity':>11}{'resident max':>14}{'worst layer':>13}{'moved':>14}"
        f"{'late':>7}{'cold reads':>12}{'bound':>7}",
        file=out,
    )
    for name, r in report.shards.items():
        ratio = [res / cap for res, cap in zip(r.resident_bytes_max, r.capacity_bytes)]
        worst = max(range(len(ratio)), key=ratio.__getitem__)
        print(
            f"{name:<14}{_mib(r.capacity_bytes[worst]):>11}{_mib(r.resident_bytes_max[worst]):>14}"
            f"{f'L{worst}':>13}{_mib(sum(r.bytes_moved)):>14}{sum(r.late_prefetches):>7}"
            f"{sum(r.cold_reads):>12}{'held' if not r.over_bound() else 'BROKEN':>7}",
            file=out,
        )
    print(
        "moved: bytes populated; cold reads: experts read on demand, each once per window (the "
        "policy table's transfers count every expert brought in, prefetched ones included)",
        file=out,
    )


def _say(text: str) -> None:
    """A progress line on stderr (start-up of Ray and of services)."""
    print(text, file=sys.stderr, flush=True)


def _rate(per_s: float) -> str:
    """1.23 M, 45.6 k, 789: a rate with the prefix that keeps three significant digits."""
    for scale, prefix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if per_s >= scale:
            return f"{per_s / scale:.3g}{prefix}"
    return f"{per_s:.3g}"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _print_throughput(throughput, out) -> None:
    print("service throughput (end to end, submit to last ack):", file=out)
    print(f"{'policy':<14}{'tokens/s':>12}{'submits/s':>12}{'submit p50':>13}{'p99':>10}", file=out)
    for t in throughput:
        print(
            f"{t.policy:<14}{t.tokens_per_s:>12,.0f}{t.submits_per_s:>12,.0f}"
            f"{t.submit_p50_ms:>10.2f} ms{t.submit_p99_ms:>7.2f} ms",
            file=out,
        )


def _byte_size(text: str) -> int:
    """'6GiB', '512 MiB', '1.5G', '1500000000' -> bytes (argparse type)."""
    from moeray._units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _resplit_predict(every: int):
    from dataclasses import replace

    from moeray.policy.predict import PredictConfig
    from moeray.policy.split import SplitConfig

    if every < 0:
        raise ValueError(f"--resplit-every: expected an int >= 0, got {every}")
    default = PredictConfig()
    split = None if every == 0 else replace(default.split or SplitConfig(), every_tokens=every)
    return replace(default, split=split)


def _replay(args) -> int:
    from dataclasses import replace

    from moeray._progress import Progress
    from moeray.policy.registry import policy_entry
    from moeray.replay import (
        POLICY_NAMES,
        ReplayConfig,
        capacity_from_fraction,
        replay_shards,
        replay_trace,
    )
    from moeray.replay.plot import PLOT_FRACTIONS
    from moeray.shards.capacity import capacity_from_bytes, shard_expert_bytes
    from moeray.traces import default_trace_path, load_trace

    trace = load_trace(
        args.trace if args.trace else default_trace_path(),
        salvage=args.salvage,
        on_salvage=lambda report: print(f"moeray replay: salvage: {report}", file=sys.stderr),
    )
    if args.realtime is not None:
        trace = trace.head(64 if args.tokens is None else args.tokens)
    elif args.tokens is not None:
        trace = trace.head(args.tokens)
    shards = str(args.shards) if args.shards else None
    if args.capacity_bytes is not None:
        if shards is None:
            raise ValueError(
                "--capacity-bytes: needs --shards (an expert's bytes come from the checkpoint)"
            )
        expert_bytes = shard_expert_bytes(shards, trace.num_layers)
        capacity = capacity_from_bytes(args.capacity_bytes, expert_bytes, trace.num_experts)
        print(
            f"capacity: {args.capacity_bytes:,} bytes across {trace.num_layers} layers hold "
            f"{capacity} experts per layer ({capacity * sum(expert_bytes):,} bytes)"
        )
    else:
        capacity = capacity_from_fraction(args.capacity, trace.num_experts)
    if capacity < trace.top_k:
        print(
            f"note: a capacity of {capacity} experts per layer is below top_k {trace.top_k}: a "
            "token's experts do not fit at once, each token evicts its own first experts, and "
            "the policies can hardly differ",
            file=sys.stderr,
        )
    if args.realtime is not None:
        return _replay_realtime(args, trace, capacity)
    config = ReplayConfig(
        capacity=capacity,
        policies=tuple(dict.fromkeys(args.policies or POLICY_NAMES)),
        affinity_weight=args.affinity_weight,
        hint_accuracy=args.hint_accuracy,
        **({} if args.resplit_every is None else {"predict": _resplit_predict(args.resplit_every)}),
    )
    total = len(config.policies) * trace.num_layers
    throughput = []
    if args.plot is not None:
        from moeray.replay.plot import require_matplotlib

        require_matplotlib()  # before minutes of replay, not after
    if args.backend == "local" and shards:
        with Progress(total, "replay", enabled=args.progress) as progress:
            report = replay_shards(
                trace, config, shards, step_tokens=args.step_tokens or 1, progress=progress
            )
    elif args.backend == "local":
        with Progress(total, "replay", enabled=args.progress) as progress:
            report = replay_trace(trace, config, progress=progress)
    else:
        from moeray.actors import _ray
        from moeray.replay.service import replay_through_service

        step_tokens = 256 if args.step_tokens is None else args.step_tokens
        if step_tokens < 1 or args.window_steps < 1:
            raise ValueError("--step-tokens and --window-steps: expected ints >= 1")
        # replay_through_service runs oracles in-process itself
        served = any(policy_entry(p).online for p in config.policies)
        with Progress(total, "replay", enabled=args.progress) as progress:
            if served:
                with _ray.local_session(args.address, say=_say):
                    report, throughput = replay_through_service(
                        trace,
                        config,
                        step_tokens=step_tokens,
                        window_steps=args.window_steps,
                        layers_per_actor=args.layers_per_actor,
                        progress=progress,
                        shards=shards,
                    )
            else:  # belady alone: no service to start
                report = replay_trace(trace, config, progress=progress)
        report = replace(
            report,
            results={
                n: replace(r, top_k=r.top_k or trace.top_k) for n, r in report.results.items()
            },
        )
    _print_report(report, trace, sys.stdout)
    if args.per_layer:
        _print_per_layer(report, sys.stdout)
    if report.shards:
        _print_shards(report, sys.stdout)
    if throughput:
        _print_throughput(throughput, sys.stdout)
    if args.json:
        document = report.to_json()
        if args.capacity_bytes is not None:
            document["capacity_budget_bytes"] = args.capacity_bytes
        if throughput:
            document["service"] = {
                t.policy: {
                    "tokens_per_s": t.tokens_per_s,
                    "submits_per_s": t.submits_per_s,
                    "submit_p50_ms": t.submit_p50_ms,
                    "submit_p99_ms": t.submit_p99_ms,
                }
                for t in throughput
            }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stdout)
    if args.plot is not None:
        from moeray.replay.plot import plot_replay

        with Progress(
            len(PLOT_FRACTIONS) * 3 * trace.num_layers, "capacity curve", enabled=args.progress
        ) as progress:
            print(f"wrote {plot_replay(report, trace, config, args.plot, progress=progress)}")
    return 0


def _replay_realtime(args, trace, capacity: int) -> int:
    """``moeray replay --realtime MS`` (moeray.replay.realtime)."""
    import contextlib

    from moeray._progress import Progress
    from moeray.actors.prefetch_node import PrefetchNode
    from moeray.engine.stream import CheckpointReader
    from moeray.policy.registry import policy_entry
    from moeray.replay import ReplayConfig
    from moeray.replay import realtime as rt
    from moeray.replay.inprocess import service_config_for

    compute_ms = rt.check_compute_ms(args.realtime)
    if args.tokens is not None and args.tokens < 1:
        raise ValueError(f"--tokens: expected an int >= 1, got {args.tokens}")
    policies = list(dict.fromkeys(args.policies or ["moeray"]))
    if len(policies) != 1 or not policy_entry(policies[0]).online:
        raise ValueError(f"--policy: --realtime paces one online policy, got {', '.join(policies)}")
    for flag, value in (("--plot", args.plot), ("--capacity-bytes", args.capacity_bytes)):
        if value is not None:
            raise ValueError(f"{flag}: not with --realtime")
    policy = policies[0]
    replay_config = ReplayConfig(
        capacity=capacity,
        policies=(policy,),
        affinity_weight=args.affinity_weight,
        **({} if args.resplit_every is None else {"predict": _resplit_predict(args.resplit_every)}),
    )
    config = service_config_for(trace, replay_config, policy)
    with contextlib.ExitStack() as stack:
        if args.shards is None:
            shards = str(stack.enter_context(rt.synthetic_checkpoint(trace, _say)).path)
        else:
            shards = str(args.shards)
        reader = CheckpointReader(shards, trace.num_layers, trace.num_experts)  # checks the fit
        stack.callback(reader.close)
        if args.backend == "local":
            target = PrefetchNode(shards, trace.num_layers, trace.num_experts)
        else:
            from moeray.actors import _ray

            stack.enter_context(_ray.local_session(args.address, say=_say))
            target = _ray.PrefetchNodeHandle(shards, trace.num_layers, trace.num_experts)
        stack.callback(target.close)
        where = "in this process" if args.backend == "local" else "a Ray actor on this node"
        _say(
            f"pacing {trace.num_tokens} tokens x {trace.num_layers} layers at {compute_ms:g} ms "
            f"per layer (~{trace.num_tokens * trace.num_layers * compute_ms / 1e3:.1f} s), "
            f"policy {policy}, prefetch node {where}"
        )
        with Progress(trace.num_tokens, "realtime", enabled=args.progress) as progress:
            report = rt.replay_realtime(
                trace, config, reader, target, compute_ms, args.shards is None, progress=progress
            )
    print("\n".join(rt.format_report(report)))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _version() -> str:
    """The package's version, and the native core's when it is built (they come from one
    pyproject.toml; a mismatch means a stale build)."""
    import moeray
    from moeray import native

    core = getattr(native.backend, "__version__", None) if native.IS_NATIVE else None
    if core is None:
        return f"{moeray.__version__} (core: {'native' if native.IS_NATIVE else 'pure Python'})"
    return f"{moeray.__version__} (native core {core})"


def _run(args) -> int:
    """Runs the parsed command; its exit code."""
    if args.command == "replay":
        return _replay(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "status":
        return _status(args)
    if args.command == "convert":
        return _convert(args)
    if args.command == "record":
        return _record(args)
    if args.command == "trace":
        return _trace_info(args)
    if args.command == "shards":
        from moeray.shards import cli as shards_cli

        return shards_cli.run(args)
    if args.command == "place":
        from moeray.placement import cli as placement_cli

        return placement_cli.run(args)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
        sys.stdout.flush()  # a reader that went away shows here, inside the try
        return code
    except KeyboardInterrupt:  # Ctrl-C: what was begun is shut down by the context managers
        print(f"moeray {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as `yes` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
    except (ValueError, OSError) as exc:
        print(f"moeray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:  # readers bound what a file declares; a policy's tables may not fit
        source = getattr(args, "trace", None) or getattr(args, "src", None)
        where = f" processing '{source}'" if source else ""
        print(
            f"moeray {args.command}: error: out of memory{where} (the sizes it declares need "
            "more memory than this machine has)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())

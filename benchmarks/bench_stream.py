"""Per-layer streaming on loopback: how soon a plan reaches the node's prefetcher, and whether
the prefetched experts are resident when a paced engine reads them, beside the physical bound.

Part 1, route-to-prefetch-start (send time to the prefetcher told, one clock): the moeray
policy's real plans for the bundled trace's first tokens, sent one per ``--interval-us`` (a decode
step of 24 layers every 12 ms sends one per 0.5 ms), side by side:
  socket    the design: a Unix stream socket served by the prefetch actor (a Ray actor on this
            node), read by the actor's own thread
  ray call  the baseline: the same actor's ``on_route`` as a one-way Ray actor call
  in-process the floor: ``PrefetchNode.on_route`` called in the engine's process
Each path sends the messages ``--rounds`` times, interleaved with the others (the host's load
moves between rounds); reported: the medians of the rounds' p50 and p99, the largest max.
Goals: socket p50 <= 200 us, p99 <= 2 ms.

Part 2, a paced replay (``moeray replay --realtime 5``): the moeray policy, one token at a time,
5 ms of compute per layer, plans streamed through the socket, experts read from the engine's
own mapping of a synthetic checkpoint whose page cache is dropped first. Reported: the fraction
of used prefetched experts resident before use (goal >= 90 %), the layer's own loads resident at
use, and the physical bound measured in the same run: the checkpoint's cold read bandwidth
(every expert populated once after a drop, one at a time, as the prefetcher does) and what the
mean layer's requested bytes take at it, against the time a prefetch has (two layers' compute).

usage: python benchmarks/bench_stream.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import ray

from moeray.actors import _ray
from moeray.actors.prefetch_node import PrefetchNode
from moeray.engine.session import EngineSession
from moeray.engine.stream import CheckpointReader
from moeray.native import IS_NATIVE, backend
from moeray.replay.config import ReplayConfig, capacity_from_fraction
from moeray.replay.inprocess import service_config_for
from moeray.replay.realtime import format_report, replay_realtime, synthetic_checkpoint
from moeray.shards.store import ShardStore
from moeray.traces import default_trace_path, load_trace


def plan_messages(trace, config):
    """The moeray policy's messages for the trace, as StreamingSession builds them."""
    from moeray.actors.channel import RouteMessage

    session, out = EngineSession(config, max_batch_tokens=1), []
    for t in range(trace.num_tokens):
        for layer in range(trace.num_layers):
            p = session.route(layer, trace.expert_ids[t, layer][None])
            lists = (p.load, p.prefetch, p.evict, p.prefetch_evict)
            out.append(RouteMessage(layer, t, *(tuple(x.tolist()) for x in lists)))
    return out


def paced(messages, send, interval_s):
    """Sends each message stamped at its send time, one per interval (a spin-then-sleep pace)."""
    next_at = time.monotonic()
    for m in messages:
        send(replace(m, sent_ns=time.monotonic_ns()))
        next_at += interval_s
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def latency_row(name, runs):
    """Medians over the rounds of each round's p50 and p99; the largest max."""
    return {
        "path": name,
        "messages": sum(r.messages for r in runs),
        "rounds": len(runs),
        "p50_us": float(np.median([r.latency_p50_us for r in runs])),
        "p99_us": float(np.median([r.latency_p99_us for r in runs])),
        "max_us": max(r.latency_max_us for r in runs),
        "per_round": [(r.latency_p50_us, r.latency_p99_us) for r in runs],
    }


def cold_bandwidth(shards, trace) -> tuple[float, int]:
    """Bytes/s of populating every expert of the checkpoint once, one at a time, cold."""
    with ShardStore(shards) as store:
        layers = store.layers[: trace.num_layers]
        cores, total = [], 0
        for layer in layers:
            ranges = [store.expert_ranges(layer, e) for e in range(trace.num_experts)]
            paths = sorted({r.path for rs in ranges for r in rs})
            core = backend.PrefetcherCore(paths, trace.num_experts)
            for e, rs in enumerate(ranges):
                core.set_ranges(e, [(paths.index(r.path), r.offset, r.length) for r in rs])
                total += sum(r.length for r in rs)
            cores.append(core)
    reader = CheckpointReader(shards, trace.num_layers, trace.num_experts)
    reader.drop_page_cache()
    assert reader.resident_total() == 0, "the page cache drop did not take"
    start = time.perf_counter()
    for core in cores:
        for e in range(trace.num_experts):
            core.wait(e)  # a cold expert is populated on this thread
    seconds = time.perf_counter() - start
    reader.drop_page_cache()
    reader.close()
    return total / seconds, total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer messages and tokens")
    parser.add_argument("--rounds", type=int, default=3, help="part 1's rounds (median)")
    parser.add_argument("--interval-us", type=float, default=500.0, help="part 1's send interval")
    parser.add_argument("--compute-ms", type=float, default=5.0, help="part 2's pace per layer")
    parser.add_argument("--size", type=int, default=128, help="synthetic expert: 3 x SIZE^2 BF16")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if not IS_NATIVE:
        print("note: the pure-Python core populates synchronously: numbers are not the design's")
    full = load_trace(default_trace_path())
    latency_tokens, paced_tokens = (32, 16) if args.quick else (128, 48)
    if args.quick:
        args.rounds = 1
    capacity = capacity_from_fraction(0.25, full.num_experts)

    def config_of(trace):
        return service_config_for(trace, ReplayConfig(capacity, policies=("moeray",)), "moeray")

    messages = plan_messages(full.head(latency_tokens), config_of(full.head(latency_tokens)))
    result = {"commit": _commit(), "native": IS_NATIVE}
    with synthetic_checkpoint(full, lambda text: print(text, file=sys.stderr), args.size) as ck:
        shards = str(ck.path)
        # before any actor maps the files (a killed actor's mappings go when its process does)
        bandwidth, total = cold_bandwidth(shards, full)
        with _ray.local_session(say=lambda text: print(text, file=sys.stderr)):
            # part 1: the same messages three ways, interleaved, ``--rounds`` times
            handle = _ray.PrefetchNodeHandle(shards, full.num_layers, full.num_experts)
            actor = handle._actor  # the baseline calls the same actor's method through Ray
            node = PrefetchNode(shards, full.num_layers, full.num_experts)
            paths = {
                "socket (design)": (
                    handle.on_route,
                    handle.flush,
                    handle.reset_stats,
                    handle.stats,
                ),
                "ray call (baseline)": (
                    lambda m: actor.on_route.remote(m),
                    lambda: ray.get(actor.flush.remote()),
                    handle.reset_stats,
                    lambda: ray.get(actor.stats.remote()),
                ),
                "in-process (floor)": (node.on_route, node.flush, node.reset_stats, node.stats),
            }
            per_round = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, (send, flush, reset, stats) in paths.items():
                    paced(messages[:200], send, 2e-4)  # warm-up
                    flush()
                    reset()
                    paced(messages, send, args.interval_us / 1e6)
                    flush()
                    per_round[name].append(stats())
            rows = [latency_row(name, runs) for name, runs in per_round.items()]
            handle.close()
            node.close()

            # part 2: the paced replay through the socket, cold
            trace = full.head(paced_tokens)
            reader = CheckpointReader(shards, trace.num_layers, trace.num_experts)
            handle = _ray.PrefetchNodeHandle(shards, trace.num_layers, trace.num_experts)
            report = replay_realtime(
                trace, config_of(trace), reader, handle, args.compute_ms, synthesised=True
            )
            handle.close()
            reader.close()

    u = report.uses
    requested = report.stream.bytes_populated / (trace.num_tokens * trace.num_layers)
    need_ms = requested / bandwidth * 1e3
    window_ms = 2 * args.compute_ms
    bound = min(1.0, window_ms / need_ms) if need_ms else 1.0
    printed = []

    def out(text: str = "") -> None:
        print(text)
        printed.append(text)

    core = "native" if IS_NATIVE else "pure-Python"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    out(f"bench_stream at {result['commit']} ({core} core, {os.cpu_count()} CPUs, load {load})")
    out()
    out(
        f"route-to-prefetch-start, {len(messages)} plans of the moeray policy, one per "
        f"{args.interval_us:g} us, {args.rounds} round(s) interleaved (medians of p50, p99):"
    )
    out(f"{'path':<22}{'messages':>10}{'p50':>12}{'p99':>12}{'max':>12}")
    for r in rows:
        times = "".join(f"{_time(r[key]):>12}" for key in ("p50_us", "p99_us", "max_us"))
        out(f"{r['path']:<22}{r['messages']:>10,}{times}")
    socket_row = rows[0]
    goal = socket_row["p50_us"] <= 200 and socket_row["p99_us"] <= 2000
    out(f"goal: socket p50 <= 200 us, p99 <= 2 ms: {'met' if goal else 'NOT met'}")
    out()
    out("\n".join(format_report(report)))
    out()
    in_time = u.prefetched_in_time or 0.0
    out(f"{'paced at ' + format(args.compute_ms, 'g') + ' ms per layer':<44}{'value':>14}")
    out(f"{'used prefetched experts resident before use':<44}{100 * in_time:>12.1f} %")
    out(f"{'  late (not resident at use)':<44}{u.late_prefetches:>9} of {u.prefetched}")
    loads = u.loaded_resident / u.loaded if u.loaded else 0.0
    out(f"{'layer loads (stalls) resident at use':<44}{100 * loads:>12.1f} %")
    out(
        f"{'cold read bandwidth (' + f'{total / 2**20:.0f} MiB, one expert at a time)':<44}"
        f"{bandwidth / 2**20:>8,.0f} MiB/s"
    )
    out(f"{'bytes paged in per layer (mean)':<44}{requested / 1024:>10,.0f} KiB")
    out(f"{'  their time at that bandwidth':<44}{need_ms:>11.2f} ms")
    out(
        f"{'physical bound (time a prefetch has: ' + f'{window_ms:g} ms)':<44}"
        f"{100 * bound:>12.1f} %"
    )
    out(f"goal: >= 90 % resident before use: {'met' if in_time >= 0.9 else 'NOT met'}")
    result.update(
        command="python benchmarks/bench_stream.py " + " ".join(argv or sys.argv[1:]),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        printed=printed,
        cpus=os.cpu_count(),
        load_average=os.getloadavg(),
        latency=rows,
        latency_interval_us=args.interval_us,
        latency_goal_met=goal,
        paced=report.to_json(),
        cold_bandwidth_bytes_per_s=bandwidth,
        checkpoint_bytes=total,
        requested_bytes_per_layer=requested,
        physical_bound=bound,
        paced_goal_met=in_time >= 0.9,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=_plain) + "\n")
        print(f"wrote {args.json}")
    return 0


def _time(us: float) -> str:
    return f"{us:,.0f} us" if us < 10_000 else f"{us / 1e3:,.0f} ms"


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    return asdict(value)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end speed of the moeray service beside the Ray floors it is built on, in one run.

Replays the bundled gpt-oss-20b slice (24 MoE layers, top-4; 20 passes) through a service on a local,
loopback-only Ray in steps of 256 tokens, under lru (the mechanism's speed: the policies' own
costs are compared below), for several coalescing windows, and reports routed
tokens per second (first submit to last acknowledgement), submits per second and submit latency
p50 / p99. The floors, measured on the same Ray in the same run: one no-op actor round trip, and
one no-op fan-out to as many actors as the service has layer actors.
Goal (2-core VM): >= 100,000 routed tokens/s; submit p50 within 2x of a no-op round trip
("goals met": throughput / latency).

Then the policies side by side (goal: prediction and budget work adds at most 20 % to the
coordinator's time per step). Two measurements:
- through Ray: each of ``--policies`` replays the same tokens (the first ``--compare-tokens``
  of the bundled trace, ``--compare-passes`` times, sequence starts included) at one window;
  routed tokens/s and the
  CPU of the coordinator's thread inside its methods per step (``coordinator_method_cpu_s``:
  less its blocking waits for layer actors and without Ray's own threads, which both cost CPU
  in proportion to how long the run lasts, and the moeray run lasts far longer). ``moeray``'s
  layer actors run the predict kernel over each window (about 1-2 CPU us per layer and token
  on a 2-core VM), so its tokens/s is below the demand policies'; the coordinator's share is
  what this goal is about (issue 18's, moeray at >= 50 % of lru's tokens/s, is the rate).
- the coordinator's body alone (``Coordinator`` over a transport that pickles each call's
  windows, as Ray does, and acknowledges at once), the policies interleaved over
  ``--body-rounds`` rounds, median CPU per step: the extra work moeray asks of the coordinator
  (previous-layer routing, sequence starts, budgets; with ``moeray+resplit`` also the capacity
  re-split over every layer's routing) without Ray's noise; the last column puts that extra
  against the coordinator's CPU per step through Ray for the first policy.

Then expert placement (``ServiceConfig.expert_placement``, ``--placement-gpus`` GPUs, a
re-placement every ``--placement-every`` tokens; 0 GPUs skips it): submit p50 / p99 and routed
tokens/s with placement off and on, the two alternating over ``--placement-rounds`` rounds of the
same replay (planning runs on the coordinator's worker thread: the goal is no change to submit),
and the time from submitting the step that completes a load window until the handle sees the new
version (``handle.placement()`` polled back to back), over ``--placement-visible`` re-placements
of a stream whose expert ids are permuted anew every load window (so each one moves slots).

usage: python benchmarks/bench_service.py [--layers-per-actor N] [--windows 1,4,16,64,256] [--passes P]
       [--policies lru,moeray,moeray+resplit] [--compare-window 4] [--compare-tokens 5120] [--compare-passes 1]
       [--body-rounds 15] [--placement-gpus 8] [--placement-every 4096] [--placement-window 4]
       [--placement-rounds 3] [--placement-visible 20]
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import ray

from moeray import service
from moeray.actors import _ray
from moeray.actors.coordinator import Coordinator
from moeray.actors.messages import Counters, LayerAck
from moeray.placement.balancer import PlacementConfig
from moeray.policy.predict import PredictConfig
from moeray.policy.split import SplitConfig
from moeray.traces import default_trace_path, load_trace


@ray.remote(num_cpus=0)
class _Noop:
    def noop(self, *args):
        return None


def floors(num_actors: int, repeats: int) -> tuple[float, float]:
    """(median no-op round trip, median no-op fan-out to num_actors actors), in ms."""
    actors = [_Noop.remote() for _ in range(num_actors)]
    ray.get([a.noop.remote() for a in actors])
    rtt, fan = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ray.get(actors[0].noop.remote())
        rtt.append(time.perf_counter() - start)
    for _ in range(max(repeats // 4, 5)):
        start = time.perf_counter()
        ray.get([a.noop.remote() for a in actors])
        fan.append(time.perf_counter() - start)
    for a in actors:
        ray.kill(a)
    return statistics.median(rtt) * 1e3, statistics.median(fan) * 1e3


# A row of the comparison that is not a policy name: moeray with one capacity re-split across
# layers by the coordinator (SplitConfig defaults).
RESPLIT = "moeray+resplit"


def policy_config(policy: str, **fields) -> service.ServiceConfig:
    """The ServiceConfig of one row of the comparison: a policy name, or RESPLIT."""
    if policy == RESPLIT:
        fields.update(policy="moeray", predict=PredictConfig(split=SplitConfig()))
    else:
        fields.update(policy=policy)
    return service.ServiceConfig(num_experts=32, capacity=8, **fields)


def run_policy(
    ids,
    weights,
    starts,
    policy: str,
    window_steps: int,
    layers_per_actor: int,
    step_tokens: int,
    passes: int,
) -> dict:
    """One service of ``policy`` replays ids [layers, T, top_k] ``passes`` times (steps of
    step_tokens, sequence starts ``starts`` bool [T]); tokens/s and coordinator CPU per step."""
    config = policy_config(
        policy,
        num_layers=ids.shape[0],
        top_k=ids.shape[2],
        window_steps=window_steps,
        layers_per_actor=layers_per_actor,
        name=f"bench-{policy.replace('+', '-')}-{os.getpid()}",
    )
    handle = service.start(config)
    try:
        handle.submit(ids[:, :step_tokens], weights[:, :step_tokens], starts[:step_tokens])
        before = handle.stats()  # every layer actor is up and has answered once
        start = time.perf_counter()
        tokens = steps = 0
        for _ in range(passes):
            for first in range(0, ids.shape[1], step_tokens):
                part = slice(first, first + step_tokens)
                handle.submit(ids[:, part], weights[:, part], starts[part])
                tokens += min(step_tokens, ids.shape[1] - first)
                steps += 1
        stats = handle.stats()
        seconds = time.perf_counter() - start
    finally:
        handle.shutdown()
    assert all(s.tokens == tokens + step_tokens for s in stats.layers)  # every token applied
    return dict(
        policy=policy,
        tokens=tokens,
        steps=steps,
        tokens_per_s=tokens / seconds,
        method_ms_per_step=(stats.coordinator_method_cpu_s - before.coordinator_method_cpu_s)
        * 1e3
        / steps,
        stall_rate=1.0 - stats.total().hit_rate(),
    )


class _PicklingTransport:
    """Layer actors that pickle each call's windows (as Ray serialises them) and acknowledge
    at once with a prebuilt ack: what the coordinator's body costs, without Ray."""

    def __init__(self, config):
        self._groups = config.actor_layers()
        empty = np.zeros(config.num_experts)
        self._ack = LayerAck(0, 0, Counters(), empty, empty.astype(np.int64))
        self._done: list = []

    def send(self, actor, windows):
        pickle.dumps(windows, protocol=5)
        self._done.append(
            (actor, 0, [replace(self._ack, layer=w.layer, number=w.number) for w in windows])
        )

    def restore(self, actor, states, warmup=None):
        pass

    def recreate(self, actor):
        pass

    def poll(self, wait):
        done, self._done = self._done, []
        return done

    def generation(self, actor):
        return 0

    def outstanding(self):
        return len(self._done)


def coordinator_body_ms_per_step(
    ids, starts, policies, window_steps: int, layers_per_actor: int, step_tokens: int, rounds: int
) -> dict[str, float]:
    """Median over ``rounds`` (policies interleaved) of the coordinator body's CPU per step
    over one pass of ids [layers, T, top_k]."""
    samples = {policy: [] for policy in policies}
    for _ in range(rounds):
        for policy in policies:
            config = policy_config(
                policy,
                num_layers=ids.shape[0],
                top_k=ids.shape[2],
                window_steps=window_steps,
                layers_per_actor=layers_per_actor,
            )
            coordinator = Coordinator(config, _PicklingTransport(config))
            steps = 0
            start = time.process_time()
            for first in range(0, ids.shape[1], step_tokens):
                part = slice(first, first + step_tokens)
                # what ServiceHandle sends: routing in the wire dtype, starts already checked
                coordinator.add_routing(ids[:, part], seq_starts=starts[part])
                steps += 1
            coordinator.sync()
            samples[policy].append((time.process_time() - start) * 1e3 / steps)
    return {policy: statistics.median(values) for policy, values in samples.items()}


def run_service(
    ids,
    weights,
    window_steps: int,
    layers_per_actor: int,
    step_tokens: int,
    passes: int,
    expert_placement: PlacementConfig | None = None,
    stats_out: list | None = None,
):
    """(routed tokens/s, submits/s, submit p50 ms, p99 ms) of an lru service replaying ids
    [layers, T, top_k] ``passes`` times; its last ServiceStats appended to ``stats_out``."""
    config = service.ServiceConfig(
        num_layers=ids.shape[0],
        num_experts=32,
        top_k=ids.shape[2],
        capacity=8,
        policy="lru",
        window_steps=window_steps,
        layers_per_actor=layers_per_actor,
        name=f"bench-{window_steps}-{'placed-' if expert_placement else ''}{os.getpid()}",
        expert_placement=expert_placement,
    )
    handle = service.start(config)
    try:
        handle.submit(ids[:, :step_tokens], weights[:, :step_tokens])
        handle.stats()  # every layer actor is up and has answered once
        handle.submit_latency_s.clear()
        start = time.perf_counter()
        tokens = 0
        for _ in range(passes):  # the trace again and again: one stall of the VM is amortised
            for first in range(0, ids.shape[1], step_tokens):
                handle.submit(
                    ids[:, first : first + step_tokens], weights[:, first : first + step_tokens]
                )
                tokens += min(step_tokens, ids.shape[1] - first)
        stats = handle.stats()
        seconds = time.perf_counter() - start
    finally:
        handle.shutdown()
    latency = np.array(handle.submit_latency_s) * 1e3
    assert all(s.tokens == tokens + step_tokens for s in stats.layers)  # every token applied
    if stats_out is not None:
        stats_out.append(stats)
    return (
        tokens / seconds,
        len(latency) / seconds,
        np.percentile(latency, 50),
        np.percentile(latency, 99),
    )


def placement_rows(ids, weights, args) -> None:
    """Prints submit latency with expert placement off and on (alternating rounds), then the
    time until a re-placement triggered by a step is visible to the handle."""
    placement = PlacementConfig(gpus=args.placement_gpus, every_tokens=args.placement_every)
    runs = {"off": [], "on": []}
    stats: list = []
    for _ in range(args.placement_rounds):
        for mode in runs:
            runs[mode].append(
                run_service(
                    ids,
                    weights,
                    args.placement_window,
                    args.layers_per_actor,
                    args.step_tokens,
                    args.passes,
                    placement if mode == "on" else None,
                    stats if mode == "on" else None,
                )
            )
    print()
    print(
        f"| expert placement ({args.placement_gpus} GPUs, every {args.placement_every:,} tokens) | "
        f"window (steps) | routed tokens/s | submit p50 | submit p99 | rebalances / skipped / "
        f"errors per run | mean balancedness, forecast / last window |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, rows in runs.items():
        tps, _, p50, p99 = (statistics.median(column) for column in zip(*rows))
        extra = "- | -"
        if mode == "on":
            last = stats[-1].expert_placement
            extra = (
                f"{last.rebalances} / {last.skipped} / {last.errors} | "
                f"{np.mean(last.forecast_balancedness):.3f} / "
                f"{np.mean(last.realised_balancedness):.3f}"
            )
        print(
            f"| {mode} (median of {len(rows)}) | {args.placement_window} | {tps:,.0f} | "
            f"{p50:.3f} ms | {p99:.3f} ms | {extra} |",
            flush=True,
        )
    visible = time_to_visible(ids, placement, args)
    print()
    print(
        "| re-placements timed | step that completes a load window -> version visible to the "
        "handle: median | p90 | max | of which in the coordinator (routing in -> published): "
        "median | not published (skipped) |"
    )
    print("|---|---|---|---|---|---|")
    times = np.array([t for t, _ in visible if t is not None]) * 1e3
    inside = np.array([c for t, c in visible if t is not None]) * 1e3
    print(
        f"| {len(visible)} | {np.median(times):.1f} ms | {np.percentile(times, 90):.1f} ms | "
        f"{times.max():.1f} ms | {np.median(inside):.1f} ms | "
        f"{sum(t is None for t, _ in visible)} |",
        flush=True,
    )


def time_to_visible(ids, placement: PlacementConfig, args) -> list[tuple[float | None, float]]:
    """Seconds from submitting the step that completes a load window (once the steps before it
    have reached the coordinator: a client that submits faster than the coordinator applies
    adds its queue) until ``handle.placement()`` returns the next version (None: not published
    within 10 s, i.e. skipped), and of those the coordinator's (``PlacementStats.latency_s``),
    per re-placement.
    Window of one step; every load window's ids go through a fresh permutation of the experts,
    so each forecast moves and each re-placement has slots to move."""
    every, step = args.placement_every, args.step_tokens
    assert every % step == 0, "--placement-every: a multiple of --step-tokens here"
    config = service.ServiceConfig(
        num_layers=ids.shape[0],
        num_experts=32,
        top_k=ids.shape[2],
        capacity=8,
        policy="lru",
        window_steps=1,
        layers_per_actor=args.layers_per_actor,
        name=f"bench-visible-{os.getpid()}",
        expert_placement=placement,
    )
    rng = np.random.default_rng(0)
    handle = service.start(config)
    out: list[tuple[float | None, float]] = []
    try:
        version, at = 0, 0
        for _ in range(args.placement_visible + 1):  # the first, full placement is not timed
            permutation = rng.permutation(32).astype(np.int32)
            for first in range(0, every, step):
                part = (at + np.arange(first, first + step)) % ids.shape[1]
                routing = permutation[ids[:, part]]
                if first + step == every:
                    handle.flush()  # the coordinator has caught up: time this step alone
                start = time.perf_counter()
                handle.submit(routing)
            at += every
            _, seen = handle.placement()
            deadline = start + 10.0
            while seen <= version and time.perf_counter() < deadline:
                _, seen = handle.placement()
            seconds = time.perf_counter() - start
            if version > 0:
                inside = handle.stats().expert_placement.latency_s
                out.append((seconds if seen > version else None, inside))
            version = max(version, seen)
    finally:
        handle.shutdown()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers-per-actor",
        type=int,
        help="layers per actor process (default: layers / CPUs, as `moeray replay`; "
        "every actor process costs a 2-core VM about 5%% CPU while idle)",
    )
    parser.add_argument(
        "--windows", default="1,4,16,64,256", help="window sizes in steps (default 1,4,16,64,256)"
    )
    parser.add_argument("--step-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200, help="round trips for the floors")
    parser.add_argument(
        "--passes",
        type=int,
        default=20,
        help="replays of the bundled trace per measurement (default 20: 206,620 tokens)",
    )
    parser.add_argument(
        "--policies",
        default=f"lru,moeray,{RESPLIT}",
        help="policies compared side by side, the first is the baseline; "
        f"{RESPLIT}: moeray with the capacity re-split by the coordinator "
        f"(default lru,moeray,{RESPLIT}; empty: skip the comparison)",
    )
    parser.add_argument(
        "--compare-window",
        type=int,
        default=4,
        help="window (steps) of the policy comparison (default 4)",
    )
    parser.add_argument(
        "--body-rounds",
        type=int,
        default=15,
        help="interleaved rounds of the coordinator-body measurement (default 15)",
    )
    parser.add_argument(
        "--compare-tokens",
        type=int,
        default=5120,
        help="tokens of the bundled trace replayed per pass in the comparison "
        "(default 5120 of 10,331)",
    )
    parser.add_argument(
        "--compare-passes",
        type=int,
        default=1,
        help="passes over those tokens per policy in the comparison (default 1; the rates "
        "of one pass of 10,331 tokens vary by a quarter from run to run here, of 5 passes less)",
    )
    parser.add_argument(
        "--placement-gpus",
        type=int,
        default=8,
        help="GPUs of the expert placement rows (default 8; 0: skip them)",
    )
    parser.add_argument(
        "--placement-every",
        type=int,
        default=4096,
        help="tokens per re-placement in the placement rows (default 4096)",
    )
    parser.add_argument(
        "--placement-window",
        type=int,
        default=4,
        help="window (steps) of the placement rows (default 4)",
    )
    parser.add_argument(
        "--placement-rounds",
        type=int,
        default=3,
        help="alternating off / on rounds of the placement rows (default 3)",
    )
    parser.add_argument(
        "--placement-visible",
        type=int,
        default=20,
        help="re-placements timed until visible to the handle (default 20)",
    )
    args = parser.parse_args(argv)

    trace = load_trace(default_trace_path())
    ids = np.ascontiguousarray(trace.expert_ids.transpose(1, 0, 2), dtype=np.int32)
    weights = np.ascontiguousarray(trace.weights.transpose(1, 0, 2))
    if args.layers_per_actor is None:
        args.layers_per_actor = max(1, -(-trace.num_layers // (os.cpu_count() or 1)))
    num_actors = -(-trace.num_layers // args.layers_per_actor)

    with _ray.local_session(object_store_memory=300 * 2**20):
        rtt_ms, fan_ms = floors(num_actors, args.repeats)
        print(
            f"bundled trace: {trace.num_tokens:,} tokens x {trace.num_layers} layers x top-"
            f"{trace.top_k}, {args.passes} passes; {num_actors} layer actors ({args.layers_per_actor} layers each); "
            f"steps of {args.step_tokens} tokens; {os.cpu_count()} CPUs",
            file=sys.stderr,
        )
        print(
            "| window (steps) | routed tokens/s | submits/s | submit p50 | submit p99 | "
            "no-op round trip | no-op fan-out | p50 / round trip | goals met |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for window in (int(w) for w in args.windows.split(",") if w):
            tps, sps, p50, p99 = run_service(
                ids, weights, window, args.layers_per_actor, args.step_tokens, args.passes
            )
            print(
                f"| {window} | {tps:,.0f} | {sps:,.0f} | {p50:.2f} ms | {p99:.2f} ms | "
                f"{rtt_ms:.2f} ms | {fan_ms:.2f} ms ({num_actors} actors) | {p50 / rtt_ms:.2f}x | "
                f"{'yes' if tps >= 100_000 else 'no'} / {'yes' if p50 <= 2 * rtt_ms else 'no'} |",
                flush=True,
            )
        whole = ids, weights  # the comparison below takes a prefix
        policies = [p for p in args.policies.split(",") if p]
        if policies:
            n = min(args.compare_tokens, trace.num_tokens)
            starts = np.zeros(trace.num_tokens, dtype=bool)
            starts[trace.seq_offsets[:-1]] = True
            ids, weights, starts = ids[:, :n], weights[:, :n], starts[:n]
            print(
                f"policy comparison: the first {n:,} tokens of the bundled trace, "
                f"{args.compare_passes} pass(es) per policy",
                file=sys.stderr,
            )
            rows = [
                run_policy(
                    ids,
                    weights,
                    starts,
                    policy,
                    args.compare_window,
                    args.layers_per_actor,
                    args.step_tokens,
                    args.compare_passes,
                )
                for policy in policies
            ]
            base = rows[0]
            print()
            print(
                f"| policy | tokens | window (steps) | routed tokens/s | stall rate | "
                f"coordinator CPU / step (own thread, through Ray) | vs {base['policy']} |"
            )
            print("|---|---|---|---|---|---|---|")
            for row in rows:
                print(
                    f"| {row['policy']} | {row['tokens']:,} | {args.compare_window} | "
                    f"{row['tokens_per_s']:,.0f} | {row['stall_rate']:.3f} | "
                    f"{row['method_ms_per_step']:.3f} ms | "
                    f"{_relative(row['method_ms_per_step'], base['method_ms_per_step'])} |",
                    flush=True,
                )
            body = coordinator_body_ms_per_step(
                ids.astype(np.uint8),
                starts,
                policies,
                args.compare_window,
                args.layers_per_actor,
                args.step_tokens,
                args.body_rounds,
            )
            print()
            print(
                f"| policy | coordinator body CPU / step (no Ray, median of {args.body_rounds}) | "
                f"extra vs {base['policy']} | extra / {base['policy']}'s CPU per step through Ray |"
            )
            print("|---|---|---|---|")
            for policy, ms in body.items():
                extra = ms - body[base["policy"]]
                through_ray = base["method_ms_per_step"]
                share = f"{extra / through_ray * 100:+.1f} %" if through_ray > 0 else "n/a"
                print(
                    f"| {policy} | {ms * 1e3:.1f} µs | {extra * 1e3:+.1f} µs | {share} |",
                    flush=True,
                )
        if args.placement_gpus:
            placement_rows(*whole, args)
    return 0


def _relative(value: float, base: float) -> str:
    return f"{(value / base - 1) * 100:+.0f} %" if base > 0 else "n/a"


if __name__ == "__main__":
    sys.exit(main())

"""The ``moeray`` command line: ``moeray replay`` compares cache policies on a routing trace."""

from __future__ import annotations

import argparse
import contextlib
import json
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
    replay.add_argument("--backend", choices=("service", "local"), default="service",
                        help="service: through a moeray service on Ray (a local Ray unless "
                        "--address is given); local: in this process, no Ray (default: service)")
    replay.add_argument("--address", metavar="ADDRESS",
                        help="join this Ray cluster (e.g. auto, or 127.0.0.1:6379) instead of "
                        "starting a local one")
    replay.add_argument("--step-tokens", type=int, default=256, metavar="T",
                        help="tokens per submitted step with --backend service (default 256)")
    replay.add_argument("--window-steps", type=int, default=16, metavar="N",
                        help="steps coalesced into one call per layer actor (default 16: on a "
                        "2-core machine per-call overhead, not decisions, bounds throughput)")
    replay.add_argument("--layers-per-actor", type=int, metavar="N",
                        help="layers hosted by one actor process (default: layers / CPUs)")
    replay.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    replay.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    serve = commands.add_parser(
        "serve",
        help="start (or attach to) a named moeray service and keep it up: a `ray job submit` entrypoint",
        description="Starts the service described by a JSON config file (the fields of "
        "moeray.service.ServiceConfig), or attaches to it if it already runs, and stays up until "
        "stopped (SIGINT/SIGTERM, e.g. `ray job stop`). A service it started is shut down on exit.",
        epilog="example config: {\"num_layers\": 24, \"num_experts\": 32, \"top_k\": 4, "
        "\"capacity\": 8, \"name\": \"gpt-oss\"}",
    )
    serve.add_argument("--config", type=Path, required=True, metavar="FILE",
                       help="JSON file with ServiceConfig fields")
    serve.add_argument("--address", metavar="ADDRESS",
                       help="Ray cluster to join (default: RAY_ADDRESS, as in a Ray job, else a local Ray)")
    serve.add_argument("--report-s", type=float, default=60.0, metavar="SECONDS",
                       help="print statistics this often (default 60; 0: never)")
    serve.add_argument("--ready-file", type=Path, metavar="PATH",
                       help="write the service name here once it answers (for scripts and tests)")
    status = commands.add_parser("status", help="print per-layer statistics of a running service")
    status.add_argument("--name", default="moeray", help="service name (default moeray)")
    status.add_argument("--namespace", default="moeray", help="Ray namespace (default moeray)")
    status.add_argument("--address", metavar="ADDRESS",
                        help="Ray cluster to join (default: RAY_ADDRESS, else auto)")
    return parser


def _load_service_config(path: Path):
    from moeray.service import ServiceConfig

    try:
        fields = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--config: no such file '{path}'") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config: '{path}' is not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ValueError("--config: expected a JSON object of ServiceConfig fields")
    for key in ("capacity", "placement"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    try:
        return ServiceConfig(**fields)
    except TypeError as exc:  # unknown or missing fields
        raise ValueError(f"--config: {exc}") from None


def _print_stats(stats, out) -> None:
    print(f"{'layer':>5}{'hit rate':>10}{'hits':>12}{'misses':>12}{'evictions':>12}"
          f"{'prefetches':>12}{'tokens':>12}{'restarts':>10}", file=out)
    for s in stats.layers + [stats.total()]:
        label = "all" if s.layer < 0 else str(s.layer)
        print(f"{label:>5}{s.hit_rate():>10.3f}{s.hits:>12,}{s.misses:>12,}{s.evictions:>12,}"
              f"{s.prefetches:>12,}{s.tokens:>12,}{s.restarts:>10}", file=out)
    print(f"submits: {stats.submits:,}; windows not yet acknowledged: {stats.pending_windows}; "
          f"coordinator CPU: {stats.coordinator_cpu_s:.1f} s", file=out)


def _serve(args) -> int:
    import signal
    import threading

    from moeray import service

    config = _load_service_config(args.config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with _ray_session(args.address, job=True):
        try:
            handle, started = service.connect(config.name, config.namespace), False
            print(f"attached to running service {config.name!r}", flush=True)
        except ValueError:
            handle, started = service.start(config), True
            print(f"started service {config.name!r}: {config.num_layers} layers, "
                  f"{len(config.actor_layers())} layer actors", flush=True)
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

    with _ray_session(args.address or "auto", job=True):
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
    print(f"{'policy':<14}{'hit rate':>10}{'worst layer':>16}{'decisions/s':>14}", file=out)
    for name, r in report.results.items():
        worst = f"{r.per_layer_hit_rate[r.worst_layer]:.3f} (L{r.worst_layer})"
        print(f"{name:<14}{r.hit_rate:>10.3f}{worst:>16}{r.decisions_per_s / 1e6:>12.1f} M", file=out)


def _print_throughput(throughput, out) -> None:
    print("service throughput (end to end, submit to last ack):", file=out)
    print(f"{'policy':<14}{'tokens/s':>12}{'submits/s':>12}{'submit p50':>13}{'p99':>10}", file=out)
    for t in throughput:
        print(f"{t.policy:<14}{t.tokens_per_s:>12,.0f}{t.submits_per_s:>12,.0f}"
              f"{t.submit_p50_ms:>10.2f} ms{t.submit_p99_ms:>7.2f} ms", file=out)


@contextlib.contextmanager
def _ray_session(address: str | None, job: bool = False):
    """Joins ``address`` (with ``job``, also RAY_ADDRESS as a Ray job's driver does), or starts a
    quiet loopback-only local Ray; shuts down what it began."""
    import os

    if address is None and job:
        address = os.environ.get("RAY_ADDRESS")
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        yield
        return
    if address is None:
        ray.init(include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False,
                 logging_level="ERROR", _system_config={"worker_maximum_startup_concurrency": 16})
    else:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


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
    throughput = []
    if args.backend == "local":
        with Progress(total, "replay", enabled=args.progress) as progress:
            report = replay_trace(trace, config, progress=progress)
    else:
        from moeray.service import replay_through_service

        if args.step_tokens < 1 or args.window_steps < 1:
            raise ValueError("--step-tokens and --window-steps: expected ints >= 1")
        with _ray_session(args.address), Progress(total, "replay", enabled=args.progress) as progress:
            report, throughput = replay_through_service(
                trace, config, step_tokens=args.step_tokens, window_steps=args.window_steps,
                layers_per_actor=args.layers_per_actor, progress=progress,
            )
    _print_report(report, trace, sys.stdout)
    if throughput:
        _print_throughput(throughput, sys.stdout)
    if args.json:
        document = report.to_json()
        if throughput:
            document["service"] = {t.policy: {
                "tokens_per_s": t.tokens_per_s, "submits_per_s": t.submits_per_s,
                "submit_p50_ms": t.submit_p50_ms, "submit_p99_ms": t.submit_p99_ms,
            } for t in throughput}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "replay":
            return _replay(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "status":
            return _status(args)
    except (ValueError, OSError) as exc:
        print(f"moeray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())

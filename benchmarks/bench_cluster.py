"""How the moeray service scales: model shape, batch size and concurrent clients, on a cluster.

Runs against an existing Ray cluster (``--address``, e.g. through ``ray job submit``) or against
N simulated nodes on this machine (``ray.cluster_utils.Cluster``, the default). Layer actors are
spread over the nodes (a custom resource per simulated node, Ray's ``node:<ip>`` resource on a
real cluster); the coordinator sits on the head. Each point of the sweep starts a service,
lets C client actors (a data-parallel serving fleet: each has its own ``ServiceHandle``) submit
synthetic routing with per-layer locality for a fixed time, and reports routed tokens per
second (all clients, first submit to last acknowledgement), submit latency p50 / p99 (per
step, in the clients) and the coordinator's CPU per step, measured two ways and never netted:
its own thread inside its methods, less the time blocked waiting for layer actors
(``ServiceStats.coordinator_method_cpu_s``: the work steps cause), and its whole process over
the point (Ray's threads included), printed beside that process's CPU over a quiet second
before the point. Every point runs the lru policy: the sweep measures the service's mechanism, and the
moeray policy's own cost per token is bench_service's and bench_policy's.

The sweep changes one factor at a time around a base point (24 layers x 32 experts top-4,
256-token steps, 1 client): layers, experts, clients, batch size, plus DeepSeek-V3's shape
(58 MoE layers x 256 experts, top-8). Results go to a JSON file and, with matplotlib, a plot.
See docs/cluster-benchmark.md.

usage: python benchmarks/bench_cluster.py [--address ADDR | --nodes N] [--seconds S] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BASE = {"layers": 24, "experts": 32, "top_k": 4, "batch": 256, "clients": 1}


@dataclass(frozen=True)
class Point:
    """One measurement of the sweep; ``factor`` names what it varies (``base`` for none)."""

    factor: str
    layers: int
    experts: int
    top_k: int
    batch: int
    clients: int


def sweep(quick: bool) -> list[Point]:
    """The points, one factor at a time around BASE (``quick``: the ends of each range)."""
    ranges = {
        "layers": [8, 24, 58],
        "experts": [32, 64, 256],
        "clients": [1, 2, 4],
        "batch": [64, 256, 1024],
    }
    if quick:
        ranges = {k: [v[0], v[-1]] for k, v in ranges.items()}
    points = [Point("base", **BASE)]
    for factor, values in ranges.items():
        for value in values:
            fields = dict(BASE, **{factor: value})
            if factor == "experts":
                fields["top_k"] = 8  # the wide-expert models route to 8
            if fields != BASE:
                points.append(Point(factor, **fields))
    points.append(Point("deepseek-v3", layers=58, experts=256, top_k=8, batch=256, clients=1))
    return points


def synthetic_routing(layers: int, experts: int, top_k: int, tokens: int, seed: int) -> np.ndarray:
    """int32 [layers, tokens, top_k]: per layer a Zipf-like popularity (exponent 0.8, its own
    permutation), k distinct experts per token drawn by Gumbel top-k."""
    rng = np.random.default_rng(seed)
    log_popularity = -0.8 * np.log(np.arange(1, experts + 1))
    out = np.empty((layers, tokens, top_k), np.int32)
    for layer in range(layers):
        keys = log_popularity[rng.permutation(experts)] + rng.gumbel(size=(tokens, experts))
        out[layer] = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
    return out


def client_class(ray):
    @ray.remote(num_cpus=0)
    class Client:
        """One serving engine: submits its own routing to the service for a fixed time."""

        def __init__(self, name: str, namespace: str):
            from moeray import service

            self._handle = service.connect(name, namespace)

        def run(self, batch: int, seconds: float, seed: int) -> dict:
            config = self._handle.config
            pool = synthetic_routing(
                config.num_layers, config.num_experts, config.top_k, max(batch, 2048), seed
            )
            weights = np.full(pool.shape, 1.0 / config.top_k, np.float32)
            self._handle.submit_latency_s.clear()
            steps = tokens = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                first = (steps * batch) % (pool.shape[1] - batch + 1)
                self._handle.submit(
                    pool[:, first : first + batch], weights[:, first : first + batch]
                )
                steps += 1
                tokens += batch
            self._handle.flush()
            latency = np.array(self._handle.submit_latency_s) * 1e3
            return {"steps": steps, "tokens": tokens, "latency_ms": latency.tolist()}

    return Client


def placement_resources(ray, simulated: bool) -> list[str]:
    """One resource per node that can host layer actors."""
    if simulated:
        return sorted(r for r in ray.cluster_resources() if r.startswith("moeray_bench_node_"))
    return sorted(
        r
        for r in ray.cluster_resources()
        if r.startswith("node:") and r != "node:__internal_head__"
    )


def measure(
    ray,
    point: Point,
    resources: list[str],
    head_resource: str | None,
    seconds: float,
    window_tokens: int,
    index: int,
) -> dict:
    from moeray import service

    layers_per_actor = max(1, -(-point.layers // (2 * max(1, len(resources)))))
    num_actors = -(-point.layers // layers_per_actor)
    config = service.ServiceConfig(
        num_layers=point.layers,
        num_experts=point.experts,
        top_k=point.top_k,
        capacity=max(1, point.experts // 4),
        window_steps=max(1, window_tokens // point.batch),
        policy="lru",  # the mechanism's cost (coalescing, fan-out), as recorded since the first run
        layers_per_actor=layers_per_actor,
        name=f"bench-cluster-{os.getpid()}-{index}",
        placement=tuple(resources[a % len(resources)] for a in range(num_actors))
        if resources
        else None,
        coordinator_placement=head_resource,
    )
    handle = service.start(config)
    Client = client_class(ray)
    try:
        clients = [Client.remote(config.name, config.namespace) for _ in range(point.clients)]
        ray.get([c.__ray_ready__.remote() for c in clients])
        # the coordinator's process burns CPU even while idle (Ray's threads): its rate over a
        # quiet second is reported beside the point's, not taken out of it
        idle_start, idle = time.perf_counter(), handle.stats()
        time.sleep(1.0)
        before = handle.stats()
        idle_s = time.perf_counter() - idle_start
        start = time.perf_counter()
        results = ray.get(
            [c.run.remote(point.batch, seconds, seed) for seed, c in enumerate(clients)]
        )
        stats = handle.stats()
        elapsed = time.perf_counter() - start
        del clients  # their processes exit once the last handle is gone
    finally:
        handle.shutdown()
    tokens = sum(r["tokens"] for r in results)
    steps = sum(r["steps"] for r in results)
    assert all(s.tokens == tokens for s in stats.layers), "every submitted token was applied"
    latency = np.concatenate([r["latency_ms"] for r in results])
    method_cpu_s = stats.coordinator_method_cpu_s - before.coordinator_method_cpu_s
    process_cpu_s = stats.coordinator_cpu_s - before.coordinator_cpu_s
    return dict(
        asdict(point),
        layer_actors=num_actors,
        window_steps=config.window_steps,
        tokens_per_s=tokens / elapsed,
        steps=steps,
        submit_p50_ms=float(np.percentile(latency, 50)),
        submit_p99_ms=float(np.percentile(latency, 99)),
        # the coordinator thread's CPU inside its methods, less its blocking waits
        coordinator_cpu_ms_per_step=method_cpu_s * 1e3 / steps,
        # its whole process over the point, Ray's threads included, as a share of one core
        coordinator_process_cpu_ms_per_step=process_cpu_s * 1e3 / steps,
        coordinator_process_cores=process_cpu_s / elapsed,
        # the same process over a quiet second before the point
        coordinator_idle_cores=(before.coordinator_cpu_s - idle.coordinator_cpu_s) / idle_s,
        seconds=elapsed,
        hit_rate=stats.total().hit_rate(),
    )


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    factors = ["layers", "experts", "clients", "batch"]
    fig, axes = plt.subplots(2, len(factors), figsize=(4 * len(factors), 6.5), squeeze=False)
    for col, factor in enumerate(factors):
        rows = [r for r in results if r["factor"] == factor]
        if factor != "experts":  # the experts sweep routes top-8, the base point top-4
            rows += [r for r in results if r["factor"] == "base"]
        rows.sort(key=lambda r: r[factor])
        x = [r[factor] for r in rows]
        axes[0][col].plot(x, [r["tokens_per_s"] / 1e3 for r in rows], "o-")
        axes[1][col].plot(
            x,
            [r["coordinator_cpu_ms_per_step"] for r in rows],
            "o-",
            label="coordinator thread CPU",
        )
        axes[1][col].plot(
            x,
            [r["coordinator_process_cpu_ms_per_step"] for r in rows],
            "^:",
            label="coordinator process CPU",
        )
        axes[1][col].plot(x, [r["submit_p50_ms"] for r in rows], "s--", label="submit p50")
        axes[0][col].set_title(f"vs {factor}")
        axes[1][col].set_xlabel(factor if factor != "experts" else "experts (top-8)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("routed k tokens/s")
    axes[1][0].set_ylabel("ms per step")
    axes[1][0].legend()
    fig.suptitle(
        "moeray service scaling (base: 24 layers x 32 experts top-4, 256-token steps, 1 client)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="On a real cluster: ray job submit --working-dir . -- python "
        "benchmarks/bench_cluster.py --address auto (see docs/cluster-benchmark.md)",
    )
    parser.add_argument("--address", help="an existing cluster (auto: the one of this Ray job)")
    parser.add_argument(
        "--nodes",
        type=int,
        default=2,
        help="simulated worker nodes beside the head when no --address (default 2)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="how long the clients submit at each point (default 5)",
    )
    parser.add_argument(
        "--window-tokens",
        type=int,
        default=16384,
        help="tokens per coalescing window; window_steps = this / batch (default 16384)",
    )
    parser.add_argument("--quick", action="store_true", help="only the ends of each range")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench_cluster.json"),
        help="JSON results (default bench_cluster.json; the plot goes beside it)",
    )
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.seconds <= 0 or args.window_tokens < 1:
        parser.error("--nodes, --seconds and --window-tokens must be positive")

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from moeray.actors import _ray

    cluster = None
    quiet = dict(log_to_driver=False, logging_level="ERROR")
    if args.address is None:
        from ray.cluster_utils import Cluster

        system = {"worker_maximum_startup_concurrency": 16}
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "resources": {"moeray_bench_head": 1},
                "include_dashboard": False,
                "object_store_memory": 200 * 2**20,
                "_system_config": system,
            },
        )
        for node in range(args.nodes):
            cluster.add_node(
                num_cpus=1,
                resources={f"moeray_bench_node_{node}": 1},
                object_store_memory=150 * 2**20,
            )
        cluster.wait_for_nodes()
        _ray.init(address=cluster.address, **quiet)  # outside the checkout: see _ray.init
    else:
        _ray.init(address=args.address, **quiet)
    results = []
    try:
        simulated = cluster is not None
        resources = placement_resources(ray, simulated)
        head = "moeray_bench_head" if simulated else None
        where = (
            f"{args.nodes} simulated nodes + head on {os.cpu_count()} CPUs"
            if simulated
            else f"cluster {args.address}: {len(resources)} nodes"
        )
        points = sweep(args.quick)
        print(
            f"{where}; {args.seconds:g} s per point, windows of {args.window_tokens:,} tokens; "
            f"{len(points)} points",
            file=sys.stderr,
        )
        print(
            "| varies | layers x experts, top-k | batch | clients | layer actors | routed tokens/s "
            "| submit p50 | submit p99 | coordinator thread CPU / step "
            "| coordinator process CPU / step | process cores busy (point / idle) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for index, point in enumerate(points):
            r = measure(ray, point, resources, head, args.seconds, args.window_tokens, index)
            results.append(r)
            print(
                f"| {r['factor']} | {r['layers']} x {r['experts']}, top-{r['top_k']} | {r['batch']} "
                f"| {r['clients']} | {r['layer_actors']} | {r['tokens_per_s']:,.0f} "
                f"| {r['submit_p50_ms']:.2f} ms | {r['submit_p99_ms']:.2f} ms "
                f"| {r['coordinator_cpu_ms_per_step']:.3f} ms "
                f"| {r['coordinator_process_cpu_ms_per_step']:.3f} ms "
                f"| {r['coordinator_process_cores']:.2f} / {r['coordinator_idle_cores']:.2f} |",
                flush=True,
            )
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if results:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps(
                    {
                        "where": where,
                        "seconds": args.seconds,
                        "window_tokens": args.window_tokens,
                        "results": results,
                    },
                    indent=2,
                )
                + "\n"
            )
            print(f"wrote {args.out}", file=sys.stderr)
    png = args.out.with_suffix(".png")
    if plot(results, png):
        print(f"wrote {png}", file=sys.stderr)
    else:
        print("no plot: pip install matplotlib (or moeray[plot])", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Replays a routing trace through placement: every ``every`` tokens each algorithm re-places from
what it has seen, and the placement is scored on the tokens that follow, never on the ones it was
computed from.

Algorithms (``ALGORITHMS``):
- ``static``: round robin, never moved; served with tokens split evenly over replicas.
- ``eplb``: the published EPLB method on all load seen so far, re-placed from scratch each window;
  served with an even split (what engines do with its map).
- ``moeray``: what a service re-places (``balancer.LoadBalancer``: the forecast, a full placement
  once, then incremental moves under the migration budget, gated); served with moeray's dispatch.
- ``oracle``: the published method given the coming window's own load (a bound no online planner
  reaches); served with an even split.
- ``shared`` (with ``PlaceConfig.shared_budget``): ``moeray`` with the same memory, the
  redundant slots of all layers, split across layers by the balance each gains
  (``Topology.shared``, ``allocate_redundant``); served with moeray's dispatch.

Each algorithm is scored both ways (``even`` and ``dispatched``); ``served`` names the one its
system uses. Balancedness = mean GPU load / max GPU load, per layer, then averaged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from moeray.placement.balancer import LoadBalancer, PlacementConfig
from moeray.placement.dispatch import dispatched_gpu_loads
from moeray.placement.eplb import rebalance_eplb
from moeray.placement.forecast import LoadForecast
from moeray.placement.placement import Placement, PlacementError, Topology, balancedness
from moeray.placement.planner import default_budget, place_moeray, place_static
from moeray.policy._validate import check_int
from moeray.traces.trace import Trace

__all__ = [
    "ALGORITHMS",
    "PlaceConfig",
    "final_placement",
    "replay_placement",
    "window_counts",
]

ALGORITHMS = ("static", "eplb", "moeray", "oracle")
_SERVED = {
    "static": "even",
    "eplb": "even",
    "moeray": "dispatched",
    "oracle": "even",
    "shared": "dispatched",
}


@dataclass(frozen=True)
class PlaceConfig:
    """gpus, nodes: the topology; redundant: extra slots per layer (None: ``Topology.for_experts``'s);
    every: tokens between re-placements (a window); batch: tokens per dispatched batch;
    migration_budget: moeray's slot moves per layer per re-placement (None: a tenth of the
    slots); groups: EPLB's expert groups; expert_bytes: one expert's bytes (for bytes moved);
    shared_budget: adds the ``shared`` row, moeray with the layers' redundant slots shared."""

    gpus: int = 8
    nodes: int = 1
    redundant: int | None = None
    every: int = 1024
    batch: int = 256
    migration_budget: int | None = None
    algorithms: tuple[str, ...] = ALGORITHMS
    groups: int = 1
    min_gain: float = 0.002
    expert_bytes: int | None = None
    shared_budget: bool = False

    def __post_init__(self):
        check_int(self.gpus, "gpus", 1, 65_536)
        check_int(self.nodes, "nodes", 1, 65_536)
        check_int(self.every, "every", 1, 2**31 - 1)
        check_int(self.batch, "batch", 1, 2**31 - 1)
        check_int(self.groups, "groups", 1, 2**20)
        if self.batch > self.every:
            raise PlacementError(
                f"batch: {self.batch} tokens is more than a window (every = {self.every})"
            )
        unknown = [name for name in self.algorithms if name not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise PlacementError(
                f"algorithms: expected some of {', '.join(ALGORITHMS)}, got "
                f"{', '.join(unknown) or 'none'}"
            )

    def topology(self, num_experts: int) -> Topology:
        return Topology.for_experts(
            num_experts, self.gpus, self.nodes, self.redundant, self.expert_bytes
        )

    def budget(self, topology: Topology) -> int:
        if self.migration_budget is None:
            return default_budget(topology)
        return check_int(self.migration_budget, "migration_budget", 0, 2**31 - 1)


def window_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [layers, experts]: routed tokens per expert of ids [tokens, layers, top_k]."""
    layers = expert_ids.shape[1]
    flat = expert_ids.astype(np.int64) + (np.arange(layers) * num_experts)[None, :, None]
    return np.bincount(flat.ravel(), minlength=layers * num_experts).reshape(layers, num_experts)


@dataclass
class _Score:
    even: list = field(default_factory=list)  # [windows] of [layers]
    dispatched: list = field(default_factory=list)
    batch_even: list = field(default_factory=list)  # [windows * batches] of [layers]
    batch_dispatched: list = field(default_factory=list)
    gpu_ratio: list = field(default_factory=list)  # [windows] of [gpus], as served
    moved: list = field(default_factory=list)  # slots moved (all layers) per re-placement
    planner_ms: list = field(default_factory=list)


def _score(score: _Score, served: str, placement: Placement, counts, batches) -> None:
    even = placement.gpu_loads(counts)
    dispatched = np.zeros_like(even)
    for batch in batches:
        loads = dispatched_gpu_loads(batch, placement).astype(np.float64)
        dispatched += loads
        score.batch_dispatched.append(balancedness(loads))
        score.batch_even.append(balancedness(placement.gpu_loads(batch)))
    score.even.append(balancedness(even))
    score.dispatched.append(balancedness(dispatched))
    loads = even if served == "even" else dispatched
    mean = loads.mean(axis=1, keepdims=True)
    ratio = np.divide(loads, mean, out=np.ones_like(loads), where=mean > 0)
    score.gpu_ratio.append(ratio.mean(axis=0))


def _summary(values: list) -> dict:
    stacked = np.asarray(values, dtype=np.float64)
    if stacked.size == 0:
        return {"mean": None, "p10": None, "per_layer": []}
    return {
        "mean": float(stacked.mean()),
        "p10": float(np.percentile(stacked, 10)),
        "per_layer": [float(v) for v in stacked.mean(axis=0)],
    }


def replay_placement(
    trace: Trace,
    config: PlaceConfig = PlaceConfig(),
    timer: Callable[[], float] = time.perf_counter,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The ``moeray place`` report of ``trace`` (a JSON-ready dict, see docs/placement.md).

    Needs at least two windows of ``config.every`` tokens (the first only teaches).
    """
    topology = config.topology(trace.num_experts)
    windows = trace.num_tokens // config.every
    if windows < 2:
        raise PlacementError(
            f"every: the trace has {trace.num_tokens} tokens, fewer than two windows of "
            f"{config.every} (the first window teaches, the next are scored): lower --every"
        )
    layers, num_experts = trace.num_layers, trace.num_experts
    budget = config.budget(topology)
    names: Sequence[str] = config.algorithms + (("shared",) if config.shared_budget else ())
    scores = {name: _Score() for name in names}
    current: dict[str, Placement] = {}
    history = np.zeros((layers, num_experts), dtype=np.int64)
    # moeray re-places exactly as a service does (LoadBalancer), one window at a time
    balancers = {
        name: LoadBalancer(
            PlacementConfig(
                gpus=config.gpus,
                nodes=config.nodes,
                redundant=config.redundant,
                every_tokens=config.every,
                migration_budget=budget,
                min_gain=config.min_gain,
                expert_bytes=config.expert_bytes,
                shared_budget=name == "shared",
            ),
            layers,
            num_experts,
        )
        for name in ("moeray", "shared")
        if name in names
    }

    def eplb(load) -> Placement:
        return rebalance_eplb(
            load,
            topology.num_slots,
            config.groups,
            topology.num_nodes,
            topology.num_gpus,
            topology.expert_bytes,
        )

    def planned(name: str, plan: Callable[..., tuple[Placement, int]], *args) -> None:
        start = timer()
        placement, moved = plan(*args)
        scores[name].planner_ms.append((timer() - start) * 1e3)
        if name in current:
            scores[name].moved.append(int(moved))
        current[name] = placement

    for w in range(windows):
        block = trace.expert_ids[w * config.every : (w + 1) * config.every]
        counts = window_counts(block, num_experts)
        if w > 0:
            batches = [
                window_counts(block[b : b + config.batch], num_experts)
                for b in range(0, config.every, config.batch)
            ]
            for name in names:
                if name == "oracle":
                    planned(name, _moved, current.get("oracle"), eplb, counts)
                _score(scores[name], _SERVED[name], current[name], counts, batches)
        history += counts
        for name in names:
            if name == "static" and "static" not in current:
                current[name] = place_static(topology, layers, num_experts)
            elif name == "eplb":
                planned(name, _moved, current.get("eplb"), eplb, history)
            elif name in balancers:
                planned(name, _rebalanced, balancers[name], counts)
            elif name == "oracle" and "oracle" not in current:
                current[name] = eplb(counts)  # replaced by the next window's own before scoring
        if progress is not None:
            progress(w + 1, windows)

    algorithms = {}
    for name in names:
        score = scores[name]
        served = _SERVED[name]
        window = score.even if served == "even" else score.dispatched
        batch = score.batch_even if served == "even" else score.batch_dispatched
        moved = np.asarray(score.moved, dtype=np.float64)
        rebalances = int((moved > 0).sum())
        algorithms[name] = {
            "served": served,
            "balancedness": _summary(window),
            "batch_balancedness": _summary(batch),
            "even": {"window": _summary(score.even), "batch": _summary(score.batch_even)},
            "dispatched": {
                "window": _summary(score.dispatched),
                "batch": _summary(score.batch_dispatched),
            },
            "slots_moved_per_rebalance": float(moved[moved > 0].mean()) if rebalances else 0.0,
            "bytes_moved_per_rebalance": (
                float(moved[moved > 0].mean()) * topology.expert_bytes
                if rebalances and topology.expert_bytes
                else (0.0 if topology.expert_bytes else None)
            ),
            "rebalances": rebalances,
            "skipped": int((moved == 0).sum()),
            "planner_ms": float(np.median(score.planner_ms)) if score.planner_ms else 0.0,
            "window_series": [float(np.mean(v)) for v in window],
            "gpu_load_ratio": [[float(x) for x in row] for row in score.gpu_ratio],
        }
    extra = {}
    if "shared" in balancers:
        shared = balancers["shared"]
        extra["shared"] = {
            "topology": shared.topology.to_dict(),
            "redundant_per_layer": [int(r) for r in shared.current.redundant],
        }
    return {
        "trace": trace.name,
        "tokens": trace.num_tokens,
        "layers": layers,
        "num_experts": num_experts,
        "topology": topology.to_dict(),
        "every": config.every,
        "batch": config.batch,
        "migration_budget": budget,
        "windows_scored": windows - 1,
        "algorithms": algorithms,
        **extra,
    }


def final_placement(trace: Trace, config: PlaceConfig = PlaceConfig()) -> Placement:
    """The placement moeray would publish after ``trace``: a full ``place_moeray`` of the
    forecast (``LoadForecast``) over every whole window of
    ``config.every`` tokens, on ``config``'s topology (what ``moeray place --write-map`` writes);
    with ``config.shared_budget``, on the shared topology (``Topology.shared``), empty slots and
    all.
    """
    topology = config.topology(trace.num_experts)
    if config.shared_budget:
        topology = Topology.shared(
            trace.num_experts,
            config.gpus,
            trace.num_layers,
            config.nodes,
            config.redundant,
            expert_bytes=config.expert_bytes,
        )
    windows = trace.num_tokens // config.every
    if windows < 1:
        raise PlacementError(
            f"every: the trace has {trace.num_tokens} tokens, less than one window of "
            f"{config.every}: lower --every"
        )
    forecast: LoadForecast | None = None
    for w in range(windows):
        counts = window_counts(
            trace.expert_ids[w * config.every : (w + 1) * config.every], trace.num_experts
        )
        forecast = LoadForecast.start(counts) if forecast is None else forecast.update(counts)
    placement, _ = place_moeray(forecast.mean, topology)
    return placement


def _moved(previous: Placement | None, plan: Callable, load) -> tuple[Placement, int]:
    placement = plan(load)
    moved = 0 if previous is None else int(placement.moved_slots(previous).sum())
    return placement, moved


def _rebalanced(balancer: LoadBalancer, counts) -> tuple[Placement, int]:
    result = balancer.rebalance(counts)
    if result.error is not None:
        raise PlacementError(f"moeray's planner failed: {result.error}")
    return balancer.current, int(result.moved_slots.sum())

"""Replays a routing trace through each policy, per layer, beside the offline optimum, in this
process: the same ``Coordinator`` and layer-actor bodies as the service, over
``InProcessTransport`` instead of Ray.

One hot set per layer, empty at the start, persisting across sequences (as ``belady_hits``
does), so every policy sees exactly the stream the optimum sees. Accounting, per layer, the same
for every policy: a hit is an expert hot when its token reached the layer; a stall one that was
neither hot nor prefetched (in a replay prefetches complete before the use they were issued in
time for, so stall rate = 1 - hit rate); a transfer every expert brought into the hot set, on
demand or by prefetch; a wasted prefetch one brought in by prefetch and evicted before any use.
A prefetch issued once layer l's routing of token t is known is in time for layer l+1 of token t
and every later token; no policy sees routing that has not happened yet. Oracles (belady) see
the whole stream and run on their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from moeray._progress import Progress
from moeray.actors.config import ServiceConfig
from moeray.actors.coordinator import Coordinator
from moeray.actors.messages import ServiceStats
from moeray.actors.transport import InProcessTransport
from moeray.policy.registry import POLICIES, PolicyEntry, policy_entry
from moeray.replay.config import ReplayConfig
from moeray.replay.hints import synthetic_hints
from moeray.replay.report import PolicyResult, ReplayReport, policy_result, resplit_report
from moeray.traces.trace import Trace

__all__ = [
    "replay_policy",
    "replay_steps",
    "replay_trace",
    "service_config_for",
    "trace_hints",
    "trace_seq_starts",
]

# Tokens per submit of an in-process replay without shards: windows never change a decision,
# so this only sets how often progress moves.
_STEP_TOKENS = 1024


def service_config_for(trace: Trace, config: ReplayConfig, policy: str, **fields) -> ServiceConfig:
    """The service configuration that runs ``policy`` with ``config``'s parameters over ``trace``'s
    shape (``fields``: coalescing, placement, shards...)."""
    return ServiceConfig(
        num_layers=trace.num_layers,
        num_experts=trace.num_experts,
        top_k=trace.top_k,
        capacity=config.capacity,
        policy=policy,
        affinity_decay=config.affinity_decay,
        affinity_boost=config.affinity_boost,
        affinity_weight=config.affinity_weight,
        predict=config.predict,
        **fields,
    )


def trace_seq_starts(trace: Trace) -> np.ndarray:
    """bool [tokens]: True where a sequence of the trace begins."""
    starts = np.zeros(trace.num_tokens, dtype=bool)
    starts[trace.seq_offsets[trace.seq_offsets < trace.num_tokens]] = True
    return starts


def trace_hints(trace: Trace, config: ReplayConfig, entry: PolicyEntry) -> np.ndarray | None:
    """int32 [layers, tokens, top_k]: the synthetic engine hints of ``config`` for a policy
    that reads hints (None otherwise, or without ``hint_accuracy``)."""
    if config.hint_accuracy is None or not entry.predictive:
        return None
    rng = np.random.default_rng(config.hint_seed)
    hints = synthetic_hints(trace.expert_ids, trace.num_experts, config.hint_accuracy, rng)
    return np.ascontiguousarray(hints.transpose(1, 0, 2))


def replay_policy(
    trace: Trace,
    config: ReplayConfig,
    name: str,
    step_tokens: int = _STEP_TOKENS,
    shards: str | None = None,
    policies: Mapping[str, PolicyEntry] = POLICIES,
    timer: Callable[[], float] = time.perf_counter,
    progress: Progress | None = None,
):
    """Online policy ``name`` over ``trace`` through a ``Coordinator`` on an
    ``InProcessTransport`` (one actor hosting every layer), ``step_tokens`` tokens per window,
    with the trace's sequence starts and, for a policy that reads them, synthetic hints. With
    ``shards`` the layer bodies keep the checkpoint's bytes resident for their hot sets,
    waiting for each window's prefetches before reading resident bytes (exact peaks).
    Returns (ServiceStats, seconds per layer)."""
    entry = policy_entry(name, policies)
    service = service_config_for(
        trace,
        config,
        name,
        layers_per_actor=trace.num_layers,
        shards=shards,
        warmup_tokens=0,  # nothing restarts in-process
    )
    transport = InProcessTransport(
        service, settle=shards is not None, policies=policies, timer=timer
    )
    coordinator = Coordinator(service, transport)
    ids = np.ascontiguousarray(trace.expert_ids.transpose(1, 0, 2), dtype=np.int32)
    starts = trace_seq_starts(trace)
    hints = trace_hints(trace, config, entry)
    reported = 0
    for first in range(0, trace.num_tokens, step_tokens):
        step = slice(first, first + step_tokens)
        coordinator.submit(
            ids[:, step], None, False, starts[step], None if hints is None else hints[:, step]
        )
        if progress is not None:  # layers' worth of the trace, as the oracle reports
            done = trace.num_layers * min(first + step_tokens, trace.num_tokens)
            units = done // max(trace.num_tokens, 1)
            progress.advance(units - reported, name)
            reported = units
    stats = coordinator.stats()
    if progress is not None and trace.num_layers > reported:
        progress.advance(trace.num_layers - reported, name)
    return stats, transport.seconds


def replay_steps(
    config: ServiceConfig,
    steps: Iterable[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]],
    restart_tokens: Mapping[int, Sequence[int]] | None = None,
) -> ServiceStats:
    """What a service of ``config`` counts for ``steps`` (expert_ids, seq_starts, hints each, as
    submitted, in order), in this process, with each layer actor re-created (empty) where
    ``restart_tokens[actor]`` says: at those token counts of its layers, each a window boundary
    and distinct, as ``LayerStats.restart_tokens`` reports them. A coordinator that restarts
    changes nothing, so this is the count of a service that survived those failures."""
    transport = InProcessTransport(config)
    coordinator = Coordinator(config, transport)
    firsts = [layers[0] for layers in config.actor_layers()]
    due = {actor: sorted(tokens) for actor, tokens in (restart_tokens or {}).items()}

    def kill_due() -> None:
        layers = coordinator.stats(sync=False).layers
        for actor, tokens in due.items():
            if tokens and tokens[0] == layers[firsts[actor]].tokens:
                transport.kill(actor)
                tokens.pop(0)

    kill_due()
    for ids, starts, hints in steps:
        coordinator.submit(ids, seq_starts=starts, hints=hints)
        kill_due()
    stats = coordinator.stats()
    left = {actor: tokens for actor, tokens in due.items() if tokens}
    if left:
        raise ValueError(f"restart_tokens: no window of these actors ends at {left}")
    return stats


def resplit_of(stats, config: ReplayConfig, entry: PolicyEntry) -> dict | None:
    """``PolicyResult.resplit`` when the policy re-split its capacity, else None."""
    if not entry.predictive or config.predict.split is None:
        return None
    return resplit_report(
        stats.resplit_moved,
        [s.resplit_evictions for s in stats.layers],
        [s.resplit_transfers for s in stats.layers],
        stats.capacity,
    )


def _oracle_result(
    entry: PolicyEntry, trace: Trace, config: ReplayConfig, timer, progress
) -> PolicyResult:
    hits, seconds = [], []
    for layer in range(trace.num_layers):
        start = timer()
        hits.append(entry.offline_hits(trace.layer_ids(layer), trace.num_experts, config.capacity))
        seconds.append(timer() - start)
        if progress is not None:
            progress.advance(1, entry.name)
    return PolicyResult(
        entry.name, tuple(hits), trace.num_tokens * trace.top_k, tuple(seconds), top_k=trace.top_k
    )


def replay_trace(
    trace: Trace,
    config: ReplayConfig,
    timer: Callable[[], float] = time.perf_counter,
    progress: Progress | None = None,
    policies: Mapping[str, PolicyEntry] = POLICIES,
) -> ReplayReport:
    """Hits, stalls and transfers per layer of every policy in ``config.policies`` over
    ``trace``. policies: the registry the names resolve in (a benchmark swaps an entry for a
    variant of the same kind)."""
    if config.capacity > trace.num_experts:
        raise ValueError(
            f"capacity: expected at most num_experts={trace.num_experts}, got {config.capacity}"
        )
    results = {}
    for name in config.policies:
        entry = policy_entry(name, policies)
        if not entry.online:
            results[name] = _oracle_result(entry, trace, config, timer, progress)
            continue
        stats, seconds = replay_policy(
            trace, config, name, policies=policies, timer=timer, progress=progress
        )
        results[name] = policy_result(
            name, stats, trace.top_k, seconds, resplit_of(stats, config, entry)
        )
    return ReplayReport(trace.name, trace.num_experts, config.capacity, results)

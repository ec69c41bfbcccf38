"""``replay_trace`` through a running moeray service on Ray (``moeray replay --backend
service``): the same decisions as in-process, with the service's own throughput."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from moeray import service
from moeray._progress import Progress
from moeray.policy.registry import policy_entry
from moeray.replay.config import ReplayConfig
from moeray.replay.inprocess import (
    replay_trace,
    resplit_of,
    service_config_for,
    trace_hints,
    trace_seq_starts,
)
from moeray.replay.report import (
    PolicyResult,
    ReplayReport,
    ShardResult,
    policy_result,
    shard_result,
)
from moeray.shards.capacity import shard_expert_bytes
from moeray.traces.trace import Trace

__all__ = ["ServiceThroughput", "replay_through_service"]


@dataclass(frozen=True)
class ServiceThroughput:
    """How fast one replay went through the service, end to end (submit to last ack)."""

    policy: str
    tokens: int
    submits: int
    seconds: float
    submit_p50_ms: float
    submit_p99_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def submits_per_s(self) -> float:
        return self.submits / self.seconds if self.seconds > 0 else float("inf")


def replay_through_service(
    trace: Trace,
    config: ReplayConfig,
    step_tokens: int = 256,
    layers_per_actor: int | None = None,
    window_steps: int = 16,
    progress: Progress | None = None,
    timer: Callable[[], float] = time.perf_counter,
    shards: str | None = None,
) -> tuple[ReplayReport, list[ServiceThroughput]]:
    """Replays ``trace`` through one service per online policy (oracles stay in-process).
    Steps of ``step_tokens`` tokens carry every layer, the trace's sequence starts and, for a
    policy that reads them, the synthetic hints of ``config``: the results equal
    ``replay_trace``'s, which tests check. With ``shards`` the layer actors keep the
    checkpoint's bytes resident for their hot sets, and the report has a ``ShardResult`` per
    online policy."""
    if shards is not None:
        expert_bytes = shard_expert_bytes(shards, trace.num_layers)
        shards = os.path.abspath(shards)
    ids = np.ascontiguousarray(trace.expert_ids.transpose(1, 0, 2), dtype=np.int32)
    if trace.weights is not None:
        weights = np.ascontiguousarray(trace.weights.transpose(1, 0, 2))
    else:  # no router weights in the trace: group with equal weights
        weights = np.full(ids.shape, 1.0 / trace.top_k, dtype=np.float32)
    seq_starts = trace_seq_starts(trace)
    layers_per_actor = layers_per_actor or max(1, -(-trace.num_layers // (os.cpu_count() or 1)))
    results: dict[str, PolicyResult] = {}
    shard_results: dict[str, ShardResult] = {}
    throughput = []
    for name in config.policies:
        entry = policy_entry(name)
        if not entry.online:
            results[name] = replay_trace(trace, replace(config, policies=(name,))).results[name]
            if progress is not None:
                progress.advance(trace.num_layers, name)
            continue
        hints = trace_hints(trace, config, entry)
        handle = service.start(
            service_config_for(
                trace,
                config,
                name,
                window_steps=window_steps,
                layers_per_actor=min(layers_per_actor, trace.num_layers),
                name=f"replay-{name}-{os.getpid()}",
                shards=shards,
            )
        )
        try:
            begin = timer()
            for first in range(0, trace.num_tokens, step_tokens):
                step = slice(first, first + step_tokens)
                handle.submit(
                    ids[:, step],
                    weights[:, step],
                    seq_starts[step],
                    None if hints is None else hints[:, step],
                )
            stats = handle.stats()
            seconds = timer() - begin
        finally:
            handle.shutdown()
        latency_ms = np.array(handle.submit_latency_s) * 1e3
        throughput.append(
            ServiceThroughput(
                policy=name,
                tokens=trace.num_tokens,
                submits=len(latency_ms),
                seconds=seconds,
                submit_p50_ms=float(np.percentile(latency_ms, 50)),
                submit_p99_ms=float(np.percentile(latency_ms, 99)),
            )
        )
        per_layer_seconds = (seconds / trace.num_layers,) * trace.num_layers
        results[name] = policy_result(
            name, stats, trace.top_k, per_layer_seconds, resplit_of(stats, config, entry)
        )
        if shards is not None:
            shard_results[name] = shard_result(stats, expert_bytes)
        if progress is not None:
            progress.advance(trace.num_layers, name)
    report = ReplayReport(
        trace.name,
        trace.num_experts,
        config.capacity,
        results,
        shards=shard_results,
        shards_path=shards,
    )
    return report, throughput

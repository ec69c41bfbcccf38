"""``replay_trace`` against real bytes: each online policy's hot sets kept resident in a
checkpoint's shards (``moeray replay --shards``), through the same in-process coordinator."""

from __future__ import annotations

from dataclasses import replace

from moeray._progress import Progress
from moeray.policy.registry import policy_entry
from moeray.replay.config import ReplayConfig
from moeray.replay.inprocess import replay_policy, replay_trace, resplit_of
from moeray.replay.report import ReplayReport, policy_result, shard_result
from moeray.shards.capacity import shard_expert_bytes
from moeray.traces.trace import Trace

__all__ = ["replay_shards"]


def replay_shards(
    trace: Trace,
    config: ReplayConfig,
    shards: str,
    step_tokens: int = 1,
    progress: Progress | None = None,
) -> ReplayReport:
    """Every online policy over the checkpoint at ``shards``, one window per ``step_tokens``
    tokens, waiting for each window's prefetches before reading resident bytes, so the readings
    are the real peaks. Decisions equal ``replay_trace``'s; oracles (belady) have no shard
    result. A re-split's shard bound is each layer's largest capacity."""
    if isinstance(step_tokens, bool) or not isinstance(step_tokens, int) or step_tokens < 1:
        raise ValueError(f"step_tokens: expected an int >= 1, got {step_tokens!r}")
    expert_bytes = shard_expert_bytes(shards, trace.num_layers)
    results, shard_results = {}, {}
    for name in config.policies:
        entry = policy_entry(name)
        if not entry.online:
            oracle = replace(config, policies=(name,))
            results[name] = replay_trace(trace, oracle, progress=progress).results[name]
            continue
        stats, seconds = replay_policy(
            trace, config, name, step_tokens, shards=str(shards), progress=progress
        )
        results[name] = policy_result(
            name, stats, trace.top_k, seconds, resplit_of(stats, config, entry)
        )
        shard_results[name] = shard_result(stats, expert_bytes)
    return ReplayReport(
        trace.name,
        trace.num_experts,
        config.capacity,
        results,
        shards=shard_results,
        shards_path=str(shards),
    )

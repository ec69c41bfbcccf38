"""Replays: routing traces through the policies, per layer, beside the offline optimum.

``config`` holds ``ReplayConfig``; ``inprocess`` runs each online policy through the service's
own ``Coordinator`` and layer bodies over an in-process transport (``replay_trace``), oracles on
their own; ``shards`` does the same with each policy's hot sets kept resident in a checkpoint's
bytes; ``service`` through a running service on Ray; ``report`` holds the results (the
``--json`` document); ``hints`` makes synthetic engine hints; ``plot`` draws them. Modules here
may import policy, native, shards, traces and actors (the mechanism they replay through); only
``service`` reaches Ray, through ``moeray.service``.
"""

from moeray.replay.config import POLICY_NAMES, ReplayConfig, capacity_from_fraction
from moeray.replay.hints import synthetic_hints
from moeray.replay.inprocess import replay_policy, replay_trace
from moeray.replay.report import PolicyResult, ReplayReport, ShardResult
from moeray.replay.shards import replay_shards

__all__ = [
    "POLICY_NAMES",
    "PolicyResult",
    "ReplayConfig",
    "ReplayReport",
    "ShardResult",
    "capacity_from_fraction",
    "replay_policy",
    "replay_shards",
    "replay_trace",
    "synthetic_hints",
]

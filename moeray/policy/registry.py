"""The policies moeray knows, one entry each: name, kind, and how it is built.

Kinds:
- ``demand``: loads an expert when it is used (a stall), evicts by a rule; may prefetch by
  affinity after a window. Belady's optimum bounds its hits.
- ``predictive``: prefetches by prediction, token by token (``moeray.policy.predict``); reads
  sequence starts, engine hints and the previous layer's routing, relearns after a restart, and
  its capacity may be re-split across layers.
- ``oracle``: sees the whole stream (Belady's optimum); replays only, never a service.

Adding a policy: one entry here, one class behind ``moeray.policy.windows.WindowPolicy``, and
the shared contract test (tests/test_policy_contract.py) runs over it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from moeray.policy.affinity import ExpertAffinity
from moeray.policy.belady import belady_hits
from moeray.policy.cache import EvictionPolicy
from moeray.policy.predict import PredictConfig
from moeray.policy.windows import DemandCaches, PredictiveWindows, WindowPolicy

__all__ = [
    "KINDS",
    "POLICIES",
    "PolicyEntry",
    "PolicySettings",
    "online_policy_names",
    "policy_entry",
    "predictive_variant",
]

KINDS = ("demand", "predictive", "oracle")


@dataclass(frozen=True)
class PolicySettings:
    """What a policy reads besides the model's shape: affinity_weight in [0, 1] (affinity-lru's
    blend) and predict (the predictive policy's parameters)."""

    affinity_weight: float = 0.8
    predict: PredictConfig = field(default_factory=PredictConfig)


# (layers, num_experts, capacity per layer, affinity per layer, settings) -> the policy
Builder = Callable[
    [list[int], int, dict[int, int], dict[int, ExpertAffinity], PolicySettings], WindowPolicy
]


@dataclass(frozen=True)
class PolicyEntry:
    """name: as in ``--policy`` and ``--json`` (names are never renamed). kind: one of KINDS.
    build: online policies' constructor (see Builder). offline_hits: an oracle's hit count of
    one layer, (expert_ids int32 [T, top_k], num_experts, capacity) -> int. summary: one line."""

    name: str
    kind: str
    summary: str
    build: Builder | None = None
    offline_hits: Callable[[np.ndarray, int, int], int] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if (self.build is None) != (self.kind == "oracle"):
            raise ValueError(f"{self.name}: online policies need build, oracles offline_hits")

    @property
    def online(self) -> bool:
        """A service can run it: it decides from the routing so far."""
        return self.kind != "oracle"

    @property
    def predictive(self) -> bool:
        """Reads sequence starts, engine hints and the previous layer's routing; prefetches
        per token; relearns from recent routing after a restart; its capacity may be
        re-split."""
        return self.kind == "predictive"


def _demand(base: EvictionPolicy, blended: bool = False) -> Builder:
    def build(layers, num_experts, capacity, affinities, settings):
        return DemandCaches(
            layers, num_experts, capacity, affinities, base, blended, settings.affinity_weight
        )

    return build


def _predictive(layers, num_experts, capacity, affinities, settings, make_caches=None):
    extra = {} if make_caches is None else {"make_caches": make_caches}
    return PredictiveWindows(layers, num_experts, capacity, affinities, settings.predict, **extra)


def predictive_variant(name: str, make_caches, summary: str) -> PolicyEntry:
    """An entry whose caches ``make_caches`` builds from ``PredictiveCaches``' arguments (a
    variant under study; a benchmark swaps it in for ``moeray``)."""
    return PolicyEntry(name, "predictive", summary, partial(_predictive, make_caches=make_caches))


# Insertion order is the order of --policy's choices and of the replay's tables.
POLICIES: Mapping[str, PolicyEntry] = {
    e.name: e
    for e in (
        PolicyEntry("lru", "demand", "evicts the least recently used", _demand(EvictionPolicy.LRU)),
        PolicyEntry(
            "lfu", "demand", "evicts the least frequently used", _demand(EvictionPolicy.LFU)
        ),
        PolicyEntry(
            "adaptive",
            "demand",
            "LFU when frequencies are skewed, else LRU",
            _demand(EvictionPolicy.ADAPTIVE),
        ),
        PolicyEntry(
            "affinity-lru",
            "demand",
            "LRU blended with an EMA affinity",
            _demand(EvictionPolicy.LRU, blended=True),
        ),
        PolicyEntry(
            "belady",
            "oracle",
            "the offline optimum of demand caching",
            offline_hits=belady_hits,
        ),
        PolicyEntry(
            "moeray",
            "predictive",
            "cross-layer and previous-token prediction, prefetch",
            _predictive,
        ),
    )
}


def policy_entry(name: str, policies: Mapping[str, PolicyEntry] = POLICIES) -> PolicyEntry:
    """The entry named ``name``; ValueError naming the known ones otherwise."""
    try:
        return policies[name]
    except (KeyError, TypeError):
        raise ValueError(f"policy: expected one of {list(policies)}, got {name!r}") from None


def online_policy_names(policies: Mapping[str, PolicyEntry] = POLICIES) -> tuple[str, ...]:
    """Names a service can run."""
    return tuple(name for name, entry in policies.items() if entry.online)

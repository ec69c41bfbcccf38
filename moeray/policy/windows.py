"""Every online policy behind one interface: decisions for consecutive layers, a window at a time.

A ``PolicyWindow`` is the routing of one window of tokens for the layers a policy instance hosts
(a layer actor's, or every layer in-process). ``WindowPolicy.apply`` serves it token by token
and returns each hosted layer's counter deltas (the ``COUNTER_KEYS``), so the mechanism that
hosts a policy (``moeray.actors.layer.LayerCaches``) has one apply path for every policy.
Decisions depend only on the routing, never on how it is cut into windows (the contract test,
tests/test_policy_contract.py, checks this for every entry of ``moeray.policy.registry``).

The affinities a policy is given (one ``ExpertAffinity`` per hosted layer, owned by the host and
restored after a restart) are the service's EMA of each layer's routing: a policy feeds each
window's routing to them exactly once; the demand policies also decide by them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from moeray.native import backend
from moeray.policy.affinity import ExpertAffinity
from moeray.policy.cache import EvictionPolicy, ExpertCache, ExpertCacheConfig
from moeray.policy.predict import PredictConfig, PredictiveCaches

__all__ = [
    "COUNTER_KEYS",
    "PREDICTOR_COUNTER_KEYS",
    "DemandCaches",
    "PolicyWindow",
    "PredictiveWindows",
    "WindowPolicy",
]

# What ``apply`` returns per hosted layer: counts of this window alone. stalls: uses of an expert
# that was not hot (a demand cache's misses); transfers are stalls + prefetches.
COUNTER_KEYS = (
    "hits",
    "stalls",
    "evictions",
    "prefetch_hits",
    "prefetches",
    "wasted_prefetches",
    "resplit_evictions",
    "resplit_transfers",
)
# Per predictor (``moeray.policy.predict.PREDICTOR_NAMES``), tuples: hits, guesses, uses.
PREDICTOR_COUNTER_KEYS = ("predictor_hits", "predictor_guesses", "predictor_uses")


@dataclass(frozen=True)
class PolicyWindow:
    """One window of tokens for a policy's hosted layers (in layer order).

    expert_ids: one int [T, top_k] per hosted layer, each in [0, num_experts).
    previous_layer_ids: int [T, top_k], the routing of the layer before the first hosted one (read by
    a cross-layer predictor when that layer is not 0; else None).
    seq_starts: bool [T], True where a token begins a sequence, or None (the stream continues).
    hints: None, or one entry per hosted layer: int [T, h] (an engine's predicted experts, -1
    for none) or None.
    prefetch_budget: experts to prefetch, per token (predictive) or after the window (demand).
    resplits: (token offset, every layer's capacity from there on) pairs in order, the first at
    offset 0 (a capacity re-split; predictive only).
    """

    expert_ids: tuple[np.ndarray, ...]
    previous_layer_ids: np.ndarray | None = None
    seq_starts: np.ndarray | None = None
    hints: tuple[np.ndarray | None, ...] | None = None
    prefetch_budget: int = 0
    resplits: tuple[tuple[int, tuple[int, ...]], ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.expert_ids[0])


class WindowPolicy(Protocol):
    """The per-window interface of every online policy (see the module docstring)."""

    def apply(self, window: PolicyWindow) -> list[dict]:
        """Serves the window; returns per hosted layer its counter deltas (COUNTER_KEYS and,
        for predictive policies, PREDICTOR_COUNTER_KEYS)."""

    def warm_up(self, expert_ids: np.ndarray, seq_starts: np.ndarray | None) -> None:
        """Steps through routing already counted (a restart's): expert_ids int [T, rows,
        top_k], rows the hosted layers with the layer before them first when that one is
        read; no counter moves."""

    def hot_sets(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per hosted layer: its hot experts and, of those, the ones brought in ahead of use
        and not used yet (what shard residency prefetches)."""


_NONE = np.zeros(0, np.int64)


class DemandCaches:
    """One seed ``ExpertCache`` per hosted layer: loads on use, evicts by ``base`` (or, with
    ``blended``, by the affinity blend of ``suggest_eviction_with_affinity``), and after each
    window prefetches ``prefetch_budget`` experts by affinity."""

    def __init__(
        self,
        layers: list[int],
        num_experts: int,
        capacity: dict[int, int],
        affinities: dict[int, ExpertAffinity],
        base: EvictionPolicy,
        blended: bool = False,
        affinity_weight: float = 0.8,
    ):
        self._layers = list(layers)
        self._affinities = affinities
        self._blended = blended
        self._weight = affinity_weight
        self._caches = [
            ExpertCache(num_experts, ExpertCacheConfig(capacity[layer], eviction_policy=base))
            for layer in self._layers
        ]
        self._ahead = [np.zeros(0, np.int64) for _ in self._layers]

    def apply(self, window: PolicyWindow) -> list[dict]:
        out = []
        for i, ids in enumerate(window.expert_ids):
            before = self._caches[i].stats()
            prefetched = self.serve(i, ids, window.prefetch_budget)
            after = self._caches[i].stats()
            counts = dict.fromkeys(COUNTER_KEYS, 0)
            counts.update(
                hits=after.hits - before.hits,
                stalls=after.misses - before.misses,
                evictions=after.evictions - before.evictions,
                prefetch_hits=after.prefetch_hits - before.prefetch_hits,
                prefetches=prefetched,
            )
            out.append(counts)
        return out

    def serve(self, index: int, ids: np.ndarray, prefetch_budget: int = 0) -> int:
        """Serves hosted layer ``index``'s routing ids int [T, top_k] (its part of a window, or
        an engine's batch), then prefetches by affinity; returns the prefetches made."""
        cache, affinity = self._caches[index], self._affinities[self._layers[index]]
        if self._blended:  # updates the affinity row by row, between accesses
            cache.access_batch(ids, affinity, self._weight)
        else:
            cache.access_batch(ids)
            affinity.update_batch(ids)
        if not prefetch_budget:
            self._ahead[index] = _NONE
            return 0
        prefetched = cache.prefetch_by_affinity(affinity, prefetch_budget)
        self._ahead[index] = np.asarray(prefetched, dtype=np.int64)
        return len(prefetched)

    def counters(self, index: int) -> dict:
        """Hosted layer ``index``'s counters since it was built (COUNTER_KEYS; prefetches are
        counted by the caller, from ``serve``'s answers)."""
        st = self._caches[index].stats()
        return dict.fromkeys(COUNTER_KEYS, 0) | dict(
            hits=st.hits,
            stalls=st.misses,
            evictions=st.evictions,
            prefetch_hits=st.prefetch_hits,
        )

    def hot_experts(self, index: int) -> np.ndarray:
        """Hosted layer ``index``'s hot experts (int64, ascending)."""
        return np.sort(np.asarray(self._caches[index].hot_experts(), dtype=np.int64))

    def plan_core(self):
        """The native core that serves these caches layer by layer and writes each call's plan
        (``native/src/session.hpp``, an engine session's): from then on it alone serves them."""
        affinities = [self._affinities[layer] for layer in self._layers]
        return backend._DemandSession(self._caches, affinities, self._blended, self._weight)

    def warm_up(self, expert_ids: np.ndarray, seq_starts: np.ndarray | None) -> None:
        """A demand cache restarts empty (as a real process's memory is): nothing to relearn."""

    def hot_sets(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [
            (np.asarray(cache.hot_experts(), dtype=np.int64), ahead)
            for cache, ahead in zip(self._caches, self._ahead)
        ]


class PredictiveWindows:
    """One ``PredictiveCaches`` over hosted layers a..b, plus the "shadow" layer a-1 when a > 0:
    layer a's cross-layer predictor reads layer a-1's routing of the same token
    (``PolicyWindow.previous_layer_ids``); the shadow's own policy does not run on the window
    step (``run_window(first_layer=1)``), and its counters are dropped on the token path (with
    hints). Hot sets never interact across layers, so this makes exactly the decisions the
    whole model's ``PredictiveCaches`` makes for a..b. Windows without hints run in one kernel
    call per stretch between re-splits. Built at the first window (top_k from its routing).
    ``make_caches``: builds the caches from ``PredictiveCaches``' arguments (a variant under
    study, in benchmarks)."""

    def __init__(
        self,
        layers: list[int],
        num_experts: int,
        capacity: dict[int, int],
        affinities: dict[int, ExpertAffinity],
        config: PredictConfig,
        make_caches: Callable[..., PredictiveCaches] = PredictiveCaches,
    ):
        if not isinstance(config, PredictConfig):
            raise TypeError(f"predict: expected a PredictConfig, got {type(config).__name__}")
        if layers != list(range(layers[0], layers[0] + len(layers))):
            raise ValueError(f"layers: the moeray policy needs consecutive layers, got {layers}")
        # A re-split couples every layer: whoever sees them all runs it and sends each window
        # its capacities (PolicyWindow.resplits), applied here token by token.
        self._config = replace(config, split=None)
        self._layers = layers
        self._affinities = affinities
        self._skip = 1 if layers[0] > 0 else 0  # the shadow layer's row in the caches
        # The shadow's hot set never touches the others': any valid capacity gives the same
        # decisions for a..b; its own layer's is the faithful one when known.
        shadow = [capacity.get(layers[0] - 1, capacity[layers[0]])] if self._skip else []
        self._capacity = np.array(shadow + [capacity[layer] for layer in layers], np.int64)
        self._num_experts = num_experts
        self._make_caches = make_caches
        self._caches: PredictiveCaches | None = None

    def _build(self, top_k: int) -> PredictiveCaches:
        if self._caches is None:
            self._caches = self._make_caches(
                len(self._capacity), self._num_experts, top_k, self._capacity, self._config
            )
        return self._caches

    def apply(self, window: PolicyWindow) -> list[dict]:
        tokens = window.num_tokens
        rows = list(window.expert_ids)
        if self._skip:
            if window.previous_layer_ids is None:
                raise ValueError(
                    f"previous_layer_ids: the moeray policy needs layer {self._layers[0] - 1}'s "
                    f"routing with layer {self._layers[0]}'s window"
                )
            rows.insert(0, window.previous_layer_ids)
        if any(np.shape(r)[:1] != (tokens,) for r in rows):
            raise ValueError(f"windows: every layer's routing must cover the same {tokens} tokens")
        ids = np.stack(rows, axis=1)  # [T, rows, top_k]
        caches = self._build(ids.shape[2])
        if caches.config.prefetch_budget != window.prefetch_budget:
            caches.config = replace(caches.config, prefetch_budget=window.prefetch_budget)
        hints = self._hints(window, tokens, len(rows))
        starts = window.seq_starts
        if starts is not None:
            starts = np.asarray(starts, dtype=bool)
            if starts.shape != (tokens,):
                raise ValueError(f"seq_starts: expected bool [{tokens}], got shape {starts.shape}")
        resplits = self._resplits(window, tokens)
        before = _counters(caches)
        if hints is None:  # one kernel call per stretch between re-splits
            cuts = sorted({0, *resplits, tokens})
            for first, end in zip(cuts, cuts[1:]):
                if first in resplits and not np.array_equal(resplits[first], caches.capacity):
                    caches.set_capacity(resplits[first])
                caches.run_window(
                    ids[first:end],
                    None if starts is None else starts[first:end],
                    first_layer=self._skip,  # the shadow layer: its routing only
                )
        else:
            for t in range(tokens):
                if t in resplits and not np.array_equal(resplits[t], caches.capacity):
                    caches.set_capacity(resplits[t])
                caches.step(
                    ids[t],
                    new_sequence=starts is not None and bool(starts[t]),
                    hints=None if hints is None else hints[t],
                )
        after = _counters(caches)
        delta = {key: after[key] - before[key] for key in after}
        for layer, layer_ids in zip(self._layers, window.expert_ids):
            self._affinities[layer].update_batch(layer_ids)
        return [
            {
                **{key: int(delta[key][i]) for key in COUNTER_KEYS},
                **{key: tuple(int(x) for x in delta[key][:, i]) for key in PREDICTOR_COUNTER_KEYS},
            }
            for i in range(self._skip, self._skip + len(self._layers))
        ]

    def warm_up(self, expert_ids: np.ndarray, seq_starts: np.ndarray | None) -> None:
        """Steps the predictor through routing already counted: its tables, hot sets and
        affinity learn again what the process that died had learned; no counter of a window
        moves."""
        ids = np.asarray(expert_ids)
        if ids.ndim != 3 or ids.shape[1] != len(self._capacity) or ids.dtype.kind not in "iu":
            raise ValueError(
                f"warmup: expected int [tokens, {len(self._capacity)}, top_k], got "
                f"{ids.dtype} {ids.shape}"
            )
        caches = self._build(ids.shape[2])
        caches.run_window(
            ids,
            None if seq_starts is None else np.asarray(seq_starts, dtype=bool),
            first_layer=self._skip,
        )

    def _resplits(self, window: PolicyWindow, tokens: int) -> dict[int, np.ndarray]:
        """Token offset -> the capacities of this instance's rows (the shadow layer's first)
        from that token on."""
        out = {}
        for offset, capacity in window.resplits if tokens else ():  # an empty window: no token
            if not 0 <= offset < tokens or len(capacity) <= self._layers[-1]:
                raise ValueError(
                    f"resplits: expected (offset in [0, {tokens}), a capacity per "
                    f"layer) pairs, got ({offset}, {capacity})"
                )
            first = self._layers[0] - self._skip
            out[offset] = np.asarray(capacity[first : self._layers[-1] + 1], dtype=np.int64)
        return out

    def _hints(self, window: PolicyWindow, tokens: int, rows: int) -> np.ndarray | None:
        """The window's hints as int [tokens, rows, h] (-1 for none; the shadow layer takes
        none: its decisions are dropped, and a layer's hints change only that layer's), or
        None without any."""
        given = [h for h in window.hints or () if h is not None]
        if not given:
            return None
        for layer, h in zip(self._layers, window.hints):
            if h is not None and (np.ndim(h) != 2 or len(h) != tokens):
                raise ValueError(
                    f"hints: expected int [{tokens}, h] for layer {layer}, got shape {np.shape(h)}"
                )
        out = np.full((tokens, rows, max(h.shape[1] for h in given)), -1, dtype=np.int64)
        for i, h in enumerate(window.hints):
            if h is not None:
                out[:, self._skip + i, : h.shape[1]] = h
        return out

    def hot_sets(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._caches is None:
            return [(np.zeros(0, np.int64),) * 2 for _ in self._layers]
        return [self._caches.hot_set(self._skip + i) for i in range(len(self._layers))]

    def tables(self) -> dict[str, np.ndarray] | None:
        """The hosted layers' learned tables (``PredictiveCaches.tables``), None before the
        first window."""
        if self._caches is None:
            return None
        return self._caches.tables(slice(self._skip, self._skip + len(self._layers)))


def _counters(caches: PredictiveCaches) -> dict[str, np.ndarray]:
    stats = caches.stats
    return {
        key: getattr(stats, key).copy()  # the stats' arrays grow in place
        for key in (*COUNTER_KEYS, *PREDICTOR_COUNTER_KEYS)
    }

"""Pure-Python twin of ``src/session.hpp`` (bound in ``src/bindings_session.cpp``): the engine
session's plan cores, with the same API, messages and decisions.

A plan compares a layer's hot set before and after the layer is served with the experts its
batch used: load = (used | after) & ~before, evict = (before | used) & ~after, ascending ids.
``_DemandSession`` serves a demand policy's layer with the calls ``DemandCaches.serve`` makes
(the victim of each miss asked for first, so the hot set's copy follows the cache; a prefetch's
victims go unreported, so after one the copy is read again); ``_HotPlan`` plans a predictive
policy's layer from ``PredictiveCaches``' hot rows, before and after its ``serve_layer``;
``_LayerAffinities`` updates every layer's affinity with a batch's routing in one call.
"""

from __future__ import annotations

import math

import numpy as np

from moeray.native._reference.affinity import AffinityCore
from moeray.native._reference.expert_cache import ExpertCacheCore

__all__ = ["_DemandSession", "_HotPlan", "_LayerAffinities"]


def _check_route_ids(ids, experts: int) -> np.ndarray:
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"ids: expected a numpy int32 or int64 array, got {type(ids).__name__}")
    if ids.dtype not in (np.int32, np.int64):
        raise TypeError(f"ids: expected dtype int32 or int64, got {ids.dtype}")
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"ids: expected shape [tokens, top_k], got {ids.shape}")
    ids = np.ascontiguousarray(ids)
    bad = (ids < 0) | (ids >= experts)
    if bad.any():
        raise ValueError(f"ids: expected ids in [0, {experts}), got {int(ids[bad][0])}")
    return ids


def _check_layer(layer: int, layers: int) -> int:
    if not 0 <= layer < layers:
        raise ValueError(f"layer: expected an int in [0, {layers}), got {layer}")
    return int(layer)


_EMPTY = np.zeros(0, np.int64)
_EMPTY.flags.writeable = False  # every empty answer (the binding's shares one too)


def _ids(mask) -> np.ndarray:
    ids = np.flatnonzero(mask).astype(np.int64)
    return ids if len(ids) else _EMPTY


def _plan_rows(before, after, used) -> tuple[np.ndarray, np.ndarray]:
    """The ascending ids of (used | after) & ~before (load) and of (before | used) & ~after
    (evict)."""
    used = np.zeros_like(before) if used is None else used
    return _ids((used | after) & ~before), _ids((before | used) & ~after)


class _DemandSession:
    """A demand policy's layers: caches[l] and affinities[l] (used by this object alone from
    now on); blended: affinity-blended victims and row-by-row affinity updates."""

    def __init__(self, caches, affinities, blended: bool, affinity_weight: float):
        caches, affinities = list(caches), list(affinities)
        if not caches:
            raise ValueError("caches: expected one ExpertCacheCore per layer")
        if len(affinities) != len(caches):
            raise ValueError(
                f"affinities: expected one per layer ({len(caches)}), got {len(affinities)}"
            )
        if not math.isfinite(affinity_weight):
            raise ValueError("affinity_weight: expected a finite float")
        for c, a in zip(caches, affinities):
            if not isinstance(c, ExpertCacheCore):
                raise TypeError(f"caches: expected ExpertCacheCore objects, got {type(c).__name__}")
            if not isinstance(a, AffinityCore):
                raise TypeError(
                    f"affinities: expected AffinityCore objects, got {type(a).__name__}"
                )
            if c.num_experts() != caches[0].num_experts() or a.num_experts() != c.num_experts():
                raise ValueError("caches: every cache and affinity must track the same experts")
        self._caches, self._affinities = caches, affinities
        self._blended = bool(blended)
        self._weight = min(max(float(affinity_weight), 0.0), 1.0)
        E = caches[0].num_experts()
        self._hot = np.zeros((len(caches), E), dtype=bool)
        for layer in range(len(caches)):
            self._read_hot(layer)

    def num_layers(self) -> int:
        return len(self._caches)

    def num_experts(self) -> int:
        return self._hot.shape[1]

    def check(self, ids) -> None:
        _check_route_ids(ids, self.num_experts())

    def route(self, layer: int, ids, budget: int) -> tuple[np.ndarray, np.ndarray, int]:
        layer = _check_layer(layer, self.num_layers())
        if budget < 0:
            raise ValueError(f"budget: expected an int >= 0, got {budget}")
        ids = _check_route_ids(ids, self.num_experts())
        c, a = self._caches[layer], self._affinities[layer]
        now = self._hot[layer]
        before = now.copy()
        used = np.zeros_like(now)
        for row in ids.tolist():
            for e in row:
                used[e] = True
                if not now[e]:  # a miss: the victim the access evicts, if the hot set is full
                    if self._blended:
                        victim = c.suggest_eviction_with_affinity(a, self._weight)
                        if victim is not None:
                            c.evict(victim)
                    else:
                        victim = c.suggest_eviction()
                    if victim is not None:
                        now[victim] = False
                    now[e] = True
                c.access(e)
            if self._blended:
                a.update(row)
        if not self._blended:
            a.update_batch(ids.astype(np.int32))
        prefetched = 0
        if budget > 0:
            prefetched = len(c.prefetch_by_affinity(a, budget))
            self._read_hot(layer)
        return (*_plan_rows(before, now, used), prefetched)

    def _read_hot(self, layer: int) -> None:
        c = self._caches[layer]
        self._hot[layer] = [c.is_hot(e) for e in range(self.num_experts())]


class _LayerAffinities:
    """Every layer's AffinityCore of an engine session, updated with a batch's routing in one
    call."""

    def __init__(self, affinities):
        affinities = list(affinities)
        if not affinities:
            raise ValueError("affinities: expected one AffinityCore per layer")
        for a in affinities:
            if not isinstance(a, AffinityCore):
                raise TypeError(
                    f"affinities: expected AffinityCore objects, got {type(a).__name__}"
                )
            if a.num_experts() != affinities[0].num_experts():
                raise ValueError("affinities: every layer's must track the same experts")
        self._affinities = affinities

    def update(self, rows) -> None:
        """rows: one array per layer, int32 or int64 [tokens, top_k], all checked before any
        affinity changes; then each layer's update_batch, in layer order."""
        if not isinstance(rows, list):
            raise TypeError(
                f"rows: expected a list of arrays, one per layer, got {type(rows).__name__}"
            )
        if len(rows) != len(self._affinities):
            raise ValueError(
                f"rows: expected one array per layer ({len(self._affinities)}), got {len(rows)}"
            )
        experts = self._affinities[0].num_experts()
        checked = [_check_route_ids(ids, experts) for ids in rows]
        for a, ids in zip(self._affinities, checked):
            a.update_batch(ids.astype(np.int32))


class _HotPlan:
    """Plans from a predictive policy's hot rows ``hot`` (bool [layers, experts], read in
    place)."""

    def __init__(self, hot):
        if not isinstance(hot, np.ndarray):
            raise TypeError(f"hot: expected a numpy bool array, got {type(hot).__name__}")
        if hot.dtype != bool:
            raise TypeError(f"hot: expected dtype bool, got {hot.dtype}")
        if hot.ndim != 2 or hot.shape[0] < 1 or hot.shape[1] < 1:
            raise ValueError(f"hot: expected shape [layers, experts], got {hot.shape}")
        if not hot.flags.c_contiguous:
            raise ValueError("hot: expected a C-contiguous array")
        self._hot = hot
        self._before = np.zeros((2, hot.shape[1]), dtype=bool)
        self._ready = -1

    def check(self, ids) -> None:
        _check_route_ids(ids, self._hot.shape[1])

    def before(self, layer: int) -> None:
        layer = _check_layer(layer, len(self._hot))
        rows = self._hot[layer : layer + 2]
        self._before[: len(rows)] = rows
        self._ready = layer

    def plan(self, layer: int, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        L, E = self._hot.shape
        layer = _check_layer(layer, L)
        if self._ready != layer:
            raise ValueError(
                f"layer: the hot rows before layer {layer} were not taken (before(layer) first)"
            )
        ids = _check_route_ids(ids, E)
        used = np.zeros(E, dtype=bool)
        used[ids.ravel()] = True
        plan = _plan_rows(self._before[0], self._hot[layer], used)
        self._ready = -1
        if layer + 1 == L:
            return (*plan, _EMPTY, _EMPTY)
        ahead = _plan_rows(self._before[1], self._hot[layer + 1], None)
        self.before(layer + 1)
        return (*plan, *ahead)

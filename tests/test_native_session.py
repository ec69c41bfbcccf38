"""The engine session's plan cores (src/session.hpp, _reference/session.py): a demand session
makes DemandCaches.serve's decisions and plans exactly the hot sets' differences, the native
core and its twin agree call for call, the layer affinities update as each layer's own
update_batch would, and bad input changes nothing."""

from __future__ import annotations

import re

import numpy as np
import pytest

from moeray.native import IS_NATIVE, backend, reference
from moeray.policy.affinity import AffinityConfig, ExpertAffinity
from moeray.policy.cache import EvictionPolicy
from moeray.policy.registry import PolicySettings, policy_entry
from moeray.policy.windows import DemandCaches

pytestmark = pytest.mark.pure

L, E, K = 3, 32, 4
DEMAND = ["lru", "lfu", "adaptive", "affinity-lru"]


def stream(seed: int, tokens: int, experts: int = E) -> np.ndarray:
    """Skewed routing [tokens, L, K]: distinct ids per token, low ids most often."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, experts + 1) ** 1.1
    p /= p.sum()
    return np.stack(
        [[rng.choice(experts, K, replace=False, p=p) for _ in range(L)] for _ in range(tokens)]
    ).astype(np.int64)


def demand_caches(policy: str, capacity: int = 6):
    """The registry's ``policy`` over L layers (a DemandCaches) and its affinities."""
    affinities = {layer: ExpertAffinity(AffinityConfig(num_experts=E)) for layer in range(L)}
    caches = policy_entry(policy).build(
        list(range(L)), E, dict.fromkeys(range(L), capacity), affinities, PolicySettings()
    )
    assert isinstance(caches, DemandCaches)
    return caches, affinities


def session_of(caches, affinities, core=backend):
    return core._DemandSession(
        caches._caches, [affinities[layer] for layer in range(L)], caches._blended, caches._weight
    )


def hot_mask(cache) -> np.ndarray:
    mask = np.zeros(E, dtype=bool)
    mask[cache.hot_experts()] = True
    return mask


@pytest.mark.parametrize("policy", DEMAND)
@pytest.mark.parametrize("budget", [0, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_demand_session_serves_as_demand_caches_and_plans_the_difference(policy, budget, batch):
    ids = stream(1, 120)
    expected, _ = demand_caches(policy)
    caches, affinities = demand_caches(policy)
    session = session_of(caches, affinities)
    for first in range(0, len(ids), batch):
        for layer in range(L):
            rows = np.ascontiguousarray(ids[first : first + batch, layer])
            prefetched = expected.serve(layer, rows, budget)
            before = hot_mask(caches._caches[layer])
            load, evict, got = session.route(layer, rows, budget)
            after = hot_mask(caches._caches[layer])
            used = np.zeros(E, dtype=bool)
            used[rows.ravel()] = True
            assert got == prefetched
            np.testing.assert_array_equal(load, np.flatnonzero((used | after) & ~before))
            np.testing.assert_array_equal(evict, np.flatnonzero((before | used) & ~after))
            assert caches._caches[layer].hot_experts() == expected._caches[layer].hot_experts()
    for layer in range(L):
        assert caches.counters(layer) == expected.counters(layer)
        np.testing.assert_array_equal(
            affinities[layer].get_scores(), expected._affinities[layer].get_scores()
        )
    assert sum(c["stalls"] for c in map(caches.counters, range(L))) > 0


@pytest.mark.skipif(not IS_NATIVE, reason="compares the native core with its twin")
@pytest.mark.parametrize("policy", DEMAND)
@pytest.mark.parametrize("experts", [E, 150])  # one word of hot bits, several and a tail
def test_native_demand_session_equals_the_twin(policy, experts):
    ids = stream(2, 80, experts)
    sessions, caches = [], []
    for core in (backend, reference):
        base = (
            EvictionPolicy.LRU
            if policy in ("lru", "affinity-lru")
            else EvictionPolicy[policy.upper()]
        )
        cs = [core.ExpertCacheCore(experts, 5, 0.1, int(base)) for _ in range(L)]
        afs = [core.AffinityCore(experts, 0.95, 1.0, 1.0) for _ in range(L)]
        session = core._DemandSession(cs, afs, policy == "affinity-lru", 0.8)
        sessions.append(session)
        caches.append(cs)
    for t in range(0, len(ids), 3):
        for layer in range(L):
            rows = np.ascontiguousarray(ids[t : t + 3, layer])
            native, twin = (s.route(layer, rows, t % 2) for s in sessions)
            assert native[2] == twin[2]
            for a, b in zip(native[:2], twin[:2]):
                np.testing.assert_array_equal(a, b)
                assert a.dtype == b.dtype == np.int64
    for native_cache, twin_cache in zip(*caches):
        assert native_cache.stats() == twin_cache.stats()
        assert native_cache.hot_experts() == twin_cache.hot_experts()


@pytest.mark.parametrize("core", [backend, reference], ids=["backend", "twin"])
@pytest.mark.parametrize("E", [E, 77, 200])  # whole words, a tail, several masks of 64
def test_hot_plan_plans_the_rows_difference(core, E):
    rng = np.random.default_rng(3)
    hot = np.zeros((L, E), dtype=bool)
    planner = core._HotPlan(hot)
    planner.before(0)
    for _ in range(20):
        for layer in range(L):
            before = hot.copy()
            hot[layer : layer + 2] ^= rng.random((min(2, L - layer), E)) < 0.2  # serve_layer
            ids = rng.integers(0, E, (2, K)).astype(np.int32 if layer % 2 else np.int64)
            used = np.zeros(E, dtype=bool)
            used[ids.ravel()] = True
            load, evict, prefetch, prefetch_evict = planner.plan(layer, ids)
            after = hot[layer]
            np.testing.assert_array_equal(load, np.flatnonzero((used | after) & ~before[layer]))
            np.testing.assert_array_equal(evict, np.flatnonzero((before[layer] | used) & ~after))
            if layer + 1 < L:
                ahead, was = hot[layer + 1], before[layer + 1]
                np.testing.assert_array_equal(prefetch, np.flatnonzero(ahead & ~was))
                np.testing.assert_array_equal(prefetch_evict, np.flatnonzero(was & ~ahead))
            else:
                assert prefetch.size == prefetch_evict.size == 0
        planner.before(0)


@pytest.mark.parametrize("core", [backend, reference], ids=["backend", "twin"])
@pytest.mark.parametrize("E", [64, 77])
def test_hot_plan_of_every_expert(core, E):
    """Plans as long as their buffers: every expert loaded, then every expert evicted (the
    native emit writes up to 2 entries past a plan's last id, into the buffers' slack)."""
    hot = np.zeros((2, E), dtype=bool)
    planner = core._HotPlan(hot)
    every = np.arange(E)
    for filled in (True, False):
        planner.before(0)
        hot[:] = filled
        load, evict, prefetch, prefetch_evict = planner.plan(0, every[None])
        np.testing.assert_array_equal(load, every if filled else [])
        np.testing.assert_array_equal(evict, [] if filled else every)
        np.testing.assert_array_equal(prefetch, every if filled else [])
        np.testing.assert_array_equal(prefetch_evict, [] if filled else every)
        planner.plan(1, every[None])


@pytest.mark.parametrize("core", [backend, reference], ids=["backend", "twin"])
def test_bad_input_changes_nothing(core):
    cs = [core.ExpertCacheCore(E, 5, 0.1, 0) for _ in range(L)]
    afs = [core.AffinityCore(E, 0.95, 1.0, 1.0) for _ in range(L)]
    session = core._DemandSession(cs, afs, False, 0.8)
    session.route(0, np.array([[0, 1, 2, 3]]), 0)
    stats = [c.stats() for c in cs]
    cases = [
        (ValueError, "ids: expected ids in [0, 32), got 32", 0, np.array([[0, 1, 2, 32]])),
        (ValueError, "ids: expected ids in [0, 32), got -1", 0, np.array([[0, -1, 2, 3]])),
        (TypeError, "ids: expected dtype int32 or int64, got float64", 0, np.zeros((1, 4))),
        (TypeError, "ids: expected a numpy int32 or int64 array, got list", 0, [[0, 1, 2, 3]]),
        (ValueError, "ids: expected shape [tokens, top_k]", 0, np.zeros(4, dtype=np.int64)),
        (ValueError, "layer: expected an int in [0, 3), got 3", 3, np.array([[0, 1, 2, 3]])),
    ]
    for exc, message, layer, ids in cases:
        with pytest.raises(exc, match=re.escape(message)):
            session.route(layer, ids, 0)
        if layer == 0:
            with pytest.raises(exc, match=re.escape(message)):
                session.check(ids)
    with pytest.raises(ValueError, match="budget: expected an int >= 0"):
        session.route(0, np.array([[0, 1, 2, 3]]), -1)
    assert [c.stats() for c in cs] == stats
    with pytest.raises(ValueError, match="affinities: expected one per layer"):
        core._DemandSession(cs, afs[:2], False, 0.8)
    with pytest.raises(TypeError, match="caches: expected ExpertCacheCore"):
        core._DemandSession([object()], afs[:1], False, 0.8)
    planner = core._HotPlan(np.zeros((L, E), dtype=bool))
    with pytest.raises(ValueError, match=re.escape("layer: the hot rows before layer 1")):
        planner.plan(1, np.array([[0, 1, 2, 3]]))
    with pytest.raises(TypeError, match="hot: expected dtype bool"):
        core._HotPlan(np.zeros((L, E)))
    with pytest.raises(ValueError, match=re.escape("hot: expected shape [layers, experts]")):
        core._HotPlan(np.zeros(E, dtype=bool))


@pytest.mark.parametrize("core", [backend, reference], ids=["backend", "twin"])
def test_layer_affinities_update_each_layer_as_update_batch(core):
    """One call over every layer's array (int32 or int64, as routed) leaves each affinity as
    its own update_batch would; bad input raises one line and changes nothing."""
    ids = stream(4, 30)
    afs = [core.AffinityCore(E, 0.95, 1.0, 1.0) for _ in range(L)]
    expected = [core.AffinityCore(E, 0.95, 1.0, 1.0) for _ in range(L)]
    layers = core._LayerAffinities(afs)
    for first in range(0, len(ids), 6):
        batch = ids[first : first + 6]
        dtype = np.int32 if first % 12 else np.int64
        layers.update([np.ascontiguousarray(batch[:, layer], dtype=dtype) for layer in range(L)])
        for layer in range(L):
            expected[layer].update_batch(np.ascontiguousarray(batch[:, layer], dtype=np.int32))
    for got, want in zip(afs, expected):
        np.testing.assert_array_equal(got.scores(), want.scores())
        np.testing.assert_array_equal(got.activation_counts(), want.activation_counts())
    scores = [a.scores() for a in afs]
    good = np.array([[0, 1, 2, 3]])
    cases = [
        (ValueError, "rows: expected one array per layer (3), got 2", [good, good]),
        (ValueError, "ids: expected ids in [0, 32), got 32", [good, good, good + 29]),
        (TypeError, "ids: expected dtype int32 or int64, got float64", [good, good, good * 1.0]),
        (TypeError, "rows: expected a list of arrays, one per layer, got tuple", (good,) * 3),
    ]
    for exc, message, rows in cases:
        with pytest.raises(exc, match=re.escape(message)):
            layers.update(rows)
    assert all(np.array_equal(a.scores(), s) for a, s in zip(afs, scores))
    with pytest.raises(ValueError, match="affinities: every layer's must track the same experts"):
        core._LayerAffinities([afs[0], core.AffinityCore(E + 1, 0.95, 1.0, 1.0)])
    with pytest.raises(TypeError, match="affinities: expected AffinityCore objects"):
        core._LayerAffinities([object()])

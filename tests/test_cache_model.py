"""Stateful model test: ``moeray.ExpertCache`` against a plain Python model of the seed semantics.

The model below is written from the seed's ``expert_cache.rs`` and the tie rules of
``moeray/policy/cache.py`` (it does not use ``moeray.native._reference``):
- the hot set is a list in touch order, oldest first; a touch is a hit or an admission;
- ``access`` ticks a logical clock, counts the expert's frequency, and on a hit stamps it,
  moves it to the newest end and spends a prefetch mark; on a miss it admits;
- ``admit`` (no-op when hot) evicts the policy's victim when full and stamps the expert with
  the clock without ticking it;
- LRU evicts the oldest touch; LFU the lowest frequency, the oldest touch among equals;
  ADAPTIVE is LFU when min > 0 and max >= 3 x min over the hot frequencies, else LRU;
- ``evict`` of a hot expert counts an eviction and drops its prefetch mark;
  ``prefetch_admit`` of a hot expert does nothing;
- affinity blends: weight clamped to [0, 1], base policy below 1e-6, else for each hot expert
  (oldest touch first) ``(1 - w) * base + w * (1 - affinity)`` with ``base`` the policy's value
  (timestamp or frequency) normalised to 1 at the minimum and 0 at the maximum (0.5 when all
  equal); the first highest wins;
- ``prefetch_by_affinity`` walks every expert by affinity (highest first, lower id on ties),
  skips hot ones, makes room with a 0.5 blend, and prefetch-admits up to ``budget``.

``CacheMachine`` drives the cache alone; ``AffinityCacheMachine`` adds an ``ExpertAffinity`` the
test updates (the model recomputes its scores: decay all, then ``min(s + boost, max_score)`` per
activated id) and checks the blended victim, ``prefetch_by_affinity`` and the blended
``access_batch``. The core decays lazily (``src/affinity.hpp``), a few ulps from the model's
eager scores: those are compared within 1e-12, every ranking and decision exactly.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from moeray import AffinityConfig, EvictionPolicy, ExpertAffinity, ExpertCache, ExpertCacheConfig

MAX_EXPERTS = 12
THRESHOLD = 0.1


class ModelAffinity:
    def __init__(self, num_experts: int, decay: float, boost: float, max_score: float):
        self.n = num_experts
        self.decay = decay
        self.boost = boost
        self.max_score = max_score
        self.scores = [0.0] * num_experts
        self.counts = [0] * num_experts

    def update(self, activated) -> None:
        self.scores = [s * self.decay for s in self.scores]
        for e in activated:
            if e < self.n:
                self.scores[e] = min(self.scores[e] + self.boost, self.max_score)
                self.counts[e] += 1

    def ranking(self) -> list[int]:
        return sorted(range(self.n), key=lambda e: (-self.scores[e], e))


class ModelCache:
    def __init__(self, num_experts: int, capacity: int, policy: EvictionPolicy):
        self.n = num_experts
        self.cap = capacity
        self.policy = policy
        self.hot: list[int] = []  # oldest touch first
        self.freq = [0] * num_experts
        self.stamp = [0] * num_experts
        self.prefetched = [False] * num_experts
        self.clock = 0
        self.hits = self.misses = self.evictions = self.prefetch_hits = 0

    # --- victim choice ---

    def _skewed(self) -> bool:
        lo = min(self.freq[e] for e in self.hot)
        hi = max(self.freq[e] for e in self.hot)
        return lo > 0 and hi >= 3 * lo

    def _by_frequency(self) -> bool:
        return self.policy == EvictionPolicy.LFU or (
            self.policy == EvictionPolicy.ADAPTIVE and self._skewed()
        )

    def _victim(self) -> int:
        if self._by_frequency():
            lowest = min(self.freq[e] for e in self.hot)
            return next(e for e in self.hot if self.freq[e] == lowest)
        return self.hot[0]

    def suggest_eviction(self):
        return self._victim() if len(self.hot) >= self.cap else None

    def suggest_eviction_with_affinity(self, affinity: ModelAffinity, weight: float):
        if len(self.hot) < self.cap:
            return None
        w = min(max(weight, 0.0), 1.0)
        if w < 1e-6:
            return self._victim()
        value = self.freq if self._by_frequency() else self.stamp
        lo = min(value[e] for e in self.hot)
        hi = max(value[e] for e in self.hot)
        best, best_score = None, -math.inf
        for e in self.hot:
            base = 1.0 - (value[e] - lo) / (hi - lo) if hi > lo else 0.5
            combined = (1.0 - w) * base + w * (1.0 - affinity.scores[e])
            if combined > best_score:
                best, best_score = e, combined
        return best

    # --- state changes ---

    def access(self, e: int) -> bool:
        self.clock += 1
        self.freq[e] += 1
        if e in self.hot:
            self.stamp[e] = self.clock
            self.hot.remove(e)
            self.hot.append(e)
            self.hits += 1
            if self.prefetched[e]:
                self.prefetch_hits += 1
                self.prefetched[e] = False
            return True
        self.misses += 1
        self.admit(e)
        return False

    def admit(self, e: int) -> None:
        if e in self.hot:
            return
        if len(self.hot) >= self.cap:
            self.evict(self._victim())
        self.stamp[e] = self.clock
        self.hot.append(e)

    def evict(self, e: int) -> None:
        if e in self.hot:
            self.hot.remove(e)
            self.evictions += 1
            self.prefetched[e] = False

    def prefetch_admit(self, e: int) -> None:
        if e in self.hot:
            return
        self.prefetched[e] = True
        self.admit(e)

    def should_prefetch(self, e: int, weight: float) -> bool:
        return weight > THRESHOLD and e not in self.hot

    def prefetch_by_affinity(self, affinity: ModelAffinity, budget: int) -> list[int]:
        out: list[int] = []
        if budget == 0:
            return out
        for e in affinity.ranking():
            if len(out) >= budget:
                break
            if e in self.hot:
                continue
            if len(self.hot) >= self.cap:
                self.evict(self.suggest_eviction_with_affinity(affinity, 0.5))
            self.prefetch_admit(e)
            out.append(e)
        return out

    def access_batch(self, ids: np.ndarray, affinity: ModelAffinity | None = None, weight=0.0):
        hits = np.zeros(ids.shape, dtype=bool)
        for t, row in enumerate(ids.tolist()):
            for j, e in enumerate(row):
                if affinity is not None and e not in self.hot and len(self.hot) >= self.cap:
                    self.evict(self.suggest_eviction_with_affinity(affinity, weight))
                hits[t, j] = self.access(e)
            if affinity is not None:
                affinity.update(row)
        return hits

    def reset_stats(self) -> None:
        self.hits = self.misses = self.evictions = self.prefetch_hits = 0


POLICIES = st.sampled_from([EvictionPolicy.LRU, EvictionPolicy.LFU, EvictionPolicy.ADAPTIVE])
WEIGHTS = st.one_of(
    st.sampled_from([-0.5, 0.0, 5e-7, 1e-6, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5]),
    st.floats(0.0, 1.0),
)
ROUTER_WEIGHTS = st.sampled_from([0.0, 0.05, 0.1, 0.1000001, 0.5, 1.0])


class CacheMachine(RuleBasedStateMachine):
    """The cache alone: every public state change, checked against ``ModelCache``."""

    def _make(self, num_experts: int, capacity: int, policy: EvictionPolicy) -> None:
        self.n = num_experts
        config = ExpertCacheConfig(
            max_hot_experts=capacity, prefetch_threshold=THRESHOLD, eviction_policy=policy
        )
        self.cache = ExpertCache(num_experts, config)
        self.model = ModelCache(num_experts, capacity, policy)

    @initialize(data=st.data())
    def init(self, data):
        n = data.draw(st.integers(1, MAX_EXPERTS), label="num_experts")
        capacity = data.draw(st.integers(1, n), label="capacity")
        self._make(n, capacity, data.draw(POLICIES, label="policy"))

    def _expert(self, data) -> int:
        return data.draw(st.integers(0, self.n - 1), label="expert_id")

    def _ids(self, data) -> np.ndarray:
        tokens = data.draw(st.integers(0, 4), label="T")
        top_k = data.draw(st.integers(1, 3), label="top_k")
        return data.draw(
            arrays(np.int32, (tokens, top_k), elements=st.integers(0, self.n - 1)),
            label="expert_ids",
        )

    @rule(data=st.data())
    def access(self, data):
        e = self._expert(data)
        assert self.cache.access(e) == self.model.access(e)

    @rule(data=st.data())
    def admit(self, data):
        e = self._expert(data)
        self.cache.admit(e)
        self.model.admit(e)

    @rule(data=st.data())
    def evict(self, data):
        e = self._expert(data)
        self.cache.evict(e)
        self.model.evict(e)

    @rule(data=st.data())
    def prefetch_admit(self, data):
        e = self._expert(data)
        self.cache.prefetch_admit(e)
        self.model.prefetch_admit(e)

    @rule(data=st.data())
    def access_batch(self, data):
        ids = self._ids(data)
        hits = self.cache.access_batch(ids)
        assert hits.dtype == np.bool_
        assert np.array_equal(hits, self.model.access_batch(ids))

    @rule()
    def reset_stats(self):
        self.cache.reset_stats()
        self.model.reset_stats()

    @rule(data=st.data(), weight=ROUTER_WEIGHTS)
    def should_prefetch(self, data, weight):
        e = self._expert(data)
        assert self.cache.should_prefetch(e, weight) == self.model.should_prefetch(e, weight)

    @rule(data=st.data())
    def out_of_range_id_raises(self, data):
        bad = data.draw(st.sampled_from([-1, self.n, self.n + 5]), label="bad_id")
        method = data.draw(
            st.sampled_from(["access", "admit", "evict", "prefetch_admit", "is_hot"])
        )
        try:
            getattr(self.cache, method)(bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"{method}({bad}) did not raise ValueError")

    @invariant()
    def hot_set_matches(self):
        assert self.cache.hot_experts() == self.model.hot
        assert self.cache.hot_count() == len(self.model.hot)
        assert self.cache.hot_count() <= self.cache.max_hot() == self.model.cap
        for e in range(self.n):
            assert self.cache.is_hot(e) == (e in self.model.hot)

    @invariant()
    def stats_match(self):
        stats = self.cache.stats()
        m = self.model
        assert (stats.hits, stats.misses, stats.evictions, stats.prefetch_hits) == (
            m.hits,
            m.misses,
            m.evictions,
            m.prefetch_hits,
        )
        total = m.hits + m.misses
        assert stats.hit_rate() == (m.hits / total if total else 0.0)

    @invariant()
    def suggest_eviction_matches(self):
        assert self.cache.suggest_eviction() == self.model.suggest_eviction()


class AffinityCacheMachine(CacheMachine):
    """The cache with an ``ExpertAffinity``: blended victims, affinity prefetch, blended batches."""

    @initialize(data=st.data())
    def init(self, data):
        n = data.draw(st.integers(1, MAX_EXPERTS), label="num_experts")
        capacity = data.draw(st.integers(1, n), label="capacity")
        self._make(n, capacity, data.draw(POLICIES, label="policy"))
        decay = data.draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]), label="decay")
        boost = data.draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]), label="boost")
        max_score = data.draw(st.sampled_from([0.5, 1.0, 2.0]), label="max_score")
        self.affinity = ExpertAffinity(
            AffinityConfig(num_experts=n, decay=decay, activation_boost=boost, max_score=max_score)
        )
        self.model_affinity = ModelAffinity(n, decay, boost, max_score)

    @rule(data=st.data())
    def update_affinity(self, data):
        # ids >= num_experts are ignored by the seed's update; include some.
        activated = data.draw(st.lists(st.integers(0, self.n + 2), max_size=4), label="activated")
        self.affinity.update(activated)
        self.model_affinity.update(activated)

    @rule(data=st.data())
    def update_affinity_batch(self, data):
        ids = self._ids(data)
        self.affinity.update_batch(ids)
        for row in ids.tolist():
            self.model_affinity.update(row)

    @rule(weight=WEIGHTS)
    def suggest_eviction_with_affinity(self, weight):
        got = self.cache.suggest_eviction_with_affinity(self.affinity, weight)
        assert got == self.model.suggest_eviction_with_affinity(self.model_affinity, weight)

    @rule(data=st.data())
    def prefetch_by_affinity(self, data):
        budget = data.draw(st.integers(0, self.n + 1), label="budget")
        got = self.cache.prefetch_by_affinity(self.affinity, budget)
        assert list(got) == self.model.prefetch_by_affinity(self.model_affinity, budget)

    @rule(data=st.data(), weight=WEIGHTS)
    def access_batch_with_affinity(self, data, weight):
        ids = self._ids(data)
        hits = self.cache.access_batch(ids, self.affinity, weight)
        assert np.array_equal(hits, self.model.access_batch(ids, self.model_affinity, weight))

    @invariant()
    def affinity_matches(self):
        np.testing.assert_allclose(
            self.affinity.get_scores(), np.array(self.model_affinity.scores), rtol=1e-12, atol=0
        )
        assert np.array_equal(
            self.affinity.get_activation_counts(), np.array(self.model_affinity.counts)
        )
        assert list(self.affinity.top_k_by_affinity(self.n)) == self.model_affinity.ranking()

    @invariant()
    def blended_victims_match(self):
        for weight in (0.0, 1e-6, 0.3, 0.5, 1.0):
            got = self.cache.suggest_eviction_with_affinity(self.affinity, weight)
            assert got == self.model.suggest_eviction_with_affinity(self.model_affinity, weight)


_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestCacheModel = CacheMachine.TestCase
TestCacheModel.settings = _SETTINGS

TestAffinityCacheModel = AffinityCacheMachine.TestCase
TestAffinityCacheModel.settings = _SETTINGS

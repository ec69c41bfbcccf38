"""The ``moeray`` predictive policy (moeray.policy.predict): hand-worked streams, a stream whose
next layer follows deterministically, and the rule that no decision uses routing that has not
happened yet. Expected counts are worked by hand in the comments, not taken from the code."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moeray.policy.predict import PREDICTOR_NAMES, PredictConfig, PredictiveCaches

pytestmark = pytest.mark.pure

# Only the cross-layer predictor, one prefetch per step: decisions easy to work by hand.
CROSS_ONLY = PredictConfig(prefetch_budget=1, previous_weight=0.0, affinity_weight=0.0,
                           keep_previous_weight=0.0, keep_affinity_weight=0.0, prefetch_margin=0.0)


def run(tokens, num_experts, capacity, config=PredictConfig(), seq_offsets=None):
    ids = np.asarray(tokens, dtype=np.int32)
    if ids.ndim == 2:
        ids = ids[:, :, None]  # top-1
    caches = PredictiveCaches(ids.shape[1], num_experts, ids.shape[2], capacity, config)
    return caches.run(ids, seq_offsets)


def test_prefetch_in_time_turns_a_known_transition_into_a_hit():
    """2 layers, top-1, capacity 1; tokens (layer 0, layer 1): (0,2) (1,3) (0,2) (1,3).

    Layer 1: t0 and t1 are first sightings of 0->2 and 1->3: no prediction, two stalls (learning
    from a token's own routing comes after its use, so it cannot help that use). t2: layer 0 says
    0, the table says 2: prefetch 2 (evicting 3) in time -> hit. t3: likewise 3 -> hit.
    Layer 0 has no cross-layer predictor and the others are off: 4 stalls."""
    stats = run([[0, 2], [1, 3], [0, 2], [1, 3]], 4, 1, CROSS_ONLY)
    assert stats.hits.tolist() == [0, 2]
    assert stats.stalls.tolist() == [4, 2]
    assert stats.prefetches.tolist() == [0, 2]
    assert stats.prefetch_hits.tolist() == [0, 2]
    assert stats.wasted_prefetches.tolist() == [0, 0]
    assert stats.transfers.tolist() == [4, 4]


def test_a_wrong_prefetch_is_wasted_when_evicted_unused():
    """Tokens (0,2) (1,3) (0,3), capacity 1. t2: layer 0 says 0, the table says 2: prefetch 2,
    evicting 3. The token uses 3: a stall, whose load evicts 2 before any use -> 1 wasted."""
    stats = run([[0, 2], [1, 3], [0, 3]], 4, 1, CROSS_ONLY)
    assert stats.hits.tolist() == [0, 0]
    assert stats.stalls.tolist() == [3, 3]
    assert stats.prefetches.tolist() == [0, 1]
    assert stats.wasted_prefetches.tolist() == [0, 1]
    assert stats.transfers.tolist() == [3, 4]


def deterministic_stream(tokens=600, layers=4, num_experts=16, top_k=2, seed=0):
    """Layer 0 draws top_k distinct experts at random; layer l+1 = perm[layer l's experts]."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_experts)
    ids = np.empty((tokens, layers, top_k), dtype=np.int32)
    for t in range(tokens):
        ids[t, 0] = rng.choice(num_experts, top_k, replace=False)
        for layer in range(1, layers):
            ids[t, layer] = perm[ids[t, layer - 1]]
    return ids


@pytest.mark.parametrize("config", [PredictConfig(), replace(CROSS_ONLY, prefetch_budget=2,
                                                                prefetch_margin=0.25)],
                         ids=["defaults", "cross-only"])
def test_a_deterministic_next_layer_stops_stalling_after_warm_up(config):
    ids = deterministic_stream()
    caches = PredictiveCaches(4, 16, 2, 4, config)
    caches.run(ids[:200])  # warm-up: every transition seen
    before = caches.stats
    stalls, prefetches, wasted = (before.stalls.copy(), before.prefetches.copy(),
                                  before.wasted_prefetches.copy())
    caches.run(ids[200:])
    after = caches.stats
    uses = 400 * 2
    later_stall_rate = (after.stalls - stalls)[1:] / uses
    assert (later_stall_rate <= 0.01).all(), later_stall_rate
    # Layer 0 is random (4 of 16 hot): it keeps stalling, about 3/4 of the time.
    assert (after.stalls - stalls)[0] / uses > 0.5
    if config.previous_weight == 0:  # prefetches only what the table is sure of: none wasted
        # (each layer-0 expert pairs with both next-layer experts: 1 for its image, a little
        # for the other; the margin keeps those little ones out)
        assert (after.wasted_prefetches - wasted).sum() == 0
        assert ((after.prefetches - prefetches)[1:] > 0).all()
    recall = after.recall()
    assert recall["cross-layer"] > 0.95 and set(recall) == set(PREDICTOR_NAMES)


def test_no_decision_uses_routing_that_has_not_happened_yet():
    """Changing token t's routing at layers >= l changes nothing counted at layers < l up to
    token t; changing later tokens changes nothing up to token t."""
    rng = np.random.default_rng(1)
    layers, num_experts, top_k, tokens = 5, 12, 3, 120
    ids = np.stack([np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(layers)])
                    for _ in range(tokens)]).astype(np.int32)

    def counts(stream, upto):
        caches = PredictiveCaches(layers, num_experts, top_k, 4)
        caches.run(stream[:upto + 1])
        s = caches.stats
        return np.stack([s.hits, s.stalls, s.prefetches, s.wasted_prefetches])

    t = 80
    for layer in (1, 3):
        changed = ids.copy()
        changed[t, layer:] = (changed[t, layer:] + 5) % num_experts
        changed[t + 1:] = (changed[t + 1:] + 7) % num_experts
        np.testing.assert_array_equal(counts(ids, t)[:, :layer], counts(changed, t)[:, :layer])
        assert not np.array_equal(counts(ids, t)[:, layer:], counts(changed, t)[:, layer:])
    changed = ids.copy()
    changed[t + 1:] = rng.integers(0, num_experts, changed[t + 1:].shape)
    np.testing.assert_array_equal(counts(ids, t), counts(changed, t))


def test_a_prefetch_threshold_above_every_probability_turns_prefetch_off():
    ids = deterministic_stream(tokens=150)
    off = run(ids, 16, 4, replace(PredictConfig(), prefetch_threshold=1.0))
    assert off.prefetches.sum() == 0 and off.wasted_prefetches.sum() == 0
    assert (off.transfers == off.stalls).all()
    on = run(ids, 16, 4)
    assert on.stalls[1:].sum() < off.stalls[1:].sum()


def test_hot_sets_never_exceed_capacity_and_counts_add_up():
    ids = deterministic_stream(tokens=300, layers=3, num_experts=10, top_k=3, seed=2)
    caches = PredictiveCaches(3, 10, 3, [3, 5, 10])
    for t in range(len(ids)):
        caches.step(ids[t], new_sequence=t % 50 == 0)
        assert (caches._hot.sum(axis=1) <= caches.capacity).all()
        assert (caches._hot.sum(axis=1) == caches._hot_count).all()
    s = caches.stats
    assert (s.hits + s.stalls == 300 * 3).all()
    assert (s.prefetch_hits <= s.prefetches).all()
    assert (s.prefetch_hits + s.wasted_prefetches <= s.prefetches).all()
    # Full capacity: only each expert's first use can stall.
    assert s.stalls[2] <= 10


def test_config_and_input_errors():
    for kwargs, field in [({"prefetch_budget": -1}, "prefetch_budget"),
                          ({"transition_decay": 1.0}, "transition_decay"),
                          ({"affinity_decay": 0.0}, "affinity_decay"),
                          ({"cross_weight": -0.1}, "cross_weight"),
                          ({"prefetch_margin": 1.5}, "prefetch_margin"),
                          ({"prefetch_threshold": -0.1}, "prefetch_threshold"),
                          ({"victim_affinity_weight": -1.0}, "victim_affinity_weight"),
                          ({"cross_weight": 0.0, "previous_weight": 0.0, "affinity_weight": 0.0},
                           "cross_weight")]:
        with pytest.raises(ValueError, match=field):
            PredictConfig(**kwargs)
    with pytest.raises(ValueError, match="capacity"):
        PredictiveCaches(2, 4, 1, 5)
    with pytest.raises(ValueError, match="capacity"):
        PredictiveCaches(2, 4, 1, [1, 0])
    caches = PredictiveCaches(2, 4, 1, 2)
    with pytest.raises(ValueError, match="ids"):
        caches.step(np.array([[0], [4]]))
    with pytest.raises(ValueError, match="ids"):
        caches.step(np.array([[0, 1], [2, 3]]))
    with pytest.raises(TypeError, match="config"):
        PredictiveCaches(2, 4, 1, 2, config={})

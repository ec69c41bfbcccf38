"""Golden cases of the seed's ``expert_cache.rs`` test module, ported to moeray's public API.

Tests 1 to 26 keep the seed's names, numbers and assertions (made exact where moeray's tie rules
fix an outcome the seed left to its vector order). The last section covers moeray's deliberate
deviations from the seed, documented in ``moeray/policy/cache.py``: prefetch marks die with
their expert, ``prefetch_admit`` of a hot expert marks nothing, ids outside [0, num_experts)
raise ValueError, LFU ties evict the least recently touched, ``hot_experts()`` lists the hot
set oldest touch first.
"""

from __future__ import annotations

import pytest

from moeray import (
    AffinityConfig,
    EvictionPolicy,
    ExpertAffinity,
    ExpertBatch,
    ExpertCache,
    ExpertCacheConfig,
    MoeBatchScheduler,
    NullPrefetcher,
    Prefetcher,
    align_to_cache_line,
    expert_memory_footprint,
)


def make_cache(num_experts: int, max_hot: int, policy: EvictionPolicy) -> ExpertCache:
    config = ExpertCacheConfig(
        max_hot_experts=max_hot, prefetch_threshold=0.1, eviction_policy=policy
    )
    return ExpertCache(num_experts, config)


# ---------------------------------------------------------------
# 1. LRU eviction order is correct
# ---------------------------------------------------------------


def test_lru_eviction_order():
    cache = make_cache(8, 3, EvictionPolicy.LRU)
    cache.access(0)
    cache.access(1)
    cache.access(2)
    assert cache.is_hot(0)
    assert cache.is_hot(1)
    assert cache.is_hot(2)

    # Refresh expert 0, then admit 3: expert 1 is now the oldest.
    cache.access(0)
    cache.access(3)

    assert cache.is_hot(0), "Expert 0 was refreshed, should still be hot"
    assert not cache.is_hot(1), "Expert 1 should have been evicted (LRU)"
    assert cache.is_hot(2), "Expert 2 was accessed after 1, should survive"
    assert cache.is_hot(3), "Expert 3 was just admitted"


# ---------------------------------------------------------------
# 2. LFU eviction order is correct
# ---------------------------------------------------------------


def test_lfu_eviction_order():
    cache = make_cache(8, 3, EvictionPolicy.LFU)
    for _ in range(3):
        cache.access(0)
    cache.access(1)
    cache.access(2)
    cache.access(2)
    # Hot set {0, 1, 2}, frequencies 0->3, 1->1, 2->2.
    assert cache.is_hot(0)
    assert cache.is_hot(1)
    assert cache.is_hot(2)

    cache.access(3)

    assert cache.is_hot(0), "Expert 0 (freq=3) should survive"
    assert not cache.is_hot(1), "Expert 1 (freq=1) should be evicted by LFU"
    assert cache.is_hot(2), "Expert 2 (freq=2) should survive"
    assert cache.is_hot(3), "Expert 3 was just admitted"


# ---------------------------------------------------------------
# 3. Hot set respects max_hot_experts limit
# ---------------------------------------------------------------


def test_hot_set_respects_limit():
    cache = make_cache(16, 4, EvictionPolicy.LRU)
    for i in range(10):
        cache.access(i)
        assert cache.hot_count() <= 4, f"Hot count {cache.hot_count()} exceeds max of 4"
    assert cache.hot_count() == 4
    assert cache.max_hot() == 4


# ---------------------------------------------------------------
# 4. Access returns hit=true for hot experts
# ---------------------------------------------------------------


def test_access_returns_hit_for_hot():
    cache = make_cache(8, 4, EvictionPolicy.LRU)
    assert cache.access(3) is False  # first access is always a miss
    assert cache.access(3) is True
    assert cache.access(3) is True


# ---------------------------------------------------------------
# 5. Access returns hit=false for cold experts
# ---------------------------------------------------------------


def test_access_returns_miss_for_cold():
    cache = make_cache(8, 2, EvictionPolicy.LRU)
    cache.access(0)
    cache.access(1)
    assert cache.access(2) is False  # evicts 0
    assert cache.access(3) is False  # evicts 1
    assert cache.access(0) is False  # 0 and 1 are cold now


# ---------------------------------------------------------------
# 6. Hit rate calculation is correct
# ---------------------------------------------------------------


def test_hit_rate_calculation():
    cache = make_cache(8, 4, EvictionPolicy.LRU)
    assert cache.stats().hit_rate() == 0.0

    cache.access(0)  # miss
    assert cache.stats().hits == 0
    assert cache.stats().misses == 1
    assert cache.stats().hit_rate() == 0.0

    cache.access(0)  # hit
    assert cache.stats().hits == 1
    assert cache.stats().misses == 1
    assert cache.stats().hit_rate() == pytest.approx(0.5)

    cache.access(0)
    cache.access(0)
    # 3 hits, 1 miss => 3/4
    assert cache.stats().hit_rate() == pytest.approx(0.75)


# ---------------------------------------------------------------
# 7. Prefetch threshold works
# ---------------------------------------------------------------


def test_prefetch_threshold():
    config = ExpertCacheConfig(
        max_hot_experts=4, prefetch_threshold=0.15, eviction_policy=EvictionPolicy.LRU
    )
    cache = ExpertCache(8, config)

    assert cache.should_prefetch(0, 0.2)
    assert cache.should_prefetch(0, 0.16)
    assert not cache.should_prefetch(0, 0.15)  # at threshold, not above
    assert not cache.should_prefetch(0, 0.1)
    assert not cache.should_prefetch(0, 0.0)

    cache.access(0)  # hot now: never worth prefetching
    assert not cache.should_prefetch(0, 0.5)


# ---------------------------------------------------------------
# 8. Batch scheduler groups tokens by expert
# ---------------------------------------------------------------


def test_batch_scheduler_groups_by_expert():
    routing = [
        (0, [(2, 0.6), (5, 0.4)]),
        (1, [(5, 0.7), (3, 0.3)]),
        (2, [(2, 0.7), (7, 0.3)]),
    ]
    batches = MoeBatchScheduler.schedule(routing)

    assert len(batches) == 4
    assert [b.expert_id for b in batches] == [2, 3, 5, 7]
    assert all(isinstance(b, ExpertBatch) for b in batches)

    batch_2 = batches[0]
    assert batch_2.expert_id == 2
    assert batch_2.token_indices == [0, 2]
    assert batch_2.weights == [0.6, 0.7]

    batch_3 = batches[1]
    assert batch_3.expert_id == 3
    assert batch_3.token_indices == [1]
    assert batch_3.weights == [0.3]

    batch_5 = batches[2]
    assert batch_5.expert_id == 5
    assert batch_5.token_indices == [0, 1]
    assert batch_5.weights == [0.4, 0.7]

    batch_7 = batches[3]
    assert batch_7.expert_id == 7
    assert batch_7.token_indices == [2]
    assert batch_7.weights == [0.3]


# ---------------------------------------------------------------
# 9. Batch scheduler handles single-token case
# ---------------------------------------------------------------


def test_batch_scheduler_single_token():
    batches = MoeBatchScheduler.schedule([(0, [(4, 0.65), (1, 0.35)])])

    assert len(batches) == 2
    assert batches[0].expert_id == 1
    assert batches[0].token_indices == [0]
    assert batches[0].weights == [0.35]

    assert batches[1].expert_id == 4
    assert batches[1].token_indices == [0]
    assert batches[1].weights == [0.65]


# ---------------------------------------------------------------
# 10. Cache stats accumulate correctly
# ---------------------------------------------------------------


def test_cache_stats_accumulate():
    cache = make_cache(8, 2, EvictionPolicy.LRU)

    cache.access(0)  # miss
    cache.access(1)  # miss
    assert cache.stats().misses == 2
    assert cache.stats().hits == 0
    assert cache.stats().evictions == 0

    cache.access(0)  # hit
    assert cache.stats().hits == 1

    cache.access(2)  # miss, evicts 1 (LRU)
    assert cache.stats().misses == 3
    assert cache.stats().evictions == 1
    assert not cache.is_hot(1)

    cache.access(0)  # hit: 0 is still hot
    assert cache.stats().hits == 2

    cache.reset_stats()
    assert cache.stats().hits == 0
    assert cache.stats().misses == 0
    assert cache.stats().evictions == 0
    assert cache.stats().prefetch_hits == 0
    # reset_stats clears counters only, not the hot set.
    assert cache.hot_experts() == [2, 0]


# ---------------------------------------------------------------
# 11. Eviction happens when hot set is full
# ---------------------------------------------------------------


def test_eviction_when_full():
    cache = make_cache(8, 3, EvictionPolicy.LRU)
    cache.access(0)
    cache.access(1)
    cache.access(2)
    assert cache.hot_count() == 3
    assert cache.stats().evictions == 0

    cache.access(3)
    assert cache.hot_count() == 3
    assert cache.stats().evictions == 1
    assert not cache.is_hot(0), "Expert 0 (oldest) should be evicted"
    assert cache.is_hot(3)


# ---------------------------------------------------------------
# 12. Memory footprint calculation is correct
# ---------------------------------------------------------------


def test_memory_footprint_calculation():
    # 256 x 256, block 256: packed 65536/4 = 16384, scales 256 blocks * 4 = 1024.
    assert expert_memory_footprint(256, 256, 256) == 17408
    # 1 x 4, block 256: packed 1 byte, scales 1 block * 4 = 4.
    assert expert_memory_footprint(1, 4, 256) == 5
    # 11008 x 4096 (a realistic gate_proj), block 256.
    rows, cols = 11008, 4096
    total = rows * cols  # 45088768
    packed = (total + 3) // 4  # 11272192
    blocks = (total + 255) // 256  # 176128
    expected = packed + blocks * 4  # 11976704
    assert expected == 11976704
    assert expert_memory_footprint(rows, cols, 256) == expected


# ---------------------------------------------------------------
# 13. align_to_cache_line works correctly
# ---------------------------------------------------------------


def test_align_to_cache_line():
    assert align_to_cache_line(0) == 0
    assert align_to_cache_line(1) == 64
    assert align_to_cache_line(63) == 64
    assert align_to_cache_line(64) == 64
    assert align_to_cache_line(65) == 128
    assert align_to_cache_line(128) == 128
    assert align_to_cache_line(129) == 192


# ---------------------------------------------------------------
# 14. NullPrefetcher does not panic
# ---------------------------------------------------------------


def test_null_prefetcher_noop():
    prefetcher = NullPrefetcher()
    assert isinstance(prefetcher, Prefetcher)
    data = bytes(1024)

    assert prefetcher.prefetch(data, 0, 64) is None
    assert prefetcher.prefetch(data, 512, 256) is None
    assert prefetcher.prefetch(data, 2000, 100) is None  # offset past the end: still a no-op
    assert prefetcher.prefetch(b"", 0, 0) is None
    assert data == bytes(1024)


# ---------------------------------------------------------------
# 15. Adaptive eviction switches between LRU and LFU
# ---------------------------------------------------------------


def test_adaptive_eviction_policy():
    cache = make_cache(8, 3, EvictionPolicy.ADAPTIVE)
    for _ in range(9):
        cache.access(0)
    for _ in range(3):
        cache.access(1)
    cache.access(2)

    # Frequencies 0->9, 1->3, 2->1: 9 >= 3 * 1 is skewed, so LFU evicts 2
    # (LRU would have evicted 0, the oldest touch).
    cache.access(3)

    assert cache.is_hot(0), "Expert 0 (freq=9) should survive adaptive LFU"
    assert cache.is_hot(1), "Expert 1 (freq=3) should survive adaptive LFU"
    assert not cache.is_hot(2), "Expert 2 (freq=1) should be evicted by adaptive LFU"
    assert cache.is_hot(3), "Expert 3 was just admitted"


# ---------------------------------------------------------------
# 16. Prefetch admit tracks prefetch hits
# ---------------------------------------------------------------


def test_prefetch_admit_tracks_hits():
    cache = make_cache(8, 4, EvictionPolicy.LRU)

    cache.prefetch_admit(5)
    assert cache.is_hot(5)
    assert cache.stats().prefetch_hits == 0

    assert cache.access(5) is True, "Expert 5 is in hot set via prefetch"
    assert cache.stats().prefetch_hits == 1

    cache.access(5)  # the mark is spent
    assert cache.stats().prefetch_hits == 1


# ---------------------------------------------------------------
# 17. Batch scheduler handles empty input
# ---------------------------------------------------------------


def test_batch_scheduler_empty():
    assert MoeBatchScheduler.schedule([]) == []


# ---------------------------------------------------------------
# 18. ExpertCacheConfig default values
# ---------------------------------------------------------------


def test_config_defaults():
    config = ExpertCacheConfig()
    assert config.max_hot_experts == 4
    assert config.prefetch_threshold == pytest.approx(0.1, abs=1e-6)
    assert config.eviction_policy == EvictionPolicy.LRU
    # ExpertCache's default config is this default.
    assert ExpertCache(8).max_hot() == 4
    assert ExpertCache(8).config() == config


# ---------------------------------------------------------------
# 19. suggest_eviction returns None when not full
# ---------------------------------------------------------------


def test_suggest_eviction_none_when_not_full():
    cache = make_cache(8, 4, EvictionPolicy.LRU)
    assert cache.suggest_eviction() is None

    cache.access(0)
    assert cache.suggest_eviction() is None

    cache.access(1)
    cache.access(2)
    assert cache.suggest_eviction() is None

    cache.access(3)  # full now
    assert cache.suggest_eviction() is not None
    assert cache.suggest_eviction() == 0  # the oldest touch


# ---------------------------------------------------------------
# 20. Admit is idempotent for already-hot experts
# ---------------------------------------------------------------


def test_admit_idempotent():
    cache = make_cache(8, 4, EvictionPolicy.LRU)
    cache.admit(0)
    cache.admit(1)
    assert cache.hot_count() == 2

    cache.admit(0)
    cache.admit(1)
    assert cache.hot_count() == 2
    assert cache.hot_experts() == [0, 1]
    # admit is not an access: no hit, miss or eviction is counted.
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.prefetch_hits) == (0, 0, 0, 0)


# ---------------------------------------------------------------
# 21. hot_experts returns current hot set
# ---------------------------------------------------------------


def test_hot_experts_list():
    cache = make_cache(8, 4, EvictionPolicy.LRU)
    cache.access(2)
    cache.access(5)
    cache.access(7)

    hot = cache.hot_experts()
    assert len(hot) == 3
    assert 2 in hot
    assert 5 in hot
    assert 7 in hot
    assert 0 not in hot


# ---------------------------------------------------------------
# 22. Eviction with affinity prefers low affinity experts
# ---------------------------------------------------------------


def test_eviction_with_affinity_prefers_low_affinity():
    cache = make_cache(8, 3, EvictionPolicy.LRU)
    affinity = ExpertAffinity(
        AffinityConfig.with_num_experts(8).with_decay(1.0).with_activation_boost(0.1)
    )
    cache.access(0)
    cache.access(1)
    cache.access(2)

    for _ in range(10):  # expert 0: 10 * 0.1 = 1.0 (at the clamp)
        affinity.update([0])
    affinity.update([2])  # expert 2: 0.1
    for _ in range(5):  # expert 1: 0.5
        affinity.update([1])

    victim = cache.suggest_eviction_with_affinity(affinity, 1.0)
    assert victim == 2, "Should evict lowest affinity expert"


# ---------------------------------------------------------------
# 23. Prefetch by affinity respects budget
# ---------------------------------------------------------------


def test_prefetch_by_affinity_respects_budget():
    config = ExpertCacheConfig(
        max_hot_experts=6, prefetch_threshold=0.1, eviction_policy=EvictionPolicy.LRU
    )
    cache = ExpertCache(8, config)
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(8).with_decay(1.0))
    for _ in range(5):
        affinity.update([3, 5, 7])

    prefetched = cache.prefetch_by_affinity(affinity, 2)

    assert len(prefetched) <= 2, "Should respect budget"
    assert len(prefetched) >= 1, "Should prefetch at least 1 high-affinity expert"
    for expert_id in prefetched:
        assert cache.is_hot(expert_id), "Prefetched expert should be hot"
    # 3, 5 and 7 all sit at max_score 1.0: ties go to the lower id.
    assert prefetched == [3, 5]
    assert cache.hot_experts() == [3, 5]


# ---------------------------------------------------------------
# 24. Prefetch skips already hot experts
# ---------------------------------------------------------------


def test_prefetch_skips_already_hot():
    config = ExpertCacheConfig(
        max_hot_experts=4, prefetch_threshold=0.1, eviction_policy=EvictionPolicy.LRU
    )
    cache = ExpertCache(8, config)
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(8).with_decay(1.0))

    cache.access(3)
    for _ in range(10):
        affinity.update([3])
    for _ in range(5):
        affinity.update([5])

    prefetched = cache.prefetch_by_affinity(affinity, 2)

    assert 3 not in prefetched, "Should not prefetch already-hot expert"
    assert 5 in prefetched, "Should prefetch next highest affinity expert"
    # Ranking 3, 5 (both 1.0), then the zeros by id: 3 is hot, so 5 then 0.
    assert prefetched == [5, 0]
    assert cache.hot_experts() == [3, 5, 0]
    assert cache.stats().evictions == 0


# ---------------------------------------------------------------
# 25. Affinity weighted eviction blends scores correctly
# ---------------------------------------------------------------


def test_affinity_weighted_eviction():
    cache = make_cache(8, 3, EvictionPolicy.LRU)
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(8).with_decay(1.0))
    cache.access(0)
    cache.access(1)
    cache.access(2)
    for _ in range(20):
        affinity.update([0])
    # Experts 1 and 2 have zero affinity.

    assert cache.suggest_eviction_with_affinity(affinity, 0.0) == 0, "Weight 0 should use pure LRU"

    victim_affinity = cache.suggest_eviction_with_affinity(affinity, 1.0)
    assert victim_affinity in (1, 2), "Weight 1.0 should evict lowest affinity"
    # 1 and 2 tie at 1 - 0 = 1.0: the scan keeps the first, oldest touch first.
    assert victim_affinity == 1

    victim_balanced = cache.suggest_eviction_with_affinity(affinity, 0.5)
    assert victim_balanced != 0, "Balanced weight should protect high-affinity expert"
    # LRU base scores 1.0, 0.5, 0.0 -> blends 0.5, 0.75, 0.5.
    assert victim_balanced == 1


# ---------------------------------------------------------------
# 26. Zero affinity weight falls back to base policy
# ---------------------------------------------------------------


def test_zero_affinity_weight_fallback():
    cache = make_cache(8, 3, EvictionPolicy.LFU)
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(8))
    cache.access(0)
    for _ in range(3):
        cache.access(1)
    cache.access(2)
    cache.access(2)

    victim_base = cache.suggest_eviction()
    victim_zero_weight = cache.suggest_eviction_with_affinity(affinity, 0.0)
    assert victim_base == victim_zero_weight, "Zero weight should match base policy"
    assert victim_base == 0, "LFU should evict lowest frequency"


# ===============================================================
# moeray's deliberate deviations from the seed (moeray/policy/cache.py)
# ===============================================================


def test_prefetched_expert_evicted_before_use_is_not_a_prefetch_hit():
    cache = make_cache(8, 2, EvictionPolicy.LRU)
    cache.prefetch_admit(5)
    cache.access(0)  # hot [5, 0]
    cache.access(1)  # evicts 5, the oldest touch, before it was ever used
    assert not cache.is_hot(5)

    assert cache.access(5) is False  # miss: re-admitted on demand
    assert cache.access(5) is True  # hit, but not thanks to the prefetch
    stats = cache.stats()
    assert stats.prefetch_hits == 0  # the seed would count 1 here
    assert (stats.hits, stats.misses, stats.evictions) == (1, 3, 2)


def test_prefetch_admit_of_hot_expert_is_not_a_prefetch_hit():
    cache = make_cache(8, 4, EvictionPolicy.LRU)
    cache.access(3)
    cache.prefetch_admit(3)  # already hot: nothing fetched
    assert cache.hot_count() == 1
    assert cache.access(3) is True
    assert cache.stats().prefetch_hits == 0  # the seed would count 1 here
    assert cache.stats().hits == 1


@pytest.mark.parametrize("bad_id", [8, 9, 1000, -1, -8])
def test_out_of_range_ids_raise(bad_id):
    cache = make_cache(8, 2, EvictionPolicy.LRU)
    cache.access(1)
    for method in (cache.access, cache.admit, cache.evict, cache.is_hot, cache.prefetch_admit):
        with pytest.raises(ValueError):
            method(bad_id)
    with pytest.raises(ValueError):
        cache.should_prefetch(bad_id, 0.9)
    # Nothing changed: still one miss, expert 1 alone in the hot set.
    assert cache.hot_experts() == [1]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.prefetch_hits) == (0, 1, 0, 0)
    assert cache.access(1) is True


def test_lfu_tie_evicts_least_recently_touched():
    cache = make_cache(8, 3, EvictionPolicy.LFU)
    cache.access(2)
    cache.access(0)
    cache.access(1)
    # All at frequency 1: the oldest touch (2) goes, not the lowest id.
    assert cache.suggest_eviction() == 2
    cache.access(3)
    assert cache.hot_experts() == [0, 1, 3]


def test_lfu_tie_follows_touch_order_not_admission_order():
    cache = make_cache(8, 2, EvictionPolicy.LFU)
    cache.access(5)
    cache.access(4)
    cache.access(4)
    cache.access(5)
    # Both at frequency 2; 4 was touched last before 5, so 4 is the least recently touched
    # (the seed's vector order would have picked 5, admitted first).
    assert cache.suggest_eviction() == 4
    cache.access(6)
    assert not cache.is_hot(4)
    assert cache.is_hot(5)
    assert cache.is_hot(6)


def test_lfu_tie_among_lowest_only():
    cache = make_cache(8, 3, EvictionPolicy.LFU)
    cache.access(0)
    cache.access(1)
    cache.access(2)
    cache.access(0)  # frequencies 0->2, 1->1, 2->1
    assert cache.suggest_eviction() == 1
    cache.access(3)
    assert cache.hot_experts() == [2, 0, 3]


def test_adaptive_unskewed_falls_back_to_lru():
    cache = make_cache(8, 3, EvictionPolicy.ADAPTIVE)
    cache.access(0)
    cache.access(0)
    cache.access(1)
    cache.access(2)
    cache.access(1)
    # Frequencies 0->2, 1->2, 2->1: 2 < 3 * 1, not skewed -> LRU evicts 0 (LFU would take 2).
    assert cache.suggest_eviction() == 0
    cache.access(3)
    assert cache.hot_experts() == [2, 1, 3]


def test_hot_experts_oldest_touch_first():
    cache = make_cache(8, 4, EvictionPolicy.LRU)
    cache.access(2)
    cache.access(5)
    cache.access(7)
    assert cache.hot_experts() == [2, 5, 7]
    cache.access(2)  # a hit is a touch
    assert cache.hot_experts() == [5, 7, 2]
    cache.admit(0)  # an admission is a touch
    assert cache.hot_experts() == [5, 7, 2, 0]
    cache.admit(5)  # re-admitting a hot expert is not
    assert cache.hot_experts() == [5, 7, 2, 0]
    cache.access(1)  # evicts 5
    assert cache.hot_experts() == [7, 2, 0, 1]


def test_evict_of_cold_expert_is_a_noop():
    cache = make_cache(8, 2, EvictionPolicy.LRU)
    cache.access(0)
    cache.evict(3)
    assert cache.stats().evictions == 0
    cache.evict(0)
    assert cache.stats().evictions == 1
    assert cache.hot_count() == 0
    cache.evict(0)
    assert cache.stats().evictions == 1

"""Golden cases of ruvllm's ``moe/affinity.rs`` test module, ported to ``moeray.ExpertAffinity``.

Every test of the seed's ``mod tests`` keeps its name and number (the ADR-092 tests 1 to 10 and
the additional ones). moeray's documented differences get their own tests at the end: scores
are float64, ``update`` ignores ids >= num_experts but rejects negative ids, the
``AffinityConfig`` constructor rejects out-of-range values while the ``with_*`` builders clamp,
and ``update_batch`` is exactly one ``update`` per row.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeray import AffinityConfig, ExpertAffinity

# =====================================================================
# Tests following ADR-092 specification
# =====================================================================


# Test 1: Affinity creation initializes all scores to zero
def test_affinity_creation():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(8))

    assert affinity.num_experts() == 8
    assert len(affinity.scores()) == 8
    assert len(affinity.get_scores()) == 8
    assert all(s == 0.0 for s in affinity.scores())
    assert all(c == 0 for c in affinity.get_activation_counts())
    assert affinity.config() == AffinityConfig.with_num_experts(8)


# Test 2: Update decays ALL scores, even those not activated
def test_update_decays_all():
    config = AffinityConfig.with_num_experts(4).with_decay(0.5).with_activation_boost(1.0)
    affinity = ExpertAffinity(config)

    affinity.update([0, 1, 2, 3])
    for score in affinity.scores():
        assert score == pytest.approx(1.0)  # boost clamped to max_score

    affinity.update([0])
    # Expert 0: 1.0 * 0.5 + 1.0 = 1.5 -> clamped to 1.0
    assert affinity.score(0) == pytest.approx(1.0)
    # Experts 1, 2, 3: 1.0 * 0.5 = 0.5 (no boost)
    for expert_id in range(1, 4):
        assert affinity.score(expert_id) == pytest.approx(0.5), (
            f"Expert {expert_id} should decay to 0.5, got {affinity.score(expert_id)}"
        )


# Test 3: Update boosts activated experts
def test_update_boosts_activated():
    config = AffinityConfig.with_num_experts(4).with_decay(0.9).with_activation_boost(0.5)
    affinity = ExpertAffinity(config)

    affinity.update([1, 3])
    # 0.0 * 0.9 + 0.5 = 0.5
    assert affinity.score(1) == pytest.approx(0.5)
    assert affinity.score(3) == pytest.approx(0.5)
    assert affinity.score(0) == 0.0
    assert affinity.score(2) == 0.0


# Test 4: INV-2 Property - Monotonic decay without activations
def test_monotonic_decay():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(8).with_decay(0.95))
    affinity.update([1, 3, 5, 7])
    scores_t0 = affinity.scores().copy()

    for iteration in range(10):
        scores_before = affinity.scores().copy()
        affinity.update([])
        scores_after = affinity.scores()
        for i, (before, after) in enumerate(zip(scores_before, scores_after)):
            assert after <= before, (
                f"INV-2 violated at iteration {iteration}: score[{i}] increased "
                f"from {before} to {after}"
            )

    for i, (t0, current) in enumerate(zip(scores_t0, affinity.scores())):
        if t0 > 0.0:
            assert current < t0, f"Score[{i}] did not decay: {t0} -> {current}"
    # The activated experts did have a score to lose.
    assert [i for i, s in enumerate(scores_t0) if s > 0.0] == [1, 3, 5, 7]


# Test 5: Top-K by affinity returns correct experts in order
def test_top_k_by_affinity():
    config = AffinityConfig.with_num_experts(6).with_decay(1.0).with_activation_boost(0.1)
    affinity = ExpertAffinity(config)

    for _ in range(5):  # expert 3 -> 0.5
        affinity.update([3])
    for _ in range(3):  # expert 1 -> 0.3
        affinity.update([1])
    affinity.update([5])  # expert 5 -> 0.1

    assert affinity.score(3) == pytest.approx(0.5), f"Expert 3 score: {affinity.score(3)}"
    assert affinity.score(1) == pytest.approx(0.3), f"Expert 1 score: {affinity.score(1)}"
    assert affinity.score(5) == pytest.approx(0.1), f"Expert 5 score: {affinity.score(5)}"

    top2 = affinity.top_k_by_affinity(2)
    assert len(top2) == 2
    assert top2[0] == 3, "Expert 3 should be top"
    assert top2[1] == 1, "Expert 1 should be second"

    top4 = affinity.top_k_by_affinity(4)
    assert len(top4) == 4
    assert top4[0] == 3
    assert top4[1] == 1
    assert top4[2] == 5
    assert top4[3] == 0  # the zeros tie: lowest id first

    top10 = affinity.top_k_by_affinity(10)  # more than available
    assert len(top10) == 6
    assert list(top10) == [3, 1, 5, 0, 2, 4]


# Test 6: Score is clamped to max_score (default 1.0)
def test_score_clamped_to_one():
    config = AffinityConfig.with_num_experts(4).with_decay(0.99).with_activation_boost(1.0)
    affinity = ExpertAffinity(config)
    for _ in range(100):
        affinity.update([0])
        assert affinity.score(0) <= 1.0, f"Score {affinity.score(0)} exceeds max_score"

    assert affinity.score(0) == pytest.approx(1.0), (
        f"Score should be clamped to 1.0, got {affinity.score(0)}"
    )
    assert affinity.score(0) <= 1.0


# Test 7: Activation counting tracks total activations
def test_activation_counting():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(4))
    affinity.update([0, 1])
    affinity.update([0, 2])
    affinity.update([0])

    assert affinity.activation_count(0) == 3
    assert affinity.activation_count(1) == 1
    assert affinity.activation_count(2) == 1
    assert affinity.activation_count(3) == 0
    assert affinity.activation_count(100) == 0  # out of range


# Test 8: Reset clears all scores and activation counts
def test_reset():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(4))
    for _ in range(10):
        affinity.update([0, 1, 2, 3])
    assert affinity.score(0) > 0.0
    assert affinity.activation_count(0) > 0

    affinity.reset()

    for score in affinity.scores():
        assert score == 0.0
    for count in affinity.get_activation_counts():
        assert count == 0
    assert affinity.num_experts() == 4


# Test 9: Empty update only decays, no boosts
def test_empty_update():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(4).with_decay(0.9))
    affinity.update([0, 1, 2, 3])
    counts_before = affinity.get_activation_counts().copy()

    affinity.update([])

    assert np.array_equal(affinity.get_activation_counts(), counts_before)
    # 1.0 * 0.9 for everyone, no boost.
    assert affinity.get_scores() == pytest.approx([0.9] * 4)


# Test 10: Multiple updates sequence produces correct state
def test_multiple_updates_sequence():
    config = AffinityConfig.with_num_experts(8).with_decay(0.8).with_activation_boost(0.5)
    affinity = ExpertAffinity(config)

    affinity.update([0, 1, 7])
    assert affinity.score(0) == pytest.approx(0.5)
    assert affinity.score(7) == pytest.approx(0.5)

    affinity.update([0, 1])
    assert affinity.score(0) == pytest.approx(0.9)  # 0.5 * 0.8 + 0.5
    assert affinity.score(7) == pytest.approx(0.4)  # 0.5 * 0.8

    affinity.update([0, 1])
    assert affinity.score(0) == pytest.approx(1.0)  # 0.9 * 0.8 + 0.5 = 1.22 -> 1.0
    assert affinity.score(7) == pytest.approx(0.32)  # 0.4 * 0.8

    top2 = affinity.top_k_by_affinity(2)
    assert 0 in top2
    assert 1 in top2

    assert affinity.activation_count(0) == 3
    assert affinity.activation_count(1) == 3
    assert affinity.activation_count(7) == 1


# =====================================================================
# Additional tests beyond the 10 required
# =====================================================================


# Test: Out-of-bounds expert IDs are silently ignored
def test_out_of_bounds_experts_ignored():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(4))
    affinity.update([0, 1, 100, 200, 3])

    assert affinity.score(0) > 0.0
    assert affinity.score(1) > 0.0
    assert affinity.score(3) > 0.0
    assert affinity.score(2) == 0.0
    assert affinity.activation_count(0) == 1
    assert affinity.activation_count(100) == 0
    assert affinity.score(100) == 0.0
    assert list(affinity.get_activation_counts()) == [1, 1, 0, 1]


# Test: Config builder methods work correctly
def test_config_builders():
    config = (
        AffinityConfig.with_num_experts(16)
        .with_decay(0.95)
        .with_activation_boost(0.75)
        .with_max_score(2.0)
    )
    assert config.num_experts == 16
    assert config.decay == pytest.approx(0.95)
    assert config.activation_boost == pytest.approx(0.75)
    assert config.max_score == pytest.approx(2.0)


# Test: Decay is clamped to [0.0, 1.0]
def test_decay_clamp():
    config = AffinityConfig.with_num_experts(4).with_decay(1.5)
    assert config.decay == 1.0, "Decay should be clamped to 1.0"

    config2 = AffinityConfig.with_num_experts(4).with_decay(-0.5)
    assert config2.decay == 0.0, "Decay should be clamped to 0.0"


# Test: Frequency percentile calculation
def test_frequency_percentile():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(4))
    affinity.update([0])  # expert 0: 1
    for _ in range(5):  # expert 1: 5
        affinity.update([1])
    for _ in range(3):  # expert 2: 3
        affinity.update([2])
    # expert 3: 0

    pct_1 = affinity.frequency_percentile(1)
    pct_3 = affinity.frequency_percentile(3)
    assert pct_1 > pct_3, "Expert 1 should have higher percentile than 3"
    assert pct_1 > 0.5, "Expert 1 should be above median"
    # (lower + 0.5 * equal) / n with counts [1, 5, 3, 0]:
    assert pct_1 == pytest.approx((3 + 0.5) / 4)
    assert pct_3 == pytest.approx((0 + 0.5) / 4)
    assert affinity.frequency_percentile(0) == pytest.approx((1 + 0.5) / 4)
    assert affinity.frequency_percentile(2) == pytest.approx((2 + 0.5) / 4)


# Test: Least affinity from candidates
def test_least_affinity():
    config = AffinityConfig.with_num_experts(4).with_decay(1.0).with_activation_boost(0.1)
    affinity = ExpertAffinity(config)
    for _ in range(5):  # expert 0 -> 0.5
        affinity.update([0])
    for _ in range(2):  # expert 1 -> 0.2
        affinity.update([1])
    affinity.update([2])  # expert 2 -> 0.1

    assert affinity.score(0) == pytest.approx(0.5)
    assert affinity.score(1) == pytest.approx(0.2)
    assert affinity.score(2) == pytest.approx(0.1)

    assert affinity.least_affinity([0, 1, 2]) == 2
    assert affinity.least_affinity([]) is None


# Test: Top-K by frequency
def test_top_k_by_frequency():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(4))
    affinity.update([0])
    affinity.update([1])
    affinity.update([1])
    affinity.update([2])
    affinity.update([2])
    affinity.update([2])

    top_2 = affinity.top_k_by_frequency(2)
    assert len(top_2) == 2
    assert top_2[0] == 2  # 3 activations
    assert top_2[1] == 1  # 2 activations


# Test: Default config values
def test_default_config():
    config = AffinityConfig()
    assert config.num_experts == 8
    assert config.decay == pytest.approx(0.99)
    assert config.activation_boost == pytest.approx(1.0)
    assert config.max_score == pytest.approx(1.0)


# =====================================================================
# moeray's documented differences and additions
# =====================================================================


def test_scores_are_float64_arrays_and_copies():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(3).with_activation_boost(0.5))
    affinity.update([1])
    scores = affinity.get_scores()
    counts = affinity.get_activation_counts()
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64 and scores.shape == (3,)
    assert isinstance(counts, np.ndarray) and counts.dtype == np.int64 and counts.shape == (3,)
    assert np.array_equal(affinity.scores(), scores)
    scores[:] = 9.0
    counts[:] = 9
    assert list(affinity.get_scores()) == [0.0, 0.5, 0.0]
    assert list(affinity.get_activation_counts()) == [0, 1, 0]


def test_scores_keep_float64_precision():
    # 0.1 is not a float32; a float64 score keeps the Python literal exactly.
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(2).with_activation_boost(0.1))
    affinity.update([0])
    assert affinity.score(0) == 0.1
    assert affinity.score(0) != float(np.float32(0.1))


def test_get_score_aliases_score_and_out_of_range_is_zero():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(4).with_activation_boost(0.25))
    affinity.update([2])
    assert affinity.get_score(2) == affinity.score(2) == 0.25
    assert affinity.score(4) == 0.0
    assert affinity.score(-1) == 0.0
    assert affinity.activation_count(-1) == 0


def test_repeated_id_in_one_update_boosts_and_counts_twice():
    affinity = ExpertAffinity(
        AffinityConfig.with_num_experts(3).with_activation_boost(0.25).with_decay(0.5)
    )
    affinity.update([1, 1])
    assert affinity.score(1) == 0.5
    assert affinity.activation_count(1) == 2


def test_update_rejects_negative_ids_without_changing_state():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(4).with_decay(0.5))
    affinity.update([1])
    scores, counts = affinity.get_scores(), affinity.get_activation_counts()
    with pytest.raises(ValueError):
        affinity.update([0, -1])
    with pytest.raises(ValueError):
        affinity.update([-3])
    assert np.array_equal(affinity.get_scores(), scores)
    assert np.array_equal(affinity.get_activation_counts(), counts)


def test_update_ignores_ids_at_or_above_num_experts_but_still_decays():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(4).with_decay(0.5))
    affinity.update([2])
    affinity.update([4, 7])
    assert list(affinity.get_scores()) == [0.0, 0.0, 0.5, 0.0]
    assert list(affinity.get_activation_counts()) == [0, 0, 1, 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": 1.5},
        {"decay": -0.1},
        {"activation_boost": -0.5},
        {"max_score": -1.0},
        {"num_experts": 0},
        {"decay": float("nan")},
    ],
)
def test_constructor_rejects_out_of_range_values(kwargs):
    with pytest.raises(ValueError):
        AffinityConfig(**kwargs)


def test_builders_clamp():
    base = AffinityConfig.with_num_experts(4)
    assert base.with_decay(1.5).decay == 1.0
    assert base.with_decay(-0.5).decay == 0.0
    assert base.with_decay(0.25).decay == 0.25
    assert base.with_activation_boost(-2.0).activation_boost == 0.0
    assert base.with_activation_boost(3.0).activation_boost == 3.0
    assert base.with_max_score(-1.0).max_score == 0.0
    assert base.with_max_score(2.5).max_score == 2.5
    # Builders return new configs and leave the original as it was.
    assert base == AffinityConfig(num_experts=4)


def test_builder_clamped_config_drives_the_tracker():
    # Boost clamped to 0: activations count but never raise a score.
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(2).with_activation_boost(-1.0))
    affinity.update([0])
    assert affinity.score(0) == 0.0
    assert affinity.activation_count(0) == 1
    # max_score clamped to 0: same, through the clamp.
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(2).with_max_score(-1.0))
    affinity.update([1])
    assert affinity.score(1) == 0.0
    # max_score above 1 lets scores pass 1.
    affinity = ExpertAffinity(
        AffinityConfig.with_num_experts(2).with_decay(1.0).with_max_score(2.0)
    )
    affinity.update([0])
    affinity.update([0])
    affinity.update([0])
    assert affinity.score(0) == 2.0


def test_top_k_ties_by_lower_id_and_zero_k():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(5).with_decay(1.0))
    affinity.update([4, 2])
    assert list(affinity.top_k_by_affinity(5)) == [2, 4, 0, 1, 3]
    assert list(affinity.top_k_by_affinity(0)) == []
    affinity.update([3])
    affinity.update([3])
    assert list(affinity.top_k_by_frequency(5)) == [3, 2, 4, 0, 1]
    assert list(affinity.top_k_by_frequency(0)) == []
    with pytest.raises(ValueError):
        affinity.top_k_by_affinity(-1)
    with pytest.raises(ValueError):
        affinity.top_k_by_frequency(-1)


def test_least_affinity_ties_by_lower_id():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(5).with_decay(1.0))
    affinity.update([0])
    assert affinity.least_affinity([4, 0, 3, 1]) == 1
    assert affinity.least_affinity([0]) == 0


def test_update_batch_equals_one_update_per_row():
    rng = np.random.default_rng(1234)
    config = AffinityConfig.with_num_experts(7).with_decay(0.9).with_activation_boost(0.3)
    ids = rng.integers(0, 7, size=(50, 3), dtype=np.int32)
    ids[5] = [2, 2, 2]  # repeated ids within a row

    batched = ExpertAffinity(config)
    batched.update_batch(ids)
    stepped = ExpertAffinity(config)
    for row in ids.tolist():
        stepped.update(row)

    assert np.array_equal(batched.get_scores(), stepped.get_scores())
    assert np.array_equal(batched.get_activation_counts(), stepped.get_activation_counts())
    assert int(batched.get_activation_counts().sum()) == 150


def test_update_batch_continues_from_current_state():
    config = AffinityConfig.with_num_experts(4).with_decay(0.5).with_activation_boost(0.5)
    batched = ExpertAffinity(config)
    stepped = ExpertAffinity(config)
    batched.update([3])
    stepped.update([3])
    ids = np.array([[0, 1], [1, 1], [2, 0]], dtype=np.int32)
    batched.update_batch(ids)
    for row in ids.tolist():
        stepped.update(row)
    assert np.array_equal(batched.get_scores(), stepped.get_scores())
    assert np.array_equal(batched.get_activation_counts(), stepped.get_activation_counts())
    # By hand (max_score 1.0): 0 -> 0.5 -> 0.25 -> 0.125 + 0.5 = 0.625;
    # 1 -> 0.5 -> min(0.25 + 0.5 + 0.5, 1.0) = 1.0 -> 0.5; 2 -> 0.5; 3 -> 0.5 halved 3 times.
    assert list(batched.get_scores()) == [0.625, 0.5, 0.5, 0.0625]
    assert list(batched.get_activation_counts()) == [2, 3, 1, 1]


def test_update_batch_rejects_out_of_range_without_changing_state():
    affinity = ExpertAffinity(AffinityConfig.with_num_experts(4))
    affinity.update([1])
    scores, counts = affinity.get_scores(), affinity.get_activation_counts()
    for bad in ([[0, 4]], [[-1, 0]]):
        with pytest.raises(ValueError):
            affinity.update_batch(np.array(bad, dtype=np.int32))
    with pytest.raises(ValueError):
        affinity.update_batch(np.array([0, 1], dtype=np.int32))  # not [T, top_k]
    assert np.array_equal(affinity.get_scores(), scores)
    assert np.array_equal(affinity.get_activation_counts(), counts)

"""One total capacity re-split across layers (moeray.policy.split): the stack-distance curves
against a real LRU cache, the best split against brute force, gradual moves that keep the total,
and the coordinator's contract (the same plans whatever the window, none from the future)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeray.policy.cache import EvictionPolicy, ExpertCache, ExpertCacheConfig
from moeray.policy.split import CapacitySplit, SplitConfig, SplitPlan, best_split, lru_hit_curves

pytestmark = pytest.mark.pure

# Decay so slow that a few hundred tokens count as undecayed (curves compare to whole counts).
NO_DECAY = SplitConfig(every_tokens=10**6, decay=1 - 1e-12)


def test_hand_stream_stack_distances():
    """One layer, top-1: 0 1 0 2 1 0. Distances: 0 and 1 first seen (no bin); 0: 1 (1 since);
    2 first seen; 1: 2 (0 and 2 since); 0: 2 (2 and 1 since). LRU hits at capacity 1, 2, 3:
    0, 1, 3."""
    split = CapacitySplit(1, 4, 2, NO_DECAY)
    split.observe(np.array([0, 1, 0, 2, 1, 0])[:, None, None])
    np.testing.assert_allclose(split.curves()[0], [0, 0, 1, 3, 3])


def test_curves_give_lru_hits_at_every_capacity():
    rng = np.random.default_rng(0)
    num_experts, top_k, tokens = 12, 3, 400
    # Skewed, with distinct ids per token, two layers with different skews.
    ids = np.stack(
        [
            np.stack(
                [
                    rng.choice(
                        num_experts,
                        top_k,
                        replace=False,
                        p=np.arange(1, num_experts + 1) ** -s
                        / np.sum(np.arange(1, num_experts + 1) ** -s),
                    )
                    for s in (0.5, 1.5)
                ]
            )
            for _ in range(tokens)
        ]
    ).astype(np.int32)
    split = CapacitySplit(2, num_experts, 4, NO_DECAY)
    split.observe(ids)
    curves = split.curves()
    for layer in range(2):
        for capacity in range(1, num_experts + 1):
            cache = ExpertCache(
                num_experts,
                ExpertCacheConfig(max_hot_experts=capacity, eviction_policy=EvictionPolicy.LRU),
            )
            hits = int(cache.access_batch(ids[:, layer]).sum())
            assert curves[layer, capacity] == pytest.approx(hits, abs=1e-6), (layer, capacity)


def test_best_split_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(150):
        layers, num_experts = int(rng.integers(1, 4)), int(rng.integers(1, 6))
        # Any curves, not only concave or increasing ones: the program is exact.
        curves = np.concatenate([np.zeros((layers, 1)), rng.random((layers, num_experts))], axis=1)
        total = int(rng.integers(layers, layers * num_experts + 1))
        got = best_split(curves, total)
        assert got.sum() == total and got.min() >= 1 and got.max() <= num_experts
        best = max(
            sum(curves[layer, c[layer]] for layer in range(layers))
            for c in itertools.product(range(1, num_experts + 1), repeat=layers)
            if sum(c) == total
        )
        assert sum(curves[layer, got[layer]] for layer in range(layers)) == pytest.approx(best)


def test_best_split_keeps_the_preferred_split_among_equals():
    flat = np.zeros((3, 5))
    assert best_split(flat, 7, prefer=[1, 4, 2]).tolist() == [1, 4, 2]
    assert best_split(flat, 6, prefer=[1, 4, 2]).tolist() in ([1, 3, 2], [1, 4, 1])


def narrow_and_wide(tokens=2000, seed=0):
    """Layer 0 picks 2 of 8 experts uniformly (needs all 8 to stop missing); layer 1 always
    uses experts 0 and 1 (needs 2)."""
    rng = np.random.default_rng(seed)
    ids = np.empty((tokens, 2, 2), dtype=np.int32)
    for t in range(tokens):
        ids[t, 0] = rng.choice(8, 2, replace=False)
        ids[t, 1] = (0, 1)
    return ids


def test_capacity_moves_to_where_it_removes_misses_gradually():
    config = SplitConfig(every_tokens=50, max_move=1)
    split = CapacitySplit(2, 8, 5, config)  # total 10: the best split is 8 + 2
    plans = split.observe(narrow_and_wide())
    assert plans, "no re-split"
    assert all(isinstance(p, SplitPlan) and p.token % 50 == 0 for p in plans)
    assert all(p.moved <= 1 and sum(p.capacity) == 10 for p in plans)
    assert plans[-1].capacity == (8, 2)
    assert split.capacity.tolist() == [8, 2] and split.moved == 3
    # One expert per re-split: 5+5 -> 6+4 -> 7+3 -> 8+2 in three re-splits, then no change.
    assert [p.capacity for p in plans] == [(6, 4), (7, 3), (8, 2)]


def test_same_plans_whatever_the_window_and_none_from_the_future():
    ids = narrow_and_wide(600, seed=2)
    config = SplitConfig(every_tokens=32, max_move=2, min_gain=0.0)

    def plans(windows):
        split = CapacitySplit(2, 8, [3, 7], config)
        return [p for w in windows for p in split.observe(w)]

    one_by_one = plans([ids[t] for t in range(len(ids))])  # [L, top_k] per call
    assert one_by_one
    assert plans([ids]) == one_by_one
    assert plans(np.array_split(ids, 7)) == one_by_one
    # Changing tokens t.. changes no plan that applies from t or earlier.
    t = 320
    changed = ids.copy()
    changed[t:] = (changed[t:] + 3) % 8
    early = [p for p in plans([changed]) if p.token <= t]
    assert early == [p for p in one_by_one if p.token <= t]


def test_min_gain_above_any_gain_keeps_the_split():
    split = CapacitySplit(2, 8, 5, SplitConfig(every_tokens=50, min_gain=1.0))
    assert split.observe(narrow_and_wide(500)) == []
    assert split.capacity.tolist() == [5, 5]


def test_lru_hit_curves_of_a_histogram():
    np.testing.assert_allclose(lru_hit_curves([[2.0, 1.0, 0.0]]), [[0, 2, 3, 3]])


def test_errors():
    for kwargs, name in [
        ({"every_tokens": 0}, "every_tokens"),
        ({"decay": 1.0}, "decay"),
        ({"max_move": 0}, "max_move"),
        ({"min_gain": 2.0}, "min_gain"),
    ]:
        with pytest.raises(ValueError, match=name):
            SplitConfig(**kwargs)
    with pytest.raises(ValueError, match="capacity"):
        CapacitySplit(2, 4, [1, 5])
    with pytest.raises(TypeError, match="config"):
        CapacitySplit(2, 4, 2, config={})
    split = CapacitySplit(2, 4, 2)
    with pytest.raises(ValueError, match="ids"):
        split.observe(np.zeros((3, 3, 1), dtype=np.int32))  # 3 layers, not 2
    with pytest.raises(ValueError, match="ids"):
        split.observe(np.full((1, 2, 1), 4))
    with pytest.raises(ValueError, match="ids"):
        split.observe(np.zeros((1, 2, 1)))  # floats
    with pytest.raises(ValueError, match="total"):
        best_split(np.zeros((2, 4)), 7)  # at most 2 x 3


def test_no_layer_below_the_floor():
    rng = np.random.default_rng(3)
    curves = np.concatenate([np.zeros((3, 1)), rng.random((3, 6)).cumsum(axis=1)], axis=1)
    curves[0] = np.linspace(0, 0.01, 7)  # layer 0 barely gains: a floor-free split starves it
    assert best_split(curves, 12)[0] == 1
    got = best_split(curves, 12, min_capacity=3)
    assert got[0] == 3 and got.sum() == 12 and got.min() >= 3
    with pytest.raises(ValueError, match="total"):
        best_split(curves, 8, min_capacity=3)  # below 3 x 3
    # for_model: top_k is the floor, unless a layer starts below it.
    assert CapacitySplit.for_model(2, 8, 4, [6, 5]).min_capacity == 4
    assert CapacitySplit.for_model(2, 8, 4, [6, 2]).min_capacity == 2
    with pytest.raises(ValueError, match="min_capacity"):
        CapacitySplit(2, 8, [6, 2], min_capacity=3)


@pytest.mark.skipif(
    not CapacitySplit._native,
    reason="the native stack distances are not in use (MOERAY_PURE_PYTHON=1 or unbuilt)",
)
def test_native_stack_histogram_equals_the_numpy_twin():
    """The same routing, in windows of varied sizes, into a CapacitySplit on the native core and
    one forced onto numpy: the same histogram to the bit, last uses, plans; decay 0.5 makes the
    scale pass 1e200 (a rescale) after 665 tokens. Some tokens repeat an expert in one routing."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 9, size=(900, 5, 3))
    config = SplitConfig(every_tokens=37, decay=0.5, max_move=2, min_gain=0.0)
    native, twin = CapacitySplit(5, 9, 4, config), CapacitySplit(5, 9, 4, config)
    twin._native = False
    cuts = np.sort(rng.choice(np.arange(1, 900), 40, replace=False))
    plans = [(native.observe(w), twin.observe(w)) for w in np.split(ids, cuts)]
    assert all(a == b for a, b in plans) and any(a for a, _ in plans)
    assert native._histogram.tobytes() == twin._histogram.tobytes()
    assert np.array_equal(native._last, twin._last) and native._accesses == twin._accesses
    assert native._scale == twin._scale and native._scale < 1e200  # rescaled once at least


def test_stack_histogram_checks_its_arguments(core):
    """Both cores' ``_stack_histogram``: the same checks, and the same sums."""
    last = np.full((2, 4), -1, dtype=np.int64)
    hist = np.zeros((2, 4))
    ids = np.zeros((3, 2, 2), dtype=np.int64)
    scales = np.ones(3)
    core._stack_histogram(last, hist, ids, 0, scales)
    # expert 0, six accesses per layer: distance 0 after the first one, each weighing 1
    assert hist.tolist() == [[5.0, 0, 0, 0]] * 2 and last.tolist() == [[5, -1, -1, -1]] * 2
    for args, error, match in (
        ((last, hist, ids + 4, 0, scales), ValueError, r"\[0, 4\)"),
        ((last, hist, ids - 1, 0, scales), ValueError, r"\[0, 4\)"),
        ((last, hist, ids.astype(np.int32), 0, scales), TypeError, "int64"),
        ((last, hist, ids[:, :1], 0, scales), ValueError, "shape"),
        ((last.astype(np.int32), hist, ids, 0, scales), TypeError, "int64"),
        ((np.full((4, 2), -1, dtype=np.int64).T, hist, ids, 0, scales), ValueError, "C-contiguous"),
        ((last, hist[:, :3], ids, 0, scales), ValueError, "histogram"),
        ((last, hist.astype(np.float32), ids, 0, scales), TypeError, "float64"),
        ((last, hist, ids, 0, scales[:2]), ValueError, "scales"),
        ((last, hist, ids, -1, scales), ValueError, "counter"),
        ((last, hist, ids, 2**63 - 2, scales), ValueError, "counter"),
    ):
        with pytest.raises(error, match=match):
            core._stack_histogram(*args)
    frozen = last.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        core._stack_histogram(frozen, hist, ids, 0, scales)


def test_split_schedule_hands_each_window_its_resplits():
    """Plans land in the window of their token, at their offset, after the split in force at
    the window's start; a window cannot run past the tokens observed."""
    from moeray.policy.split import SplitSchedule

    ids = narrow_and_wide(300, seed=4)
    config = SplitConfig(every_tokens=40, max_move=1)
    plans = CapacitySplit(2, 8, 5, config).observe(ids)
    schedule = SplitSchedule(CapacitySplit(2, 8, 5, config))
    schedule.observe(ids[:130])
    with pytest.raises(ValueError, match="observed"):
        schedule.window(131)
    windows = [schedule.window(50), schedule.window(80)]
    schedule.observe(ids[130:])
    windows.append(schedule.window(170))
    assert [w[0] for w in windows] == [(0, (5, 5)), (0, windows[0][-1][1]), (0, windows[1][-1][1])]
    starts = [0, 50, 130]
    got = [
        (start + offset, capacity)
        for start, w in zip(starts, windows)
        for offset, capacity in w[1:]
    ]
    assert got == [(p.token, p.capacity) for p in plans] and got
    assert schedule.capacity == plans[-1].capacity
    assert schedule.moved == sum(p.moved for p in plans)
    assert schedule.capacity_max == tuple(max(5, *(p.capacity[l] for p in plans)) for l in range(2))

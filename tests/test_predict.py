"""The ``moeray`` predictive policy (moeray.policy.predict): hand-worked streams, a stream whose
next layer follows deterministically, and the rule that no decision uses routing that has not
happened yet. Expected counts are worked by hand in the comments, not taken from the code."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moeray.policy.predict import PREDICTOR_NAMES, PredictConfig, PredictiveCaches
from moeray.policy.split import CapacitySplit, SplitConfig

pytestmark = pytest.mark.pure

# Only the cross-layer predictor, one prefetch per step: decisions easy to work by hand.
CROSS_ONLY = PredictConfig(
    prefetch_budget=1,
    previous_weight=0.0,
    affinity_weight=0.0,
    keep_previous_weight=0.0,
    keep_affinity_weight=0.0,
    prefetch_margin=0.0,
)


def run(tokens, num_experts, capacity, config=None, seq_offsets=None):
    config = PredictConfig() if config is None else config
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


@pytest.mark.parametrize(
    "config",
    [PredictConfig(), replace(CROSS_ONLY, prefetch_budget=2, prefetch_margin=0.25)],
    ids=["defaults", "cross-only"],
)
def test_a_deterministic_next_layer_stops_stalling_after_warm_up(config):
    ids = deterministic_stream()
    caches = PredictiveCaches(4, 16, 2, 4, config)
    caches.run(ids[:200])  # warm-up: every transition seen
    before = caches.stats
    stalls, prefetches, wasted = (
        before.stalls.copy(),
        before.prefetches.copy(),
        before.wasted_prefetches.copy(),
    )
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
    # Per layer: the cross-layer table guesses from layer 1 on, affinity everywhere, for each
    # of the 600 tokens' 2 uses; no hints were given.
    uses = after.predictor_uses
    assert uses[PREDICTOR_NAMES.index("cross-layer")].tolist() == [0, 1200, 1200, 1200]
    assert uses[PREDICTOR_NAMES.index("affinity")].tolist() == [1200] * 4
    assert uses[PREDICTOR_NAMES.index("hints")].sum() == 0
    assert (after.predictor_hits <= after.predictor_guesses).all()


@pytest.mark.parametrize(
    "config",
    [
        PredictConfig(),
        replace(PredictConfig(), split=SplitConfig(every_tokens=8, max_move=2, min_gain=0.0)),
    ],
    ids=["fixed", "re-split"],
)
def test_no_decision_uses_routing_that_has_not_happened_yet(config):
    """Changing token t's routing at layers >= l changes nothing counted at layers < l up to
    token t; changing later tokens changes nothing up to token t. With re-split, capacities
    come from earlier tokens of every layer, so the same holds."""
    rng = np.random.default_rng(1)
    layers, num_experts, top_k, tokens = 5, 12, 3, 120
    ids = np.stack(
        [
            np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(layers)])
            for _ in range(tokens)
        ]
    ).astype(np.int32)

    def counts(stream, upto):
        caches = PredictiveCaches(layers, num_experts, top_k, 4, config)
        caches.run(stream[: upto + 1])
        if config.split is not None:
            assert caches.stats.resplit_moved > 0
        s = caches.stats
        return np.stack([s.hits, s.stalls, s.prefetches, s.wasted_prefetches])

    t = 80
    for layer in (1, 3):
        changed = ids.copy()
        changed[t, layer:] = (changed[t, layer:] + 5) % num_experts
        changed[t + 1 :] = (changed[t + 1 :] + 7) % num_experts
        np.testing.assert_array_equal(counts(ids, t)[:, :layer], counts(changed, t)[:, :layer])
        assert not np.array_equal(counts(ids, t)[:, layer:], counts(changed, t)[:, layer:])
    changed = ids.copy()
    changed[t + 1 :] = rng.integers(0, num_experts, changed[t + 1 :].shape)
    np.testing.assert_array_equal(counts(ids, t), counts(changed, t))


def test_a_prefetch_threshold_above_every_probability_turns_prefetch_off():
    ids = deterministic_stream(tokens=150)
    off = run(ids, 16, 4, replace(PredictConfig(), prefetch_threshold=1.0))
    assert off.prefetches.sum() == 0 and off.wasted_prefetches.sum() == 0
    assert (off.transfers == off.stalls).all()
    on = run(ids, 16, 4)
    assert on.stalls[1:].sum() < off.stalls[1:].sum()


def pair_stream(tokens=400, seed=3):
    """Layer 0: a random pair of {0, 1, 2, 3}; layer 1: target A = (4, 5), B = (6, 7) or
    C = (8, 9) by the pair: (0,1) and (2,3) -> A, (0,2) and (1,3) -> B, (0,3) and (1,2) -> C.
    Every expert of layer 0 is in one pair of each target, so alone it says nothing about
    layer 1 (1/3 each); the pair says everything."""
    target = {(0, 1): 4, (2, 3): 4, (0, 2): 6, (1, 3): 6, (0, 3): 8, (1, 2): 8}
    rng = np.random.default_rng(seed)
    pairs = list(target)
    ids = np.empty((tokens, 2, 2), dtype=np.int32)
    for t in range(tokens):
        pair = pairs[rng.integers(len(pairs))]
        ids[t, 0] = pair if rng.random() < 0.5 else pair[::-1]  # order within a pair is noise
        ids[t, 1] = (target[pair], target[pair] + 1)
    return ids


def test_the_pair_table_predicts_what_single_experts_cannot():
    ids = pair_stream()
    stall_rate = {}
    for pairs in (True, False):
        config = replace(CROSS_ONLY, prefetch_budget=2, cross_pairs=pairs)
        caches = PredictiveCaches(2, 10, 2, 2, config)
        caches.run(ids[:100])
        before = caches.stats.stalls[1]
        caches.run(ids[100:])
        stall_rate[pairs] = (caches.stats.stalls[1] - before) / (300 * 2)
    # With pairs, layer 1 knows its target before each token arrives; without, the three
    # targets tie and about 2 in 3 tokens find the wrong pair hot.
    assert stall_rate[True] <= 0.01, stall_rate
    assert stall_rate[False] > 0.4, stall_rate


def test_prefetch_victims_keep_what_the_next_token_wants():
    """Layer 1 cycles A=0, B=1, then X, a random one of 3..9; layer 0 names the same expert,
    so the cross-layer table knows each token's expert exactly (no stalls after warm-up).
    Capacity 2, one prefetch per token. At X's token A and B are hot and this token wants
    neither. Valued by this token alone they tie and the least recently used, A, goes, though
    the next token wants it: 3 transfers a period (X, A, B). Valued also by the next token
    (the previous-token table says A follows X), B goes and A is hit: 2 (X and B), fewer when
    X repeats and is still hot."""
    rng = np.random.default_rng(0)
    seq = np.array([e for _ in range(300) for e in (0, 1, int(rng.integers(3, 10)))])
    ids = np.stack([seq, seq], axis=1)[:, :, None]
    per_period = {}
    for weight in (0.0, 0.7):
        config = replace(CROSS_ONLY, victim_next_weight=weight)
        caches = PredictiveCaches(2, 10, 1, 2, config)
        caches.run(ids[:300])
        before = caches.stats.transfers[1], caches.stats.stalls[1]
        caches.run(ids[300:])
        assert caches.stats.stalls[1] == before[1]
        per_period[weight] = (caches.stats.transfers[1] - before[0]) / 200
    assert per_period[0.0] >= 2.9 and per_period[0.7] <= 2.05, per_period


def test_previous_token_tables_forget_at_their_own_decay():
    """One sequence, 2 layers, top-1, each token the same expert at both layers: 0 is followed
    by 1 for 100 tokens (50 times 0 -> 1), then by 2 for 100 tokens (50 times 0 -> 2).

    After the switch, the previous-token guess after a 0 names 2 once P(2 | 0) overtakes
    P(1 | 0). With previous_decay 0.5 that is from the first 0 -> 2 on: 49 of the 50 guesses
    after a 0 are right. With 0.999 the 50 old 0 -> 1 weigh about 50 x 0.999^100 ~ 45 against
    the new ones, so it takes some 45 of the 50 before the guess turns. The cross-layer tables
    keep transition_decay: their guesses are the same with either previous_decay."""
    phase = lambda e: [x for _ in range(50) for x in (0, e)]  # noqa: E731
    tokens = [[e, e] for e in phase(1) + phase(2)]
    fast = run(tokens, 3, 2, replace(PredictConfig(), previous_decay=0.5))
    slow = run(tokens, 3, 2, replace(PredictConfig(), previous_decay=0.999))
    previous, cross = PREDICTOR_NAMES.index("previous-token"), PREDICTOR_NAMES.index("cross-layer")
    # Both layers see the same stream: per layer, the fast tables are right ~45 more times.
    assert (fast.predictor_hits[previous] - slow.predictor_hits[previous] >= 30).all()
    assert (fast.predictor_hits[cross] == slow.predictor_hits[cross]).all()
    assert (fast.predictor_guesses[cross] == slow.predictor_guesses[cross]).all()


def test_hashed_pair_buckets_stay_in_range(monkeypatch):
    import moeray.policy.predict as predict
    from moeray.native._reference.predict import pair_index

    monkeypatch.setattr(predict, "PAIR_TABLE_ENTRIES", 3 * 12 * 5)  # 5 buckets for 78 pairs
    ids = random_stream(200, 3, 12, 3, seed=4)
    caches = PredictiveCaches(3, 12, 3, 4)
    assert caches._pair_buckets == 5
    index = pair_index(caches._twin(), ids.reshape(-1, 3))
    assert index.min() >= 0 and index.max() < 5 and len(np.unique(index)) == 5
    s = caches.run(ids)
    assert (s.hits + s.stalls == 200 * 3).all()
    assert (caches._hot.sum(axis=1) <= caches.capacity).all()
    # top-1 routing has no pairs: the cross-layer table is the single-expert one
    assert PredictiveCaches(3, 12, 1, 4)._pair_buckets == 0


@pytest.mark.parametrize("capacity", [[3, 5, 10], [1, 2, 3]])
def test_hot_sets_never_exceed_capacity_and_counts_add_up(capacity):
    """Also below top_k (capacity 1 and 2 of a top-3 routing), where a miss finds every hot
    expert already used by this token and must still evict a hot one."""
    ids = deterministic_stream(tokens=300, layers=3, num_experts=10, top_k=3, seed=2)
    caches = PredictiveCaches(3, 10, 3, capacity)
    for t in range(len(ids)):
        caches.step(ids[t], new_sequence=t % 50 == 0)
        assert (caches._hot.sum(axis=1) <= caches.capacity).all()
        assert (caches._hot.sum(axis=1) == caches._hot_count).all()
    s = caches.stats
    assert (s.hits + s.stalls == 300 * 3).all()
    assert (s.prefetch_hits <= s.prefetches).all()
    assert (s.prefetch_hits + s.wasted_prefetches <= s.prefetches).all()
    # every transfer into a full hot set evicted exactly one hot expert
    assert (s.evictions == s.stalls + s.prefetches - caches._hot_count).all()
    if capacity[2] == 10:  # full capacity: only each expert's first use can stall
        assert s.stalls[2] <= 10


def test_a_new_config_applies_from_the_next_token():
    """The layer actors set the budget the coordinator sends: after config's budget becomes 0,
    no expert is prefetched any more (on the native step as on numpy)."""
    ids = deterministic_stream(tokens=200, layers=3, num_experts=10, top_k=2, seed=4)
    caches = PredictiveCaches(3, 10, 2, 4)
    for t in range(100):
        caches.step(ids[t])
    before = caches.stats.prefetches.copy()
    assert before.sum() > 0
    caches.config = replace(caches.config, prefetch_budget=0)
    for t in range(100, 200):
        caches.step(ids[t])
    assert caches.stats.prefetches.tolist() == before.tolist()
    with pytest.raises(TypeError, match="config"):
        caches.config = {"prefetch_budget": 0}


def test_config_and_input_errors():
    for kwargs, field in [
        ({"prefetch_budget": -1}, "prefetch_budget"),
        ({"transition_decay": 1.0}, "transition_decay"),
        ({"previous_decay": 0.0}, "previous_decay"),
        ({"affinity_decay": 0.0}, "affinity_decay"),
        ({"cross_weight": -0.1}, "cross_weight"),
        ({"prefetch_margin": 1.5}, "prefetch_margin"),
        ({"prefetch_threshold": -0.1}, "prefetch_threshold"),
        ({"victim_affinity_weight": -1.0}, "victim_affinity_weight"),
        ({"pair_prior": -1.0}, "pair_prior"),
        ({"cross_pairs": 1}, "cross_pairs"),
        ({"cross_weight": 0.0, "previous_weight": 0.0, "affinity_weight": 0.0}, "cross_weight"),
    ]:
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


# ---------------------------------------------------------------------- engine hints


def random_stream(tokens, layers, num_experts, top_k, seed):
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(layers)])
            for _ in range(tokens)
        ]
    ).astype(np.int32)


def test_truthful_hints_stall_no_more_and_are_reported_right():
    # A stream with some cross-layer structure and noise, where prediction alone stalls.
    ids = deterministic_stream(tokens=400, layers=4, num_experts=16, top_k=2, seed=3)
    noisy = random_stream(400, 4, 16, 2, seed=4)
    mix = np.random.default_rng(5).random((400, 4)) < 0.4
    ids = np.where(mix[:, :, None], noisy, ids)
    plain = PredictiveCaches(4, 16, 2, 4).run(ids)
    hinted = PredictiveCaches(4, 16, 2, 4).run(ids, hints=ids)
    assert hinted.stalls.sum() <= plain.stalls.sum()
    assert hinted.stalls.sum() < 0.5 * plain.stalls.sum()  # they help a lot, not only a little
    assert hinted.recall()["hints"] == 1.0 and hinted.precision()["hints"] == 1.0
    assert plain.predictor_uses[PREDICTOR_NAMES.index("hints")].sum() == 0


def test_no_hint_ids_change_nothing():
    ids = random_stream(200, 3, 10, 2, seed=6)
    plain = PredictiveCaches(3, 10, 2, 3).run(ids)
    empty = PredictiveCaches(3, 10, 2, 3).run(ids, hints=np.full((200, 3, 1), -1))
    for key in ("hits", "stalls", "prefetches", "wasted_prefetches", "predictor_hits"):
        np.testing.assert_array_equal(getattr(plain, key), getattr(empty, key))


def test_noise_hints_keep_the_accounting_and_precision_near_chance():
    ids = random_stream(300, 3, 16, 2, seed=7)
    rng = np.random.default_rng(8)
    hints = rng.integers(-1, 16, (300, 3, 4))
    caches = PredictiveCaches(3, 16, 2, [2, 4, 16])
    for t in range(300):
        caches.step(ids[t], hints=hints[t])
        assert (caches._hot.sum(axis=1) <= caches.capacity).all()
    s = caches.stats
    assert (s.hits + s.stalls == 300 * 2).all()
    assert (s.prefetch_hits + s.wasted_prefetches <= s.prefetches).all()
    assert s.stalls[2] <= 16  # full capacity: first uses only
    # About 3.6 distinct hinted of 16, 2 used: precision near 2/16, recall near 3.6/16.
    assert 0.05 < s.precision()["hints"] < 0.2 and 0.1 < s.recall()["hints"] < 0.35


def test_a_layers_hints_change_only_that_layer():
    ids = random_stream(150, 4, 12, 3, seed=9)
    hints = np.random.default_rng(10).integers(0, 12, (150, 4, 3))
    changed = hints.copy()
    changed[:, 2] = ids[:, 2]  # truthful at layer 2 only
    a = PredictiveCaches(4, 12, 3, 4).run(ids, hints=hints)
    b = PredictiveCaches(4, 12, 3, 4).run(ids, hints=changed)
    for key in ("hits", "stalls", "prefetches", "wasted_prefetches"):
        x, y = getattr(a, key), getattr(b, key)
        np.testing.assert_array_equal(np.delete(x, 2), np.delete(y, 2))
    assert b.stalls[2] < a.stalls[2]


def test_bad_hints_are_clear_errors():
    caches = PredictiveCaches(2, 4, 1, 2)
    ok = np.array([[0], [1]])
    for hints, _what in [
        (np.array([0, 1]), "shape"),
        (np.zeros((3, 1), int), "shape"),
        (np.zeros((2, 0), int), "shape"),
        (np.zeros((2, 1)), "float"),
        (np.array([[0], [4]]), "range"),
        (np.array([[-2], [0]]), "range"),
    ]:
        with pytest.raises(ValueError, match="hints"):
            caches.step(ok, hints=hints)
    with pytest.raises(ValueError, match="hints"):
        caches.run(np.zeros((3, 2, 1), int), hints=np.zeros((2, 2, 1), int))
    before = caches.stats.hits.copy()
    caches.step(ok, hints=np.array([[-1, 3], [1, 1]]))  # -1 and repeats are fine
    assert caches.stats.hits.sum() + caches.stats.stalls.sum() == 2 + before.sum()


# ---------------------------------------------------------------------- re-split

SPLIT = SplitConfig(every_tokens=50, max_move=1)
DEMAND = PredictConfig(prefetch_budget=0)  # decisions easy to follow: a demand cache


def narrow_and_wide(tokens=1500, seed=0):
    """Layer 0 picks 2 of 8 experts uniformly (needs 8 to stop stalling); layer 1 uses 2..7
    in its first three tokens, then always experts 0 and 1 (needs 2)."""
    rng = np.random.default_rng(seed)
    ids = np.empty((tokens, 2, 2), dtype=np.int32)
    for t in range(tokens):
        ids[t, 0] = rng.choice(8, 2, replace=False)
        ids[t, 1] = (2 + 2 * t, 3 + 2 * t) if t < 3 else (0, 1)
    return ids


def test_resplit_moves_capacity_to_the_layer_that_stalls_and_counts_its_cost():
    ids = narrow_and_wide()
    fixed = PredictiveCaches(2, 8, 2, 5, DEMAND).run(ids)
    caches = PredictiveCaches(2, 8, 2, 5, replace(DEMAND, split=SPLIT))
    for t in range(len(ids)):
        caches.step(ids[t])
        assert caches.capacity.sum() == 10
        assert (caches._hot.sum(axis=1) <= caches.capacity).all()
    s = caches.stats
    assert caches.capacity.tolist() == [8, 2]
    assert s.resplit_moved == 3
    # Layer 1 holds 0, 1 and three of 2..7, idle: shrinking 5 -> 2 evicts the three idle
    # ones, never loaded again; layer 1 stalls on its first 8 uses only, either way.
    assert s.resplit_evictions.tolist() == [0, 3] and s.resplit_transfers.tolist() == [0, 0]
    assert s.stalls[1] == fixed.stalls[1] == 8
    # Layer 0 with 8 of 8 hot stops stalling; with 5 of 8 it stalls on ~3/8 of uses.
    assert s.stalls[0] < 0.25 * fixed.stalls[0]
    assert (s.evictions >= s.resplit_evictions).all()


def test_a_coordinator_applying_the_same_split_gets_the_same_decisions():
    """The service's shape: layers run without re-split; a coordinator runs CapacitySplit over
    every layer's routing and sends set_capacity before each plan's first token."""
    ids = deterministic_stream(tokens=500, layers=3, num_experts=10, top_k=2, seed=4)
    ids[::3, 0] = (ids[::3, 0] + 1) % 10  # some drift between layers' needs
    config = SplitConfig(every_tokens=20, max_move=2, min_gain=0.0)
    inside = PredictiveCaches(3, 10, 2, [4, 3, 3], replace(PredictConfig(), split=config))
    inside.run(ids)
    layer_side = PredictiveCaches(3, 10, 2, [4, 3, 3])
    coordinator = CapacitySplit.for_model(3, 10, 2, [4, 3, 3], config)
    plans = {p.token: p for window in np.array_split(ids, 9) for p in coordinator.observe(window)}
    assert plans
    for t in range(len(ids)):
        if t in plans:
            layer_side.set_capacity(plans[t].capacity)
        layer_side.step(ids[t], new_sequence=t == 0)
    a, b = inside.stats, layer_side.stats
    for key in (
        "hits",
        "stalls",
        "prefetches",
        "wasted_prefetches",
        "resplit_evictions",
        "resplit_transfers",
    ):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert a.resplit_evictions.sum() > 0
    np.testing.assert_array_equal(inside.capacity, layer_side.capacity)


def test_set_capacity_errors_and_shrink_evicts_the_least_needed():
    caches = PredictiveCaches(1, 6, 1, 4, DEMAND)
    for e in (0, 1, 2, 3, 0, 0, 0):
        caches.step(np.array([[e]]))
    # Keep score after token 0: half P(next | 0) (0 followed 0 twice, 1 once: 2/3, 1/3, 0, 0)
    # and half affinity (0 highest, then the latest: 3, 2, 1, all below 0.1): keep 0 and 1.
    caches.set_capacity(2)
    assert caches._hot[0].nonzero()[0].tolist() == [0, 1]
    assert caches.stats.resplit_evictions.tolist() == [2]
    caches.step(np.array([[1]]))  # kept: a hit
    caches.step(np.array([[3]]))  # pushed out by the re-split: its reload is counted
    assert caches.stats.resplit_transfers.tolist() == [1]
    assert caches.stats.stalls.tolist() == [5]
    for bad in (0, 7, [2, 2], 1.5):
        with pytest.raises(ValueError, match="capacity"):
            caches.set_capacity(bad)
    with pytest.raises(ValueError, match="split"):
        PredictConfig(split=50)

"""Placement as a specification: the published EPLB maps, the values' invariants, moeray's planner
(budgets kept, every move lowers the forecast peak), dispatch (tokens only on their experts'
replicas, never worse than no dispatch, exact when one expert is replicated), the forecast, and
the replay's rule that a placement is scored only on tokens it never saw."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeray.placement import (
    LoadForecast,
    PlaceConfig,
    Placement,
    PlacementError,
    Topology,
    balancedness,
    dispatch,
    dispatched_gpu_loads,
    place_moeray,
    place_static,
    rebalance_eplb,
    replay_placement,
)
from moeray.traces.trace import Trace

pytestmark = pytest.mark.pure

# --------------------------------------------------------------------------- EPLB


def test_eplb_reproduces_the_published_example():
    # deepseek-ai/EPLB README: the hierarchical policy's map for this load (its printed output).
    weight = [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
    published = [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    placement = rebalance_eplb(weight, 16, 4, 2, 8)
    np.testing.assert_array_equal(placement.physical_to_logical, published)
    expected_counts = np.stack([np.bincount(row, minlength=12) for row in np.array(published)])
    np.testing.assert_array_equal(placement.replica_counts, expected_counts)
    assert placement.topology.num_nodes == 2 and placement.topology.slots_per_gpu == 2


def test_eplb_global_policy_worked_by_hand():
    # groups (1) do not divide over 2 nodes... use the global policy: 1 node, 2 GPUs, 6 slots.
    # Replicas: 40 -> expert 0 twice (20 each), then 33 -> expert 2 twice (16.5 each).
    # Heaviest first onto the lighter GPU with room: 21->g0, 20->g1, 20->g1, 16.5->g0,
    # 16.5->g0 (now full), 10->g1.
    placement = rebalance_eplb([[40, 10, 33, 21]], 6, 1, 1, 2)
    np.testing.assert_array_equal(placement.physical_to_logical, [[3, 2, 2, 0, 0, 1]])
    # 3 groups over 2 nodes do not divide: the global policy, as published
    hierarchical_off = rebalance_eplb([[40, 10, 33, 21, 1, 2]], 8, 3, 2, 2)
    assert hierarchical_off.replica_counts.sum() == 8


def test_eplb_refuses_what_it_cannot_place():
    with pytest.raises(PlacementError, match="num_groups"):
        rebalance_eplb(np.ones((1, 12)), 16, 5, 1, 8)
    with pytest.raises(PlacementError, match="gpus"):
        rebalance_eplb(np.ones((1, 12)), 16, 4, 3, 8)
    with pytest.raises(PlacementError, match="redundant"):
        rebalance_eplb(np.ones((1, 12)), 15, 4, 1, 8)
    with pytest.raises(PlacementError, match="finite"):
        rebalance_eplb([[1.0, float("nan")]], 2, 1, 1, 1)
    with pytest.raises(PlacementError, match=">= 0"):
        rebalance_eplb([[1.0, -1.0]], 2, 1, 1, 1)


# --------------------------------------------------------------------------- values


def test_placement_derives_its_inverse_and_is_read_only():
    topology = Topology.for_experts(4, gpus=2, redundant=2)
    placement = Placement(np.array([[0, 1, 2, 3, 0, 0]]), topology, 4)
    np.testing.assert_array_equal(placement.replica_counts, [[3, 1, 1, 1]])
    np.testing.assert_array_equal(placement.logical_to_physical[0, 0], [0, 4, 5])
    np.testing.assert_array_equal(placement.logical_to_physical[0, 1], [1, -1, -1])
    with pytest.raises(ValueError):
        placement.physical_to_logical[0, 0] = 1
    np.testing.assert_allclose(placement.gpu_loads([[9, 1, 1, 1]]), [[3 + 1 + 1, 1 + 3 + 3]])


def test_placement_refuses_bad_maps_and_topologies():
    topology = Topology.for_experts(4, gpus=2, redundant=2)
    with pytest.raises(PlacementError, match="expert 3 holds no slot"):
        Placement(np.array([[0, 1, 2, 0, 1, 2]]), topology, 4)
    with pytest.raises(PlacementError, match=r"\[0, 4\)"):
        Placement(np.array([[0, 1, 2, 3, 4, 0]]), topology, 4)
    with pytest.raises(PlacementError, match="shape"):
        Placement(np.array([[0, 1, 2, 3]]), topology, 4)
    with pytest.raises(PlacementError, match="cannot hold"):
        Placement(np.zeros((1, 6), dtype=np.int32), topology, 8)
    with pytest.raises(PlacementError, match="divide over 2 nodes"):
        Topology.for_experts(8, gpus=3, nodes=2)
    with pytest.raises(PlacementError, match="budget"):
        Topology(1, 2, 4, gpu_memory_bytes=100, expert_bytes=30)


def test_balancedness_is_mean_over_max():
    np.testing.assert_allclose(
        balancedness([[1, 1, 1, 1], [0, 0, 0, 4], [0, 0, 0, 0]]), [1, 0.25, 1]
    )


# --------------------------------------------------------------------------- planner


def _zipf(rng, layers, experts, skew=1.1):
    load = 1.0 / np.arange(1, experts + 1) ** skew
    return np.stack([rng.permutation(load) for _ in range(layers)]) * 1000


def test_full_placement_spreads_replicas_and_follows_load():
    rng = np.random.default_rng(0)
    load = _zipf(rng, 3, 32)
    topology = Topology.for_experts(32, gpus=8, redundant=16)
    placement, moved = place_moeray(load, topology)
    assert (moved == topology.num_slots).all()
    for layer in range(3):
        hottest = int(np.argmax(load[layer]))
        assert placement.replica_counts[layer, hottest] == placement.replica_counts[layer].max()
        for expert in range(32):  # replicas of one expert on different GPUs while GPUs last
            slots = placement.logical_to_physical[layer, expert]
            gpus = topology.slot_gpu[slots[slots >= 0]]
            assert len(set(gpus.tolist())) == min(len(gpus), topology.num_gpus)
    static = place_static(topology, 3, 32)
    assert (balancedness(placement.gpu_loads(load)) > balancedness(static.gpu_loads(load))).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), budget=st.integers(0, 6), nodes=st.sampled_from([1, 2]))
def test_incremental_keeps_its_budget_and_every_move_lowers_the_peak(seed, budget, nodes):
    rng = np.random.default_rng(seed)
    topology = Topology.for_experts(16, gpus=4, nodes=nodes, redundant=8)
    start, _ = place_moeray(_zipf(rng, 2, 16), topology)
    load = _zipf(rng, 2, 16, skew=1.4)  # the forecast moved
    placement, moved = place_moeray(load, topology, start, migration_budget=budget, min_gain=0)
    np.testing.assert_array_equal(moved, placement.moved_slots(start))
    assert (moved <= budget).all()
    before = start.gpu_loads(load).max(axis=1)
    after = placement.gpu_loads(load).max(axis=1)
    assert (after <= before + 1e-9).all()
    assert ((moved == 0) | (after < before)).all()


def test_incremental_gate_skips_an_unchanged_forecast():
    rng = np.random.default_rng(1)
    load = _zipf(rng, 2, 16)
    topology = Topology.for_experts(16, gpus=4, redundant=8)
    placement, _ = place_moeray(load, topology)
    again, moved = place_moeray(load * 1.001, topology, placement, migration_budget=8)
    assert moved.sum() == 0
    np.testing.assert_array_equal(again.physical_to_logical, placement.physical_to_logical)


def test_incremental_refuses_a_placement_of_another_shape():
    topology = Topology.for_experts(8, gpus=2, redundant=2)
    other = place_static(Topology.for_experts(8, gpus=2, redundant=4), 1, 8)
    with pytest.raises(PlacementError, match="current"):
        place_moeray(np.ones((1, 8)), topology, other)


# --------------------------------------------------------------------------- dispatch


def _first_replica_loads(ids, placement, layer):
    topology = placement.topology
    first = placement.logical_to_physical[layer, ids.ravel(), 0]
    return np.bincount(topology.slot_gpu[first], minlength=topology.num_gpus)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), tokens=st.integers(1, 64))
def test_dispatch_serves_each_token_on_its_experts_replica(seed, tokens):
    rng = np.random.default_rng(seed)
    topology = Topology.for_experts(8, gpus=4, redundant=4)
    placement, _ = place_moeray(_zipf(rng, 1, 8), topology)
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(tokens)]).astype(np.int32)
    weights = rng.random(ids.shape).astype(np.float32)
    batches = dispatch(ids, weights, placement, 0)
    assert batches.offsets[0] == 0 and batches.offsets[-1] == ids.size
    for gpu in range(4):
        part = slice(batches.offsets[gpu], batches.offsets[gpu + 1])
        tokens_here = batches.token_indices[part]
        assert (np.diff(tokens_here) >= 0).all()  # token order within a GPU
        assert (topology.slot_gpu[batches.slot_indices[part]] == gpu).all()
        for t, slot, w in zip(tokens_here, batches.slot_indices[part], batches.weights[part]):
            k = np.flatnonzero(ids[t] == placement.physical_to_logical[0, slot])
            assert len(k) == 1 and weights[t, k[0]] == w
    counts = np.bincount(ids.ravel(), minlength=8)[None, :]
    np.testing.assert_array_equal(batches.loads(), dispatched_gpu_loads(counts, placement)[0])
    assert batches.loads().max() <= _first_replica_loads(ids, placement, 0).max()


@pytest.mark.parametrize("counts", [[5, 3, 0, 9], [1, 0, 0, 0], [7, 7, 7, 7], [0, 12, 2, 1]])
def test_dispatch_is_optimal_when_one_expert_is_replicated(counts):
    # 4 experts on 3 GPUs of 2 slots; expert 1 on GPUs 0, 1 and 2: water-filling it is exact.
    topology = Topology(1, 3, 2)
    placement = Placement(np.array([[0, 1, 2, 1, 3, 1]]), topology, 4)
    loads = dispatched_gpu_loads(np.array([counts]), placement)[0]
    fixed = np.array([counts[0], counts[2], counts[3]])
    best = min(
        max(fixed + np.array(split))
        for split in itertools.product(range(counts[1] + 1), repeat=3)
        if sum(split) == counts[1]
    )
    assert loads.max() == best and loads.sum() == sum(counts)


# --------------------------------------------------------------------------- forecast


def test_forecast_follows_the_horizon_that_erred_least():
    # layer 0 alternates between two loads (the long horizons, near their average, err least);
    # layer 1 jumps once and stays (the shortest horizon follows first and errs least)
    a, b = np.array([8.0, 2.0]), np.array([2.0, 8.0])
    forecast = LoadForecast.start(np.stack([a, a]))
    for w in range(40):
        forecast = forecast.update(np.stack([b if w % 2 == 0 else a, b]))
    np.testing.assert_allclose(forecast.mean[0], [0.5, 0.5], atol=0.1)
    np.testing.assert_allclose(forecast.mean[1], b / b.sum(), atol=1e-3)
    short = forecast.horizons.index(min(forecast.horizons))
    assert np.argmin(forecast.errors[:, 1]) == short
    assert np.argmin(forecast.errors[:, 0]) != short
    assert forecast.windows == 41
    with pytest.raises(PlacementError, match="shape"):
        forecast.update(np.ones((1, 3)))
    with pytest.raises(PlacementError, match="horizons"):
        LoadForecast.start(np.ones((1, 2)), horizons=(0.0,))


# --------------------------------------------------------------------------- replay


def _trace(rng, windows, every, layers=2, experts=16, top_k=2, drift=False):
    rows = []
    for _ in range(windows):
        p = 1.0 / np.arange(1, experts + 1) ** 1.5
        p = p[rng.permutation(experts)] if drift else p
        p /= p.sum()
        rows.append(
            [
                [rng.choice(experts, top_k, replace=False, p=p) for _ in range(layers)]
                for _ in range(every)
            ]
        )
    ids = np.asarray(rows, dtype=np.uint8).reshape(windows * every, layers, top_k)
    return Trace(ids, None, np.array([0, len(ids)], dtype=np.int64), experts, "synthetic")


def test_replay_scores_each_placement_on_the_tokens_after_it():
    rng = np.random.default_rng(3)
    trace = _trace(rng, 4, 256, drift=True)  # every window routes to different hot experts
    config = PlaceConfig(gpus=4, redundant=8, every=256, batch=64, migration_budget=3)
    report = replay_placement(trace, config)
    assert report["windows_scored"] == 3
    algorithms = report["algorithms"]
    assert algorithms["oracle"]["balancedness"]["mean"] > algorithms["eplb"]["balancedness"]["mean"]
    assert algorithms["static"]["rebalances"] == 0
    moeray = algorithms["moeray"]
    assert moeray["served"] == "dispatched"
    assert moeray["slots_moved_per_rebalance"] <= 3 * trace.num_layers
    for entry in algorithms.values():
        for key in ("balancedness", "batch_balancedness"):
            assert 0 < entry[key]["mean"] <= 1 and 0 < entry[key]["p10"] <= 1
        assert len(entry["window_series"]) == 3


def test_replay_needs_two_windows():
    trace = _trace(np.random.default_rng(0), 1, 100)
    with pytest.raises(PlacementError, match="every"):
        replay_placement(trace, PlaceConfig(gpus=4, redundant=8, every=64, batch=64))


def test_dispatch_serves_tokens_on_their_node_first(core):
    # 2 nodes x 2 GPUs; expert 0 on every GPU, the others once. Tokens of node 1 first.
    topology = Topology(2, 2, 2)
    row = np.array([0, 1, 0, 2, 0, 3, 0, 4], dtype=np.int32)
    rng = np.random.default_rng(5)
    ids = np.stack([[0, rng.integers(1, 5)] for _ in range(40)]).astype(np.int32)
    weights = np.ones(ids.shape, dtype=np.float32)
    nodes = np.repeat(np.array([1, 0], dtype=np.int32), 20)
    plain = core.dispatch(ids, weights, row, 4, 5)
    local = core.dispatch(ids, weights, row, 4, 5, nodes, 2)
    np.testing.assert_array_equal(np.diff(plain[0]), np.diff(local[0]))  # the same loads

    def crossing(result):
        offsets, tokens, slots, _ = result
        node_of_entry = topology.slot_node[slots]
        return int((node_of_entry != nodes[tokens]).sum())

    assert crossing(local) < crossing(plain)
    for g in range(4):  # token order within each GPU still
        assert (np.diff(local[1][local[0][g] : local[0][g + 1]]) >= 0).all()
    with pytest.raises(ValueError, match="token_nodes"):
        core.dispatch(ids, weights, row, 4, 5, np.full(40, 2, dtype=np.int32), 2)
    with pytest.raises(ValueError, match="gpus_per_node"):
        core.dispatch(ids, weights, row, 4, 5, nodes, 3)
    placement = Placement(row[None], topology, 5)
    batches = dispatch(ids, weights, placement, 0, token_nodes=nodes)
    np.testing.assert_array_equal(batches.slot_indices, local[2])
    with pytest.raises(PlacementError, match="token_nodes"):
        dispatch(ids, weights, placement, 0, token_nodes=nodes[:3])

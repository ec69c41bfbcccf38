"""Shared redundant budgets: placements with empty slots (-1) through every consumer, the
allocator that splits one budget over the layers, and their bad input.

Parity: the kernels that read empty slots (``_improve``, ``_dispatch_allocation``, ``dispatch``)
decide alike in the C++ core and the twin (skipped unless the native core is in use); every
other test runs on whichever core is in use, so ``MOERAY_PURE_PYTHON=1`` runs them on the twin.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

import moeray.native
from moeray.native import backend
from moeray.placement import (
    Placement,
    PlacementError,
    Topology,
    balancedness,
    dispatch,
    dispatched_gpu_loads,
    place_moeray,
    read_map,
    write_map,
)
from moeray.placement.balancer import (
    LoadBalancer,
    PlacementConfig,
    decode_placement,
    encode_placement,
)
from moeray.placement.planner import _packed, allocate_redundant

pytestmark = pytest.mark.pure

E = 8  # experts
SHARED = Topology(1, 4, 4, redundant_budget=6)  # 16 slots per layer, 6 redundant in all
# two layers: layer 0 fills 12 slots (4 redundant), layer 1 fills 10 (2 redundant)
TABLE = np.array(
    [
        [0, 1, 0, -1, 2, 3, 1, -1, 4, 5, 2, -1, 6, 7, 3, -1],
        [0, 1, -1, -1, 2, 3, 0, -1, 4, 5, -1, -1, 6, 7, 1, -1],
    ],
    dtype=np.int32,
)


@pytest.fixture(scope="module")
def pair():
    """(native core, twin); skips unless the native core is the one in use."""
    if not moeray.native.IS_NATIVE:
        pytest.skip("the native core is not in use (MOERAY_PURE_PYTHON=1 or unbuilt)")
    return importlib.import_module("moeray.native._core"), moeray.native.reference


def with_empties(rng: np.random.Generator, rows: int, n: int, num_slots: int) -> np.ndarray:
    """int32 [rows, num_slots]: every expert at least once, some slots replicas, some empty."""
    out = np.empty((rows, num_slots), dtype=np.int32)
    for x in range(rows):
        empty = int(rng.integers(0, num_slots - n + 1))
        row = np.concatenate(
            [np.arange(n), rng.integers(0, n, num_slots - n - empty), np.full(empty, -1)]
        )
        out[x] = rng.permutation(row)
    return out


def even_loads(table: np.ndarray, load: np.ndarray, num_gpus: int) -> np.ndarray:
    """float64 [rows, gpus]: each expert's load split evenly over its replicas, by hand."""
    rows, num_slots = table.shape
    out = np.zeros((rows, num_gpus))
    for x in range(rows):
        counts = np.bincount(table[x][table[x] >= 0], minlength=load.shape[1])
        for s, e in enumerate(table[x]):
            if e >= 0:
                out[x, s // (num_slots // num_gpus)] += load[x, e] / counts[e]
    return out


# --------------------------------------------------------------------------- the value


def test_a_placement_with_empty_slots_derives_its_maps():
    placement = Placement(TABLE, SHARED, E)
    np.testing.assert_array_equal(placement.redundant, [4, 2])
    counts = placement.replica_counts
    assert counts.tolist() == [[2, 2, 2, 2, 1, 1, 1, 1], [2, 2, 1, 1, 1, 1, 1, 1]]
    inverse = placement.logical_to_physical
    assert inverse.shape == (2, E, 2)
    assert inverse[0, 0].tolist() == [0, 2] and inverse[0, 3].tolist() == [5, 14]
    assert inverse[1, 1].tolist() == [1, 14] and inverse[1, 7].tolist() == [13, -1]
    for layer in range(2):  # every filled slot appears once in the inverse, no empty one
        listed = inverse[layer][inverse[layer] >= 0]
        assert sorted(listed.tolist()) == np.flatnonzero(TABLE[layer] >= 0).tolist()
    load = np.arange(1, 2 * E + 1, dtype=np.float64).reshape(2, E)
    np.testing.assert_allclose(placement.gpu_loads(load), even_loads(TABLE, load, 4))
    assert placement.gpu_loads(load).sum() == pytest.approx(load.sum())


def test_moved_slots_count_copies_not_emptied_slots():
    before = Placement(TABLE, SHARED, E)
    table = TABLE.copy()
    table[0, 3], table[0, 2] = 0, -1  # expert 0 moves from slot 2 to slot 3: one copy
    table[1, 2] = 4  # an empty slot filled: one copy
    table[1, 6] = -1  # a replica dropped: no copy
    after = Placement(table, SHARED, E)
    assert after.moved_slots(before).tolist() == [1, 1]


def test_empty_slots_need_a_shared_budget():
    fixed = Topology(1, 4, 4)
    with pytest.raises(PlacementError, match=r"got -1 \(-1, empty, only under a shared"):
        Placement(TABLE, fixed, E)


def test_an_expert_without_a_replica_is_refused():
    table = TABLE.copy()
    table[1, 13] = -1  # expert 7's only slot of layer 1
    with pytest.raises(PlacementError, match="expert 7 holds no slot in layer 1"):
        Placement(table, SHARED, E)


def test_a_placement_over_the_budget_is_refused():
    tight = Topology(1, 4, 4, redundant_budget=5)
    with pytest.raises(PlacementError, match="6 redundant slots filled over 2 layers, more than"):
        Placement(TABLE, tight, E)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"redundant_budget": -1}, "redundant_budget"),
        ({"redundant_budget": 2.5}, "redundant_budget"),
    ],
)
def test_a_bad_budget_is_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message) as info:
        Topology(1, 4, 4, **kwargs)
    assert "\n" not in str(info.value)


def test_shared_topology_holds_the_fixed_memory():
    fixed = Topology.for_experts(64, 8, 1, 16)
    shared = Topology.shared(64, 8, 26, redundant=16)
    assert shared.redundant_budget == 26 * 16
    assert shared.num_slots == fixed.num_slots + 16  # room to double a layer's share
    assert Topology.shared(64, 8, 26, redundant=16, headroom=0).num_slots == fixed.num_slots
    with pytest.raises(ValueError, match="num_layers"):
        Topology.shared(64, 8, 0, redundant=16)


# --------------------------------------------------------------------------- the allocator


def test_the_more_skewed_layer_gets_more_replicas():
    load = np.ones((2, 16))
    load[1, :2] = 20.0  # layer 1: two hot experts
    topology = Topology.shared(16, 4, 2, redundant=8)
    counts = allocate_redundant(load, topology)
    assert counts[1] > counts[0]
    assert counts.sum() <= topology.redundant_budget
    uniform_first = allocate_redundant(load[::-1], topology)
    assert uniform_first[0] > uniform_first[1]  # the layer, not its index


@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_stays_within_the_budget_and_the_grid(seed):
    rng = np.random.default_rng(seed)
    layers, experts, gpus = int(rng.integers(1, 7)), int(rng.integers(2, 20)), 4
    load = rng.gamma(0.5, size=(layers, experts)) * (rng.random((layers, 1)) < 0.8)
    topology = Topology.shared(experts, gpus, layers, redundant=None)
    for budget in (0, 1, 5, topology.redundant_budget, 10**6):
        counts = allocate_redundant(load, topology, budget)
        assert counts.dtype == np.int64 and counts.shape == (layers,)
        assert counts.sum() <= budget
        assert counts.min() >= 0 and counts.max() <= topology.num_slots - experts


def test_an_allocation_of_ties_is_weighed_per_slot():
    """Eight tied hot experts need eight slots before layer 0's bound falls; layer 1's one
    mildly hot expert needs one, which buys more per slot: given first, then the eight whole."""
    load = np.ones((2, 16))
    load[0, :8] = 10.0
    load[1, 0] = 2.0
    topology = Topology(1, 4, 8, redundant_budget=9)
    assert allocate_redundant(load, topology).tolist() == [8, 1]
    # with one slot fewer the eight do not fit whole: layer 1's slot first, the rest after
    assert allocate_redundant(load, topology, 8).tolist() == [7, 1]
    assert allocate_redundant(load, topology, 1).tolist() == [0, 1]


def test_allocator_bad_input_is_one_line():
    topology = Topology.shared(8, 4, 2, redundant=8)
    load = np.ones((2, 8))
    for bad, message in (
        (-1, "budget"),
        (None, "budget: expected a redundant-slot budget"),
    ):
        target = Topology(1, 4, 4) if bad is None else topology
        with pytest.raises(ValueError, match=message) as info:
            allocate_redundant(load, target, bad)
        assert "\n" not in str(info.value)
    with pytest.raises(PlacementError, match="load: every load must be finite"):
        allocate_redundant(np.full((2, 8), np.nan), topology)


# --------------------------------------------------------------------------- the planner


def test_place_moeray_splits_the_budget_and_keeps_it_when_incremental():
    rng = np.random.default_rng(3)
    layers, experts = 4, 16
    load = rng.gamma(0.6, size=(layers, experts))
    load[2] *= np.linspace(6, 1, experts)  # one layer far more skewed
    topology = Topology.shared(experts, 4, layers, redundant=8)
    placement, moved = place_moeray(load, topology)
    table = placement.physical_to_logical
    assert (table < 0).any()
    assert placement.redundant.sum() <= topology.redundant_budget
    np.testing.assert_array_equal(placement.redundant, allocate_redundant(load, topology))
    np.testing.assert_array_equal(moved, (table >= 0).sum(axis=1))
    packed = _packed(load.astype(np.float32), topology, experts + 5)  # before the polish
    filled_per_gpu = (packed >= 0).reshape(layers, 4, -1).sum(-1)
    assert (filled_per_gpu <= 6).all() and (filled_per_gpu.sum(1) == 21).all()  # ceil(21 / 4)
    shifted = load * rng.lognormal(0, 0.7, load.shape)
    again, moved_again = place_moeray(shifted, topology, placement, 6)
    np.testing.assert_array_equal(again.redundant, placement.redundant)  # counts kept
    np.testing.assert_array_equal(moved_again, again.moved_slots(placement))
    assert (moved_again <= 6).all()
    before = balancedness(placement.gpu_loads(shifted))
    assert (balancedness(again.gpu_loads(shifted)) >= before - 1e-12).all()


def test_improve_moves_an_expert_into_an_empty_slot_for_one_copy():
    """GPU 0 holds the hot expert twice and GPU 1 has an empty slot: one move, one copy."""
    slots = np.array([[0, 0, 1, -1, 2, 3, 4, 5]], dtype=np.int32)
    load = np.array([[8.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    moved = backend._improve(slots, load, 4, 4, 1, 8, 0.0, 1.0)
    assert moved.tolist() == [1]
    assert (slots >= 0).sum() == 7  # filled slots unchanged
    assert np.bincount(slots[0][slots[0] >= 0], minlength=6)[0] == 2
    gpus = [{int(e) for e in slots[0][2 * g : 2 * g + 2] if e >= 0} for g in range(4)]
    assert sum(0 in held for held in gpus) == 2  # the hot expert now spans two GPUs


# --------------------------------------------------------------------------- dispatch


def test_dispatch_serves_nothing_from_empty_slots():
    placement = Placement(TABLE, SHARED, E)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, E, (64, 2)).astype(np.int32)
    weights = rng.random(ids.shape).astype(np.float32)
    for layer in range(2):
        batches = dispatch(ids, weights, placement, layer)
        assert batches.offsets[-1] == ids.size
        row = TABLE[layer]
        assert (row[batches.slot_indices] >= 0).all()
        for g in range(4):
            served = slice(batches.offsets[g], batches.offsets[g + 1])
            tokens, slots = batches.token_indices[served], batches.slot_indices[served]
            assert (slots // 4 == g).all()
            experts = row[slots]
            assert all(e in ids[t] for t, e in zip(tokens, experts))
    counts = np.stack([np.bincount(ids.ravel(), minlength=E)] * 2).astype(np.int64)
    loads = dispatched_gpu_loads(counts, placement)
    assert (loads.sum(axis=1) == ids.size).all()


@pytest.mark.parametrize("seed", range(10))
def test_kernels_with_empty_slots_decide_alike(pair, seed):
    native, reference = pair
    rng = np.random.default_rng([16, seed])
    for _ in range(4):
        num_gpus = int(rng.choice([1, 2, 4, 8]))
        num_slots = num_gpus * int(rng.integers(2, 6))
        n = int(rng.integers(1, num_slots))
        rows = int(rng.integers(1, 4))
        slots = with_empties(rng, rows, n, num_slots)
        load = rng.gamma(0.5, size=(rows, n)) * 10
        per_node = int(rng.choice([g for g in (1, 2, 4) if num_gpus % g == 0]))
        budget = int(rng.choice([0, 1, 3, 8, 40]))
        node_cost = float(rng.choice([1.0, 2.0]))
        args = (num_gpus, per_node, budget, int(rng.choice([1, 3, 8])), 0.0, node_cost)
        got, want = slots.copy(), slots.copy()
        moved = native._improve(got, load, *args)
        np.testing.assert_array_equal(moved, reference._improve(want, load, *args))
        np.testing.assert_array_equal(got, want)
        assert ((got >= 0).sum(axis=1) == (slots >= 0).sum(axis=1)).all()
        assert (moved <= budget).all()
        for x in range(rows):
            assert set(got[x][got[x] >= 0].tolist()) == set(range(n))
        peak_before = even_loads(slots, load, num_gpus).max(axis=1)
        assert (even_loads(got, load, num_gpus).max(axis=1) <= peak_before + 1e-9).all()
        row = got[0]
        ids = rng.integers(0, n, (int(rng.choice([0, 5, 50])), 2)).astype(np.int32)
        weights = rng.random(ids.shape).astype(np.float32)
        nodes = rng.integers(0, num_gpus // per_node, ids.shape[0]).astype(np.int32)
        for extra in ((), (nodes, per_node)):
            out = native.dispatch(ids, weights, row, num_gpus, n, *extra)
            expected = reference.dispatch(ids, weights, row, num_gpus, n, *extra)
            for a, b in zip(out, expected):
                np.testing.assert_array_equal(a, b)
            assert (row[out[2]] >= 0).all()
        counts = rng.integers(0, 100, n).astype(np.int64)
        alloc = native._dispatch_allocation(counts, row, num_gpus)
        np.testing.assert_array_equal(alloc, reference._dispatch_allocation(counts, row, num_gpus))
        assert (alloc[row < 0] == 0).all()
        assert np.bincount(row[row >= 0], weights=alloc[row >= 0], minlength=n).tolist() == (
            counts.tolist()
        )


@pytest.mark.parametrize("core", ["native", "reference"])
def test_kernels_refuse_slots_below_empty(core):
    if core == "native" and not moeray.native.IS_NATIVE:
        pytest.skip("the native core is not in use")
    impl = (
        importlib.import_module("moeray.native._core")
        if core == "native"
        else moeray.native.reference
    )
    row = np.array([0, 1, -2, 2], dtype=np.int32)
    with pytest.raises(ValueError, match=r"slots: every slot must hold an expert in \[0, 3\)"):
        impl._dispatch_allocation(np.ones(3, np.int64), row, 2)
    with pytest.raises(ValueError, match=r"slots: every slot must hold an expert in \[0, 3\)"):
        impl._improve(row[None].copy(), np.ones((1, 3)), 2, 1, 1, 1, 0.0, 1.0)


# --------------------------------------------------------------------------- engines


def test_filling_empty_slots_with_a_gpu_local_expert_moves_no_load():
    # every GPU with an empty slot holds an expert whose every replica is there
    table = np.array(
        [
            [0, 1, 0, -1, 2, 3, 2, -1, 4, 5, 1, -1, 6, 7, -1, -1],
            [0, 1, -1, -1, 2, 3, -1, -1, 4, 5, 6, -1, 7, 6, -1, -1],
        ],
        dtype=np.int32,
    )
    placement = Placement(table, SHARED, E)
    load = np.arange(1, 2 * E + 1, dtype=np.float64).reshape(2, E)
    filled = placement.filled()
    assert (filled.physical_to_logical >= 0).all()
    assert filled.topology.redundant_budget is None
    np.testing.assert_allclose(filled.gpu_loads(load), placement.gpu_loads(load))
    for layer in range(2):
        counts = np.bincount(filled.physical_to_logical[layer], minlength=E)
        alloc = backend._dispatch_allocation(counts.astype(np.int64), table[layer], 4)
        again = backend._dispatch_allocation(
            counts.astype(np.int64), np.ascontiguousarray(filled.physical_to_logical[layer]), 4
        )
        np.testing.assert_array_equal(alloc.reshape(4, 4).sum(1), again.reshape(4, 4).sum(1))
    assert filled.filled() is filled  # nothing left to fill


def test_sglang_and_trtllm_maps_fill_empty_slots(tmp_path):
    placement = Placement(TABLE, SHARED, E)
    filled = placement.filled()
    kept = TABLE >= 0
    np.testing.assert_array_equal(filled.physical_to_logical[kept], TABLE[kept])
    for layer, gpu in ((0, 0), (1, 1)):  # a GPU-local expert where there is one
        own = filled.physical_to_logical[layer, 4 * gpu : 4 * gpu + 4]
        assert set(own[TABLE[layer, 4 * gpu : 4 * gpu + 4] < 0]) <= {0, 2, 3}
    fixed = Topology(1, 4, 4)
    for format in ("sglang", "trtllm"):
        path = write_map(placement, format, tmp_path / f"map.{format}")
        back = read_map(path, format, fixed, E)
        np.testing.assert_array_equal(back.physical_to_logical, filled.physical_to_logical)


def test_vllm_map_refuses_empty_slots(tmp_path):
    placement = Placement(TABLE, SHARED, E)
    with pytest.raises(PlacementError, match="layer 0 slot 3 is empty") as info:
        write_map(placement, "vllm", tmp_path / "map.json")
    assert "\n" not in str(info.value)


def test_msgpack_keeps_empty_slots_and_the_budget():
    placement = Placement(TABLE, SHARED, E, version=3)
    back = decode_placement(encode_placement(placement))
    np.testing.assert_array_equal(back.physical_to_logical, TABLE)
    assert back.topology == SHARED and back.version == 3


def test_the_balancer_publishes_shared_placements():
    rng = np.random.default_rng(9)
    config = PlacementConfig(gpus=4, redundant=8, every_tokens=64, shared_budget=True)
    balancer = LoadBalancer(config, 3, 16)
    assert balancer.topology.redundant_budget == 3 * 8
    for _ in range(3):
        result = balancer.rebalance(rng.integers(0, 50, (3, 16)))
        assert result.error is None
    assert balancer.current.redundant.sum() <= 3 * 8
    json.dumps(balancer.topology.to_dict())  # a plain dict
    with pytest.raises(ValueError, match="shared_budget: expected a bool"):
        PlacementConfig(gpus=4, shared_budget="yes")

"""The placement kernels' C++ core (``_core``) and their pure-Python twin
(``_reference/placement.py``) decide alike, bit for bit, and keep the twin's promises.

Parity: both cores run side by side on the same inputs, seeded random layers and Hypothesis
draws, with ties in the loads, zero loads and counts, one item per pack, replicas of one expert
on one GPU, budget 0, node_cost > 1 and several layers; every output must be identical,
``_improve``'s in-place ``slots`` and its returned moves included, and bad input must raise the
same exception with the same message. These tests need the native core in use
(``moeray.native.IS_NATIVE``); the properties below run on the twin always, and on the native
core when it is in use:

- ``_replicate``: slot i < n holds expert i, the counts are the slots of each expert and sum to
  ``num_slots``, each slot's rank is its place among its expert's slots;
- ``_pack``: exactly n / num_packs items per pack, ranks 0.. in each, one item per pack is the
  identity; heaviest first, each item onto the least loaded pack with room, and with labels onto
  a pack without its label while one with room exists;
- ``_improve``: at most ``budget`` slots rewritten, every expert keeps a replica, the max GPU
  load does not rise;
- ``_dispatch_allocation`` / ``dispatch``: the slots of an expert serve exactly its tokens, a
  second replica on one GPU serves none, every assignment lands on a slot holding its expert, the
  offsets are a CSR over the GPUs and each GPU's entries are in token order.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moeray.native

pytestmark = pytest.mark.pure

LOAD_KINDS = ("uniform", "ties", "zipf", "sparse", "zeros")


@pytest.fixture(scope="module")
def pair():
    """(native core, twin); skips unless the native core is the one in use."""
    if not moeray.native.IS_NATIVE:
        pytest.skip("the native core is not in use (MOERAY_PURE_PYTHON=1 or unbuilt)")
    native = importlib.import_module("moeray.native._core")
    return native, moeray.native.reference


@pytest.fixture(params=["reference", "native"])
def impl(request):
    """The twin, then the native core when it is in use."""
    if request.param == "reference":
        return moeray.native.reference
    if not moeray.native.IS_NATIVE:
        pytest.skip("the native core is not in use (MOERAY_PURE_PYTHON=1 or unbuilt)")
    return importlib.import_module("moeray.native._core")


# --------------------------------------------------------------------------- inputs


def loads(rng: np.random.Generator, rows: int, n: int, kind: str) -> np.ndarray:
    """float64 [rows, n] >= 0: ``ties`` draws small integers (many equal loads), ``sparse`` is
    mostly zeros, ``zeros`` all zeros."""
    if kind == "uniform":
        return rng.random((rows, n)) * 100
    if kind == "ties":
        return rng.integers(0, 4, (rows, n)).astype(np.float64)
    if kind == "zipf":
        return (rng.zipf(1.4, (rows, n)) % 60).astype(np.float64) * 1.5
    if kind == "sparse":
        return rng.random((rows, n)) * (rng.random((rows, n)) < 0.3) * 10
    assert kind == "zeros"
    return np.zeros((rows, n))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def random_slots(rng: np.random.Generator, rows: int, n: int, num_slots: int) -> np.ndarray:
    """int32 [rows, num_slots]: every expert once, the rest random, shuffled (replicas of one
    expert often share a GPU)."""
    out = np.empty((rows, num_slots), dtype=np.int32)
    for x in range(rows):
        row = np.concatenate([np.arange(n), rng.integers(0, n, num_slots - n)])
        out[x] = rng.permutation(row)
    return out


def planned_slots(core, weight: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
    """The planner's full placement: replicate, then pack the replicas onto GPUs, labels keeping
    the replicas of one expert apart (moeray.placement.planner._full)."""
    rows = weight.shape[0]
    experts, _, counts = core._replicate(weight, num_slots)
    share = np.take_along_axis(weight / counts.astype(np.float32), experts, -1)
    gpu, rank = core._pack(np.ascontiguousarray(share, dtype=np.float32), num_gpus, experts)
    table = np.empty_like(experts)
    table[np.arange(rows)[:, None], gpu * (num_slots // num_gpus) + rank] = experts
    return table


def assert_same(got, want) -> None:
    """Identical outputs: the same tuple structure, dtypes, shapes and values."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
        return
    assert isinstance(got, np.ndarray) and isinstance(want, np.ndarray)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def gpu_loads(slots: np.ndarray, load: np.ndarray, num_gpus: int) -> np.ndarray:
    """float64 [rows, num_gpus]: each expert's load split evenly over its replicas."""
    rows, num_slots = slots.shape
    out = np.zeros((rows, num_gpus))
    for x in range(rows):
        counts = np.bincount(slots[x], minlength=load.shape[1])
        share = load[x][slots[x]] / counts[slots[x]]
        out[x] = share.reshape(num_gpus, num_slots // num_gpus).sum(axis=1)
    return out


# --------------------------------------------------------------------------- properties


def check_replicate(out, weight: np.ndarray, num_slots: int) -> None:
    phy, rank, counts = out
    rows, n = weight.shape
    assert phy.dtype == rank.dtype == counts.dtype == np.int32
    assert phy.shape == rank.shape == (rows, num_slots) and counts.shape == (rows, n)
    for x in range(rows):
        np.testing.assert_array_equal(phy[x, :n], np.arange(n))
        np.testing.assert_array_equal(counts[x], np.bincount(phy[x], minlength=n))
        assert counts[x].sum() == num_slots
        seen = np.zeros(n, dtype=np.int64)
        for s, e in enumerate(phy[x]):
            assert rank[x, s] == seen[e]
            seen[e] += 1


def check_pack(out, weight: np.ndarray, num_packs: int, labels) -> None:
    pack, rank = out
    rows, n = weight.shape
    per_pack = n // num_packs
    assert pack.dtype == rank.dtype == np.int32 and pack.shape == rank.shape == (rows, n)
    for x in range(rows):
        np.testing.assert_array_equal(np.bincount(pack[x], minlength=num_packs), per_pack)
        for p in range(num_packs):
            np.testing.assert_array_equal(np.sort(rank[x, pack[x] == p]), np.arange(per_pack))
        if per_pack <= 1:
            np.testing.assert_array_equal(pack[x], np.arange(n))
            continue
        # replayed heaviest first: onto the least loaded (then first) pack with room, one
        # without the item's label whenever a pack with room lacks it
        sums = np.zeros(num_packs, dtype=np.float32)
        sizes = np.zeros(num_packs, dtype=np.int64)
        held: list[set] = [set() for _ in range(num_packs)]
        for item in np.argsort(-weight[x], kind="stable"):
            label = None if labels is None else int(labels[x, item])
            room = [p for p in range(num_packs) if sizes[p] < per_pack]
            spread = [p for p in room if label is None or label not in held[p]]
            eligible = spread or room
            p = int(pack[x, item])
            assert p in eligible, (x, item, p, eligible)
            assert rank[x, item] == sizes[p]
            assert sums[p] == min(sums[q] for q in eligible)
            assert p == min(q for q in eligible if sums[q] == sums[p])
            sums[p] += weight[x, item]
            sizes[p] += 1
            held[p].add(label)


def check_improve(moved, before, after, load, num_gpus, budget) -> None:
    assert moved.dtype == np.int32 and moved.shape == (before.shape[0],)
    assert (moved >= 0).all() and (moved <= budget).all()
    assert ((before != after).sum(axis=1) <= moved).all()
    for x in range(before.shape[0]):
        assert set(after[x].tolist()) == set(before[x].tolist())  # every expert keeps a slot
    if before.shape[1]:
        peak_before = gpu_loads(before, load, num_gpus).max(axis=1)
        peak_after = gpu_loads(after, load, num_gpus).max(axis=1)
        assert (peak_after <= peak_before * (1 + 1e-9)).all()
        assert (peak_after[moved == 0] == peak_before[moved == 0]).all()


def check_allocation(alloc, counts, slots, num_gpus) -> None:
    num_slots = len(slots)
    per_gpu = num_slots // num_gpus
    assert alloc.dtype == np.int64 and alloc.shape == (num_slots,)
    assert (alloc >= 0).all()
    np.testing.assert_array_equal(np.bincount(slots, weights=alloc, minlength=len(counts)), counts)
    seen = set()
    for s, e in enumerate(slots.tolist()):
        if (e, s // per_gpu) in seen:  # a second replica on one GPU serves nothing
            assert alloc[s] == 0
        seen.add((e, s // per_gpu))


def check_dispatch(out, ids, weights, slots, num_gpus, core) -> None:
    offsets, token_indices, slot_indices, out_weights = out
    total = ids.size
    per_gpu = len(slots) // num_gpus
    assert offsets.dtype == np.int64 and offsets.shape == (num_gpus + 1,)
    assert token_indices.dtype == slot_indices.dtype == np.int32
    assert out_weights.dtype == np.float32
    assert token_indices.shape == slot_indices.shape == out_weights.shape == (total,)
    assert offsets[0] == 0 and offsets[-1] == total and (np.diff(offsets) >= 0).all()
    for g in range(num_gpus):
        part = slice(offsets[g], offsets[g + 1])
        assert (slot_indices[part] // per_gpu == g).all()
        assert (np.diff(token_indices[part]) >= 0).all()  # token order within a GPU
    # every assignment, once, on a slot holding its expert, with its weight
    got = sorted(zip(token_indices.tolist(), slots[slot_indices].tolist(), out_weights.tolist()))
    want = sorted(
        (t, int(ids[t, j]), float(weights[t, j]))
        for t in range(ids.shape[0])
        for j in range(ids.shape[1])
    )
    assert got == want
    counts = np.bincount(ids.ravel(), minlength=int(slots.max()) + 1).astype(np.int64)
    alloc = core._dispatch_allocation(counts, slots, num_gpus)
    np.testing.assert_array_equal(np.bincount(slot_indices, minlength=len(slots)), alloc)


# --------------------------------------------------------------------------- seeded parity

CASES = [(seed, kind) for seed in range(6) for kind in LOAD_KINDS]


@pytest.mark.parametrize("seed,kind", CASES)
def test_replicate_and_pack_decide_alike(pair, seed, kind):
    native, reference = pair
    rng = np.random.default_rng([1, seed, LOAD_KINDS.index(kind)])
    for _ in range(6):
        rows, n = int(rng.integers(1, 5)), int(rng.integers(1, 20))
        weight = loads(rng, rows, n, kind).astype(np.float32)
        num_slots = n + int(rng.integers(0, 2 * n + 1))
        out = native._replicate(weight, num_slots)
        assert_same(out, reference._replicate(weight, num_slots))
        check_replicate(out, weight, num_slots)
        experts, _, counts = out
        share = np.ascontiguousarray(
            np.take_along_axis(weight / counts.astype(np.float32), experts, -1), dtype=np.float32
        )
        random_labels = rng.integers(-3, 3, experts.shape).astype(np.int32)
        for num_packs in divisors(num_slots):
            for labels in (None, experts, random_labels):
                got = native._pack(share, num_packs, labels)
                assert_same(got, reference._pack(share, num_packs, labels))
                check_pack(got, share, num_packs, labels)


IMPROVE_CASES = [(seed, kind) for seed in range(8) for kind in LOAD_KINDS]


@pytest.mark.parametrize("seed,kind", IMPROVE_CASES)
def test_improve_decides_alike(pair, seed, kind):
    native, reference = pair
    rng = np.random.default_rng([2, seed, LOAD_KINDS.index(kind)])
    for trial in range(4):
        num_gpus = int(rng.choice([1, 2, 4, 6, 8]))
        per_gpu = int(rng.integers(1, 5))
        num_slots = num_gpus * per_gpu
        n = int(rng.integers(1, num_slots + 1))
        rows = int(rng.integers(1, 4))
        gpus_per_node = int(rng.choice(divisors(num_gpus)))
        load = loads(rng, rows, n, kind)
        if trial % 2:
            slots = random_slots(rng, rows, n, num_slots)
        else:
            weight = loads(rng, rows, n, kind).astype(np.float32)
            slots = planned_slots(reference, weight, num_slots, num_gpus)
        budget = int(rng.choice([0, 1, 2, 3, 5, 12]))
        candidates = int(rng.choice([1, 2, 3, 8, 1000]))
        min_gain = float(rng.choice([0.0, 0.01, 0.2]))
        node_cost = float(rng.choice([1.0, 2.0, 3.5, np.inf]))
        args = (num_gpus, gpus_per_node, budget, candidates, min_gain, node_cost)
        got, want = slots.copy(), slots.copy()
        moved = native._improve(got, load, *args)
        assert_same(moved, reference._improve(want, load, *args))
        assert_same(got, want)
        check_improve(moved, slots, got, load, num_gpus, budget)


def test_improve_moves_at_a_deepseek_like_shape(pair):
    """Many moves per layer on a scaled DeepSeek-V3 shape (4 nodes of 2 GPUs, 64 experts on 72
    slots), the load shifted from the one placed for: rewrites, swaps, cross-node costs."""
    native, reference = pair
    rng = np.random.default_rng(7)
    rows, n, num_slots, num_gpus, gpus_per_node = 3, 64, 72, 8, 2
    placed = loads(rng, rows, n, "zipf") + 1
    slots = planned_slots(native, placed.astype(np.float32), num_slots, num_gpus)
    shifted = placed * rng.lognormal(0, 0.8, placed.shape)
    for budget, node_cost in ((6, 2.0), (10, 1.0), (8, 1.5)):
        args = (num_gpus, gpus_per_node, budget, 8, 0.0, node_cost)
        got, want = slots.copy(), slots.copy()
        moved = native._improve(got, shifted, *args)
        assert_same(moved, reference._improve(want, shifted, *args))
        assert_same(got, want)
        assert moved.sum() >= rows * 3  # it did move, several times per layer
        check_improve(moved, slots, got, shifted, num_gpus, budget)


def test_improve_swaps_decide_alike(pair):
    """Drawn placements with replicas side by side: swaps between the hottest and coldest GPUs
    compete with rewrites."""
    native, reference = pair
    rng = np.random.default_rng(8)
    swapped = 0
    for _ in range(60):
        num_gpus, per_gpu = int(rng.choice([2, 4, 8])), int(rng.integers(2, 5))
        num_slots = num_gpus * per_gpu
        n = int(rng.integers(num_slots // 2, num_slots + 1))
        load = loads(rng, 2, n, "zipf") + rng.random((2, n))
        slots = random_slots(rng, 2, n, num_slots)
        args = (num_gpus, int(rng.choice(divisors(num_gpus))), 8, 4, 0.0, 1.5)
        got, want = slots.copy(), slots.copy()
        moved = native._improve(got, load, *args)
        assert_same(moved, reference._improve(want, load, *args))
        assert_same(got, want)
        for x in range(2):  # moves that kept every replica count: swaps alone
            counts = np.bincount(got[x], minlength=n), np.bincount(slots[x], minlength=n)
            swapped += bool(moved[x]) and (counts[0] == counts[1]).all()
    assert swapped >= 5


@pytest.mark.parametrize("seed", range(3))
def test_improve_decides_alike_past_the_fast_paths(pair, seed):
    """More than 64 GPUs (no GPU masks) and more than 64 candidates (a partial sort)."""
    native, reference = pair
    rng = np.random.default_rng([9, seed])
    for num_gpus, per_gpu, n, candidates in ((66, 1, 40, 4), (8, 9, 70, 70), (8, 9, 70, 1000)):
        num_slots = num_gpus * per_gpu
        load = loads(rng, 1, n, "zipf") + 1
        slots = random_slots(rng, 1, n, num_slots)
        for gpus_per_node in (1, 2):
            args = (num_gpus, gpus_per_node, 6, candidates, 0.0, 2.0)
            got, want = slots.copy(), slots.copy()
            moved = native._improve(got, load, *args)
            assert_same(moved, reference._improve(want, load, *args))
            assert_same(got, want)
            assert moved[0] > 0


def test_improve_breaks_ties_alike(pair):
    """Equal loads everywhere: many candidates of one rate; the first in the twin's order wins."""
    native, reference = pair
    n, num_gpus = 6, 4
    slots = np.array([[0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]], dtype=np.int32)
    for load in (
        np.ones((1, n)),
        np.array([[4.0, 2, 2, 1, 1, 0]]),
        np.array([[0.0, 0, 0, 0, 0, 3]]),
    ):
        for gpus_per_node in (1, 2, 4):
            args = (num_gpus, gpus_per_node, 4, 6, 0.0, 2.0)
            got, want = slots.copy(), slots.copy()
            assert_same(native._improve(got, load, *args), reference._improve(want, load, *args))
            assert_same(got, want)


DISPATCH_CASES = [(seed, skew) for seed in range(8) for skew in (False, True)]


@pytest.mark.parametrize("seed,skew", DISPATCH_CASES)
def test_dispatch_decides_alike(pair, seed, skew):
    native, reference = pair
    rng = np.random.default_rng([3, seed, skew])
    for _ in range(5):
        num_gpus = int(rng.choice([1, 2, 3, 4, 8]))
        num_slots = num_gpus * int(rng.integers(1, 5))
        n = int(rng.integers(1, num_slots + 1))
        slots = random_slots(rng, 1, n, num_slots)[0]
        tokens, top_k = int(rng.choice([0, 1, 7, 40])), int(rng.choice([0, 1, 2, 4]))
        p = 1.0 / np.arange(1, n + 1) ** (2.0 if skew else 0.0)
        ids = rng.choice(n, size=(tokens, top_k), p=p / p.sum()).astype(np.int32)
        weights = rng.standard_normal((tokens, top_k)).astype(np.float32)
        got = native.dispatch(ids, weights, slots, num_gpus, n)
        assert_same(got, reference.dispatch(ids, weights, slots, num_gpus, n))
        check_dispatch(got, ids, weights, slots, num_gpus, native)
        per_node = int(rng.choice([g for g in (1, 2, 4) if num_gpus % g == 0]))
        nodes = rng.integers(0, num_gpus // per_node, tokens).astype(np.int32)
        local = native.dispatch(ids, weights, slots, num_gpus, n, nodes, per_node)
        assert_same(local, reference.dispatch(ids, weights, slots, num_gpus, n, nodes, per_node))
        check_dispatch(local, ids, weights, slots, num_gpus, native)
        np.testing.assert_array_equal(local[0], got[0])  # the same loads, other replicas
        for counts in (
            np.bincount(ids.ravel(), minlength=n),
            rng.integers(0, 3, n),
            rng.integers(0, 10**12, n) * (rng.random(n) < 0.5),
            np.zeros(n),
        ):
            counts = counts.astype(np.int64)
            alloc = native._dispatch_allocation(counts, slots, num_gpus)
            assert_same(alloc, reference._dispatch_allocation(counts, slots, num_gpus))
            check_allocation(alloc, counts, slots, num_gpus)


def test_dispatch_of_a_planned_layer_decides_alike(pair):
    """A planner's layer (hot experts replicated across GPUs) and a skewed batch of top-8."""
    native, reference = pair
    rng = np.random.default_rng(11)
    n, num_slots, num_gpus = 32, 40, 8
    weight = (1.0 / np.arange(1, n + 1) ** 1.2)[None, :].astype(np.float32)
    slots = planned_slots(native, weight, num_slots, num_gpus)[0]
    p = weight[0] / weight[0].sum()
    ids = np.stack([rng.choice(n, size=8, replace=False, p=p) for _ in range(300)])
    ids = ids.astype(np.int32)
    weights = rng.random(ids.shape).astype(np.float32)
    got = native.dispatch(ids, weights, slots, num_gpus, n)
    assert_same(got, reference.dispatch(ids, weights, slots, num_gpus, n))
    check_dispatch(got, ids, weights, slots, num_gpus, native)
    loads_per_gpu = np.diff(got[0])
    assert loads_per_gpu.max() - loads_per_gpu.min() <= ids.size // 10  # water-filled


# --------------------------------------------------------------------------- Hypothesis parity

VALUES = st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.0, 2.0, 3.25, 7.0, 1e-3, 1e6])


@st.composite
def layers(draw):
    """A small topology, loads with many ties (and zeros, and far apart), a placement with
    every expert once and the rest drawn, and improve's parameters."""
    num_gpus = draw(st.sampled_from([1, 2, 3, 4, 6]))
    per_gpu = draw(st.integers(1, 4))
    num_slots = num_gpus * per_gpu
    n = draw(st.integers(1, num_slots))
    rows = draw(st.integers(1, 3))
    gpus_per_node = draw(st.sampled_from(divisors(num_gpus)))
    load = np.array(draw(st.lists(VALUES, min_size=rows * n, max_size=rows * n)))
    load = load.reshape(rows, n)
    extra = draw(
        st.lists(
            st.integers(0, n - 1), min_size=rows * (num_slots - n), max_size=rows * (num_slots - n)
        )
    )
    order = draw(st.permutations(range(num_slots)))
    slots = np.empty((rows, num_slots), dtype=np.int32)
    for x in range(rows):
        row = np.concatenate([np.arange(n), extra[x * (num_slots - n) : (x + 1) * (num_slots - n)]])
        slots[x] = row[list(order)]
    params = (
        draw(st.integers(0, 6)),  # budget
        draw(st.integers(1, n + 1)),  # candidates
        draw(st.sampled_from([0.0, 0.05])),  # min_gain
        draw(st.sampled_from([1.0, 2.0, 1.5])),  # node_cost
    )
    return num_gpus, gpus_per_node, load, slots, params


@settings(max_examples=150, deadline=None)
@given(case=layers())
def test_generated_layers_decide_alike(pair, case):
    native, reference = pair
    num_gpus, gpus_per_node, load, slots, params = case
    weight = load.astype(np.float32)
    num_slots = slots.shape[1]
    assert_same(native._replicate(weight, num_slots), reference._replicate(weight, num_slots))
    share = np.ascontiguousarray(np.take_along_axis(weight, slots, -1))  # replicas as items
    for labels in (None, slots):
        got = native._pack(share, num_gpus, labels)
        assert_same(got, reference._pack(share, num_gpus, labels))
        check_pack(got, share, num_gpus, labels)
    got, want = slots.copy(), slots.copy()
    moved = native._improve(got, load, num_gpus, gpus_per_node, *params)
    assert_same(moved, reference._improve(want, load, num_gpus, gpus_per_node, *params))
    assert_same(got, want)
    check_improve(moved, slots, got, load, num_gpus, params[0])
    ids = slots[:, : min(num_slots, 5)].T.copy()  # [T, rows] ids, every one in range
    weights = np.arange(ids.size, dtype=np.float32).reshape(ids.shape)
    n = load.shape[1]
    row = np.ascontiguousarray(slots[0])
    assert_same(
        native.dispatch(ids, weights, row, num_gpus, n),
        reference.dispatch(ids, weights, row, num_gpus, n),
    )
    counts = np.round(load[0] * 3).astype(np.int64)
    assert_same(
        native._dispatch_allocation(counts, row, num_gpus),
        reference._dispatch_allocation(counts, row, num_gpus),
    )


# --------------------------------------------------------------------------- properties, each core


@pytest.mark.parametrize("kind", LOAD_KINDS)
def test_replicate_and_pack_keep_their_promises(impl, kind):
    rng = np.random.default_rng([4, LOAD_KINDS.index(kind)])
    for _ in range(4):
        rows, n = int(rng.integers(1, 4)), int(rng.integers(1, 16))
        weight = loads(rng, rows, n, kind).astype(np.float32)
        num_slots = n + int(rng.integers(0, n + 3))
        out = impl._replicate(weight, num_slots)
        check_replicate(out, weight, num_slots)
        experts = out[0]
        share = np.ascontiguousarray(rng.integers(0, 3, experts.shape), dtype=np.float32)
        for num_packs in divisors(num_slots):
            for labels in (None, experts):
                check_pack(impl._pack(share, num_packs, labels), share, num_packs, labels)


def test_replicate_goes_to_the_most_load_per_copy(impl):
    """Loads per copy 6, 3, 0, 3: expert 0 (6); then 3, 3, 0, 3 ties go to the first index,
    expert 0 again; then 2, 3, 0, 3: expert 1; then 2, 1.5, 0, 3: expert 3."""
    weight = np.array([[6.0, 3.0, 0.0, 3.0]], dtype=np.float32)
    phy, rank, counts = impl._replicate(weight, 8)
    np.testing.assert_array_equal(phy[0], [0, 1, 2, 3, 0, 0, 1, 3])
    np.testing.assert_array_equal(rank[0], [0, 0, 0, 0, 1, 2, 1, 1])
    np.testing.assert_array_equal(counts[0], [3, 2, 1, 2])


def test_pack_spreads_labels_while_it_can(impl):
    """Two replicas each of experts 0 and 1 over two packs: never both in one pack; and when
    avoiding is impossible (three copies, two packs), the least loaded pack takes the third."""
    weight = np.array([[4.0, 4.0, 3.0, 3.0]], dtype=np.float32)
    labels = np.array([[0, 0, 1, 1]], dtype=np.int32)
    pack, rank = impl._pack(weight, 2, labels)
    assert pack[0, 0] != pack[0, 1] and pack[0, 2] != pack[0, 3]
    weight = np.array([[5.0, 4.0, 1.0, 1.0, 1.0, 0.0]], dtype=np.float32)
    labels = np.array([[7, 7, 7, 1, 2, 3]], dtype=np.int32)
    pack, rank = impl._pack(weight, 2, labels)
    assert pack[0, 0] != pack[0, 1]
    check_pack((pack, rank), weight, 2, labels)
    one = impl._pack(weight, 6, labels)  # one item per pack: the identity, labels or not
    np.testing.assert_array_equal(one[0][0], np.arange(6))
    np.testing.assert_array_equal(one[1][0], 0)


def test_pack_of_empty_layers(impl):
    """No items: empty answers, even for a huge number of packs (nothing allocated for them)."""
    weight = np.zeros((3, 0), dtype=np.float32)
    pack, rank = impl._pack(weight, 2**31 - 1)
    assert pack.shape == rank.shape == (3, 0) and pack.dtype == rank.dtype == np.int32
    phy, rank, counts = impl._replicate(np.zeros((0, 0), dtype=np.float32), 5)
    assert phy.shape == (0, 5) and counts.shape == (0, 0)


@pytest.mark.parametrize("kind", LOAD_KINDS)
def test_improve_keeps_its_promises(impl, kind):
    rng = np.random.default_rng([5, LOAD_KINDS.index(kind)])
    for budget in (0, 1, 4):
        num_gpus, num_slots, n, rows = 4, 12, 8, 2
        load = loads(rng, rows, n, kind)
        slots = random_slots(rng, rows, n, num_slots)
        after = slots.copy()
        moved = impl._improve(after, load, num_gpus, 2, budget, 4, 0.0, 2.0)
        check_improve(moved, slots, after, load, num_gpus, budget)
        if budget == 0 or kind == "zeros":
            assert (moved == 0).all() and (after == slots).all()


def test_improve_without_slots_moves_nothing(impl):
    """S = 0: nothing to move, and no [num_gpus] loads allocated for a huge num_gpus."""
    slots = np.zeros((2, 0), dtype=np.int32)
    moved = impl._improve(slots, np.ones((2, 3)), 2**31 - 1, 1, 10, 4, 0.0, 1.0)
    np.testing.assert_array_equal(moved, [0, 0])


def test_improve_rewrites_a_hot_expert_onto_the_coldest_gpu(impl):
    """Expert 0 carries the load, alone on GPU 0; expert 1 has a spare replica on GPU 1."""
    slots = np.array([[0, 2, 1, 1, 3, 4]], dtype=np.int32)
    load = np.array([[12.0, 1.0, 1.0, 1.0, 1.0]])
    moved = impl._improve(slots, load, 3, 3, 1, 2, 0.0, 1.0)
    np.testing.assert_array_equal(moved, [1])
    np.testing.assert_array_equal(slots, [[0, 2, 0, 1, 3, 4]])


@pytest.mark.parametrize("seed", range(4))
def test_dispatch_keeps_its_promises(impl, seed):
    rng = np.random.default_rng([6, seed])
    num_gpus, num_slots, n = 4, 12, 7
    slots = random_slots(rng, 1, n, num_slots)[0]
    ids = rng.integers(0, n, (50, 3)).astype(np.int32)
    ids[:, 0] = 0  # a hot expert
    weights = rng.random(ids.shape).astype(np.float32)
    check_dispatch(
        impl.dispatch(ids, weights, slots, num_gpus, n), ids, weights, slots, num_gpus, impl
    )
    counts = np.bincount(ids.ravel(), minlength=n).astype(np.int64)
    check_allocation(impl._dispatch_allocation(counts, slots, num_gpus), counts, slots, num_gpus)


def test_dispatch_allocation_water_fills(impl):
    """Expert 0 on GPUs 0, 1, 2 over the others' 5, 1, 0 tokens: its 10 tokens raise all three
    to 5 (0, 4, 5 of them), and the one left goes to the first GPU: 6, 5, 5."""
    slots = np.array([0, 1, 0, 2, 0, 3], dtype=np.int32)  # GPUs of 2 slots
    counts = np.array([10, 5, 1, 0], dtype=np.int64)
    alloc = impl._dispatch_allocation(counts, slots, 3)
    np.testing.assert_array_equal(alloc, [1, 5, 4, 1, 5, 0])
    per_gpu = alloc.reshape(3, 2).sum(axis=1)
    np.testing.assert_array_equal(per_gpu, [6, 5, 5])
    empty = impl.dispatch(np.zeros((0, 2), np.int32), np.zeros((0, 2), np.float32), slots, 3, 4)
    np.testing.assert_array_equal(empty[0], [0, 0, 0, 0])
    assert [a.size for a in empty[1:]] == [0, 0, 0]


def test_dispatch_keeps_a_second_replica_on_one_gpu_idle(impl):
    slots = np.array([0, 0, 1, 1], dtype=np.int32)  # both replicas of each on one GPU
    ids = np.array([[0, 1], [0, 0], [1, 0]], dtype=np.int32)
    weights = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)
    offsets, tokens, slot_of, w = impl.dispatch(ids, weights, slots, 2, 2)
    np.testing.assert_array_equal(offsets, [0, 4, 6])
    np.testing.assert_array_equal(tokens, [0, 1, 1, 2, 0, 2])
    np.testing.assert_array_equal(slot_of, [0, 0, 0, 0, 2, 2])
    np.testing.assert_array_equal(w, [1, 3, 4, 6, 2, 5])


# --------------------------------------------------------------------------- bad input


def f32(*rows):
    return np.array(rows, dtype=np.float32)


W = f32([1, 2, 3], [4, 5, 6])
LOAD = np.array([[1.0, 2, 3], [4, 5, 6]])
SLOTS = np.array([[0, 1, 2, 0], [2, 1, 0, 0]], dtype=np.int32)
ROW = np.array([0, 1, 2, 0], dtype=np.int32)
IDS = np.array([[0, 1], [2, 2], [1, 0]], dtype=np.int32)
WEIGHTS = np.ones((3, 2), dtype=np.float32)
COUNTS = np.array([3, 0, 2], dtype=np.int64)


def read_only(array):
    array = array.copy()
    array.setflags(write=False)
    return array


def replicate(**change):
    return "_replicate", {"weight": W, "num_slots": 3, **change}


def pack(**change):
    return "_pack", {"weight": W, "num_packs": 3, **change}


def improve(**change):
    args = dict(slots=SLOTS, load=LOAD, num_gpus=2, gpus_per_node=1, budget=2, candidates=3)
    return "_improve", {**args, "min_gain": 0.0, "node_cost": 2.0, **change}


def allocation(**change):
    return "_dispatch_allocation", {"counts": COUNTS, "slots": ROW, "num_gpus": 2, **change}


def dispatch(**change):
    args = dict(expert_ids=IDS, weights=WEIGHTS, slots=ROW, num_gpus=2, num_experts=3)
    return "dispatch", {**args, **change}


BAD = [
    (*replicate(weight=[[1.0]]), TypeError, "weight: expected a numpy float32 array, got list"),
    (
        *replicate(weight=f32(1, 2)),
        ValueError,
        r"weight: expected a 2-d array \[layers, n\], got \[2\]",
    ),
    (
        *replicate(weight=np.zeros(())),
        ValueError,
        r"weight: expected a 2-d array \[layers, n\], got \[\]",
    ),
    (
        *replicate(weight=W.astype(np.float64)),
        TypeError,
        "weight: expected dtype float32, got float64",
    ),
    (*replicate(weight=W.astype(">f4")), TypeError, "weight: expected dtype float32, got >f4"),
    (*replicate(weight=np.asfortranarray(W)), ValueError, "weight: expected a C-contiguous array"),
    (
        *replicate(weight=f32([1, np.nan, 2])),
        ValueError,
        r"weight: every load must be finite \(no NaN or inf\)",
    ),
    (*replicate(weight=f32([1, -np.inf, -2])), ValueError, "weight: every load must be finite"),
    (*replicate(weight=f32([1, -1.5, 2])), ValueError, "weight: every load must be >= 0, got -1.5"),
    (*replicate(num_slots=2), ValueError, r"num_slots: expected an int in \[3, 2\*\*31\), got 2"),
    (
        *replicate(num_slots=2**40),
        ValueError,
        r"num_slots: expected an int in \[3, 2\*\*31\), got 1099511627776",
    ),
    (*replicate(num_slots=4.0), TypeError, "num_slots: expected an int, got float"),
    (*replicate(num_slots=True), TypeError, "num_slots: expected an int, got bool"),
    (
        *replicate(weight=np.zeros((2, 0), np.float32), num_slots=1),
        ValueError,
        r"weight: expected at least one expert per layer, got \[2, 0\]",
    ),
    (
        *replicate(weight=np.zeros((0, 0), np.float32), num_slots=0),
        ValueError,
        r"num_slots: expected an int in \[1, 2\*\*31\), got 0",
    ),
    (*pack(num_packs=0), ValueError, "num_packs: expected an int >= 1, got 0"),
    (*pack(num_packs=2), ValueError, "num_packs: 3 items do not divide over 2 packs"),
    (*pack(num_packs=None), TypeError, "num_packs: expected an int, got NoneType"),
    (*pack(labels=[[0, 1, 2]]), TypeError, "labels: expected a numpy int32 array, got list"),
    (
        *pack(labels=np.zeros((2, 3), np.int64)),
        TypeError,
        "labels: expected dtype int32 like weight, got int64",
    ),
    (
        *pack(labels=np.zeros(3, np.int32)),
        ValueError,
        r"labels: expected shape \[2, 3\] like weight, got \[3\]",
    ),
    (*pack(weight=f32([0, -0.25, 1])), ValueError, "weight: every load must be >= 0, got -0.25"),
    (*improve(slots=SLOTS.tolist()), TypeError, "slots: expected a numpy int32 array, got list"),
    (
        *improve(slots=SLOTS.astype(np.int64)),
        TypeError,
        r"slots: expected dtype int32 \[layers, slots\], got int64",
    ),
    (
        *improve(slots=SLOTS[:1]),
        ValueError,
        r"slots: expected shape \[2, 4\] \[layers, slots\], got \[1, 4\]",
    ),
    (
        *improve(slots=np.array(3, np.int32)),
        ValueError,
        r"slots: expected shape \[2, 0\] \[layers, slots\], got \[\]",
    ),
    (
        *improve(slots=np.zeros((2, 8), np.int32)[:, ::2]),
        ValueError,
        "slots: expected a C-contiguous array",
    ),
    (*improve(slots=read_only(SLOTS)), ValueError, "slots: expected a writeable array"),
    (
        *improve(load=LOAD.astype(np.float32)),
        TypeError,
        "load: expected dtype float64, got float32",
    ),
    (*improve(load=LOAD[0]), ValueError, r"load: expected a 2-d array \[layers, n\], got \[3\]"),
    (
        *improve(load=np.array([[1.0, np.nan, 3], [1, 1, 1]])),
        ValueError,
        "load: every load must be finite",
    ),
    (
        *improve(load=np.array([[1.0, -2, 3], [1, 1, 1]])),
        ValueError,
        "load: every load must be >= 0, got -2.0",
    ),
    (*improve(num_gpus=3), ValueError, "num_gpus: 4 slots do not divide over 3 GPUs"),
    (*improve(num_gpus=0), ValueError, "num_gpus: expected an int >= 1, got 0"),
    (
        *improve(num_gpus=4, gpus_per_node=3),
        ValueError,
        "gpus_per_node: 4 GPUs do not divide into nodes of it",
    ),
    (*improve(budget=-1), ValueError, "budget: expected an int >= 0, got -1"),
    (*improve(budget=2.5), TypeError, "budget: expected an int, got float"),
    (*improve(candidates=0), ValueError, "candidates: expected an int >= 1, got 0"),
    (*improve(min_gain=-0.1), ValueError, "min_gain must be >= 0 and node_cost >= 1"),
    (*improve(node_cost=0.5), ValueError, "min_gain must be >= 0 and node_cost >= 1"),
    (*improve(min_gain=float("nan")), ValueError, "min_gain must be >= 0 and node_cost >= 1"),
    (*improve(min_gain="0.1"), TypeError, "min_gain: expected a float, got str"),
    (*improve(node_cost=None), TypeError, "node_cost: expected a float, got NoneType"),
    (*improve(slots=SLOTS + 1), ValueError, r"slots: every slot must hold an expert in \[0, 3\)"),
    (*improve(slots=SLOTS - 2), ValueError, r"slots: every slot must hold an expert in \[0, 3\)"),
    (*allocation(counts=[1, 2, 3]), TypeError, "counts: expected a numpy int64 array, got list"),
    (*allocation(counts=5), TypeError, "counts: expected a numpy int64 array, got int"),
    (*allocation(counts=np.array(5)), ValueError, r"counts: expected shape \[0\], got \[\]"),
    (
        *allocation(counts=COUNTS.astype(np.int32)),
        TypeError,
        "counts: expected dtype int64, got int32",
    ),
    (
        *allocation(counts=np.zeros((3, 2), np.int64)),
        ValueError,
        r"counts: expected shape \[3\], got \[3, 2\]",
    ),
    (*allocation(counts=np.array([1, -1, 0])), ValueError, "counts: every count must be >= 0"),
    (
        *allocation(counts=np.array([2**62, 1, 0])),
        ValueError,
        r"counts: the counts must sum to at most 2\*\*62",
    ),
    (
        *allocation(counts=np.full(3, 2**63 - 1)),
        ValueError,
        r"counts: the counts must sum to at most 2\*\*62",
    ),
    (*allocation(slots=ROW.tolist()), TypeError, "slots: expected a numpy int32 array, got list"),
    (*allocation(slots=SLOTS), ValueError, r"slots: expected shape \[2\] \[slots\], got \[2, 4\]"),
    (
        *allocation(slots=np.array(0, np.int32)),
        ValueError,
        r"slots: expected shape \[0\] \[slots\], got \[\]",
    ),
    (
        *allocation(slots=ROW.astype(np.int64)),
        TypeError,
        r"slots: expected dtype int32 \[slots\], got int64",
    ),
    (*allocation(num_gpus=0), ValueError, "num_gpus: expected an int >= 1, got 0"),
    (*allocation(num_gpus=3), ValueError, "num_gpus: 4 slots do not divide over 3 GPUs"),
    (
        *allocation(slots=ROW[:0], num_gpus=1),
        ValueError,
        "num_gpus: 0 slots do not divide over 1 GPUs",
    ),
    (*allocation(slots=ROW + 1), ValueError, r"slots: every slot must hold an expert in \[0, 3\)"),
    (*allocation(slots=ROW % 2), ValueError, "slots: every expert must hold at least one slot"),
    (
        *allocation(counts=np.zeros(9, np.int64)),
        ValueError,
        "slots: every expert must hold at least one slot",
    ),
    (*dispatch(num_experts=True), TypeError, "num_experts: expected an int, got bool"),
    (
        *dispatch(num_experts=0),
        ValueError,
        r"num_experts: expected an int in \[1, 2\*\*31\), got 0",
    ),
    (
        *dispatch(expert_ids=IDS.tolist()),
        TypeError,
        "expert_ids: expected a numpy int32 array, got list",
    ),
    (
        *dispatch(expert_ids=IDS.astype(np.int64)),
        TypeError,
        "expert_ids: expected dtype int32, got int64",
    ),
    (
        *dispatch(expert_ids=IDS[0]),
        ValueError,
        r"expert_ids: expected shape \[T, top_k\], got \(2,\)",
    ),
    (
        *dispatch(expert_ids=np.asfortranarray(IDS)),
        ValueError,
        "expert_ids: expected a C-contiguous array",
    ),
    (*dispatch(expert_ids=IDS + 2), ValueError, r"expert_ids: every id must be in \[0, 3\), got 3"),
    (
        *dispatch(weights=WEIGHTS.astype(np.float64)),
        TypeError,
        "weights: expected dtype float32 like expert_ids, got float64",
    ),
    (
        *dispatch(weights=WEIGHTS[0]),
        ValueError,
        r"weights: expected shape \[3, 2\] like expert_ids, got \[2\]",
    ),
    (
        *dispatch(weights=WEIGHTS.tolist()),
        TypeError,
        "weights: expected a numpy float32 array, got list",
    ),
    (
        *dispatch(weights=WEIGHTS * np.nan),
        ValueError,
        r"weights: every weight must be finite \(no NaN or inf\)",
    ),
    # the first bad argument in the twin's order is the one named
    (
        *dispatch(expert_ids=IDS - 1, weights=WEIGHTS[0]),
        ValueError,
        r"expert_ids: every id must be in \[0, 3\), got -1",
    ),
    (
        *dispatch(expert_ids=IDS + 1, weights=WEIGHTS * np.inf),
        ValueError,
        r"expert_ids: every id must be in \[0, 3\), got 3",
    ),
    (
        *dispatch(weights=WEIGHTS * np.inf, slots=ROW[:0]),
        ValueError,
        "weights: every weight must be finite",
    ),
    (*dispatch(num_gpus=3), ValueError, "num_gpus: 4 slots do not divide over 3 GPUs"),
    (*dispatch(num_experts=4), ValueError, "slots: every expert must hold at least one slot"),
    (
        *dispatch(num_experts=2**31 - 1),
        ValueError,
        "slots: every expert must hold at least one slot",
    ),
    (
        *dispatch(expert_ids=IDS % 2, num_experts=2),
        ValueError,
        r"slots: every slot must hold an expert in \[0, 2\)",
    ),
]

BAD_IDS = [f"{name}-{i}" for i, (name, *_) in enumerate(BAD)]


def call(core, name, args):
    if name == "_improve":  # a fresh copy: the kernel would write into it
        args = dict(args)
        slots = args["slots"]
        if isinstance(slots, np.ndarray) and slots.flags.writeable and slots.flags.c_contiguous:
            args["slots"] = slots.copy()
    return getattr(core, name)(**args)


@pytest.mark.parametrize("name,args,error,message", BAD, ids=BAD_IDS)
def test_bad_input_is_refused(impl, name, args, error, message):
    with pytest.raises(error, match=message):
        call(impl, name, args)


@pytest.mark.parametrize("name,args,error,message", BAD, ids=BAD_IDS)
def test_bad_input_is_refused_alike(pair, name, args, error, message):
    native, reference = pair
    with pytest.raises(error) as want:
        call(reference, name, args)
    with pytest.raises(error) as got:
        call(native, name, args)
    assert type(got.value) is type(want.value)
    assert str(got.value) == str(want.value)


def test_improve_refuses_before_it_writes(pair):
    """A refused call leaves slots as they were."""
    for core in pair:
        slots = SLOTS.copy()
        with pytest.raises(ValueError):
            core._improve(slots, LOAD, 2, 1, 4, 3, 0.0, 0.5)
        np.testing.assert_array_equal(slots, SLOTS)

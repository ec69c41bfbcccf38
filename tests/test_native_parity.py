"""The C++ core (``moeray.native._core``) and its pure-Python twin (``_reference``) decide alike.

Both modules are driven directly, side by side, on the same inputs: random access streams,
random interleavings of every scalar operation, real routing traces, and the affinity
rankings. Every return value, the stats, the hot set (in recency order) and the affinity state
must be identical. Where a simple independent expectation exists (misses of a cache that holds
every expert, activation counts, the documented ranking rules) the test checks it as well.
"""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest

from moeray.traces import default_trace_path, load_trace

pytestmark = pytest.mark.pure

POLICIES = ("LRU", "LFU", "ADAPTIVE")


# --------------------------------------------------------------------------- helpers


def zipf_stream(rng: np.random.Generator, n: int, tokens: int, top_k: int) -> np.ndarray:
    """Skewed routing with distinct experts per token and a working-set shift halfway."""
    k = min(top_k, n)
    p = 1.0 / np.arange(1, n + 1) ** 1.2
    p /= p.sum()
    rows = []
    for phase in range(2):
        q = p[rng.permutation(n)]
        for _ in range(tokens // 2 + phase * (tokens % 2)):
            rows.append(rng.choice(n, size=k, replace=False, p=q))
    return np.ascontiguousarray(np.stack(rows), dtype=np.int32)


def uniform_stream(rng: np.random.Generator, n: int, tokens: int, top_k: int) -> np.ndarray:
    """Uniform routing; an expert may repeat inside a token."""
    return rng.integers(0, n, size=(tokens, top_k), dtype=np.int32)


STREAMS = {"zipf": zipf_stream, "uniform": uniform_stream}


def cache_pair(native, reference, n, cap, policy, threshold=0.1):
    return (
        native.ExpertCacheCore(n, cap, threshold, getattr(native, policy)),
        reference.ExpertCacheCore(n, cap, threshold, getattr(reference, policy)),
    )


def affinity_pair(native, reference, n, decay=0.9, boost=0.3, max_score=1.0):
    return (
        native.AffinityCore(n, decay, boost, max_score),
        reference.AffinityCore(n, decay, boost, max_score),
    )


def assert_same_cache(cn, cr):
    assert cn.stats() == cr.stats()
    assert cn.hot_experts() == cr.hot_experts()
    assert cn.hot_count() == cr.hot_count() == len(cr.hot_experts())
    assert cn.max_hot() == cr.max_hot()


def assert_same_affinity(an, ar):
    np.testing.assert_array_equal(an.scores(), ar.scores())
    np.testing.assert_array_equal(an.activation_counts(), ar.activation_counts())


def test_policy_codes_agree(core_pair):
    native, reference = core_pair
    assert (native.LRU, native.LFU, native.ADAPTIVE) == (
        reference.LRU,
        reference.LFU,
        reference.ADAPTIVE,
    )
    assert len({reference.LRU, reference.LFU, reference.ADAPTIVE}) == 3


# --------------------------------------------------------------------------- (a) random streams

SIZES = [(n, cap) for n in (1, 8, 64, 256) for cap in sorted({1, max(1, n // 4), n})]


@pytest.mark.parametrize("dist", sorted(STREAMS))
@pytest.mark.parametrize("affinity_weight", [None, 0.0, 0.3, 1.0], ids=lambda w: f"aff={w}")
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n,cap", SIZES, ids=[f"n{n}-cap{c}" for n, c in SIZES])
def test_access_batch_random_streams(core_pair, n, cap, policy, affinity_weight, dist):
    native, reference = core_pair
    rng = np.random.default_rng([n, cap, POLICIES.index(policy), sorted(STREAMS).index(dist)])
    ids = STREAMS[dist](rng, n, 240, 4)
    cn, cr = cache_pair(native, reference, n, cap, policy)
    an = ar = None
    if affinity_weight is not None:
        an, ar = affinity_pair(native, reference, n)
    # Two calls: state carries over from one batch to the next.
    for part in (ids[:80], ids[80:]):
        part = np.ascontiguousarray(part)
        if affinity_weight is None:
            hn, hr = cn.access_batch(part), cr.access_batch(part)
        else:
            hn = cn.access_batch(part, an, affinity_weight)
            hr = cr.access_batch(part, ar, affinity_weight)
        assert hn.dtype == hr.dtype == np.bool_
        assert hn.shape == hr.shape == part.shape
        np.testing.assert_array_equal(hn, hr)
        assert_same_cache(cn, cr)
    if an is not None:
        assert_same_affinity(an, ar)
        np.testing.assert_array_equal(ar.activation_counts(), np.bincount(ids.ravel(), minlength=n))
    hits, misses, evictions, prefetch_hits = cr.stats()
    assert hits + misses == ids.size and prefetch_hits == 0
    distinct = len(np.unique(ids))
    if cap == n:  # every expert fits: exactly one miss per distinct expert, nothing evicted
        assert (misses, evictions) == (distinct, 0)
        assert sorted(cr.hot_experts()) == sorted(np.unique(ids).tolist())
    # Every miss admits; an admission into a full hot set evicts exactly one expert.
    assert evictions == max(0, misses - cap)
    assert len(cr.hot_experts()) == misses - evictions == min(misses, cap)


@pytest.mark.parametrize("dist", sorted(STREAMS))
@pytest.mark.parametrize("n,cap", SIZES, ids=[f"n{n}-cap{c}" for n, c in SIZES])
def test_schedule_and_belady_random_streams(core_pair, n, cap, dist):
    native, reference = core_pair
    rng = np.random.default_rng([7, n, cap, sorted(STREAMS).index(dist)])
    ids = STREAMS[dist](rng, n, 300, 4)
    weights = rng.random(ids.shape, dtype=np.float32)
    on, tn, wn = native.schedule(ids, weights, n)
    orf, tr, wr = reference.schedule(ids, weights, n)
    for a, b, dtype in ((on, orf, np.int64), (tn, tr, np.int32), (wn, wr, np.float32)):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.diff(orf), np.bincount(ids.ravel(), minlength=n))
    bn = native.belady_hits(ids, n, cap)
    assert bn == reference.belady_hits(ids, n, cap)
    if cap == n:
        assert bn == ids.size - len(np.unique(ids))


@pytest.mark.parametrize("shape", [(0, 4), (5, 0), (0, 0), (1, 1)])
def test_schedule_and_belady_degenerate_shapes(core_pair, shape):
    native, reference = core_pair
    ids = np.zeros(shape, dtype=np.int32)
    weights = np.full(shape, 0.5, dtype=np.float32)
    rn, rr = native.schedule(ids, weights, 3), reference.schedule(ids, weights, 3)
    for a, b in zip(rn, rr):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rr[0], [0, ids.size, ids.size, ids.size])
    assert native.belady_hits(ids, 3, 1) == reference.belady_hits(ids, 3, 1) == 0
    cn, cr = cache_pair(native, reference, 3, 2, "LRU")
    np.testing.assert_array_equal(cn.access_batch(ids), cr.access_batch(ids))
    assert_same_cache(cn, cr)


# --------------------------------------------------------------------------- (b) scalar ops

OP_NAMES = (
    "access",
    "admit",
    "evict",
    "prefetch_admit",
    "prefetch_by_affinity",
    "suggest_eviction",
    "suggest_eviction_with_affinity",
    "affinity.update",
    "should_prefetch",
    "is_hot",
    "reset_stats",
)
OP_PROBS = np.array([30, 8, 8, 6, 6, 4, 8, 12, 4, 3, 1], dtype=float)
AFFINITY_PARAMS = {
    "smooth": (0.9, 0.3, 1.0),
    "ties": (1.0, 1.0, 1.0),  # scores are 0 or 1: rankings are decided by the id tie-break
    "saturating": (0.7, 0.6, 1.0),
}
SCALAR_SIZES = [(1, 1), (8, 1), (8, 3), (8, 8), (64, 1), (64, 16), (64, 64), (256, 40)]


@pytest.mark.parametrize("aff", sorted(AFFINITY_PARAMS))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n,cap", SCALAR_SIZES, ids=[f"n{n}-cap{c}" for n, c in SCALAR_SIZES])
def test_interleaved_scalar_operations(core_pair, n, cap, policy, aff):
    native, reference = core_pair
    rng = np.random.default_rng(
        [11, n, cap, POLICIES.index(policy), sorted(AFFINITY_PARAMS).index(aff)]
    )
    cn, cr = cache_pair(native, reference, n, cap, policy, threshold=0.25)
    an, ar = affinity_pair(native, reference, n, *AFFINITY_PARAMS[aff])
    # A small working set (3 x cap) makes hits, prefetch hits and re-admissions common.
    working = rng.permutation(n)[: min(n, 3 * cap + 1)]
    evicted = False
    for step in range(350):
        op = OP_NAMES[rng.choice(len(OP_NAMES), p=OP_PROBS / OP_PROBS.sum())]
        e = (
            int(working[rng.integers(len(working))])
            if rng.random() < 0.85
            else int(rng.integers(n))
        )
        if op == "prefetch_by_affinity":
            budget = int(rng.integers(0, 5))
            out = (cn.prefetch_by_affinity(an, budget), cr.prefetch_by_affinity(ar, budget))
            assert len(out[1]) <= budget and len(set(out[1])) == len(out[1])
        elif op == "suggest_eviction_with_affinity":
            w = float(rng.choice([0.0, 1e-7, 0.3, 0.5, 1.0, -0.5, 2.0]))
            out = (
                cn.suggest_eviction_with_affinity(an, w),
                cr.suggest_eviction_with_affinity(ar, w),
            )
            assert (out[1] is None) == (cr.hot_count() < cap)
        elif op == "affinity.update":
            row = rng.choice(working, size=int(rng.integers(0, min(4, n) + 1))).tolist()
            out = (an.update(row), ar.update(row))
        elif op == "should_prefetch":
            w = float(rng.uniform(-0.2, 1.2))
            out = (cn.should_prefetch(e, w), cr.should_prefetch(e, w))
            assert out[1] == (w > 0.25 and not cr.is_hot(e))
        elif op in ("suggest_eviction", "reset_stats"):
            out = (getattr(cn, op)(), getattr(cr, op)())
        else:
            out = (getattr(cn, op)(e), getattr(cr, op)(e))
        assert out[0] == out[1], f"step {step}: {op}(e={e}) native {out[0]!r} reference {out[1]!r}"
        assert_same_cache(cn, cr)
        assert_same_affinity(an, ar)
        evicted |= cr.stats()[2] > 0
    # The interleaving is not vacuous: the hot set filled up and was evicted from.
    if cap < n:
        assert evicted


def test_prefetch_by_affinity_walks_affinity_order(core_pair):
    """Hand-checked: cap 2 of 6, LRU, hot [0, 1] (0 touched first), decay 1 (no decay).

    prefetch_by_affinity walks experts by affinity, skips those hot when reached, and when
    full evicts the blended victim (weight 0.5): 0.5 * lru_score + 0.5 * (1 - affinity), where
    lru_score is 1 for the oldest touch, 0 for the newest, 0.5 for all when touches tie.
    """
    for mod in core_pair:
        # Affinity 4: .4, 1: .3, 5: .2, 2: .1, 0 and 3: 0 -> walk order 4, 1, 5, 2, 0, 3.
        cache = mod.ExpertCacheCore(6, 2, 0.1, mod.LRU)
        aff = mod.AffinityCore(6, 1.0, 0.1, 10.0)
        for row in ([4, 1, 5, 2], [4, 1, 5], [4, 1], [4]):
            aff.update(row)
        cache.access(0)
        cache.access(1)
        # 4: evict 0 (1.0 vs 0.35); 1 is hot: skipped; 5: evict 1 (0.6 vs 4's 0.55) -- 1 ranks
        # before 5, so the walk never returns to it; 2: evict 5 (0.65 vs 0.55).
        assert cache.prefetch_by_affinity(aff, 3) == [4, 5, 2]
        assert cache.hot_experts() == [4, 2]
        assert cache.stats() == (0, 2, 3, 0)
        assert cache.access(2) and cache.stats() == (1, 2, 3, 1)  # a prefetch hit, counted once
        assert cache.access(2) and cache.stats() == (2, 2, 3, 1)

        # Victims that rank after the expert being admitted come back in the walk.
        cache = mod.ExpertCacheCore(6, 2, 0.1, mod.LRU)
        aff = mod.AffinityCore(6, 1.0, 0.2, 10.0)
        aff.update([4, 5])
        aff.update([4])  # 4: .4, 5: .2, the rest 0 -> walk order 4, 5, 0, 1, 2, 3
        cache.access(0)
        cache.access(1)
        # 4: evict 0 (1.0 vs 0.5); 5: evict 1 (0.75 vs 0.55); 0 (evicted, ranks after 4):
        # evict 5 (0.65 vs 0.55); 1: evict 0 (0.75 vs 0.55).
        assert cache.prefetch_by_affinity(aff, 4) == [4, 5, 0, 1]
        assert cache.hot_experts() == [4, 1]
        assert cache.stats() == (0, 2, 4, 0)
        assert cache.prefetch_by_affinity(aff, 0) == []
        assert cache.prefetch_by_affinity(aff, 1) == [5]  # evicts 1 (0.75 vs 0.55)
        assert cache.hot_experts() == [4, 5]


# --------------------------------------------------------------------------- (c) real routing


def read_npz_rows(path, key: str, rows: int) -> np.ndarray:
    """The first ``rows`` rows of array ``key`` of an .npz, without decompressing the rest."""
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        assert not fortran and not dtype.hasobject
        n = min(rows, shape[0])
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        data = f.read(n * row_bytes)
        assert len(data) == n * row_bytes
    return np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:])).copy()


class Routing:
    """A slice of a routing trace: per chosen layer, int32 ids [T, k] and float32 weights."""

    def __init__(self, name, ids, weights, num_experts, layers):
        self.name = name
        self.num_experts = num_experts
        self.layers = list(layers)
        self.ids = [np.ascontiguousarray(ids[:, l, :], dtype=np.int32) for l in self.layers]
        self.weights = [
            np.ascontiguousarray(weights[:, l, :], dtype=np.float32) for l in self.layers
        ]


@pytest.fixture(scope="module")
def bundled_routing():
    trace = load_trace(default_trace_path())
    ids, weights = trace.expert_ids[:2000], trace.weights[:2000]
    return Routing("bundled", ids, weights, trace.num_experts, range(trace.num_layers))


@pytest.fixture(scope="module")
def deepseek_routing(shared_traces):
    path = shared_traces / "deepseek-v2-lite-chat" / "deepseek_v2_lite_chat_prefill_routing.npz"
    if not path.is_file():
        pytest.skip(f"no {path}")
    ids = read_npz_rows(path, "expert_ids", 1500)
    assert ids.shape == (1500, 26, 6) and ids.dtype == np.uint8 and ids.max() < 64
    # DeepSeek traces have no router weights: schedule() gets deterministic random ones.
    weights = np.random.default_rng(5).random(ids.shape, dtype=np.float32)
    return Routing("deepseek", ids, weights, 64, (0, 12, 25))


@pytest.fixture(scope="module")
def gpt_oss_routing(shared_traces):
    path = shared_traces / "gpt-oss-20b" / "gpt_oss_20b_decode_routing.npz"
    if not path.is_file():
        pytest.skip(f"no {path}")
    ids = read_npz_rows(path, "expert_ids", 1500)
    probs = read_npz_rows(path, "expert_probs", 1500)
    assert ids.shape == probs.shape == (1500, 24, 4) and ids.max() < 32
    return Routing("gpt-oss", ids, probs, 32, (0, 11, 23))


ROUTINGS = ["bundled_routing", "deepseek_routing", "gpt_oss_routing"]


@pytest.mark.parametrize("with_affinity", [False, True], ids=["plain", "affinity"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("routing_name", ROUTINGS)
def test_real_routing_access_batch(core_pair, request, routing_name, policy, with_affinity):
    native, reference = core_pair
    routing = request.getfixturevalue(routing_name)
    n = routing.num_experts
    cap = n // 4
    for layer, ids in zip(routing.layers, routing.ids):
        cn, cr = cache_pair(native, reference, n, cap, policy)
        if with_affinity:
            an, ar = affinity_pair(native, reference, n, decay=0.95, boost=0.2)
            hn, hr = cn.access_batch(ids, an, 0.5), cr.access_batch(ids, ar, 0.5)
            assert_same_affinity(an, ar)
        else:
            hn, hr = cn.access_batch(ids), cr.access_batch(ids)
        assert np.array_equal(hn, hr), f"{routing.name} layer {layer}: first difference at " + str(
            np.argwhere(hn != hr)[:1].tolist()
        )
        assert_same_cache(cn, cr)
        assert 0 < hr.sum() < ids.size  # real routing at 1/4 capacity both hits and misses


@pytest.mark.parametrize("routing_name", ROUTINGS)
def test_real_routing_schedule_and_belady(core_pair, request, routing_name):
    native, reference = core_pair
    routing = request.getfixturevalue(routing_name)
    n = routing.num_experts
    for layer, ids, weights in zip(routing.layers, routing.ids, routing.weights):
        on, tn, wn = native.schedule(ids, weights, n)
        orf, tr, wr = reference.schedule(ids, weights, n)
        assert np.array_equal(on, orf), f"offsets differ at layer {layer}"
        assert np.array_equal(tn, tr), f"token_indices differ at layer {layer}"
        assert np.array_equal(wn, wr), f"weights differ at layer {layer}"
        np.testing.assert_array_equal(np.diff(orf), np.bincount(ids.ravel(), minlength=n))
        bn, br = native.belady_hits(ids, n, n // 4), reference.belady_hits(ids, n, n // 4)
        assert bn == br, f"belady differs at layer {layer}: {bn} vs {br}"


# --------------------------------------------------------------------------- (d) affinity


def spec_scores(rows, n, decay, boost, max_score):
    """The documented EMA: decay every score, then boost each activated id (clamped)."""
    scores = [0.0] * n
    for row in rows:
        scores = [s * decay for s in scores]
        for e in row:
            scores[e] = min(scores[e] + boost, max_score)
    return np.array(scores)


@pytest.mark.parametrize("params", sorted(AFFINITY_PARAMS))
@pytest.mark.parametrize("n", [1, 8, 64, 256])
def test_update_batch_equals_row_updates(core_pair, n, params):
    decay, boost, max_score = AFFINITY_PARAMS[params]
    rng = np.random.default_rng([3, n, sorted(AFFINITY_PARAMS).index(params)])
    ids = uniform_stream(rng, n, 150, 4)  # repeats inside a row boost twice
    states = []
    for mod in core_pair:
        batch = mod.AffinityCore(n, decay, boost, max_score)
        rows = mod.AffinityCore(n, decay, boost, max_score)
        batch.update_batch(ids[:50])
        batch.update_batch(np.ascontiguousarray(ids[50:]))
        for row in ids.tolist():
            rows.update(row)
        assert_same_affinity(batch, rows)
        assert batch.scores().dtype == np.float64 and batch.activation_counts().dtype == np.int64
        states.append(batch)
    assert_same_affinity(*states)
    np.testing.assert_array_equal(
        states[1].activation_counts(), np.bincount(ids.ravel(), minlength=n)
    )
    # The cores decay lazily (src/affinity.hpp): the spec's scores within a few ulps, its ranking.
    spec = spec_scores(ids.tolist(), n, decay, boost, max_score)
    np.testing.assert_allclose(states[1].scores(), spec, rtol=1e-13, atol=1e-300)
    assert states[1].top_k_by_affinity(n) == np.lexsort((np.arange(n), -spec)).tolist()


@pytest.mark.parametrize("params", sorted(AFFINITY_PARAMS))
@pytest.mark.parametrize("n", [1, 5, 32, 200])
def test_affinity_rankings(core_pair, n, params):
    rng = np.random.default_rng([4, n, sorted(AFFINITY_PARAMS).index(params)])
    ids = zipf_stream(rng, n, 60, 3)
    cores = [mod.AffinityCore(n, *AFFINITY_PARAMS[params]) for mod in core_pair]
    for a in cores:
        a.update_batch(ids)
    an, ar = cores
    assert_same_affinity(an, ar)
    scores, counts = ar.scores(), ar.activation_counts()
    by_affinity = np.lexsort((np.arange(n), -scores)).tolist()  # highest first, then lowest id
    by_frequency = np.lexsort((np.arange(n), -counts)).tolist()
    for k in sorted({0, 1, 2, n // 2, n - 1, n, n + 3} - {-1}):
        assert an.top_k_by_affinity(k) == ar.top_k_by_affinity(k) == by_affinity[:k]
        assert an.top_k_by_frequency(k) == ar.top_k_by_frequency(k) == by_frequency[:k]
    for _ in range(40):
        cand = rng.integers(0, n, size=int(rng.integers(1, min(n, 6) + 1))).tolist()
        expected = min(cand, key=lambda e: (scores[e], e))
        assert an.least_affinity(cand) == ar.least_affinity(cand) == expected
    assert an.least_affinity([]) is None and ar.least_affinity([]) is None
    for e in range(n):
        expected = ((counts < counts[e]).sum() + 0.5 * (counts == counts[e]).sum()) / n
        assert an.frequency_percentile(e) == ar.frequency_percentile(e) == pytest.approx(expected)
        assert an.score(e) == ar.score(e) == scores[e]
        assert an.activation_count(e) == ar.activation_count(e) == counts[e]
    if params == "ties" and n > 1:  # the tie-break is exercised, not just possible
        assert len(set(scores.tolist())) < n


def test_affinity_ties_break_by_lower_id(core_pair):
    for mod in core_pair:
        a = mod.AffinityCore(6, 1.0, 1.0, 1.0)
        a.update([5, 3, 1])
        a.update([3, 5, 4])  # counts: 3 and 5 twice, 1 and 4 once; scores 1.0 for 1, 3, 4, 5
        assert a.top_k_by_affinity(6) == [1, 3, 4, 5, 0, 2]
        assert a.top_k_by_frequency(6) == [3, 5, 1, 4, 0, 2]
        assert a.least_affinity([5, 4, 2, 0]) == 0
        assert a.least_affinity([5, 3, 4]) == 3
        assert a.frequency_percentile(3) == (4 + 0.5 * 2) / 6


def test_non_finite_scores_rank_last(core_pair):
    """decay 0 with an infinite boost: inf * 0 is NaN. Non-finite scores rank below finite ones."""
    results = []
    for mod in core_pair:
        a = mod.AffinityCore(5, 0.0, math.inf, math.inf)
        a.update([3])  # score 3 = inf
        a.update([1])  # score 3 = inf * 0 = NaN, score 1 = inf
        s = a.scores()
        assert math.isnan(s[3]) and s[1] == math.inf and s[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
        assert a.top_k_by_affinity(5) == [0, 2, 4, 1, 3]
        assert a.least_affinity([0, 1, 3]) == 1
        assert a.least_affinity([3, 4]) == 3
        results.append((a.top_k_by_affinity(3), a.least_affinity([4, 3, 1, 0])))
    assert results[0] == results[1]


def test_non_finite_affinity_blend_falls_back_to_base_policy(core_pair):
    """Every blended score is NaN: the victim is the base policy's (LRU: the oldest touch)."""
    for mod in core_pair:
        a = mod.AffinityCore(4, 0.0, math.inf, math.inf)
        a.update([0, 1, 2, 3])
        a.update([0, 1, 2, 3])  # every score: inf * 0 + inf = NaN
        assert all(math.isnan(x) for x in a.scores())
        cache = mod.ExpertCacheCore(4, 2, 0.1, mod.LRU)
        cache.access(2)
        cache.access(1)
        assert cache.suggest_eviction_with_affinity(a, 0.5) == 2
        hits = cache.access_batch(np.array([[3], [2]], dtype=np.int32), a, 0.5)
        assert hits.tolist() == [[False], [False]]
        assert cache.hot_experts() == [3, 2]


def test_reset_and_copies(core_pair):
    for mod in core_pair:
        a = mod.AffinityCore(4, 0.5, 1.0, 2.0)
        a.update([1, 2])
        s = a.scores()
        s[:] = 99.0
        a.activation_counts()[:] = 99
        assert a.scores().tolist() == [0.0, 1.0, 1.0, 0.0]
        assert a.activation_counts().tolist() == [0, 1, 1, 0]
        a.reset()
        assert a.scores().tolist() == [0.0] * 4 and a.activation_counts().tolist() == [0] * 4

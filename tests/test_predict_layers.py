"""The ``moeray`` policy served a batch of tokens layer by layer (``PredictiveCaches.open_batch``,
``serve_layer``, ``close_batch``) and a window of tokens in one kernel call (``run_window``)
decides exactly as ``step`` token by token.

Why layer-major order can match: layer l's work touches only layer l's rows of the state and
reads the routing of layer l - 1 (same token, served before) and of the previous token (same
layer, served before in the same call); the clocks and lazy-decay scales of the batch's tokens
are fixed when it opens. So batches of any size reach the state of the token-major steps bit
for bit, on the native kernel and on the twin (``moeray.native._reference.predict``), and the
two agree with each other (tables to 1e-12 relative, as tests/test_native_predict.py). The one
exception, a re-split decided inside a batch (applied from the next batch), is checked apart.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from predict_helpers import LEARNED, SERVED

from moeray.native import backend
from moeray.policy.affinity import AffinityConfig, ExpertAffinity
from moeray.policy.predict import PLAN_EVENT_KINDS, PredictConfig, PredictiveCaches, PredictStats
from moeray.policy.split import SplitConfig
from moeray.policy.windows import PolicyWindow, PredictiveWindows
from moeray.traces import default_trace_path, load_trace

pytestmark = pytest.mark.pure
needs_native = pytest.mark.skipif(
    not PredictiveCaches._native,
    reason="the native kernel is not in use (MOERAY_PURE_PYTHON=1 or unbuilt)",
)
PATHS = [pytest.param(True, marks=needs_native, id="native"), pytest.param(False, id="twin")]

STATE = (*SERVED, *LEARNED, "_last_ids")
COUNTERS = tuple(field.name for field in dataclasses.fields(PredictStats))
STALL, PREFETCH, EVICTION = (PLAN_EVENT_KINDS.index(k) for k in PLAN_EVENT_KINDS)


def caches(native, layers, experts, top_k, capacity, config=None):
    out = PredictiveCaches(layers, experts, top_k, capacity, config or PredictConfig())
    out._native = native
    return out


def assert_same(a, b, where, rtol=0.0):
    """Equal state and counters; tables to rtol (0: bit for bit)."""
    for name in STATE:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), f"{where}: {name}"
        if rtol and name in ("_cross", "_cross_n", "_pair", "_pair_n", "_prev", "_prev_n"):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=0, err_msg=f"{where}: {name}")
        elif rtol and name in ("_affinity", "_touch"):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=0, err_msg=f"{where}: {name}")
        else:
            assert np.array_equal(x, y), f"{where}: {name}"
    sa, sb = a.stats, b.stats
    for name in COUNTERS:
        assert np.array_equal(getattr(sa, name), getattr(sb, name)), f"{where}: {name}"


def routing(rng, tokens, layers, experts, top_k):
    """int [tokens, L, k]: skewed routing, distinct experts per layer."""
    weights = 1.0 / np.arange(1, experts + 1) ** 1.1
    out = np.empty((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        p = weights[rng.permutation(experts)]
        p /= p.sum()
        for t in range(tokens):
            out[t, layer] = rng.choice(experts, size=top_k, replace=False, p=p)
    return out


def by_steps(c, ids, starts):
    for t in range(len(ids)):
        c.step(ids[t], new_sequence=bool(starts[t]))


def by_batches(c, ids, starts, size, record=False):
    """Serves ids [T, L, k] in batches of `size`, layer by layer; returns the events."""
    events = []
    for first in range(0, len(ids), size):
        chunk = ids[first : first + size]
        c.open_batch(starts[first : first + size], record=record)
        for layer in range(c.num_layers):
            c.serve_layer(layer, chunk[:, layer])
            if record:
                events.append(c.take_events())
        c.close_batch()
    return np.concatenate(events) if record else None


def starts_of(rng, tokens):
    starts = rng.random(tokens) < 0.05
    starts[0] = True
    return starts


# (layers, experts, top_k, capacity, config fields)
CASES = [
    (1, 6, 1, 2, {}),
    (4, 10, 3, [3, 5, 10, 2], {}),
    (4, 10, 3, 4, {"cross_pairs": False}),
    (3, 9, 2, 2, {"prefetch_budget": 0}),
    (3, 9, 3, 1, {}),  # capacity under top_k
    (3, 10, 2, 3, {"transition_decay": 0.01, "previous_decay": 0.05}),  # rescales mid-batch
]


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("size", [1, 3, 8])
def test_batches_decide_as_steps(native, case, size):
    layers, experts, top_k, capacity, fields = CASES[case]
    rng = np.random.default_rng(case)
    ids = routing(rng, 120, layers, experts, top_k)
    starts = starts_of(rng, 120)
    config = PredictConfig(**fields)
    a, b = (caches(native, layers, experts, top_k, capacity, config) for _ in range(2))
    by_steps(a, ids, starts)
    by_batches(b, ids, starts, size)
    assert_same(a, b, f"case {case}, batches of {size}")
    assert a.stats.evictions.sum() > 0


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("size", [1, 16])
def test_bundled_trace_batches_decide_as_steps(native, size):
    trace = load_trace(default_trace_path())
    ids = np.asarray(trace.expert_ids[:160], dtype=np.int64)
    starts = np.isin(np.arange(160), trace.seq_offsets)
    shape = (ids.shape[1], trace.num_experts, ids.shape[2], 8)
    a, b = caches(native, *shape), caches(native, *shape)
    by_steps(a, ids, starts)
    by_batches(b, ids, starts, size)
    assert_same(a, b, f"batches of {size}")
    assert a.stats.prefetches.sum() > 0


@needs_native
def test_native_and_twin_batches_agree():
    """The same batches on both kernels: the same decisions and events, tables to 1e-12."""
    rng = np.random.default_rng(9)
    ids = routing(rng, 100, 4, 12, 3)
    starts = starts_of(rng, 100)
    a, b = caches(True, 4, 12, 3, 4), caches(False, 4, 12, 3, 4)
    events = [by_batches(c, ids, starts, 5, record=True) for c in (a, b)]
    assert_same(a, b, "native vs twin", rtol=1e-12)
    assert np.array_equal(*events)


@needs_native
def test_large_tables_batches_decide_as_steps_and_the_twin():
    """Tables larger than a core's L2 (8.7 MB a layer at 128 experts): the native batches ask
    for the next layer's rows early (PredictKernel.large_tables), which changes nothing."""
    rng = np.random.default_rng(11)
    ids = routing(rng, 40, 2, 128, 4)
    starts = starts_of(rng, 40)
    steps, native, twin = (caches(path, 2, 128, 4, 16) for path in (True, True, False))
    assert 8 * 128 * (2 * 128 + steps._pair_buckets) > 2**20
    by_steps(steps, ids, starts)
    by_batches(native, ids, starts, 3)
    by_batches(twin, ids, starts, 3)
    assert_same(steps, native, "native batches vs steps")
    assert_same(native, twin, "native vs twin", rtol=1e-12)
    assert native.stats.evictions.sum() > 0


@pytest.mark.parametrize("native", PATHS)
def test_events_are_the_plan(native):
    """The events of each layer call account for every load and eviction the counters show,
    and replayed on the hot sets before it they give the hot sets after it; the next layer's
    prefetches for the first token come with the call that serves the layer before."""
    trace = load_trace(default_trace_path())
    ids = np.asarray(trace.expert_ids[:64], dtype=np.int64)
    c = caches(native, ids.shape[1], trace.num_experts, ids.shape[2], 8)
    by_steps(c, ids[:32], np.arange(32) == 0)  # warm tables: prefetches happen
    L, early = c.num_layers, 0
    for first in range(32, 64, 4):
        c.open_batch(np.zeros(4, dtype=bool), record=True)
        for layer in range(L):
            hot = c._hot.copy()
            before = {k: getattr(c.stats, k).copy() for k in ("stalls", "prefetches", "evictions")}
            c.serve_layer(layer, ids[first : first + 4, layer])
            events = c.take_events()
            assert events.dtype == np.int64 and events.shape[1] == 4
            for token, row, expert, kind in events.tolist():
                assert 0 <= token < 4 and row in (layer, layer + 1)
                assert hot[row, expert] == (kind == EVICTION)
                hot[row, expert] = kind != EVICTION
            assert np.array_equal(hot, c._hot)
            for key, kind in (("stalls", STALL), ("prefetches", PREFETCH), ("evictions", EVICTION)):
                counted = getattr(c.stats, key) - before[key]
                shown = np.bincount(events[events[:, 3] == kind, 1], minlength=L)
                assert np.array_equal(counted, shown), key
            early += int(((events[:, 1] == layer + 1) & (events[:, 3] == PREFETCH)).sum())
        c.close_batch()
    assert early > 0


@pytest.mark.parametrize("native", PATHS)
def test_resplits_of_one_token_batches_decide_as_steps(native):
    """With config.split a re-split applies from the next batch: batches of one token are
    exact, and larger batches still move capacity."""
    config = PredictConfig(split=SplitConfig(every_tokens=16, min_gain=0.0, max_move=2))
    rng = np.random.default_rng(5)
    ids = routing(rng, 160, 4, 12, 2)
    ids[:, 0] = rng.integers(0, 12, size=(160, 1)) // 6 * 6 + [0, 1]  # layer 0: few experts
    starts = np.arange(160) == 0
    a, b, d = (caches(native, 4, 12, 2, [4, 4, 4, 4], config) for _ in range(3))
    by_steps(a, ids, starts)
    by_batches(b, ids, starts, 1)
    assert_same(a, b, "batches of 1 with re-splits")
    assert a.stats.resplit_evictions.sum() > 0
    by_batches(d, ids, starts, 8)
    assert d.stats.resplit_moved > 0


def test_layers_out_of_order_are_refused():
    c = caches(PredictiveCaches._native, 3, 6, 2, 2)
    ids = np.array([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"^layer: no batch is open"):
        c.serve_layer(0, ids)
    c.open_batch(np.array([True, False]))
    with pytest.raises(ValueError, match=r"^layer: expected 0 \(layers in order 0..2 per batch\)"):
        c.serve_layer(1, ids)
    c.serve_layer(0, ids)
    hot = c._hot.copy()
    with pytest.raises(ValueError, match=r"^layer: expected 1 .*got 2$"):
        c.serve_layer(2, ids)
    with pytest.raises(ValueError, match=r"^ids: every id must be in \[0, 6\)"):
        c.serve_layer(1, ids + 5)
    with pytest.raises(ValueError, match=r"^ids: expected shape \[2, 2\]"):
        c.serve_layer(1, ids[:1])
    assert np.array_equal(hot, c._hot)  # nothing changed
    with pytest.raises(ValueError, match=r"^close_batch: layers 1..2 of the batch not served"):
        c.close_batch()
    with pytest.raises(ValueError, match=r"^step: a batch is open"):
        c.step(np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"^open_batch: a batch is open"):
        c.open_batch(np.array([True]))
    c.serve_layer(1, ids)
    c.serve_layer(2, ids)
    with pytest.raises(ValueError, match=r"^layer: every layer of the batch is served"):
        c.serve_layer(0, ids)
    c.close_batch()
    with pytest.raises(ValueError, match=r"^new_sequence: expected bool \[tokens\]"):
        c.open_batch(np.zeros(0, dtype=bool))


# --------------------------------------------------------------------------- the window step


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_windows_decide_as_steps(native, case):
    layers, experts, top_k, capacity, fields = CASES[case]
    rng = np.random.default_rng(100 + case)
    ids = routing(rng, 150, layers, experts, top_k)
    starts = starts_of(rng, 150)
    config = PredictConfig(**fields)
    a, b = (caches(native, layers, experts, top_k, capacity, config) for _ in range(2))
    by_steps(a, ids, starts)
    for first, end in ((0, 1), (1, 70), (70, 70), (70, 150)):  # an empty window too
        b.run_window(ids[first:end], starts[first:end])
    assert_same(a, b, f"case {case}")
    if fields.get("transition_decay") == 0.01:
        assert b._scale < 1e200 and b._clock == 150  # rescaled inside a window


@pytest.mark.parametrize("native", PATHS)
def test_window_without_starts_continues_the_sequence(native):
    trace = load_trace(default_trace_path())
    ids = np.asarray(trace.expert_ids[:120], dtype=np.int64)
    shape = (ids.shape[1], trace.num_experts, ids.shape[2], 8)
    a, b = caches(native, *shape), caches(native, *shape)
    by_steps(a, ids, np.zeros(120, dtype=bool))
    b.run_window(ids[:50])
    b.run_window(ids[50:].astype(np.int32))
    assert_same(a, b, "bundled trace")
    assert a.stats.prefetches.sum() > 0


@needs_native
def test_window_kernels_agree():
    """The native window step and the twin's, each over its own copy of one state."""
    rng = np.random.default_rng(12)
    ids = routing(rng, 80, 3, 9, 3)
    starts = starts_of(rng, 80)
    a, b = PredictiveCaches(3, 9, 3, 4), PredictiveCaches(3, 9, 3, 4)
    kernels = backend._PredictKernel(**a._kernel_arguments()), b._twin()
    out = [k.run_window(ids, starts, None, 0, 1.0, 1.0, 0.999, 0.99, 0) for k in kernels]
    kernels[1].flush()
    assert out[0] == out[1] and out[0][0] == 80
    for name, x in a._kernel_arguments().items():
        y = b._kernel_arguments()[name]
        if isinstance(x, np.ndarray) and x.dtype == np.float64:
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=0, err_msg=name)
        else:
            assert np.array_equal(x, y), name


@pytest.mark.parametrize("native", PATHS)
def test_window_layers_below_first_are_routing_only(native):
    """run_window(first_layer=2): layers 2.. decide as the full steps, layers 0 and 1 keep
    their state and counters."""
    rng = np.random.default_rng(31)
    ids = routing(rng, 90, 4, 10, 3)
    starts = starts_of(rng, 90)
    a, b = caches(native, 4, 10, 3, 4), caches(native, 4, 10, 3, 4)
    by_steps(a, ids, starts)
    b.run_window(ids[:40], starts[:40], first_layer=2)
    b.run_window(ids[40:], starts[40:], first_layer=2)
    for name in ("_hot", "_pending", "_touch", "_affinity", "_prev", "_cross", "_pair"):
        x, y = getattr(a, name), getattr(b, name)
        assert np.array_equal(x[2:], y[2:]), name
        assert not y[:2].any(), name
    for name in ("hits", "stalls", "prefetches", "prefetch_hits", "wasted_prefetches", "evictions"):
        x, y = getattr(a.stats, name), getattr(b.stats, name)  # [layers] each
        assert np.array_equal(x[2:], y[2:]) and not y[:2].any(), name
    assert b._clock == 90 and a.stats.prefetches[2:].sum() > 0
    with pytest.raises(ValueError, match=r"^first_layer: expected an int \[0, 3\], got 4"):
        b.run_window(ids[:1], first_layer=4)


def test_window_checks_its_input(core):
    c = PredictiveCaches(3, 6, 2, 2)
    kernel = core._PredictKernel(**c._kernel_arguments())
    ids = np.zeros((4, 3, 2), dtype=np.int64)
    args = (None, None, 0, 1.0, 1.0, 0.999, 0.99, 0)
    with pytest.raises(ValueError, match=r"ids: every id must be in \[0, 6\)"):
        kernel.run_window(ids + 6, *args)
    with pytest.raises(ValueError, match=r"ids: expected shape \[4, 3, 2\]"):
        kernel.run_window(np.zeros((4, 3, 3), dtype=np.int64), *args)
    with pytest.raises(ValueError, match=r"new_sequence: expected shape \[4\]"):
        kernel.run_window(ids, np.zeros(3, dtype=bool), *args[1:])
    with pytest.raises(ValueError, match=r"transition_decay: expected a float in \(0, 1\)"):
        kernel.run_window(ids, None, None, 0, 1.0, 1.0, 1.0, 0.99, 0)
    assert not c._hot.any()
    with pytest.raises(ValueError, match=r"first_layer: expected an int in \[0, 2\]"):
        kernel.run_window(ids, None, None, 0, 1.0, 1.0, 0.999, 0.99, 3)
    assert kernel.run_window(ids, None, None, 5, 1.0, 1.0, 0.5, 0.5, 0)[0] == 9


class _TokenByToken(PredictiveCaches):
    """Windows served by ``step`` one token at a time (the path before the window step)."""

    def _windowed(self) -> bool:
        return False


@pytest.mark.parametrize("native", PATHS)
def test_policy_windows_decide_as_token_loops(native, monkeypatch):
    """PredictiveWindows (layers 1..3 and their shadow layer 0) over windows with sequence
    starts and re-splits: the window step gives the counters and hot sets of the token loop."""
    monkeypatch.setattr(PredictiveCaches, "_native", native)
    rng = np.random.default_rng(21)
    ids = routing(rng, 120, 4, 12, 3)
    starts = starts_of(rng, 120)
    capacity = {layer: 4 for layer in range(4)}
    policies = [
        PredictiveWindows(
            [1, 2, 3],
            12,
            capacity,
            {x: ExpertAffinity(AffinityConfig(num_experts=12)) for x in range(4)},
            PredictConfig(),
            make,
        )
        for make in (PredictiveCaches, _TokenByToken)
    ]
    for first in range(0, 120, 40):
        window = PolicyWindow(
            tuple(ids[first : first + 40, layer] for layer in (1, 2, 3)),
            previous_layer_ids=ids[first : first + 40, 0],
            seq_starts=starts[first : first + 40],
            prefetch_budget=2,
            resplits=((0, (4, 4, 4, 4)), (17, (4, 3, 5, 4))) if first == 40 else (),
        )
        counts = [policy.apply(window) for policy in policies]
        assert counts[0] == counts[1]
        for (hot_a, ahead_a), (hot_b, ahead_b) in zip(*(p.hot_sets() for p in policies)):
            assert np.array_equal(hot_a, hot_b) and np.array_equal(ahead_a, ahead_b)
    assert policies[0]._caches.stats.resplit_evictions.sum() > 0
    tables = [p.tables() for p in policies]  # the hosted layers' (the shadow's never runs)
    for name in tables[0]:
        assert np.array_equal(tables[0][name], tables[1][name]), name
    window, token = (p._caches for p in policies)
    assert not window._hot[0].any() and token._hot[0].any()  # the shadow: routing only
    for name in ("_hot", "_pending", "_touch", "_affinity", "_prev", "_cross"):
        assert np.array_equal(getattr(window, name)[1:], getattr(token, name)[1:]), name


@pytest.mark.parametrize("native", PATHS)
def test_an_aborted_batch_is_a_batch_of_its_served_layers_then_a_new_sequence(native):
    """abort_batch after layers 0..1 of 4: those layers decide as if the batch's tokens had
    been served there, the others as if they never came, and the next token starts afresh
    (as a new sequence). Compared with steps of the same routing on the layers it reached."""
    rng = np.random.default_rng(11)
    ids = routing(rng, 30, 4, 12, 3)
    a = caches(native, 4, 12, 3, 4)
    for t in range(10):
        a.step(ids[t])
    a.open_batch(np.zeros(2, dtype=bool))
    for layer in range(2):
        a.serve_layer(layer, ids[10:12, layer])
    a.abort_batch()
    with pytest.raises(ValueError, match="no batch is open"):
        a.abort_batch()
    for t in range(12, 30):
        a.step(ids[t], new_sequence=t == 12)
    uses = a.stats.hits + a.stats.stalls
    assert uses.tolist() == [30 * 3, 30 * 3, 28 * 3, 28 * 3]


@needs_native
def test_native_and_twin_abort_alike():
    rng = np.random.default_rng(12)
    ids = routing(rng, 40, 4, 12, 3)
    pair = caches(True, 4, 12, 3, 4), caches(False, 4, 12, 3, 4)
    for c in pair:
        for t in range(10):
            c.step(ids[t])
        c.open_batch(np.zeros(3, dtype=bool))
        c.serve_layer(0, ids[10:13, 0])
        c.abort_batch()
        for t in range(13, 40):
            c.step(ids[t])
    assert_same(*pair, "native vs twin after an abort", rtol=1e-12)

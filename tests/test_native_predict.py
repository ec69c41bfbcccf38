"""The native kernel of the ``moeray`` policy (``moeray.native._core._PredictKernel``) and its
twin's phases (``moeray.native._reference.predict``, run by ``PredictiveCaches._step_numpy``)
decide alike.

Two ``PredictiveCaches`` are fed the same tokens, one on the native path (tokens without hints)
and one forced onto the numpy path; after every token their hot sets, pending prefetches, hot
counts and every counter must be equal, and the learned tables equal to 1e-12 relative. Streams:
random small models (top_k 1, one layer, pairs on and off, hashed pair buckets, budgets 0 and
None, several capacities, sequence starts, repeated ids, fast decays that rescale the tables),
the bundled trace, tokens with hints (numpy on both sides) between plain ones, and re-splits.
The kernels' boundary checks are tested on their own, on both cores.

The parity tests are skipped where the native step is not in use (``MOERAY_PURE_PYTHON=1`` or
an unbuilt core): there both sides would run numpy.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from predict_helpers import HINTS, LEARNED, SERVED

import moeray.policy.predict as predict
from moeray.native import backend
from moeray.native._reference import predict as twin
from moeray.policy.predict import PredictConfig, PredictiveCaches, PredictStats
from moeray.policy.split import SplitConfig
from moeray.traces import default_trace_path, load_trace

pytestmark = pytest.mark.pure
needs_native = pytest.mark.skipif(
    not PredictiveCaches._native,
    reason="the native step is not in use (MOERAY_PURE_PYTHON=1 or unbuilt)",
)

EXACT = SERVED
TABLES = LEARNED + HINTS
COUNTERS = tuple(field.name for field in dataclasses.fields(PredictStats))


# --------------------------------------------------------------------------- helpers


def twins(num_layers, num_experts, top_k, capacity, config=None):
    """(native, numpy): the same caches, the second forced onto the numpy path."""
    config = PredictConfig() if config is None else config
    native = PredictiveCaches(num_layers, num_experts, top_k, capacity, config)
    numpy = PredictiveCaches(num_layers, num_experts, top_k, capacity, config)
    numpy._native = False
    assert native._native
    return native, numpy


def assert_same(native, numpy, where):
    for name in EXACT:
        a, b = getattr(native, name), getattr(numpy, name)
        assert (a is None) == (b is None), f"{where}: {name}"
        assert np.array_equal(a, b), f"{where}: {name} native {a} numpy {b}"
    for name in TABLES:
        np.testing.assert_allclose(
            getattr(native, name),
            getattr(numpy, name),
            rtol=1e-12,
            atol=0,
            err_msg=f"{where}: {name}",
        )
    sa, sb = native.stats, numpy.stats  # flushes the numpy side's queued guesses
    for name in COUNTERS:
        assert np.array_equal(getattr(sa, name), getattr(sb, name)), (
            f"{where}: {name} native {getattr(sa, name)} numpy {getattr(sb, name)}"
        )


def feed(native, numpy, ids, starts=(0,), hints=None, every=1):
    """Steps both with ids [T, L, k] (hints: None or [T, L, h] with None rows), comparing them
    every `every` tokens and at the end."""
    starts = set(starts)
    for t in range(len(ids)):
        h = None if hints is None else hints[t]
        for caches in (native, numpy):
            caches.step(ids[t], new_sequence=t in starts, hints=h)
        if t % every == 0 or t == len(ids) - 1:
            assert_same(native, numpy, f"token {t}")


def routing(rng, tokens, num_layers, num_experts, top_k, repeats=False):
    """int [tokens, L, k]: skewed routing, distinct experts per layer unless `repeats`."""
    if repeats:
        return rng.integers(0, num_experts, size=(tokens, num_layers, top_k))
    weights = 1.0 / np.arange(1, num_experts + 1) ** 1.1
    out = np.empty((tokens, num_layers, top_k), dtype=np.int64)
    for layer in range(num_layers):
        p = weights[rng.permutation(num_experts)]
        p /= p.sum()
        for t in range(tokens):
            out[t, layer] = rng.choice(num_experts, size=top_k, replace=False, p=p)
    return out


# --------------------------------------------------------------------------- parity

# (layers, experts, top_k, capacity, config fields, repeated ids)
CASES = [
    (1, 6, 1, 2, {}, False),  # one layer, top-1
    (3, 8, 1, 3, {}, False),  # top-1: no pairs
    (1, 8, 3, 4, {}, False),  # one layer: no pairs
    (4, 10, 3, [3, 5, 10, 2], {}, False),  # pairs, capacities per layer
    (4, 10, 3, 4, {"cross_pairs": False}, False),
    (3, 9, 2, 2, {"prefetch_budget": 0}, False),  # a demand cache
    (3, 9, 2, 9, {"prefetch_budget": None}, False),  # every expert fits
    (3, 9, 3, 1, {}, False),  # capacity under top_k
    (3, 9, 3, 3, {}, True),  # repeated ids in a row
    (
        3,
        10,
        3,
        4,
        {
            "prefetch_budget": 5,
            "prefetch_threshold": 0.0,
            "prefetch_margin": 0.0,
            "victim_next_weight": 0.0,
            "victim_affinity_weight": 0.5,
            "keep_affinity_weight": 0.3,
        },
        False,
    ),
    (3, 10, 3, 4, {"cross_weight": 0.0, "affinity_weight": 0.0}, False),
    (3, 10, 3, 4, {"previous_weight": 0.0, "pair_prior": 0.0}, False),
    (3, 10, 2, 3, {"transition_decay": 0.01, "previous_decay": 0.05}, False),  # rescales
]


@needs_native
@pytest.mark.parametrize("case", range(len(CASES)))
def test_random_streams_decide_alike(case):
    layers, experts, top_k, capacity, fields, repeats = CASES[case]
    rng = np.random.default_rng(case)
    ids = routing(rng, 150, layers, experts, top_k, repeats)
    starts = [0] + [t for t in range(1, 150) if rng.random() < 0.05]
    native, numpy = twins(layers, experts, top_k, capacity, PredictConfig(**fields))
    feed(native, numpy, ids, starts)
    if fields.get("transition_decay") == 0.01:
        assert native._scale < 1e200 and native._clock > 120  # rescaled at least once


@needs_native
def test_hashed_pair_buckets_decide_alike(monkeypatch):
    monkeypatch.setattr(predict, "PAIR_TABLE_ENTRIES", 3 * 12 * 5)  # 5 buckets for 78 pairs
    native, numpy = twins(3, 12, 3, 4)
    assert native._pair_buckets == 5
    feed(native, numpy, routing(np.random.default_rng(7), 150, 3, 12, 3), starts=(0, 60))


@needs_native
def test_bundled_trace_decides_alike():
    trace = load_trace(default_trace_path())
    ids = np.asarray(trace.expert_ids[:300])
    native, numpy = twins(ids.shape[1], trace.num_experts, ids.shape[2], 8)
    feed(native, numpy, ids, starts=trace.seq_offsets[trace.seq_offsets < 300], every=10)
    assert native.stats.prefetches.sum() > 0 and native.stats.evictions.sum() > 0


@needs_native
def test_hinted_tokens_interleave():
    """Tokens with hints run numpy on both sides, the others native on one: the shared state
    stays the same."""
    rng = np.random.default_rng(3)
    ids = routing(rng, 200, 4, 10, 3)
    hints = [
        None if t % 3 else np.where(rng.random((4, 2)) < 0.7, ids[t, :, :2], -1) for t in range(200)
    ]
    native, numpy = twins(4, 10, 3, 4)
    feed(native, numpy, ids, starts=(0, 90), hints=hints)
    assert native.stats.predictor_uses[predict.PREDICTOR_NAMES.index("hints")].sum() > 0


@needs_native
def test_resplits_decide_alike():
    config = PredictConfig(split=SplitConfig(every_tokens=16, min_gain=0.0, max_move=2))
    rng = np.random.default_rng(5)
    ids = routing(rng, 300, 4, 12, 2)
    ids[:, 0] = rng.integers(0, 12, size=(300, 1)) // 6 * 6 + [0, 1]  # layer 0: few experts
    native, numpy = twins(4, 12, 2, [4, 4, 4, 4], config)
    feed(native, numpy, ids, starts=(0, 150), every=3)
    s = native.stats
    assert s.resplit_evictions.sum() > 0 and s.resplit_transfers.sum() > 0


def test_guesses_break_ties_by_lower_expert():
    """The twin's rule (which the native step mirrors): among equal float32 scores the lower
    expert id is guessed; a score of 0 is no guess."""
    caches = PredictiveCaches(1, 4, 1, 1)
    kernel = caches._twin()
    twin.count_guess(kernel, 2, np.array([[0.5, 0.5, 0.5, 0.0]]), np.array([[1]]))
    twin.count_guess(kernel, 2, np.array([[0.0, 0.0, 0.0, 0.0]]), np.array([[0]]))
    kernel.flush()
    st = caches._stats
    assert (st.predictor_hits[2, 0], st.predictor_guesses[2, 0], st.predictor_uses[2, 0]) == (
        0,
        1,
        2,
    )


# --------------------------------------------------------------------------- the boundary


def token(caches):
    ids = np.zeros((caches.num_layers, caches.top_k), dtype=np.int64)
    ids[:, :] = np.arange(caches.top_k)
    return dict(ids=ids, last_ids=None, clock=1, scale=1.0, next_scale=1.0, next_prev_scale=1.0)


def replace(mapping, key, value):
    out = dict(mapping)
    out[key] = value
    return out


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda a: replace(a, "touch", a["touch"].astype(np.float32)),
            TypeError,
            "touch: expected dtype float64",
        ),
        (
            lambda a: replace(a, "prev", np.zeros((3, 6, 5))),
            ValueError,
            "prev: expected shape [3, 6, 6]",
        ),
        (
            lambda a: replace(a, "cross_n", np.zeros((6, 3)).T),
            ValueError,
            "cross_n: expected a C-contiguous array",
        ),
        (
            lambda a: replace(a, "pair", np.zeros((3, 21))),
            ValueError,
            "pair: expected shape [3, buckets, 6], got [3, 21]",
        ),
        (
            lambda a: replace(a, "hits", [0, 0, 0]),
            TypeError,
            "hits: expected a numpy int64 array",
        ),
        (
            lambda a: replace(a, "pending", None),
            TypeError,
            "pending: expected a numpy bool array",
        ),
        (lambda a: replace(a, "top_k", 7), ValueError, "top_k: expected an int in [1, 6]"),
        (
            lambda a: replace(a, "affinity_decay", 1.5),
            ValueError,
            "affinity_decay: expected a float in (0, 1)",
        ),
        (
            lambda a: replace(a, "prefetch_budget", 1.5),
            TypeError,
            "prefetch_budget: expected an int",
        ),
        (lambda a: replace(a, "pair_prior", None), TypeError, "pair_prior: expected a float"),
    ],
)
def test_kernel_checks_the_state_once(core, change, error, message):
    caches = PredictiveCaches(3, 6, 2, 2)
    with pytest.raises(error) as raised:
        core._PredictKernel(**change(caches._kernel_arguments()))
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda a: replace(a, "ids", a["ids"].astype(np.int32)),
            TypeError,
            "ids: expected dtype int64",
        ),
        (lambda a: replace(a, "ids", a["ids"] + 6), ValueError, "ids: every id must be in [0, 6)"),
        (
            lambda a: replace(a, "last_ids", np.zeros((3, 3), dtype=np.int64)),
            ValueError,
            "last_ids: expected shape [3, 2]",
        ),
        (lambda a: replace(a, "clock", 0), ValueError, "clock: expected an int >= 1"),
        (
            lambda a: replace(a, "next_scale", float("nan")),
            ValueError,
            "next_scale: expected a finite",
        ),
    ],
)
def test_step_checks_the_token(core, change, error, message):
    caches = PredictiveCaches(3, 6, 2, 2)
    kernel = core._PredictKernel(**caches._kernel_arguments())
    before = caches._hot.copy(), caches._touch.copy()
    with pytest.raises(error) as raised:
        kernel.step(**change(token(caches)))
    assert message in str(raised.value)
    assert np.array_equal(caches._hot, before[0]) and np.array_equal(caches._touch, before[1])


def test_kernel_refuses_read_only_state(core):
    caches = PredictiveCaches(3, 6, 2, 2)
    caches._hot.setflags(write=False)
    with pytest.raises(ValueError, match=r"hot: expected a writeable array"):
        core._PredictKernel(**caches._kernel_arguments())
    caches._hot.setflags(write=True)
    caches.capacity.setflags(write=False)  # read, never written
    core._PredictKernel(**caches._kernel_arguments())


def test_kernel_steps_what_step_passes(core):
    caches = PredictiveCaches(3, 6, 2, 2)
    kernel = core._PredictKernel(**caches._kernel_arguments())
    kernel.step(**token(caches))
    kernel.flush()
    assert caches._hot_count.tolist() == [2, 2, 2] and caches.stats.stalls.tolist() == [2, 2, 2]
    # uses per predictor: cross-layer at layers 1 and 2, no previous token, affinity, combined
    assert caches.stats.predictor_uses[:4].sum(axis=1).tolist() == [4, 0, 6, 6]


@needs_native
def test_kernels_step_alike_on_the_same_state():
    """The native kernel and the twin's, each over its own copy of one state, fed the same
    tokens: the same state after every step (the tables to 1e-12, as above)."""
    ids = routing(np.random.default_rng(11), 60, 3, 9, 3)
    a, b = PredictiveCaches(3, 9, 3, 4), PredictiveCaches(3, 9, 3, 4)
    kernels = backend._PredictKernel(**a._kernel_arguments()), b._twin()
    for t in range(len(ids)):
        last = ids[t - 1] if t else None
        for kernel in kernels:
            kernel.step(ids[t], last, t + 1, 0.999**-t, 0.999 ** -(t + 1), 0.99 ** -(t + 1))
        kernels[1].flush()
        for name, x in a._kernel_arguments().items():
            y = b._kernel_arguments()[name]
            if isinstance(x, np.ndarray) and x.dtype == np.float64:
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=0, err_msg=name)
            else:
                assert np.array_equal(x, y), f"token {t}: {name}"
    assert a._stats.prefetches.sum() > 0 and a._stats.evictions.sum() > 0

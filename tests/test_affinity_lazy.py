"""The lazy affinity decay (``src/affinity.hpp``): O(top_k) a token, the seed's scores within a few
ulps, the seed's rankings, native and twin bit for bit.

A token multiplies one running scale by ``decay`` and adds ``boost / scale`` (clamped at
``max_score / scale``) to its experts' stored values; a score reads ``min(stored * scale,
max_score)``; the scale is folded into the stored values when it falls below 2^-64. ``eager``
below is the seed's arithmetic (every score decayed every token), the reference the lazy form is
held to.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeray.native._reference.affinity import lazy_applies

pytestmark = pytest.mark.pure

# (decay, boost, max_score): the service's and the replay's defaults, bench_core's (every boost
# saturates), a fast decay that folds the scale every 64 tokens, no decay at all.
LAZY = [
    (0.95, 0.05, 1.0),
    (0.99, 1.0, 1.0),
    (0.5, 0.3, 1.0),
    (0.9, 0.25, math.inf),
    (1.0, 0.5, 3.0),
]


def eager(n: int, params, ids: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """The scores after ``ids`` from ``scores`` (zeros by default), in the seed's arithmetic."""
    decay, boost, max_score = params
    scores = np.zeros(n) if scores is None else scores.copy()
    for row in ids.tolist():
        scores *= decay
        for e in row:
            scores[e] = min(scores[e] + boost, max_score)
    return scores


def routing(seed: int, n: int, rows: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Skewed, as real routing is: a few hot experts, so scores meet the clamp and tie there.
    p = rng.zipf(1.5, size=n).astype(float)
    p /= p.sum()
    return np.stack([rng.choice(n, size=k, replace=False, p=p) for _ in range(rows)]).astype(
        np.int32
    )


def ranking(scores: np.ndarray) -> list[int]:
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))


@pytest.mark.parametrize("params", LAZY)
def test_lazy_scores_and_rankings_match_the_eager_form(core, params):
    assert lazy_applies(*params)
    n, ids = 40, routing(1, 40, 1500, 6)
    a, want = core.AffinityCore(n, *params), np.zeros(n)
    for start in range(0, len(ids), 100):
        a.update_batch(ids[start : start + 100])
        want = eager(n, params, ids[start : start + 100], want)
        got = a.scores()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
        assert (got <= params[2]).all()
        assert a.top_k_by_affinity(n) == ranking(want)
        assert [a.score(e) for e in range(n)] == got.tolist()


@pytest.mark.parametrize("params", LAZY)
def test_batch_equals_single_updates_across_scale_folds(core, params):
    n, ids = 24, routing(2, 24, 700, 4)
    batch, single = core.AffinityCore(n, *params), core.AffinityCore(n, *params)
    batch.update_batch(ids[:333])
    batch.update_batch(ids[333:])
    for row in ids.tolist():
        single.update(row)
    assert batch.scores().tobytes() == single.scores().tobytes()
    np.testing.assert_array_equal(batch.activation_counts(), single.activation_counts())


@pytest.mark.parametrize("params", LAZY + [(0.0, 1.0, 1.0), (0.95, 2.0**600, 1.0)])
def test_native_equals_the_twin_across_scale_folds(core_pair, params):
    n, ids = 70, routing(3, 70, 2000, 8)
    native, twin = (mod.AffinityCore(n, *params) for mod in core_pair)
    for a in (native, twin):
        a.update_batch(ids[:1000])
        a.update(ids[1000].tolist())
        a.update_batch(ids[1001:])
    assert native.scores().tobytes() == twin.scores().tobytes()
    assert native.top_k_by_affinity(n) == twin.top_k_by_affinity(n)


@pytest.mark.parametrize(
    "params", [(0.0, 1.0, 1.0), (1e-6, 0.5, 1.0), (0.95, 2.0**600, 1.0), (0.9, 0.1, -1.0)]
)
def test_parameters_outside_the_lazy_bounds_take_the_eager_form(core, params):
    assert not lazy_applies(*params)
    n, ids = 16, routing(4, 16, 300, 3)
    a = core.AffinityCore(n, *params)
    a.update_batch(ids)
    assert a.scores().tobytes() == eager(n, params, ids).tobytes()


def test_load_state_then_scores_round_trips(core):
    n, params = 32, (0.95, 0.05, 1.0)
    a = core.AffinityCore(n, *params)
    a.update_batch(routing(5, n, 900, 4))  # past a fold of the scale
    saved, counts = a.scores(), a.activation_counts()
    b = core.AffinityCore(n, *params)
    b.load_state(saved.copy(), counts.copy())
    assert b.scores().tobytes() == saved.tobytes()
    ids = routing(6, n, 200, 4)
    a.update_batch(ids)
    b.update_batch(ids)
    np.testing.assert_allclose(b.scores(), a.scores(), rtol=1e-13)
    assert b.top_k_by_affinity(n) == a.top_k_by_affinity(n)
    b.reset()
    assert b.scores().tobytes() == np.zeros(n).tobytes()

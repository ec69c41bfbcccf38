"""The native batched affinity update (``AffinityCore.update_batch``) gives the twin's bits.

With the usual parameters both cores decay lazily (``src/affinity.hpp``: a running scale, O(top_k)
a token; tests/test_affinity_lazy.py holds it to the eager form). Outside the lazy form's bounds
(decay 0 or NaN, huge boosts, a negative cap), on CPUs with AVX-512 the C++ core replays two
tokens per pass over the scores with masked vector operations (``update_rows_avx512``); elsewhere
it sweeps token by token. Either way every score must see the twin's IEEE operations in the twin's
order, so the scores are compared as bytes (``-0.0`` and ``0.0`` differ), all but NaNs' sign and
payload: where two NaNs meet, x86 keeps the first operand's, and neither core fixes the order the
compiler picks (the native per-token ``update`` differs from the twin there too); rankings see
every NaN alike. Over sizes that are not multiples of 8 or 64, odd and even batch lengths, tokens
that name an expert twice, and parameters and states that produce infinities, NaNs and
subnormals.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.pure

SPECIAL = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-310,
    -1e-310,
    1e300,
    math.inf,
    -math.inf,
    math.nan,
    -math.nan,
]


def routing(rng: np.random.Generator, n: int, rows: int, k: int, repeats: bool) -> np.ndarray:
    """int32 [rows, k]: distinct ids per token unless `repeats` (then some tokens name one twice)."""
    if repeats or k > n:
        return rng.integers(0, n, size=(rows, k), dtype=np.int32)
    return np.stack([rng.choice(n, size=k, replace=False) for _ in range(rows)]).astype(np.int32)


def start_state(rng: np.random.Generator, n: int) -> np.ndarray:
    scores = rng.uniform(-0.5, 1.5, size=n)
    special = rng.random(n) < 0.2
    scores[special] = rng.choice(SPECIAL, size=int(special.sum()))
    return scores


def run_both(core_pair, n, params, ids, scores):
    states = []
    for mod in core_pair:
        a = mod.AffinityCore(n, *params)
        a.load_state(scores.copy(), np.zeros(n, dtype=np.int64))
        a.update_batch(ids)
        states.append((a.scores(), a.activation_counts()))
    (native_scores, native_counts), (twin_scores, twin_counts) = states
    nan = np.isnan(twin_scores)
    np.testing.assert_array_equal(np.isnan(native_scores), nan)
    assert native_scores[~nan].tobytes() == twin_scores[~nan].tobytes()
    np.testing.assert_array_equal(native_counts, twin_counts)


@pytest.mark.parametrize("n", [1, 7, 8, 63, 64, 65, 200, 256, 300])
@pytest.mark.parametrize("rows", [15, 16, 17, 257])
@pytest.mark.parametrize("repeats", [False, True])
def test_update_batch_bytes_equal_the_twin(core_pair, n, rows, repeats):
    rng = np.random.default_rng([5, n, rows, repeats])
    ids = routing(rng, n, rows, min(8, n), repeats)
    run_both(core_pair, n, (0.95, 0.3, 1.0), ids, start_state(rng, n))


@pytest.mark.parametrize(
    "params",
    [
        (0.99, 1.0, 1.0),  # bench_core's: every boost saturates
        (1.0, 0.25, 10.0),
        (0.5, -0.75, -0.5),  # negative boost and cap
        (-0.9, 0.3, 0.6),  # negative decay: signs alternate
        (0.0, math.inf, math.inf),  # inf * 0 is NaN
        (math.inf, 1.0, 2.0),
        (0.9, math.nan, 1.0),
        (math.inf, math.nan, 1.0),  # inf * 0 is NaN, then + NaN
        (-math.nan, 0.5, 1.0),
        (math.nan, 0.5, math.nan),
        (0.999, 1e-310, 1e-300),  # subnormal boosts
        (-0.0, -0.0, -0.0),
    ],
)
@pytest.mark.parametrize("repeats", [False, True])
def test_update_batch_special_values(core_pair, params, repeats):
    rng = np.random.default_rng([6, repeats])
    n = 72
    ids = routing(rng, n, 101, 6, repeats)
    run_both(core_pair, n, params, ids, start_state(rng, n))


def test_long_batch_in_pieces_equals_one_call(core_pair):
    """Batches split anywhere (odd lengths too) end in the same bytes as one call."""
    native, _ = core_pair
    rng = np.random.default_rng(7)
    n = 256
    ids = routing(rng, n, 4099, 8, False)
    one, pieces = native.AffinityCore(n, 0.99, 1.0, 1.0), native.AffinityCore(n, 0.99, 1.0, 1.0)
    one.update_batch(ids)
    for start, stop in ((0, 17), (17, 18), (18, 1001), (1001, 4099)):
        pieces.update_batch(np.ascontiguousarray(ids[start:stop]))
    assert one.scores().tobytes() == pieces.scores().tobytes()
    run_both(core_pair, n, (0.99, 1.0, 1.0), ids[:600], np.zeros(n))
    run_both(core_pair, n, (0.9, 0.2, 1.0), ids[:1000], np.zeros(n))  # folds the scale twice

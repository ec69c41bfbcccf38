"""Bad input raises ValueError or TypeError naming the argument, and changes nothing.

Covered at three levels: the public API (``moeray.ExpertCache``, ``ExpertAffinity``,
``schedule``, ``belady_hits``, the config dataclasses), each core module directly (the C++
extension and its pure-Python twin must raise the same exception type), and routing trace
files (``moeray.load_trace``). Every ``match=`` names the argument the message must mention.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

import moeray

pytestmark = pytest.mark.pure

NAN, INF = math.nan, math.inf
N = 8  # experts in most tests below


def is_reference(core) -> bool:
    return core.__name__.endswith("_reference")


def ids_of(rows, dtype=np.int32) -> np.ndarray:
    return np.array(rows, dtype=dtype)


def warm_core_cache(core, policy="LRU"):
    cache = core.ExpertCacheCore(N, 3, 0.1, getattr(core, policy))
    for e in (1, 2, 1, 5, 7, 2):
        cache.access(e)
    return cache


def snapshot(cache, affinity=None):
    state = (tuple(cache.stats()), tuple(cache.hot_experts()))
    if affinity is not None:
        state += (affinity.scores().tolist(), affinity.activation_counts().tolist())
    return state


# =========================================================================== core modules


class TestCoreIds:
    """Expert ids out of range or negative, in every core entry point."""

    @pytest.mark.parametrize("method", ["access", "admit", "evict", "prefetch_admit", "is_hot"])
    @pytest.mark.parametrize("bad", [-1, N, N + 100, -(2**40), 2**40])
    def test_scalar_id_out_of_range(self, core, method, bad):
        cache = warm_core_cache(core)
        before = snapshot(cache)
        with pytest.raises(ValueError, match="expert_id"):
            getattr(cache, method)(bad)
        assert snapshot(cache) == before

    @pytest.mark.parametrize("bad", [-1, N])
    def test_should_prefetch_id_out_of_range(self, core, bad):
        with pytest.raises(ValueError, match="expert_id"):
            warm_core_cache(core).should_prefetch(bad, 0.5)

    def test_affinity_update_negative_id(self, core):
        a = core.AffinityCore(N, 0.9, 0.3, 1.0)
        with pytest.raises(ValueError, match="activated"):
            a.update([1, -1])
        assert a.scores().tolist() == [0.0] * N and a.activation_counts().tolist() == [0] * N

    @pytest.mark.parametrize("bad", [-1, N, 2**31 - 1, -(2**31)])
    def test_batch_ids_out_of_range(self, core, bad):
        ids = ids_of([[0, 1], [2, 3], [4, bad]])
        weights = np.ones(ids.shape, dtype=np.float32)
        cache = warm_core_cache(core)
        with pytest.raises(ValueError, match="expert_ids"):
            cache.access_batch(ids)
        with pytest.raises(ValueError, match="expert_ids"):
            core.AffinityCore(N, 0.9, 0.3, 1.0).update_batch(ids)
        with pytest.raises(ValueError, match="expert_ids"):
            core.schedule(ids, weights, N)
        with pytest.raises(ValueError, match="expert_ids"):
            core.belady_hits(ids, N, 2)


class TestCoreArrays:
    """dtype, type, shape and layout of the batch arrays handed to the cores."""

    @staticmethod
    def entry_points(core):
        weights = np.ones((3, 2), dtype=np.float32)
        return {
            "access_batch": lambda ids: warm_core_cache(core).access_batch(ids),
            "update_batch": lambda ids: core.AffinityCore(N, 0.9, 0.3, 1.0).update_batch(ids),
            "schedule": lambda ids: core.schedule(ids, weights, N),
            "belady_hits": lambda ids: core.belady_hits(ids, N, 2),
        }

    @pytest.mark.parametrize("entry", ["access_batch", "update_batch", "schedule", "belady_hits"])
    @pytest.mark.parametrize(
        "dtype", [np.float32, np.float64, np.int64, np.int16, np.uint8, np.uint32, np.bool_, ">i4"]
    )
    def test_wrong_id_dtype_is_type_error(self, core, entry, dtype):
        ids = ids_of([[0, 1], [2, 3], [4, 5]], dtype=dtype)
        with pytest.raises(TypeError, match="expert_ids"):
            self.entry_points(core)[entry](ids)

    @pytest.mark.parametrize("entry", ["access_batch", "update_batch", "schedule", "belady_hits"])
    @pytest.mark.parametrize("bad", [[[0, 1], [2, 3], [4, 5]], None, "0,1", (0, 1)], ids=repr)
    def test_ids_not_an_array_is_type_error(self, core, entry, bad):
        with pytest.raises(TypeError, match="expert_ids"):
            self.entry_points(core)[entry](bad)

    @pytest.mark.parametrize("entry", ["access_batch", "update_batch", "schedule", "belady_hits"])
    @pytest.mark.parametrize("shape", [(6,), (3, 2, 1), (1, 3, 2), ()])
    def test_ids_not_2d_is_value_error(self, core, entry, shape):
        ids = np.zeros(shape, dtype=np.int32)
        with pytest.raises(ValueError, match="expert_ids"):
            self.entry_points(core)[entry](ids)

    @pytest.mark.parametrize("entry", ["access_batch", "update_batch", "schedule", "belady_hits"])
    @pytest.mark.parametrize("layout", ["strided", "fortran", "transposed"])
    def test_non_contiguous_ids_is_value_error(self, core, entry, layout):
        base = ids_of([[0, 1, 2, 3], [4, 5, 6, 7], [1, 2, 3, 4]])
        ids = {
            "strided": base[:, ::2],
            "fortran": np.asfortranarray(base[:, :2]),
            "transposed": ids_of([[0, 2, 4], [1, 3, 5]]).T,
        }[layout]
        assert ids.shape == (3, 2) and not ids.flags.c_contiguous
        with pytest.raises(ValueError, match="expert_ids"):
            self.entry_points(core)[entry](ids)

    @pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.bool_])
    def test_schedule_weights_wrong_dtype_is_type_error(self, core, dtype):
        ids = ids_of([[0, 1], [2, 3]])
        with pytest.raises(TypeError, match="weights"):
            core.schedule(ids, np.ones(ids.shape, dtype=dtype), N)

    @pytest.mark.parametrize("bad", [[[1.0, 1.0], [1.0, 1.0]], None, 1.0], ids=repr)
    def test_schedule_weights_not_an_array_is_type_error(self, core, bad):
        with pytest.raises(TypeError, match="weights"):
            core.schedule(ids_of([[0, 1], [2, 3]]), bad, N)

    @pytest.mark.parametrize("shape", [(2, 3), (3, 2), (4,), (2, 2, 1), (1, 2)])
    def test_schedule_weights_shape_mismatch_is_value_error(self, core, shape):
        ids = ids_of([[0, 1], [2, 3]])
        with pytest.raises(ValueError, match="weights"):
            core.schedule(ids, np.ones(shape, dtype=np.float32), N)

    @pytest.mark.parametrize("layout", ["strided", "fortran"])
    def test_schedule_non_contiguous_weights_is_value_error(self, core, layout):
        ids = ids_of([[0, 1], [2, 3], [4, 5]])
        full = np.ones((3, 4), dtype=np.float32)
        weights = full[:, ::2] if layout == "strided" else np.asfortranarray(full[:, :2])
        assert weights.shape == ids.shape and not weights.flags.c_contiguous
        with pytest.raises(ValueError, match="weights"):
            core.schedule(ids, weights, N)

    @pytest.mark.parametrize("bad", [NAN, INF, -INF])
    def test_schedule_non_finite_weights_is_value_error(self, core, bad):
        ids = ids_of([[0, 1], [2, 3], [4, 5]])
        weights = np.full(ids.shape, 0.5, dtype=np.float32)
        weights[2, 1] = bad
        with pytest.raises(ValueError, match="weights"):
            core.schedule(ids, weights, N)

    @pytest.mark.parametrize("bad_id", [-1, N])
    def test_schedule_bad_ids_and_bad_weights_names_the_ids(self, core, bad_id):
        """Both are wrong: the ids are checked first, and the message names the bad id."""
        ids = ids_of([[0, 1], [2, 3], [4, bad_id]])
        weights = np.full(ids.shape, 0.5, dtype=np.float32)
        weights[0, 0] = NAN
        with pytest.raises(ValueError, match=rf"expert_ids.*{bad_id}"):
            core.schedule(ids, weights, N)


class TestCoreScalars:
    """Capacity, num_experts, policy, thresholds and weights handed to the cores."""

    @pytest.mark.parametrize("bad", [0, -1, 2**31, -(2**31)])
    def test_num_experts_out_of_range(self, core, bad):
        ids = ids_of([[0]])
        with pytest.raises(ValueError, match="num_experts"):
            core.ExpertCacheCore(bad, 1, 0.1, core.LRU)
        with pytest.raises(ValueError, match="num_experts"):
            core.AffinityCore(bad, 0.9, 0.3, 1.0)
        with pytest.raises(ValueError, match="num_experts"):
            core.schedule(ids, np.ones((1, 1), dtype=np.float32), bad)
        with pytest.raises(ValueError, match="num_experts"):
            core.belady_hits(ids, bad, 1)

    @pytest.mark.parametrize("bad", [0, -1, N + 1, 2**40])
    def test_capacity_out_of_range(self, core, bad):
        with pytest.raises(ValueError, match="max_hot"):
            core.ExpertCacheCore(N, bad, 0.1, core.LRU)
        with pytest.raises(ValueError, match="capacity"):
            core.belady_hits(ids_of([[0, 1]]), N, bad)

    @pytest.mark.parametrize("bad", [-1, 3, 100])
    def test_unknown_policy(self, core, bad):
        with pytest.raises(ValueError, match="eviction_policy"):
            core.ExpertCacheCore(N, 2, 0.1, bad)

    @pytest.mark.parametrize("bad", [NAN, INF, -INF])
    def test_non_finite_threshold_and_weights(self, core, bad):
        with pytest.raises(ValueError, match="prefetch_threshold"):
            core.ExpertCacheCore(N, 2, bad, core.LRU)
        cache = warm_core_cache(core)
        a = core.AffinityCore(N, 0.9, 0.3, 1.0)
        before = snapshot(cache, a)
        with pytest.raises(ValueError, match="router_weight"):
            cache.should_prefetch(0, bad)
        with pytest.raises(ValueError, match="affinity_weight"):
            cache.suggest_eviction_with_affinity(a, bad)
        with pytest.raises(ValueError, match="affinity_weight"):
            cache.access_batch(ids_of([[0, 3]]), a, bad)
        assert snapshot(cache, a) == before

    def test_negative_budget_and_k(self, core):
        cache = warm_core_cache(core)
        a = core.AffinityCore(N, 0.9, 0.3, 1.0)
        a.update([0, 3, 4])
        before = snapshot(cache, a)
        with pytest.raises(ValueError, match="budget"):
            cache.prefetch_by_affinity(a, -1)
        assert snapshot(cache, a) == before
        for method in ("top_k_by_affinity", "top_k_by_frequency"):
            with pytest.raises(ValueError, match=r"\bk\b"):
                getattr(a, method)(-1)

    @pytest.mark.parametrize("other_n", [1, N - 1, N + 1])
    def test_affinity_of_another_size(self, core, other_n):
        cache = warm_core_cache(core)
        a = core.AffinityCore(other_n, 0.9, 0.3, 1.0)
        before = snapshot(cache, a)
        with pytest.raises(ValueError, match="affinity"):
            cache.suggest_eviction_with_affinity(a, 0.5)
        with pytest.raises(ValueError, match="affinity"):
            cache.prefetch_by_affinity(a, 2)
        with pytest.raises(ValueError, match="affinity"):
            cache.access_batch(ids_of([[0], [3], [6]]), a, 0.5)
        assert snapshot(cache, a) == before

    @pytest.mark.parametrize("bad", [None, "affinity", 0.5])
    def test_affinity_of_wrong_type(self, core, bad):
        cache = warm_core_cache(core)
        with pytest.raises(TypeError, match="affinity"):
            cache.suggest_eviction_with_affinity(bad, 0.5)
        with pytest.raises(TypeError, match="affinity"):
            cache.prefetch_by_affinity(bad, 1)

    def test_affinity_from_the_other_core_is_type_error(self, core_pair):
        native, reference = core_pair
        for cache_mod, aff_mod in ((native, reference), (reference, native)):
            cache = cache_mod.ExpertCacheCore(N, 2, 0.1, cache_mod.LRU)
            with pytest.raises(TypeError, match="affinity"):
                cache.access_batch(ids_of([[0]]), aff_mod.AffinityCore(N, 0.9, 0.3, 1.0), 0.5)

    @pytest.mark.parametrize(
        "call",
        [
            "access",
            "admit",
            "evict",
            "prefetch_admit",
            "is_hot",
            "should_prefetch",
            "prefetch_by_affinity",
            "top_k_by_affinity",
            "belady_capacity",
            "update",
            "policy",
        ],
    )
    @pytest.mark.parametrize("bad", [1.5, "3"], ids=repr)
    def test_non_integer_scalar_is_type_error(self, core, call, bad):
        """A float or str where an int is expected raises TypeError naming the argument."""
        cache = warm_core_cache(core)
        a = core.AffinityCore(N, 0.9, 0.3, 1.0)
        a.update([0, 3])
        before = snapshot(cache, a)
        name, thunk = {
            "access": ("expert_id", lambda: cache.access(bad)),
            "admit": ("expert_id", lambda: cache.admit(bad)),
            "evict": ("expert_id", lambda: cache.evict(bad)),
            "prefetch_admit": ("expert_id", lambda: cache.prefetch_admit(bad)),
            "is_hot": ("expert_id", lambda: cache.is_hot(bad)),
            "should_prefetch": ("expert_id", lambda: cache.should_prefetch(bad, 0.5)),
            "prefetch_by_affinity": ("budget", lambda: cache.prefetch_by_affinity(a, bad)),
            "top_k_by_affinity": ("k", lambda: a.top_k_by_affinity(bad)),
            "belady_capacity": ("capacity", lambda: core.belady_hits(ids_of([[0]]), N, bad)),
            "update": ("activated", lambda: a.update([bad])),
            "policy": ("policy", lambda: core.ExpertCacheCore(N, 2, 0.1, bad)),
        }[call]
        with pytest.raises(TypeError, match=rf"\b{name}\b"):
            thunk()
        assert snapshot(cache, a) == before

    @pytest.mark.parametrize("cls", ["ExpertCacheCore", "AffinityCore"])
    def test_bool_num_experts_is_type_error(self, core, cls):
        args = (1, 0.1, core.LRU) if cls == "ExpertCacheCore" else (0.9, 0.3, 1.0)
        with pytest.raises(TypeError, match="num_experts"):
            getattr(core, cls)(True, *args)


class TestCoreFailedBatchChangesNothing:
    """A batch call that raises leaves the cache and the affinity exactly as they were."""

    @pytest.mark.parametrize("policy", ["LRU", "LFU", "ADAPTIVE"])
    @pytest.mark.parametrize("with_affinity", [False, True])
    def test_access_batch_bad_id_in_last_row(self, core, policy, with_affinity):
        cache = warm_core_cache(core, policy)
        a = core.AffinityCore(N, 0.9, 0.3, 1.0)
        a.update([1, 2])
        before = snapshot(cache, a)
        ids = ids_of([[0, 3], [4, 6], [1, N]])  # valid rows first: they must not be applied
        with pytest.raises(ValueError, match="expert_ids"):
            if with_affinity:
                cache.access_batch(ids, a, 0.5)
            else:
                cache.access_batch(ids)
        assert snapshot(cache, a) == before
        # The cache still works, from the state it had.
        assert cache.access(2) is True and cache.access(0) is False

    def test_update_batch_bad_id_in_last_row(self, core):
        a = core.AffinityCore(N, 0.9, 0.3, 1.0)
        a.update([1])
        scores, counts = a.scores().tolist(), a.activation_counts().tolist()
        with pytest.raises(ValueError, match="expert_ids"):
            a.update_batch(ids_of([[0, 3], [1, -1]]))
        assert a.scores().tolist() == scores and a.activation_counts().tolist() == counts


# =========================================================================== public API


def warm_cache(policy=moeray.EvictionPolicy.LRU):
    cache = moeray.ExpertCache(
        N, moeray.ExpertCacheConfig(max_hot_experts=3, eviction_policy=policy)
    )
    for e in (1, 2, 1, 5, 7, 2):
        cache.access(e)
    return cache


def public_snapshot(cache, affinity=None):
    state = (cache.stats(), tuple(cache.hot_experts()))
    if affinity is not None:
        state += (affinity.get_scores().tolist(), affinity.get_activation_counts().tolist())
    return state


class TestPublicIds:
    @pytest.mark.parametrize("method", ["access", "admit", "evict", "prefetch_admit", "is_hot"])
    @pytest.mark.parametrize("bad", [-1, N, 10**12])
    def test_scalar_id_out_of_range(self, method, bad):
        cache = warm_cache()
        before = public_snapshot(cache)
        with pytest.raises(ValueError, match="expert_id"):
            getattr(cache, method)(bad)
        assert public_snapshot(cache) == before

    @pytest.mark.parametrize("method", ["access", "admit", "evict"])
    def test_scalar_float_id_is_type_error(self, method):
        cache = warm_cache()
        before = public_snapshot(cache)
        with pytest.raises(TypeError, match="expert_id"):
            getattr(cache, method)(1.5)
        assert public_snapshot(cache) == before

    @pytest.mark.parametrize(
        "ids",
        [
            ids_of([[0, 1], [2, N]]),
            ids_of([[0, 1], [-1, 2]]),
            ids_of([[0, 1], [2, N]], dtype=np.uint8),
            ids_of([[0, 1], [2, 2**32]], dtype=np.int64),  # would wrap to 0 as int32
            ids_of([[0, 1], [2, 2**32 + 3]], dtype=np.uint64),
            ids_of([[0, 1], [2, -(2**32)]], dtype=np.int64),
            [[0, 1], [2, N]],
        ],
        ids=[
            "int32",
            "negative",
            "uint8",
            "int64-wraps",
            "uint64-wraps",
            "int64-neg-wraps",
            "list",
        ],
    )
    def test_batch_ids_out_of_range(self, ids):
        cache = warm_cache()
        aff = moeray.ExpertAffinity(moeray.AffinityConfig(num_experts=N))
        before = public_snapshot(cache, aff)
        with pytest.raises(ValueError, match="expert_ids"):
            cache.access_batch(ids)
        with pytest.raises(ValueError, match="expert_ids"):
            cache.access_batch(ids, aff, 0.5)
        with pytest.raises(ValueError, match="expert_ids"):
            aff.update_batch(ids)
        assert public_snapshot(cache, aff) == before
        with pytest.raises(ValueError, match="expert_ids"):
            moeray.schedule(ids, np.ones((2, 2), dtype=np.float32), N)
        with pytest.raises(ValueError, match="expert_ids"):
            moeray.belady_hits(ids, N, 2)

    @pytest.mark.parametrize(
        "dtype", [np.float32, np.float64, np.bool_, np.complex64, object, "U1"]
    )
    def test_batch_ids_wrong_dtype_is_type_error(self, dtype):
        ids = np.array([[0, 1], [1, 0]]).astype(dtype)
        cache = warm_cache()
        with pytest.raises(TypeError, match="expert_ids"):
            cache.access_batch(ids)
        with pytest.raises(TypeError, match="expert_ids"):
            moeray.ExpertAffinity(moeray.AffinityConfig(num_experts=N)).update_batch(ids)
        with pytest.raises(TypeError, match="expert_ids"):
            moeray.schedule(ids, np.ones((2, 2), dtype=np.float32), N)
        with pytest.raises(TypeError, match="expert_ids"):
            moeray.belady_hits(ids, N, 2)

    @pytest.mark.parametrize("bad", [None, "01", 3, {0: 1}], ids=repr)
    def test_batch_ids_not_array_like_is_type_error(self, bad):
        with pytest.raises(TypeError, match="expert_ids"):
            warm_cache().access_batch(bad)
        with pytest.raises(TypeError, match="expert_ids"):
            moeray.belady_hits(bad, N, 2)

    @pytest.mark.parametrize("shape", [(4,), (2, 2, 1), (1, 2, 2), ()])
    def test_batch_ids_not_2d_is_value_error(self, shape):
        ids = np.zeros(shape, dtype=np.int32)
        with pytest.raises(ValueError, match="expert_ids"):
            warm_cache().access_batch(ids)
        with pytest.raises(ValueError, match="expert_ids"):
            moeray.ExpertAffinity(moeray.AffinityConfig(num_experts=N)).update_batch(ids)
        with pytest.raises(ValueError, match="expert_ids"):
            moeray.schedule(ids, np.ones(shape, dtype=np.float32), N)
        with pytest.raises(ValueError, match="expert_ids"):
            moeray.belady_hits(ids, N, 2)

    def test_ragged_list_names_the_argument(self):
        with pytest.raises((ValueError, TypeError), match="expert_ids"):
            moeray.belady_hits([[0], [1, 2]], N, 2)

    def test_non_contiguous_ids_are_accepted_by_the_public_api(self):
        """The public API copies to C order; only the cores insist on contiguity."""
        base = ids_of([[0, 9, 1, 9], [2, 9, 0, 9]])
        ids = base[:, ::2]  # [[0, 1], [2, 0]], strided
        assert not ids.flags.c_contiguous
        cache = moeray.ExpertCache(N, moeray.ExpertCacheConfig(max_hot_experts=3))
        assert cache.access_batch(ids).tolist() == [[False, False], [False, True]]
        assert moeray.belady_hits(ids, N, 3) == 1
        batches = moeray.schedule(ids, np.ones((2, 4), dtype=np.float32)[:, ::2], N)
        assert batches.tokens_of(0).tolist() == [0, 1] and batches.tokens_of(2).tolist() == [1]


class TestPublicWeightsAndScalars:
    @pytest.mark.parametrize("bad", [NAN, INF, -INF, 1e39])  # 1e39 overflows float32
    def test_schedule_non_finite_weights(self, bad):
        weights = np.array([[0.5, 0.5], [0.5, bad]])
        with pytest.raises(ValueError, match="weights"), np.errstate(over="ignore"):
            moeray.schedule(ids_of([[0, 1], [2, 3]]), weights, N)

    @pytest.mark.parametrize("shape", [(2, 3), (4,), (2, 2, 1), (2,)])
    def test_schedule_weights_shape_mismatch(self, shape):
        with pytest.raises(ValueError, match="weights"):
            moeray.schedule(ids_of([[0, 1], [2, 3]]), np.ones(shape), N)

    @pytest.mark.parametrize("dtype", [np.int32, np.bool_, object])
    def test_schedule_weights_wrong_dtype(self, dtype):
        with pytest.raises(TypeError, match="weights"):
            moeray.schedule(ids_of([[0, 1], [2, 3]]), np.ones((2, 2)).astype(dtype), N)

    @pytest.mark.parametrize("bad", [0, -3])
    def test_schedule_and_belady_num_experts(self, bad):
        with pytest.raises(ValueError, match="num_experts"):
            moeray.schedule(ids_of([[0]]), np.ones((1, 1)), bad)
        with pytest.raises(ValueError, match="num_experts"):
            moeray.belady_hits(ids_of([[0]]), bad, 1)

    @pytest.mark.parametrize("bad", [1.0, "8", True, None])
    def test_schedule_and_belady_num_experts_type(self, bad):
        with pytest.raises(TypeError, match="num_experts"):
            moeray.schedule(ids_of([[0]]), np.ones((1, 1)), bad)
        with pytest.raises(TypeError, match="num_experts"):
            moeray.belady_hits(ids_of([[0]]), bad, 1)

    @pytest.mark.parametrize("bad", [0, -1, N + 1])
    def test_belady_capacity(self, bad):
        with pytest.raises(ValueError, match="capacity"):
            moeray.belady_hits(ids_of([[0, 1]]), N, bad)

    @pytest.mark.parametrize("bad", [2.0, "2", None])
    def test_belady_capacity_type(self, bad):
        with pytest.raises(TypeError, match="capacity"):
            moeray.belady_hits(ids_of([[0, 1]]), N, bad)

    @pytest.mark.parametrize("bad", [NAN, INF, -INF])
    def test_non_finite_router_and_affinity_weight(self, bad):
        cache = warm_cache()
        aff = moeray.ExpertAffinity(moeray.AffinityConfig(num_experts=N))
        aff.update([0, 4])
        before = public_snapshot(cache, aff)
        with pytest.raises(ValueError, match="router_weight"):
            cache.should_prefetch(0, bad)
        with pytest.raises(ValueError, match="affinity_weight"):
            cache.suggest_eviction_with_affinity(aff, bad)
        with pytest.raises(ValueError, match="affinity_weight"):
            cache.access_batch(ids_of([[0, 3]]), aff, bad)
        assert public_snapshot(cache, aff) == before

    def test_non_numeric_affinity_weight_names_the_argument(self):
        cache = warm_cache()
        aff = moeray.ExpertAffinity(moeray.AffinityConfig(num_experts=N))
        with pytest.raises((TypeError, ValueError), match="affinity_weight"):
            cache.access_batch(ids_of([[0, 3]]), aff, "heavy")

    @pytest.mark.parametrize("other_n", [1, N - 1, N + 1])
    def test_affinity_of_another_size(self, other_n):
        cache = warm_cache()
        aff = moeray.ExpertAffinity(moeray.AffinityConfig(num_experts=other_n))
        before = public_snapshot(cache, aff)
        with pytest.raises(ValueError, match="affinity"):
            cache.access_batch(ids_of([[0, 1], [2, 3]]), aff, 0.5)
        with pytest.raises(ValueError, match="affinity"):
            cache.suggest_eviction_with_affinity(aff, 0.5)
        with pytest.raises(ValueError, match="affinity"):
            cache.prefetch_by_affinity(aff, 2)
        assert public_snapshot(cache, aff) == before

    def test_negative_budget(self):
        cache = warm_cache()
        aff = moeray.ExpertAffinity(moeray.AffinityConfig(num_experts=N))
        with pytest.raises(ValueError, match="budget"):
            cache.prefetch_by_affinity(aff, -2)


class TestPublicFailedBatchChangesNothing:
    @pytest.mark.parametrize("policy", list(moeray.EvictionPolicy))
    @pytest.mark.parametrize(
        "case", ["bad-id", "bad-dtype", "bad-shape", "nan-weight", "affinity-size"]
    )
    def test_access_batch(self, policy, case):
        cache = warm_cache(policy)
        aff = moeray.ExpertAffinity(moeray.AffinityConfig(num_experts=N))
        aff.update([1, 6])
        before = public_snapshot(cache, aff)
        ids = ids_of([[0, 3], [4, 6], [1, 2]])
        args = {
            "bad-id": (ids_of([[0, 3], [4, 6], [1, N]]), aff, 0.5),
            "bad-dtype": (ids.astype(np.float64), aff, 0.5),
            "bad-shape": (ids.reshape(-1), aff, 0.5),
            "nan-weight": (ids, aff, NAN),
            "affinity-size": (
                ids,
                moeray.ExpertAffinity(moeray.AffinityConfig(num_experts=N + 1)),
                0.5,
            ),
        }[case]
        with pytest.raises((ValueError, TypeError)):
            cache.access_batch(*args)
        assert public_snapshot(cache, aff) == before
        # The cache goes on from its old state: 2 was the last admission, 0 was never seen.
        assert cache.access_batch(ids_of([[2], [0]])).tolist() == [[True], [False]]


class TestConfigs:
    @pytest.mark.parametrize("bad", [0, -1])
    def test_cache_config_capacity(self, bad):
        with pytest.raises(ValueError, match="max_hot_experts"):
            moeray.ExpertCacheConfig(max_hot_experts=bad)

    @pytest.mark.parametrize("bad", [1.5, 2.0, "4", True, None])
    def test_cache_config_capacity_type(self, bad):
        with pytest.raises(TypeError, match="max_hot_experts"):
            moeray.ExpertCacheConfig(max_hot_experts=bad)

    @pytest.mark.parametrize("bad", [NAN, INF, -INF, "0.1", None])
    def test_cache_config_threshold(self, bad):
        with pytest.raises((ValueError, TypeError), match="prefetch_threshold"):
            moeray.ExpertCacheConfig(prefetch_threshold=bad)

    def test_cache_config_threshold_accepts_numpy_float32(self):
        assert (
            moeray.ExpertCacheConfig(prefetch_threshold=np.float32(0.25)).prefetch_threshold == 0.25
        )

    @pytest.mark.parametrize("bad", [3, -1, "lru", "LRU", 1.5, None])
    def test_cache_config_policy(self, bad):
        with pytest.raises(ValueError, match="eviction_policy"):
            moeray.ExpertCacheConfig(eviction_policy=bad)

    @pytest.mark.parametrize("bad", [0, -5])
    def test_cache_num_experts(self, bad):
        with pytest.raises(ValueError, match="num_experts"):
            moeray.ExpertCache(bad)

    @pytest.mark.parametrize("bad", [8.0, "8", None, True])
    def test_cache_num_experts_type(self, bad):
        with pytest.raises(TypeError, match="num_experts"):
            moeray.ExpertCache(bad)

    @pytest.mark.parametrize("n,cap", [(4, 5), (1, 2), (8, 9)])
    def test_cache_capacity_above_num_experts(self, n, cap):
        with pytest.raises(ValueError, match="max_hot_experts"):
            moeray.ExpertCache(n, moeray.ExpertCacheConfig(max_hot_experts=cap))

    @pytest.mark.parametrize(
        "bad", [None, {"max_hot_experts": 2}, moeray.AffinityConfig()], ids=repr
    )
    def test_cache_config_type(self, bad):
        with pytest.raises(TypeError, match="config"):
            moeray.ExpertCache(N, bad)

    @pytest.mark.parametrize(
        "field,bad,exc",
        [
            ("num_experts", 0, ValueError),
            ("num_experts", -1, ValueError),
            ("num_experts", 2**31, ValueError),
            ("num_experts", 8.0, TypeError),
            ("num_experts", True, TypeError),
            ("decay", NAN, ValueError),
            ("decay", 1.5, ValueError),
            ("decay", -0.1, ValueError),
            ("decay", "0.9", TypeError),
            ("decay", None, TypeError),
            ("activation_boost", -1.0, ValueError),
            ("activation_boost", NAN, ValueError),
            ("activation_boost", "1", TypeError),
            ("max_score", -0.5, ValueError),
            ("max_score", NAN, ValueError),
            ("max_score", [1.0], TypeError),
        ],
    )
    def test_affinity_config(self, field, bad, exc):
        with pytest.raises(exc, match=field):
            moeray.AffinityConfig(**{field: bad})

    @pytest.mark.parametrize(
        "builder,name",
        [
            ("with_decay", "decay"),
            ("with_activation_boost", "activation_boost"),
            ("with_max_score", "max_score"),
        ],
    )
    def test_affinity_config_builders_reject_nan(self, builder, name):
        with pytest.raises(ValueError, match=name):
            getattr(moeray.AffinityConfig(), builder)(NAN)

    @pytest.mark.parametrize("bad", [None, 8, moeray.ExpertCacheConfig()], ids=repr)
    def test_affinity_config_type(self, bad):
        with pytest.raises(TypeError, match="config"):
            moeray.ExpertAffinity(bad)


# =========================================================================== trace files


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def good_arrays(tokens=6, layers=2, top_k=2, num_experts=4):
    rng = np.random.default_rng(0)
    ids = np.stack(
        [
            [rng.choice(num_experts, top_k, replace=False) for _ in range(layers)]
            for _ in range(tokens)
        ]
    ).astype(np.uint8)
    probs = rng.random(ids.shape).astype(np.float16)
    return {
        "expert_ids": ids,
        "expert_probs": probs,
        "seq_offsets": np.array([0, 2, tokens], dtype=np.int64),
    }


UNPICKLED: list[str] = []


def _record_unpickling(tag):
    UNPICKLED.append(tag)
    return tag


class Tripwire:
    """Unpickling an instance calls _record_unpickling: proof that a pickle was executed."""

    def __reduce__(self):
        return (_record_unpickling, ("tripwire",))


class TestTraceFiles:
    def test_valid_file_loads(self, tmp_path):
        """The control case: the arrays the bad cases below start from are accepted."""
        trace = moeray.load_trace(write_npz(tmp_path / "ok.npz", **good_arrays()))
        assert (trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts) == (6, 2, 2, 4)

    @pytest.mark.parametrize("where", ["missing", "missing-dir", "directory"])
    def test_missing_file(self, tmp_path, where):
        path = {
            "missing": tmp_path / "nope.npz",
            "missing-dir": tmp_path / "no" / "such" / "trace.npz",
            "directory": tmp_path,
        }[where]
        with pytest.raises(moeray.TraceNotFoundError, match="path") as info:
            moeray.load_trace(path)
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
        assert issubclass(moeray.TraceNotFoundError, FileNotFoundError)
        assert issubclass(moeray.TraceNotFoundError, ValueError)
        with pytest.raises(FileNotFoundError):
            moeray.load_trace(str(path))
        with pytest.raises(ValueError):
            moeray.load_trace(path)

    @pytest.mark.parametrize("fraction", [0.5, 0.9, 0.1])
    def test_truncated_file(self, tmp_path, fraction):
        whole = write_npz(tmp_path / "whole.npz", **good_arrays(tokens=200)).read_bytes()
        cut = tmp_path / "cut.npz"
        cut.write_bytes(whole[: int(len(whole) * fraction)])
        with pytest.raises(ValueError, match="path") as info:
            moeray.load_trace(cut)
        assert not isinstance(info.value, moeray.TraceNotFoundError)

    @pytest.mark.parametrize(
        "content",
        [b"", b"hello, not a zip\n", b"PK\x03\x04garbage", b"\x93NUMPY garbage"],
        ids=["empty", "text", "bad-zip-magic", "bad-npy-magic"],
    )
    def test_not_a_zip(self, tmp_path, content):
        path = tmp_path / "bad.npz"
        path.write_bytes(content)
        with pytest.raises(ValueError, match="path"):
            moeray.load_trace(path)

    def test_plain_npy_file(self, tmp_path):
        path = tmp_path / "ids.npy"
        np.save(path, good_arrays()["expert_ids"])
        with pytest.raises(ValueError, match="path"):
            moeray.load_trace(path)

    def test_pickle_file_is_not_unpickled(self, tmp_path):
        path = tmp_path / "evil.npz"
        path.write_bytes(pickle.dumps({"expert_ids": Tripwire()}))
        UNPICKLED.clear()
        with pytest.raises(ValueError, match="path"):
            moeray.load_trace(path)
        assert UNPICKLED == []

    @pytest.mark.parametrize("key", ["expert_ids", "seq_offsets", "extra"])
    def test_object_array_is_not_unpickled(self, tmp_path, key):
        arrays = good_arrays()
        arrays[key] = np.array([Tripwire(), Tripwire()], dtype=object)
        path = write_npz(tmp_path / "obj.npz", **arrays)
        # The file really holds a pickle that would run the tripwire if loaded unsafely.
        UNPICKLED.clear()
        with np.load(path, allow_pickle=True) as data:
            data[key]
        assert UNPICKLED == ["tripwire", "tripwire"]
        UNPICKLED.clear()
        with pytest.raises(ValueError):
            moeray.load_trace(path)
        assert UNPICKLED == []

    def test_missing_expert_ids(self, tmp_path):
        arrays = good_arrays()
        arrays["routing"] = arrays.pop("expert_ids")
        with pytest.raises(ValueError, match="expert_ids"):
            moeray.load_trace(write_npz(tmp_path / "t.npz", **arrays))

    @pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_, "U2"])
    def test_non_integer_expert_ids(self, tmp_path, dtype):
        arrays = good_arrays()
        arrays["expert_ids"] = arrays["expert_ids"].astype(dtype)
        with pytest.raises(ValueError, match="expert_ids"):
            moeray.load_trace(write_npz(tmp_path / "t.npz", **arrays))

    @pytest.mark.parametrize("shape", [(6, 4), (24,), (6, 2, 2, 1), (6, 0, 2), (6, 2, 0), ()])
    def test_expert_ids_shape(self, tmp_path, shape):
        arrays = {"expert_ids": np.zeros(shape, dtype=np.uint8)}
        with pytest.raises(ValueError, match="expert_ids"):
            moeray.load_trace(write_npz(tmp_path / "t.npz", **arrays))

    def test_negative_expert_ids(self, tmp_path):
        arrays = good_arrays()
        arrays["expert_ids"] = arrays["expert_ids"].astype(np.int8)
        arrays["expert_ids"][3, 1, 0] = -1
        with pytest.raises(ValueError, match="expert_ids"):
            moeray.load_trace(write_npz(tmp_path / "t.npz", **arrays))

    @pytest.mark.parametrize("shape", [(6, 2, 3), (6, 2), (5, 2, 2), (6, 1, 2)])
    def test_expert_probs_shape_mismatch(self, tmp_path, shape):
        arrays = good_arrays()
        arrays["expert_probs"] = np.full(shape, 0.5, dtype=np.float32)
        with pytest.raises(ValueError, match="expert_probs"):
            moeray.load_trace(write_npz(tmp_path / "t.npz", **arrays))

    @pytest.mark.parametrize("bad", ["int", NAN, INF])
    def test_expert_probs_values(self, tmp_path, bad):
        arrays = good_arrays()
        if bad == "int":
            arrays["expert_probs"] = np.ones(arrays["expert_ids"].shape, dtype=np.int32)
        else:
            arrays["expert_probs"] = arrays["expert_probs"].astype(np.float32)
            arrays["expert_probs"][2, 1, 1] = bad
        with pytest.raises(ValueError, match="expert_probs"):
            moeray.load_trace(write_npz(tmp_path / "t.npz", **arrays))

    @pytest.mark.parametrize(
        "offsets",
        [[0, 2, 5], [0, 2, 7], [1, 2, 6], [0, 4, 2, 6], [0], [], [0.0, 6.0], [[0, 6]]],
        ids=["short", "long", "not-from-0", "decreasing", "one", "empty", "float", "2d"],
    )
    def test_seq_offsets(self, tmp_path, offsets):
        arrays = good_arrays()
        arrays["seq_offsets"] = np.array(offsets)
        with pytest.raises(ValueError, match="seq_offsets"):
            moeray.load_trace(write_npz(tmp_path / "t.npz", **arrays))

    def test_num_experts_below_max_id(self, tmp_path):
        arrays = good_arrays()
        arrays["expert_ids"][0, 0, 0] = 9
        path = write_npz(tmp_path / "t.npz", **arrays)
        assert moeray.load_trace(path).num_experts == 10  # inferred: max id + 1
        for n in (9, 1, 0, -1):
            with pytest.raises(ValueError, match="num_experts"):
                moeray.load_trace(path, num_experts=n)
        arrays["num_experts"] = np.array(9)
        with pytest.raises(ValueError, match="num_experts"):
            moeray.load_trace(write_npz(tmp_path / "stored.npz", **arrays))

    def test_num_experts_not_a_scalar(self, tmp_path):
        arrays = good_arrays()
        arrays["num_experts"] = np.array([4, 4])
        with pytest.raises((ValueError, TypeError), match="num_experts"):
            moeray.load_trace(write_npz(tmp_path / "t.npz", **arrays))

"""The prefetcher moves real bytes: populated experts are resident (mincore), released ones are
not, and the native background thread and the synchronous Python twin agree on every outcome.

Experts here are 4 MiB and 4 MiB-aligned: the page cache keeps file pages in folios of up to a
few MiB on recent kernels, and only folios wholly inside a released range leave it, so smaller
experts could not show the bound. The shard file lives beside the repository, on a real file
system (tmpfs pages would always be resident).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

EXPERT_BYTES = 4 << 20
NUM_EXPERTS = 6


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("shard") / "experts.bin"
    data = np.random.default_rng(1).integers(0, 256, NUM_EXPERTS * EXPERT_BYTES, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())  # clean pages: only those can leave the page cache
    return path


def _prefetcher(core, shard):
    p = core.PrefetcherCore([str(shard)], NUM_EXPERTS)
    for e in range(NUM_EXPERTS):
        p.set_ranges(e, [(0, e * EXPERT_BYTES, EXPERT_BYTES)])
    for e in range(NUM_EXPERTS):
        p.release(e)
    return p


def test_prefetch_populates_and_release_drops(core, shard):
    p = _prefetcher(core, shard)
    assert [p.resident_bytes(e) for e in range(NUM_EXPERTS)] == [0] * NUM_EXPERTS
    p.prefetch(2)
    p.wait(2)
    assert p.ready(2)
    assert p.resident_bytes(2) == EXPERT_BYTES
    assert all(p.resident_bytes(e) == 0 for e in range(NUM_EXPERTS) if e != 2)
    p.release(2)
    assert not p.ready(2)
    assert p.resident_bytes(2) == 0
    stats = p.stats()
    assert stats["bytes_populated"] == EXPERT_BYTES
    assert stats["bytes_released"] == (NUM_EXPERTS + 1) * EXPERT_BYTES


def test_a_cold_wait_is_late_and_loads_the_expert(core, shard):
    p = _prefetcher(core, shard)
    assert p.wait(4) is False  # nobody prefetched it: the consumer loads it itself
    assert p.ready(4) and p.resident_bytes(4) == EXPERT_BYTES
    assert p.wait(4) is True
    stats = p.stats()
    assert (stats["late"], stats["in_time"], stats["prefetches_completed"]) == (1, 1, 0)


def test_hot_set_bounds_resident_bytes(core, shard):
    """A cache of 2 experts over a stream of accesses: resident bytes never exceed 2 experts."""
    from moeray.policy import ExpertCache, ExpertCacheConfig

    p = _prefetcher(core, shard)
    cache = ExpertCache(NUM_EXPERTS, ExpertCacheConfig(max_hot_experts=2))
    stream = np.random.default_rng(3).integers(0, NUM_EXPERTS, 40)
    peak = 0
    for e in stream.tolist():
        victim = None
        if not cache.is_hot(e) and cache.hot_count() == cache.max_hot():
            victim = cache.suggest_eviction()
        cache.access(e)
        if victim is not None:
            p.release(victim)
        p.prefetch(e)
        p.wait(e)
        peak = max(peak, sum(p.resident_bytes(x) for x in range(NUM_EXPERTS)))
        assert sorted(x for x in range(NUM_EXPERTS) if p.ready(x)) == sorted(cache.hot_experts())
    assert peak <= 2 * EXPERT_BYTES
    assert peak == 2 * EXPERT_BYTES  # the stream does fill the hot set


def test_native_and_reference_agree(core_pair, shard):
    native, reference = (_prefetcher(core, shard) for core in core_pair)
    rng = np.random.default_rng(5)
    for _ in range(30):
        e = int(rng.integers(0, NUM_EXPERTS))
        op = rng.choice(["prefetch", "release", "wait"])
        for p in (native, reference):
            getattr(p, op)(e)
        if op == "prefetch":  # the native one works in the background: let it finish
            native.wait(e)
            reference.wait(e)
        assert native.ready(e) == reference.ready(e)
        assert native.resident_bytes(e) == reference.resident_bytes(e)
    for key in ("bytes_populated", "bytes_released"):
        assert native.stats()[key] == reference.stats()[key]


def test_ranges_and_ids_are_checked(core, shard):
    size = NUM_EXPERTS * EXPERT_BYTES
    p = core.PrefetcherCore([str(shard)], NUM_EXPERTS)
    with pytest.raises(ValueError, match="run past file 0"):
        p.set_ranges(0, [(0, size - 10, 11)])
    with pytest.raises(ValueError, match="run past file 0"):
        p.set_ranges(0, [(0, -1, 10)])
    with pytest.raises(ValueError, match="file index 1"):
        p.set_ranges(0, [(1, 0, 10)])
    for method in ("prefetch", "ready", "wait", "release", "resident_bytes"):
        with pytest.raises(ValueError, match="expert_id"):
            getattr(p, method)(NUM_EXPERTS)
    with pytest.raises(ValueError, match="nonexistent"):
        core.PrefetcherCore([str(shard.parent / "nonexistent.bin")], 2)
    p.set_ranges(1, [(0, size - 11, 11)])  # the last bytes of the file are fine
    assert p.expert_bytes(1) == 11


def test_file_array_is_a_read_only_view_of_the_mapping(core, shard):
    """Kernels read through the prefetcher's own mapping (whose page tables populate filled)."""
    p = _prefetcher(core, shard)
    view = p.file_array(0)
    assert view.dtype == np.uint8 and view.shape == (NUM_EXPERTS * EXPERT_BYTES,)
    assert not view.flags.writeable
    with open(shard, "rb") as f:
        f.seek(3 * EXPERT_BYTES + 12345)
        assert view[3 * EXPERT_BYTES + 12345 : 3 * EXPERT_BYTES + 12345 + 64].tobytes() == f.read(
            64
        )
    del p  # the view keeps the mapping alive
    assert int(view[-1]) == shard.read_bytes()[-1]
    with pytest.raises(ValueError, match="file"):
        _prefetcher(core, shard).file_array(1)

"""Residency: the bytes of one layer's shard kept equal to its cache's hot set.

The thin mechanism between cache decisions (``moeray.policy``, pure) and the prefetcher
(``moeray.native``'s ``PrefetcherCore``, physical). After each window (the service) or step
(``moeray replay --shards``), ``sync(hot, ahead)`` first releases the experts that left the hot
set, then prefetches the ones that entered it, so the resident bytes of the shard stay within the
hot set's bytes plus the pages its ranges share with cold neighbours. ``use(experts)`` is the
consumer reaching the layer: it counts each expert as in time (its bytes were ready), late (a
prefetch ahead of use was issued but had not finished) or a cold read (never asked for).

A new ``ShardResidency`` drops the layer's pages from the page cache first, so that residency
starts cold and follows the hot set from the first window: a freshly written checkpoint sits in
the page cache in folios of up to a few MiB, and only folios wholly inside a dropped range leave
it, which per-expert releases could not guarantee. Pages populated afterwards come in one page at a
time (the mappings are MADV_RANDOM), so later releases drop exactly the expert's pages. Dirty pages
cannot be dropped: write checkpoints with a final fsync (``moeray shards synth`` does).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from moeray.native import backend
from moeray.shards.store import ShardStore

__all__ = ["ResidencyStats", "ShardResidency"]


@dataclass
class ResidencyStats:
    """Counters of one layer's residency since it was opened.

    bytes_moved: bytes populated (prefetches and consumer loads). in_time / late / cold_reads:
    experts used whose bytes were ready / prefetched ahead but not ready / never asked for.
    resident_bytes_max: the largest mincore reading taken by ``measure`` (after each sync)."""

    layer: int
    capacity_bytes: int
    expert_bytes: int
    bytes_moved: int = 0
    bytes_released: int = 0
    in_time: int = 0
    late: int = 0
    cold_reads: int = 0
    resident_bytes: int = 0
    resident_bytes_max: int = 0


class ShardResidency:
    """One layer's shard under a hot set of ``capacity`` experts, on the selected backend."""

    def __init__(self, store: ShardStore, layer: int, capacity: int):
        num_experts = store.num_experts(layer)
        if not 1 <= capacity <= num_experts:
            raise ValueError(f"capacity: expected an int in [1, {num_experts}], got {capacity}")
        ranges = [store.expert_ranges(layer, e) for e in range(num_experts)]
        self._store, self._ranges = store, ranges
        paths = sorted({r.path for rs in ranges for r in rs})
        file_of = {path: i for i, path in enumerate(paths)}
        self._core = backend.PrefetcherCore(paths, num_experts)
        self._mapped = {path: self._core.file_array(i) for i, path in enumerate(paths)}
        for e, rs in enumerate(ranges):
            self._core.set_ranges(e, [(file_of[r.path], r.offset, r.length) for r in rs])
        shard = store.layer_ranges(layer)
        _drop_page_cache(shard)
        # the whole shard as ranges of its own, to read resident bytes counting each page once
        self._shard = backend.PrefetcherCore(paths, len(shard))
        for i, r in enumerate(shard):
            self._shard.set_ranges(i, [(file_of[r.path], r.offset, r.length)])
        self.layer = layer
        expert_bytes = max(self._core.expert_bytes(e) for e in range(num_experts))
        self._stats = ResidencyStats(layer, capacity * expert_bytes, expert_bytes)
        self._resident: set[int] = set()  # experts asked for and not released since
        self._ahead: set[int] = set()  # of those, prefetched ahead of use and not used yet

    @property
    def num_experts(self) -> int:
        return self._core.num_experts()

    def sync(self, hot: Iterable[int], ahead: Iterable[int] = (), fetch: bool = True) -> None:
        """Makes the resident experts the hot set: releases the ones that left it, then
        prefetches the new ones. ``ahead``: those of the new ones brought in by prediction
        rather than on demand (their use counts as in time or late, not as a stall).
        ``fetch=False`` only releases: new experts come in when a kernel faults them in (the
        no-prefetch baseline of ``benchmarks/bench_prefetch.py``)."""
        hot = {int(e) for e in hot}
        for e in sorted(self._resident - hot):
            self._store.release_pages(self._ranges[e])  # a kernel may have mapped them
            self._core.release(e)
        self._resident &= hot
        self._ahead &= hot
        self._ahead |= {int(e) for e in ahead} & (hot - self._resident)
        if fetch:
            for e in sorted(hot - self._resident):
                self._core.prefetch(e)
        self._resident |= hot

    def expert_weights(self, expert: int):
        """The expert's weights read through the prefetcher's own mapping, whose page tables
        its populate filled: a kernel reading them takes no page faults."""
        return self._store.expert_weights(self.layer, expert, mapped=self._mapped)

    def ready(self, expert: int) -> bool:
        return self._core.ready(expert)

    def wait(self, expert: int) -> bool:
        """Waits for one expert's bytes (loading them if nobody asked); True if already ready."""
        return self._core.wait(expert)

    def use(self, experts: Iterable[int], wait: bool = True) -> set[int]:
        """Counts the consumer's use of ``experts`` (ids, repeats ignored) and returns the
        cold reads (experts nobody had asked for); with ``wait`` also waits for each resident one's
        bytes, as a kernel about to read them would."""
        s = self._stats
        cold = set()
        for e in {int(e) for e in experts}:
            if e not in self._resident:
                cold.add(e)
            elif e in self._ahead:
                ready = self._core.wait(e) if wait else self._core.ready(e)
                s.in_time += bool(ready)
                s.late += not ready
                self._ahead.discard(e)
            elif wait:
                self._core.wait(e)
        s.cold_reads += len(cold)
        return cold

    def read_cold(self, experts: Iterable[int]) -> None:
        """The consumer reading experts that are not resident and stay cold (a cold read the
        policy did not admit): each is loaded and released before the next, one expert over the hot
        set at most."""
        for e in sorted({int(e) for e in experts} - self._resident):
            self._core.prefetch(e)
            self._core.wait(e)
            self._store.release_pages(self._ranges[e])
            self._core.release(e)

    def settle(self) -> None:
        """Waits until every resident expert's prefetch has finished."""
        for e in sorted(self._resident):
            self._core.wait(e)

    def measure(self) -> int:
        """Resident bytes of the shard now: mincore over the pages its ranges touch, each page
        once (a page shared with a neighbouring tensor counts whole)."""
        resident = sum(self._shard.resident_bytes(i) for i in range(self._shard.num_experts()))
        self._stats.resident_bytes = resident
        self._stats.resident_bytes_max = max(self._stats.resident_bytes_max, resident)
        return resident

    def stats(self) -> ResidencyStats:
        core = self._core.stats()
        self._stats.bytes_moved = int(core["bytes_populated"])
        self._stats.bytes_released = int(core["bytes_released"])
        return ResidencyStats(**vars(self._stats))

    def resident_experts(self) -> list[int]:
        return sorted(self._resident)


def _drop_page_cache(ranges) -> None:
    """POSIX_FADV_DONTNEED over the span of each file's ranges (the layer's shard)."""
    spans: dict[str, tuple[int, int]] = {}
    for r in ranges:
        start, end = spans.get(r.path, (r.offset, r.end))
        spans[r.path] = (min(start, r.offset), max(end, r.end))
    for path, (start, end) in spans.items():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

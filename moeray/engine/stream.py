"""Per-layer streaming: an engine's plans reach its node's prefetcher as each router runs.

``StreamingSession`` wraps an ``EngineSession``: each ``route(layer, ids)`` returns the layer's
plan and sends, one way (no answer awaited), a ``RouteMessage`` to the node-local prefetch actor
(``moeray.actors.prefetch_node.PrefetchNode``), which starts paging in the layer's ``load`` and the
next layer's ``prefetch`` at once. The engine reads experts from its own mapping of the same
checkpoint (``CheckpointReader``; the page cache is shared by every process of the host) and
reports each use (``use(layer, experts)``): before reading, each expert's pages are checked
(mincore), so timeliness is observed, not assumed. Per expert use, ``UseStats`` counts:

- prefetched: the expert's first use since a plan prefetched it (for this layer, from the
  previous layer's route); in time when every page was resident, late otherwise;
- loaded: an expert the layer's own plan loaded (streamed at this layer's route);
- other: experts already kept (hits), resident or not.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moeray.actors.prefetch_node import RouteMessage, check_checkpoint
from moeray.engine.session import EngineSession, LayerPlan
from moeray.native import backend
from moeray.shards.residency import _drop_page_cache
from moeray.shards.store import ByteRange, ShardStore

__all__ = ["CheckpointReader", "StreamingSession", "UseStats"]

_PAGE = mmap.PAGESIZE


@dataclass
class UseStats:
    """Expert uses the engine reported, by what the plans had said of them (module doc)."""

    prefetched: int = 0
    prefetched_resident: int = 0
    loaded: int = 0
    loaded_resident: int = 0
    other: int = 0
    other_resident: int = 0
    bytes_read: int = 0

    @property
    def late_prefetches(self) -> int:
        """Prefetched experts whose pages were not all resident when the engine read them."""
        return self.prefetched - self.prefetched_resident

    @property
    def prefetched_in_time(self) -> float | None:
        """Fraction of used prefetched experts resident before use (None: none used)."""
        return self.prefetched_resident / self.prefetched if self.prefetched else None


class CheckpointReader:
    """The engine's read-only mapping of the checkpoint at ``shards``, trace layers
    0..num_layers-1 (trace layer i is its i-th MoE layer, of ``num_experts`` experts: checked,
    ValueError naming ``shards`` otherwise).

    ``resident(layer, expert)``: every page of the expert's bytes is in the page cache (mincore
    through the selected core's ``PrefetcherCore``, which never pages anything in here);
    ``read``: touches every page of the experts' bytes (a cold page costs its fault);
    ``unmap``: drops the experts' pages from this mapping (a mapped page cannot leave the page
    cache when the prefetcher frees it). Mappings are MADV_RANDOM: no fault readahead."""

    def __init__(self, shards: str, num_layers: int, num_experts: int):
        store = ShardStore(shards)
        try:
            layers = check_checkpoint(store, num_layers, num_experts)
            ranges = [[store.expert_ranges(la, e) for e in range(num_experts)] for la in layers]
            self.path = str(store.path)
            self.total_bytes = sum(store.layer_bytes(la) for la in layers)
        finally:
            store.close()
        paths = sorted({r.path for layer in ranges for rs in layer for r in rs})
        file_of = {path: i for i, path in enumerate(paths)}
        self._paths = paths
        self._maps, self._arrays, self._sizes = [], [], []
        for path in paths:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                view = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            view.madvise(mmap.MADV_RANDOM)
            self._maps.append(view)
            self._arrays.append(np.frombuffer(view, dtype=np.uint8))
            self._sizes.append(size)
        self._probe = backend.PrefetcherCore(paths, num_layers * num_experts)
        # per (layer, expert): (file, first page, end of its pages) and its pages' bytes
        self._pages: list[list[list[tuple[int, int, int]]]] = []
        self._span: list[list[int]] = []
        for layer, experts in enumerate(ranges):
            self._pages.append([])
            self._span.append([])
            for e, rs in enumerate(experts):
                self._probe.set_ranges(
                    layer * num_experts + e, [(file_of[r.path], r.offset, r.length) for r in rs]
                )
                spans = [self._outer(file_of[r.path], r.offset, r.end) for r in rs if r.length]
                self._pages[layer].append(spans)
                self._span[layer].append(sum(end - start for _, start, end in spans))
        self.num_experts = num_experts

    def _outer(self, file: int, start: int, end: int) -> tuple[int, int, int]:
        return file, start // _PAGE * _PAGE, min(self._sizes[file], -(-end // _PAGE) * _PAGE)

    def resident_bytes(self, layer: int, expert: int) -> int:
        return self._probe.resident_bytes(layer * self.num_experts + expert)

    def resident(self, layer: int, expert: int) -> bool:
        return self.resident_bytes(layer, expert) >= self._span[layer][expert]

    def resident_total(self) -> int:
        """Resident bytes of every expert's pages (a page two experts share counts twice)."""
        return sum(self._probe.resident_bytes(i) for i in range(self._probe.num_experts()))

    def drop_page_cache(self) -> None:
        """Drops the checkpoint's files from the page cache, whole (the pages of other tensors
        included: a span's folios that straddle them would stay), so reads start cold."""
        _drop_page_cache([ByteRange(p, 0, s) for p, s in zip(self._paths, self._sizes)])

    def read(self, layer: int, experts) -> int:
        """Reads one byte of every page of each expert's bytes; returns the bytes spanned."""
        total, sink = 0, 0
        for e in experts:
            for file, start, end in self._pages[layer][int(e)]:
                sink += int(self._arrays[file][start:end:_PAGE].sum())
                total += end - start
        return total

    def unmap(self, layer: int, experts) -> None:
        for e in experts:
            for file, start, end in self._pages[layer][int(e)]:
                self._maps[file].madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self._arrays = []
        for view in self._maps:
            view.close()
        self._maps = []


class StreamingSession:
    """``session``'s plans, each streamed to ``send`` as it is made (module doc).

    send(message): delivers one ``RouteMessage`` without waiting for an answer (a prefetch
    actor's handle's ``on_route``, or, in one process, a ``PrefetchNode``'s). reader: the
    engine's mapping of the checkpoint, for ``use``. clock: ns, the prefetch actor's clock."""

    def __init__(
        self,
        session: EngineSession,
        send: Callable[[RouteMessage], object],
        reader: CheckpointReader | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
    ):
        self.session = session
        self._send = send
        self._reader = reader
        self._clock = clock
        num_layers = session.config.num_layers
        self._batch = 0
        self._prefetched: list[set[int]] = [set() for _ in range(num_layers)]
        self._loaded: list[set[int]] = [set() for _ in range(num_layers)]
        self._evicted: list[tuple[int, ...]] = [() for _ in range(num_layers)]
        self.uses = UseStats()

    @property
    def batch(self) -> int:
        """The number of the batch being routed (0, 1, ...)."""
        return self._batch

    def route(self, layer: int, ids, weights=None, new_sequence=None) -> LayerPlan:
        """``EngineSession.route``, then the plan streamed (bad input raises before anything is
        sent)."""
        plan = self.session.route(layer, ids, weights, new_sequence)
        message = RouteMessage(
            plan.layer,
            self._batch,
            tuple(plan.load.tolist()),
            tuple(plan.prefetch.tolist()),
            tuple(plan.evict.tolist()),
            tuple(plan.prefetch_evict.tolist()),
            self._clock(),
        )
        self._send(message)
        self._loaded[layer] = set(message.load)
        self._evicted[layer] = message.evict
        if layer + 1 < len(self._prefetched):
            ahead = self._prefetched[layer + 1]
            ahead.difference_update(message.prefetch_evict)
            ahead.update(message.prefetch)
            if self._reader is not None:  # before the actor frees them (its next message)
                self._reader.unmap(layer + 1, message.prefetch_evict)
        if layer == len(self._prefetched) - 1:
            self._batch += 1
        return plan

    def use(self, layer: int, experts) -> None:
        """The engine runs ``layer`` on ``experts`` (ids; repeats ignored): counts each one's
        residency, then reads its bytes, then unmaps the layer's evictions. Needs a reader."""
        reader = self._reader
        if reader is None:
            raise ValueError("reader: use() needs the engine's CheckpointReader")
        u = self.uses
        prefetched, loaded = self._prefetched[layer], self._loaded[layer]
        unique = sorted({int(e) for e in np.asarray(experts).ravel().tolist()})
        for e in unique:
            if not 0 <= e < reader.num_experts:
                raise ValueError(f"experts: expected ids in [0, {reader.num_experts}), got {e}")
        for e in unique:
            resident = reader.resident(layer, e)
            if e in prefetched:
                prefetched.discard(e)
                u.prefetched += 1
                u.prefetched_resident += resident
            elif e in loaded:
                u.loaded += 1
                u.loaded_resident += resident
            else:
                u.other += 1
                u.other_resident += resident
        u.bytes_read += reader.read(layer, unique)
        reader.unmap(layer, self._evicted[layer])
        prefetched.difference_update(self._evicted[layer])
        self._evicted[layer] = ()

"""PrefetchNode: the node-local prefetch actor's body, which pages in what an engine's plans ask
for as each layer's router runs.

The engine-side session decides (``moeray.engine.EngineSession``); this body executes. An engine
that reads experts from a checkpoint mapped on its node streams, one way, a ``RouteMessage`` per
layer (``moeray.engine.stream.StreamingSession``); ``on_route`` tells the node's prefetcher (one
``PrefetcherCore`` per layer over the checkpoint's expert byte ranges) to page in the layer's
``load`` and the next layer's ``prefetch`` at once, then frees what the previous message evicted.
Messages arrive in send order (one-way calls to one actor are ordered), and an engine routes
layer l only after it ran layer l - 1, so when message l arrives the engine has read the experts
message l - 1 evicted: they are freed then, not earlier.

Timeliness is measured by the clock: ``sent_ns`` is the engine's ``time.monotonic_ns()`` (one
clock for every process of a host, which is why the actor is node-local); the route-to-prefetch-
start latency of a message is the time from its send until the prefetcher was told about its
last expert. A bad message cannot fail its sender (nobody waits for the answer): it is counted
and its reason kept (``StreamStats.rejected``, ``last_error``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moeray.actors.channel import ChannelServer, RouteMessage
from moeray.native import backend
from moeray.shards.residency import _drop_page_cache
from moeray.shards.store import ShardStore

__all__ = ["PrefetchNode", "RouteMessage", "StreamStats", "check_checkpoint"]

# Latency samples kept (the latest ones): p50 / p99 over a bounded ring, 512 KiB of int64.
_MAX_SAMPLES = 1 << 16


@dataclass(frozen=True)
class StreamStats:
    """What a PrefetchNode counted. messages: accepted; rejected: refused (``last_error`` says
    why); experts_told / experts_released: prefetcher calls; latency_p50_us / _p99_us / _max_us:
    route-to-prefetch-start over the latest ``samples`` messages (None before any);
    bytes_populated: bytes the prefetcher paged in."""

    messages: int
    rejected: int
    experts_told: int
    experts_released: int
    samples: int
    latency_p50_us: float | None
    latency_p99_us: float | None
    latency_max_us: float | None
    bytes_populated: int
    last_error: str = ""


def check_checkpoint(store: ShardStore, num_layers: int, num_experts: int) -> tuple[int, ...]:
    """The checkpoint's MoE layers that serve trace layers 0..num_layers-1 (trace layer i is its
    i-th MoE layer); ValueError naming ``shards`` when it has fewer layers or another number of
    experts per layer."""
    layers = store.layers
    if num_layers > len(layers):
        raise ValueError(
            f"shards: {store.path} has {len(layers)} MoE layers, the routing {num_layers}"
        )
    for i, layer in enumerate(layers[:num_layers]):
        if store.num_experts(layer) != num_experts:
            raise ValueError(
                f"shards: {store.path} layer {layer} has {store.num_experts(layer)} experts, the "
                f"routing {num_experts} (trace layer {i})"
            )
    return layers[:num_layers]


class PrefetchNode:
    """The prefetcher of one node's checkpoint at ``shards``, for ``num_layers`` layers of
    ``num_experts`` experts. A new node drops the layers' shards from the page cache (``cold``),
    so residency starts from nothing. clock: ns, the engine's clock (``time.monotonic_ns``)."""

    def __init__(
        self,
        shards: str,
        num_layers: int,
        num_experts: int,
        cold: bool = True,
        clock: Callable[[], int] = time.monotonic_ns,
        max_samples: int = _MAX_SAMPLES,
    ):
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples: expected an int >= 1, got {max_samples!r}")
        self._store = ShardStore(shards)
        try:
            layers = check_checkpoint(self._store, num_layers, num_experts)
            self._cores = [self._layer_core(layer, num_experts, cold) for layer in layers]
        except BaseException:
            self._store.close()
            raise
        self._num_experts = num_experts
        self._clock = clock
        self._latency_ns = np.zeros(max_samples, dtype=np.int64)
        self._samples = 0  # messages timed since the last reset (the ring holds the latest)
        self._messages = self._rejected = self._told = self._released = 0
        self._last_error = ""
        self._asked: list[set[int]] = [set() for _ in layers]  # paged in, not freed since
        self._pending: list[tuple[int, tuple[int, ...]]] = []  # freed at the next message
        # the channel's thread and the actor's calls share the body: one at a time
        self._lock = threading.RLock()
        self._server: ChannelServer | None = None
        self._received = 0  # messages and rejected frames, never reset (for ``received``)
        # Frees run on a thread of their own: a release waits on the kernel (fadvise drains
        # every CPU's page lists), and the next message must not wait behind it.
        self._freer = _Freer(self._cores)

    def _layer_core(self, layer: int, num_experts: int, cold: bool):
        ranges = [self._store.expert_ranges(layer, e) for e in range(num_experts)]
        paths = sorted({r.path for rs in ranges for r in rs})
        file_of = {path: i for i, path in enumerate(paths)}
        core = backend.PrefetcherCore(paths, num_experts)
        for e, rs in enumerate(ranges):
            core.set_ranges(e, [(file_of[r.path], r.offset, r.length) for r in rs])
        if cold:
            _drop_page_cache(self._store.layer_ranges(layer))
        return core

    # ------------------------------------------------------------------ the stream

    def listen(self) -> str:
        """Starts serving the stream's socket (``moeray.actors.channel``); returns its path."""
        with self._lock:
            if self._server is None:
                self._server = ChannelServer(self.on_route, self._reject)
            return self._server.path

    def received(self) -> int:
        """Messages and frames handled so far, rejected ones included (an engine compares it
        with what it sent, to know the stream has been read)."""
        with self._lock:
            return self._received

    def on_route(self, message: RouteMessage) -> None:
        """Pages in the message's load (its layer) and prefetch (the next layer) at once, then
        frees what the previous message evicted (the engine has run that layer since) and not
        this one asked for again. A bad message changes nothing and is counted as rejected."""
        with self._lock:
            self._on_route(message)

    def _reject(self, reason: str) -> None:
        with self._lock:
            self._received += 1
            self._rejected += 1
            self._last_error = reason

    def _on_route(self, message: RouteMessage) -> None:
        try:
            layer, ask = self._check(message)
        except (ValueError, TypeError) as exc:
            self._reject(str(exc))
            return
        self._received += 1
        for target, experts in ask:
            core = self._cores[target]
            for e in experts:
                self._freer.cancel(target, e)  # asked again before its free ran: it stays
                core.prefetch(e)
            self._asked[target].update(experts)
            self._told += len(experts)
        told = self._clock()
        self._latency_ns[self._samples % len(self._latency_ns)] = told - message.sent_ns
        self._samples += 1
        self._messages += 1
        asked_now = {(target, e) for target, experts in ask for e in experts}
        self._free([(t, [e for e in es if (t, e) not in asked_now]) for t, es in self._pending])
        self._pending = [(layer, message.evict)]
        if layer + 1 < len(self._cores):
            self._pending.append((layer + 1, message.prefetch_evict))

    def flush(self) -> None:
        """Frees what the last message evicted (the engine ran that layer)."""
        with self._lock:
            self._free(self._pending)
            self._pending = []
        self._freer.drain()

    def settle(self) -> None:
        """Waits until every expert asked for and not freed is paged in and every free queued
        so far has run (tests, benchmarks)."""
        self._freer.drain()
        with self._lock:
            for core, asked in zip(self._cores, self._asked):
                for e in sorted(asked):
                    core.wait(e)

    def stats(self) -> StreamStats:
        with self._lock:
            return self._stats()

    def _stats(self) -> StreamStats:
        n = min(self._samples, len(self._latency_ns))
        if n:
            p50, p99, top = np.percentile(self._latency_ns[:n], [50, 99, 100]) / 1e3
        populated = sum(int(core.stats()["bytes_populated"]) for core in self._cores)
        return StreamStats(
            self._messages,
            self._rejected,
            self._told,
            self._released,
            n,
            float(p50) if n else None,
            float(p99) if n else None,
            float(top) if n else None,
            populated,
            self._last_error,
        )

    def reset_stats(self) -> None:
        """Starts the latency samples and counters afresh (after a warm-up)."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._samples = self._messages = self._rejected = self._told = self._released = 0
        self._last_error = ""

    def resident_experts(self, layer: int) -> list[int]:
        """Experts of ``layer`` asked for and not freed since (ascending)."""
        with self._lock:
            return sorted(self._asked[layer])

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.close()
                self._server = None
            self._freer.close()
            self._cores.clear()  # the freer shares the list: the mappings go with the cores
            self._store.close()

    # ------------------------------------------------------------------ internals

    def _free(self, pending) -> None:
        for layer, experts in pending:
            for e in experts:
                self._freer.free(layer, e)
                self._asked[layer].discard(e)
            self._released += len(experts)

    def _check(self, message) -> tuple[int, list[tuple[int, tuple[int, ...]]]]:
        if not isinstance(message, RouteMessage):
            raise TypeError(f"message: expected a RouteMessage, got {type(message).__name__}")
        layer = message.layer
        num_layers = len(self._cores)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"layer: expected an int in [0, {num_layers}), got {layer!r}")
        if isinstance(message.sent_ns, bool) or not isinstance(message.sent_ns, int):
            raise ValueError(f"sent_ns: expected an int, got {message.sent_ns!r}")
        for name in ("load", "prefetch", "evict", "prefetch_evict"):
            experts = getattr(message, name)
            if not isinstance(experts, tuple) or len(experts) > self._num_experts:
                raise ValueError(f"{name}: expected a tuple of at most {self._num_experts} ids")
            if name.startswith("prefetch") and experts and layer + 1 >= num_layers:
                raise ValueError(f"{name}: layer {layer} is the last: nothing comes after it")
            for e in experts:
                if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self._num_experts:
                    raise ValueError(f"{name}: expected ids in [0, {self._num_experts}), got {e!r}")
        ask = [(layer, message.load)]
        if message.prefetch:
            ask.append((layer + 1, message.prefetch))
        return layer, ask


class _Freer:
    """Releases experts on its own thread, in the order queued. ``cancel`` takes back a free
    that has not run (the expert was asked for again) or waits for the one running."""

    def __init__(self, cores):
        self._cores = cores
        self._queue: dict[tuple[int, int], None] = {}  # insertion-ordered set
        self._running: tuple[int, int] | None = None
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._serve, name="moeray-free", daemon=True)
        self._thread.start()

    def free(self, layer: int, expert: int) -> None:
        with self._cv:
            self._queue[layer, expert] = None
            self._cv.notify_all()

    def cancel(self, layer: int, expert: int) -> None:
        with self._cv:
            self._queue.pop((layer, expert), None)
            self._cv.wait_for(lambda: self._running != (layer, expert))

    def drain(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: not self._queue and self._running is None)

    def close(self) -> None:
        self.drain()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def _serve(self) -> None:
        with self._cv:
            while True:
                self._cv.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                item = next(iter(self._queue))
                del self._queue[item]
                self._running = item
                self._cv.release()
                try:
                    self._cores[item[0]].release(item[1])
                finally:
                    self._cv.acquire()
                    self._running = None
                    self._cv.notify_all()

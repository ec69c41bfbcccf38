"""Start, find and stop a moeray service on a Ray cluster; submit routing to it.

A service is a named, detached coordinator actor plus its layer actors, in a Ray namespace
(``ServiceConfig.name``, ``ServiceConfig.namespace``). ``start`` creates one, ``connect`` finds a
running one from any driver or job, ``ServiceHandle.shutdown`` removes every actor it created.
Ray must be initialised by the caller (``ray.init()`` or a job's driver).

``ServiceHandle.submit`` validates the step and groups it by expert in the caller's process
(the native ``schedule``: microseconds), and coalesces the routing of ``window_steps`` submits
(or ``window_ms``) itself before handing it to the coordinator as one closed window, without
waiting: the coordinator sees one call per client window, not one per step, which is what
keeps it from saturating under a fleet of clients. At most ``max_in_flight`` windows are
outstanding before the next one waits.

``submit(..., seq_starts=...)`` marks the tokens that begin a sequence; only the ``moeray``
policy reads it (its previous-token predictor starts afresh there). Without it the stream is
one continuing sequence. ``submit(..., hints=...)`` carries an engine's predicted experts of
each token at each layer to the ``moeray`` policy (``moeray.policy.predict``, "Engine hints").
The msgpack path (``submit_msgpack``) carries both (``moeray.wire``: ``positions`` 0 where a
sequence starts, ``hints``).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from moeray._progress import Progress
from moeray.actors import _ray
from moeray.actors.coordinator import (
    ServiceConfig,
    ServiceStats,
    check_hints,
    check_seq_starts,
    check_step,
    join_hints,
    schedule_step,
)
from moeray.actors.layer import PREDICTIVE_POLICY
from moeray.metrics import SubmitLatency
from moeray.policy.scheduler import ExpertBatches
from moeray.replay import (
    PolicyResult,
    ReplayConfig,
    ReplayReport,
    ShardResult,
    replay_trace,
    resplit_report,
    served_result,
    shard_capacity,
    shard_expert_bytes,
    synthetic_hints,
)
from moeray.traces import Trace

__all__ = [
    "ServiceConfig",
    "ServiceHandle",
    "ServiceThroughput",
    "start",
    "connect",
    "replay_through_service",
]


class ServiceHandle:
    """A driver's handle on a running service."""

    def __init__(
        self,
        coordinator,
        config: ServiceConfig,
        max_in_flight: int = 64,
        timer: Callable[[], float] = time.perf_counter,
    ):
        self._coordinator = coordinator
        self.config = config
        self._in_flight: deque = deque()
        self._max_in_flight = max_in_flight
        self._timer = timer
        # the latest submits' latencies, for p50 / p99; bounded so a long-lived engine's
        # handle does not grow without end (the Prometheus histogram keeps the full record)
        self.submit_latency_s: deque[float] = deque(maxlen=100_000)
        self._latency_metric = SubmitLatency(config.name)
        self._window: list[np.ndarray] = []  # this client's routing not yet sent
        self._window_starts: list[np.ndarray | None] = []  # and its sequence starts
        self._window_hints: list[tuple[int, np.ndarray | None]] = []  # and its engine hints
        self._window_opened = 0.0
        self._window_number = 0  # which window a window_ms timer was armed for
        self._lock = threading.Lock()  # submit and the window_ms timer both send windows

    def submit(
        self, expert_ids, weights=None, seq_starts=None, hints=None
    ) -> list[ExpertBatches] | None:
        """One forward pass: expert_ids int [num_layers, T, top_k], weights float, same shape
        (or None: no schedule is returned), seq_starts bool [T]: True where a token begins a
        sequence (or None: the step continues the stream; only ``moeray`` reads it), hints int
        [num_layers, T, h]: an engine's predicted experts of each token at each layer, -1 for
        none (or None; only ``moeray`` takes them: ``moeray.policy.predict``, "Engine hints").
        Returns each layer's ``ExpertBatches``.

        Bad input raises TypeError / ValueError here and reaches no actor."""
        start = self._timer()
        ids, w = check_step(expert_ids, weights, self.config)
        starts = check_seq_starts(seq_starts, ids.shape[1])
        hinted = check_hints(hints, self.config, ids.shape[1])
        batches = None
        if w is not None:
            batches = schedule_step(ids, w, self.config.num_experts)
        ms = self.config.window_ms
        with self._lock:
            if not self._window:
                self._window_opened = start
                self._window_number += 1
                if ms is not None and self.config.window_steps > 1:
                    # an engine that pauses must not leave its routing unsent: close the
                    # window when it is ms old even if no submit comes to do it
                    closer = threading.Timer(ms / 1e3, self._close_window, (self._window_number,))
                    closer.daemon = True
                    closer.start()
            self._window.append(ids.astype(self.config.ids_dtype()))  # 1/4 of int32's bytes
            self._window_starts.append(starts)
            self._window_hints.append((ids.shape[1], hinted))
            if len(self._window) >= self.config.window_steps or (
                ms is not None and (start - self._window_opened) * 1e3 >= ms
            ):
                self._send_window()
        elapsed = self._timer() - start
        self.submit_latency_s.append(elapsed)
        self._latency_metric.observe(elapsed)
        return batches

    def _close_window(self, number: int) -> None:
        """The window_ms timer: sends window ``number`` if it is still open."""
        with self._lock:
            if self._window and self._window_number == number:
                self._send_window()

    def _send_window(self) -> None:
        """Sends the open window (the caller holds the lock)."""
        if not self._window:
            return
        if len(self._in_flight) >= self._max_in_flight:
            _ray.wait_all([self._in_flight.popleft()])
        routing = np.concatenate(self._window, axis=1)
        starts = None
        if any(s is not None for s in self._window_starts):
            starts = np.concatenate(
                [
                    np.zeros(ids.shape[1], dtype=bool) if s is None else s
                    for ids, s in zip(self._window, self._window_starts)
                ]
            )
        self._in_flight.append(
            _ray.call_async(
                self._coordinator.add_routing,
                routing,
                len(self._window),
                True,
                starts,
                join_hints(self._window_hints),
            )
        )
        self._window = []
        self._window_starts = []
        self._window_hints = []

    def submit_msgpack(self, payload: bytes) -> bytes:
        """A step in the msgpack form of ``moeray.wire``; returns the schedules in that form.
        This is the path of non-Python clients: it waits for the coordinator. This handle's
        open window goes first, so steps mixed with ``submit`` keep their order."""
        with self._lock:
            self._send_window()
        return _ray.call(self._coordinator.submit_msgpack, payload)

    def flush(self) -> None:
        """Sends this client's open window and waits until everything submitted so far has
        reached the coordinator; then closes the coordinator's open window."""
        with self._lock:
            self._send_window()
            in_flight = list(self._in_flight)
            self._in_flight.clear()
        _ray.wait_all(in_flight)
        _ray.call(self._coordinator.flush)

    def stats(self) -> ServiceStats:
        """Per-layer statistics once everything submitted so far has been applied."""
        self.flush()
        return _ray.call(self._coordinator.stats)

    def layer_actor_handles(self) -> list:
        return _ray.call(self._coordinator.layer_actor_handles)

    def placement(self) -> list[str | None]:
        """The node resource each layer actor is pinned to now (after any re-placement)."""
        return _ray.call(self._coordinator.placement)

    def layer_actor_nodes(self) -> list[str]:
        """The Ray node id each layer actor runs on."""
        return _ray.call(self._coordinator.layer_actor_nodes)

    def shutdown(self) -> None:
        """Removes the coordinator and every layer actor of this service."""
        try:
            with self._lock:
                self._window = []
                self._window_starts = []
            _ray.wait_all(self._in_flight)
            _ray.call(self._coordinator.shutdown)
        except _ray.RayActorError:
            pass
        finally:
            self._in_flight.clear()
            _ray.kill(self._coordinator)


def start(config: ServiceConfig) -> ServiceHandle:
    """Creates the service's actors and returns once the coordinator answers.

    ValueError when a service of that name already runs in the namespace (use ``connect``)."""
    if not isinstance(config, ServiceConfig):
        raise TypeError(f"config: expected a ServiceConfig, got {type(config).__name__}")
    try:
        _ray.get_coordinator(config.name, config.namespace)
    except ValueError:
        pass
    else:
        raise ValueError(f"name: service {config.name!r} already runs; connect() to it")
    coordinator = _ray.create_coordinator(config)
    _ray.call(coordinator.ready)  # every actor is up, or its creation error surfaces here
    _warn_if_core_differs(*_ray.call(coordinator.core))
    return ServiceHandle(coordinator, config)


def _warn_if_core_differs(path: str, native: bool) -> None:
    """A service whose actors fell back to the pure-Python core, beside a native driver, runs
    tens of times slower: say so, and name the usual cause."""
    import moeray
    from moeray.native import IS_NATIVE

    if IS_NATIVE and not native:
        warnings.warn(
            f"the service's actors run moeray's pure-Python core, imported from {path} (this "
            f"process: native, from {moeray.__file__}). Ray puts the driver's working directory "
            "first on workers' sys.path: a driver started in a moeray checkout makes them import "
            "its unbuilt source tree. Start the driver in another directory (moeray's own commands do).",
            RuntimeWarning,
            stacklevel=3,
        )


def connect(name: str = "moeray", namespace: str = "moeray") -> ServiceHandle:
    """A handle on the running service ``name``; ValueError when there is none."""
    coordinator = _ray.get_coordinator(name, namespace)
    return ServiceHandle(coordinator, _ray.call(coordinator.config))


@dataclass(frozen=True)
class ServiceThroughput:
    """How fast one replay went through the service, end to end (submit to last ack)."""

    policy: str
    tokens: int
    submits: int
    seconds: float
    submit_p50_ms: float
    submit_p99_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def submits_per_s(self) -> float:
        return self.submits / self.seconds if self.seconds > 0 else float("inf")


def replay_through_service(
    trace: Trace,
    config: ReplayConfig,
    step_tokens: int = 256,
    layers_per_actor: int | None = None,
    window_steps: int = 16,
    progress: Progress | None = None,
    timer: Callable[[], float] = time.perf_counter,
    shards: str | None = None,
) -> tuple[ReplayReport, list[ServiceThroughput]]:
    """Replays ``trace`` through one service per online policy (``belady`` stays in-process:
    it is an oracle, not a policy a service can run). Steps of ``step_tokens`` tokens carry
    every layer, and the trace's sequence starts (``seq_offsets``); the hit counts equal
    ``replay_trace``'s, and ``moeray``'s stalls, transfers, wasted prefetches and predictor
    recall / precision too, which tests check. With ``config.hint_accuracy`` the moeray
    service gets the synthetic hints ``replay_trace`` makes, with each step.
    With ``shards`` the layer actors keep the checkpoint's bytes resident for their hot sets,
    one window at a time, and the report has a ``ShardResult`` per policy (``moeray``
    included)."""
    hints = None  # [layers, T, top_k], for the moeray service only, as replay_trace makes them
    if PREDICTIVE_POLICY in config.policies and config.hint_accuracy is not None:
        hints = synthetic_hints(
            trace.expert_ids,
            trace.num_experts,
            config.hint_accuracy,
            np.random.default_rng(config.hint_seed),
        ).transpose(1, 0, 2)
    if shards is not None:
        expert_bytes = shard_expert_bytes(shards, trace.num_layers)
        shards = os.path.abspath(shards)
    ids = np.ascontiguousarray(trace.expert_ids.transpose(1, 0, 2), dtype=np.int32)
    if trace.weights is not None:
        weights = np.ascontiguousarray(trace.weights.transpose(1, 0, 2))
    else:  # no router weights in the trace: group with equal weights
        weights = np.full(ids.shape, 1.0 / trace.top_k, dtype=np.float32)
    seq_starts = np.zeros(trace.num_tokens, dtype=bool)
    seq_starts[trace.seq_offsets[trace.seq_offsets < trace.num_tokens]] = True
    layers_per_actor = layers_per_actor or max(1, -(-trace.num_layers // (os.cpu_count() or 1)))
    results: dict[str, PolicyResult] = {}
    shard_results: dict[str, ShardResult] = {}
    throughput = []
    for name in config.policies:
        if name == "belady":
            results[name] = replay_trace(trace, replace(config, policies=("belady",))).results[name]
            if progress is not None:
                progress.advance(trace.num_layers, name)
            continue
        service_config = ServiceConfig(
            num_layers=trace.num_layers,
            num_experts=trace.num_experts,
            top_k=trace.top_k,
            capacity=config.capacity,
            policy=name,
            window_steps=window_steps,
            layers_per_actor=min(layers_per_actor, trace.num_layers),
            name=f"replay-{name}-{os.getpid()}",
            affinity_decay=config.affinity_decay,
            affinity_boost=config.affinity_boost,
            affinity_weight=config.affinity_weight,
            shards=shards,
            predict=config.predict,
        )
        handle = start(service_config)
        try:
            begin = timer()
            for first in range(0, trace.num_tokens, step_tokens):
                step = slice(first, first + step_tokens)
                handle.submit(
                    ids[:, step],
                    weights[:, step],
                    seq_starts[step],
                    hints[:, step] if hints is not None and name == PREDICTIVE_POLICY else None,
                )
            stats = handle.stats()
            seconds = timer() - begin
        finally:
            handle.shutdown()
        latency_ms = np.array(handle.submit_latency_s) * 1e3
        throughput.append(
            ServiceThroughput(
                policy=name,
                tokens=trace.num_tokens,
                submits=len(latency_ms),
                seconds=seconds,
                submit_p50_ms=float(np.percentile(latency_ms, 50)),
                submit_p99_ms=float(np.percentile(latency_ms, 99)),
            )
        )
        resplit = None
        if name == PREDICTIVE_POLICY and config.predict.split is not None:
            resplit = resplit_report(
                stats.resplit_moved,
                [s.resplit_evictions for s in stats.layers],
                [s.resplit_transfers for s in stats.layers],
                stats.capacity,
            )
        results[name] = served_result(
            name, stats.layers, trace, (seconds / trace.num_layers,) * trace.num_layers, resplit
        )
        if shards is not None:
            shard_results[name] = ShardResult(
                shard_capacity(stats.capacity_max, expert_bytes),
                expert_bytes,
                *(
                    tuple(getattr(s, key) for s in stats.layers)
                    for key in ("resident_bytes_max", "bytes_moved", "late_prefetches", "stalls")
                ),
            )
        if progress is not None:
            progress.advance(trace.num_layers, name)
    report = ReplayReport(
        trace.name,
        trace.num_experts,
        config.capacity,
        results,
        shards=shard_results,
        shards_path=shards,
    )
    return report, throughput

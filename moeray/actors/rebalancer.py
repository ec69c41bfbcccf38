"""The coordinator's expert placement, re-planned off its submit path.

``Rebalancer`` hands every flushed window's routing to one background worker (a single thread:
load windows are planned in order, and the native planning kernels release the GIL) that runs
``moeray.placement.balancer.LoadBalancer`` and publishes each new placement by swapping one
reference, so a submit costs one queued call and never waits for a plan. The coordinator's own
thread folds finished rebalances into ``PlacementStats`` and the metrics hook (``drain``), so
neither statistics nor metrics are touched from two threads. Tests pass ``run_in_background``
(e.g. run at once) and ``timer``, and decide when planning happens.

``wait_for_placement``: the poll-with-a-deadline that ``ServiceHandle.wait_placement`` runs.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from moeray.actors.messages import PlacementStats
from moeray.placement.balancer import LoadBalancer, PlacementConfig, Planner, Rebalance
from moeray.placement.placement import Placement
from moeray.placement.planner import place_moeray

__all__ = ["Rebalancer", "wait_for_placement"]

_log = logging.getLogger("moeray.placement")


class Rebalancer:
    """Load windows, forecast and published placements of one service (module doc).

    run_in_background(job): runs ``job()`` later, in submission order, off the caller's thread
    (None: one worker thread of its own, stopped by ``close``). timer: seconds, monotonic (the
    age of a placement). on_rebalance(result): called on the coordinator's thread for every
    finished load window (e.g. Prometheus metrics). planner: ``place_moeray`` or a stand-in.
    """

    def __init__(
        self,
        config: PlacementConfig,
        num_layers: int,
        num_experts: int,
        run_in_background: Callable[[Callable[[], None]], object] | None = None,
        timer: Callable[[], float] = time.monotonic,
        on_rebalance: Callable[[Rebalance], None] | None = None,
        planner: Planner = place_moeray,
    ):
        self._balancer = LoadBalancer(config, num_layers, num_experts, planner)
        self._executor: ThreadPoolExecutor | None = None
        if run_in_background is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="moeray-placement")
            run_in_background = self._executor.submit
        self._run = run_in_background
        self._timer = timer
        self._on_rebalance = on_rebalance
        # Written by the worker, read by the coordinator's thread: one reference swapped (a
        # tuple), and a deque whose append and popleft are atomic, so no lock is needed.
        self._published: tuple[Placement | None, float | None] = (None, None)
        self._latency_s: float | None = None
        self._finished: deque[Rebalance] = deque()
        self._stats = PlacementStats(bytes_moved=0 if config.expert_bytes else None)
        self._expert_bytes = config.expert_bytes

    def feed(self, expert_ids: np.ndarray) -> None:
        """A flushed window's routing, int [num_layers, T, top_k] (not written to afterwards):
        queued for the worker; returns at once."""
        queued = self._timer()
        self._run(lambda: self._plan(expert_ids, queued))

    def _plan(self, expert_ids: np.ndarray, queued: float) -> None:
        """The worker: counts the routing into load windows and re-plans each one in turn;
        ``queued``: when the routing was handed over (the timer's)."""
        balancer = self._balancer
        try:
            windows = balancer.observe(expert_ids)
        except Exception as exc:  # a bug, not a bad load: keep serving, say it once per window
            _log.warning("moeray placement: routing not counted (%s: %s)", type(exc).__name__, exc)
            return
        for counts in windows:
            result = balancer.rebalance(counts)
            if result.placement is not None:
                now = self._timer()
                self._published = (result.placement, now)
                self._latency_s = now - queued
            elif result.error is not None:
                _log.warning(
                    "moeray placement: load window %d not re-placed, version %d kept (%s)",
                    result.window,
                    result.version,
                    result.error,
                )
            self._finished.append(result)

    def drain(self) -> None:
        """Folds the rebalances finished so far into the statistics and the hook (the
        coordinator's thread)."""
        stats = self._stats
        while self._finished:
            result = self._finished.popleft()
            stats.windows += 1
            if result.error is not None:
                stats.errors += 1
                stats.last_error = result.error
            elif result.skipped:
                stats.skipped += 1
            else:
                stats.rebalances += 1
                moved = int(result.moved_slots.sum())
                stats.slots_moved += moved
                if self._expert_bytes:
                    stats.bytes_moved += moved * self._expert_bytes
            if result.forecast_balancedness is not None:
                stats.forecast_balancedness = tuple(map(float, result.forecast_balancedness))
            if result.realised_balancedness is not None:
                stats.realised_balancedness = tuple(map(float, result.realised_balancedness))
            if self._on_rebalance is not None:
                self._on_rebalance(result)

    def latest(self, after_version: int = 0) -> Placement | None:
        """The latest published placement when its version is above ``after_version``."""
        placement, _ = self._published
        if placement is None or placement.version <= after_version:
            return None
        return placement

    def stats(self) -> PlacementStats:
        """A copy of the statistics, with the age of the latest placement now."""
        self.drain()
        placement, published_at = self._published
        out = PlacementStats(**vars(self._stats))
        out.version = placement.version if placement is not None else 0
        out.age_s = None if published_at is None else max(0.0, self._timer() - published_at)
        out.latency_s = self._latency_s
        return out

    def close(self) -> None:
        """Stops the worker of its own (planning in progress finishes, queued windows are
        dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def wait_for_placement(
    read: Callable[[int], Placement | None],
    after_version: int,
    timeout_s: float,
    timer: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    poll_s: float = 0.01,
) -> Placement | None:
    """Polls ``read(after_version)`` (a placement newer than that, or None) until it gives one,
    or ``timeout_s`` seconds have passed on ``timer`` (then None); ``sleep`` between polls, at
    most ``poll_s`` seconds each."""
    deadline = timer() + timeout_s
    while True:
        found = read(after_version)
        if found is not None:
            return found
        left = deadline - timer()
        if left <= 0:
            return None
        sleep(min(poll_s, left))

"""A session's link to a running service: its routing goes to the service on a thread of its own,
and the service's updates come back to it, so the engine never waits on the service.

The engine's thread hands each routed batch to ``report`` (a bounded queue; when the queue is
full the batch is dropped for the service and counted, never the engine made to wait) and takes
the newest update with ``take_update`` between batches. The link's thread submits the batches
through the service's handle (which coalesces them into windows) and polls the handle for
updates every ``poll_s``. When the service fails (a submit or a poll raises), the link warns
once, counts the failure, keeps the session deciding on its own, and retries every ``poll_s``;
with ``reconnect`` (a callable returning a new handle) it reconnects; the first call that works
again resynchronises (the newest update is taken again). A handle here is anything with
``submit(expert_ids, seq_starts=...)`` and ``engine_update(after_version)`` (``ServiceHandle``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moeray.actors.messages import EngineUpdate

__all__ = ["LinkStats", "ServiceLink"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkStats:
    """reported_tokens: tokens the service took; dropped_tokens: tokens dropped because the
    queue was full or the service failed them; failures: failed calls to the service;
    connected: whether the last call to the service worked; updates: updates taken."""

    reported_tokens: int
    dropped_tokens: int
    failures: int
    connected: bool
    updates: int


class ServiceLink:
    """handle: the service's handle; max_queued_tokens: the most routed tokens waiting for the
    link's thread (at about layers x top_k bytes each); poll_s: seconds between update polls
    (and between retries of a failed service); reconnect: None, or a callable that returns a new
    handle after the service failed; metrics: None, or an object whose ``observe(LinkStats)``
    the link's thread calls after each call to the service (``ServiceHandle.link_metrics()``:
    Ray metrics, so a lost service shows on the node's metrics endpoint)."""

    def __init__(
        self,
        handle,
        max_queued_tokens: int = 65_536,
        poll_s: float = 0.5,
        reconnect: Callable[[], object] | None = None,
        timer: Callable[[], float] = time.monotonic,
        metrics=None,
    ):
        if isinstance(max_queued_tokens, bool) or not isinstance(max_queued_tokens, int):
            raise TypeError(f"max_queued_tokens: expected an int, got {max_queued_tokens!r}")
        if max_queued_tokens < 1:
            raise ValueError(f"max_queued_tokens: expected an int >= 1, got {max_queued_tokens}")
        if not poll_s > 0:
            raise ValueError(f"poll_s: expected seconds > 0, got {poll_s!r}")
        self._handle = handle
        self._max_tokens = max_queued_tokens
        self._poll_s = float(poll_s)
        self._reconnect = reconnect
        self._timer = timer
        self.metrics = metrics
        self._queue: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._update: EngineUpdate | None = None
        self._seen_version = 0  # the newest version fetched (taken or waiting)
        self._reported = self._dropped = self._failures = self._updates = 0
        self._connected = True
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="moeray-link", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the engine's thread

    def report(self, expert_ids: np.ndarray, seq_starts: np.ndarray) -> bool:
        """Queues one routed batch (int [layers, tokens, top_k], bool [tokens]) for the
        service. Returns False (and counts the tokens dropped) when the queue is full."""
        tokens = expert_ids.shape[1]
        with self._cond:
            if self._closed or self._queued_tokens + tokens > self._max_tokens:
                self._dropped += tokens
                return False
            self._queue.append((expert_ids, seq_starts))
            self._queued_tokens += tokens
            self._cond.notify()
        return True

    def take_update(self) -> EngineUpdate | None:
        """The newest update not taken yet, or None."""
        with self._cond:
            update, self._update = self._update, None
            if update is not None:
                self._updates += 1
            return update

    def stats(self) -> LinkStats:
        with self._cond:
            return LinkStats(
                self._reported, self._dropped, self._failures, self._connected, self._updates
            )

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Waits until every queued batch went to the service (or was dropped); False after
        ``timeout_s``."""
        deadline = self._timer() + timeout_s
        with self._cond:
            while self._queue or self._sending:
                left = deadline - self._timer()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        """Stops the link's thread; batches still queued are dropped and counted."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    # ------------------------------------------------------------------ the link's thread

    _sending = False
    _exported: LinkStats | None = None  # what metrics last observed

    def _run(self) -> None:
        next_poll = self._timer()
        while True:
            with self._cond:
                while not self._closed and not self._queue and self._timer() < next_poll:
                    self._cond.wait(max(0.0, next_poll - self._timer()))
                if self._closed:
                    self._dropped += self._queued_tokens
                    self._queue.clear()
                    self._queued_tokens = 0
                    self._cond.notify_all()
                    break
                batch = self._queue.popleft() if self._queue and self._connected else None
                self._sending = batch is not None
            if batch is not None:
                self._call(self._submit, batch)
            if self._timer() >= next_poll:
                next_poll = self._timer() + self._poll_s
                if not self._connected and self._reconnect is not None:
                    self._call(self._do_reconnect, None)
                self._call(self._poll, None)
            self._export()
        self._export()  # what closing dropped

    def _submit(self, batch: tuple[np.ndarray, np.ndarray]) -> None:
        self._handle.submit(batch[0], seq_starts=batch[1])

    def _do_reconnect(self, _=None) -> None:
        self._handle = self._reconnect()

    def _poll(self, _=None) -> None:
        update = self._handle.engine_update(self._seen_version)
        if update is not None and update.version > self._seen_version:
            with self._cond:
                self._seen_version = update.version
                self._update = update

    def _call(self, fn: Callable[[object], None], batch) -> None:
        try:
            fn(batch)
        except Exception as exc:  # the service failed: the engine decides on its own
            with self._cond:
                self._failures += 1
                if batch is not None:
                    self._dropped += batch[0].shape[1]
                    self._queued_tokens -= batch[0].shape[1]
                    self._sending = False
                    self._cond.notify_all()
                if self._connected:
                    log.warning(
                        "moeray: the service failed (%s: %s); the session decides on its own "
                        "and retries every %.1f s",
                        type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "",
                        self._poll_s,
                    )
                self._connected = False
                self._seen_version = 0  # take the newest update again when it returns
            return
        with self._cond:
            if batch is not None:
                self._reported += batch[0].shape[1]
                self._queued_tokens -= batch[0].shape[1]
                self._sending = False
                self._cond.notify_all()
            if not self._connected:
                log.warning("moeray: the service is back; the session resynchronises")
            self._connected = True

    def _export(self) -> None:
        if self.metrics is None:
            return
        stats = self.stats()
        if stats == self._exported:
            return
        self._exported = stats
        try:
            self.metrics.observe(stats)
        except Exception as exc:  # metrics are for people; the link goes on without them
            log.warning("moeray: link metrics dropped (%s: %s)", type(exc).__name__, exc)
            self.metrics = None

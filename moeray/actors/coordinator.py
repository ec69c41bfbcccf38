"""The coordinator: coalesces routing per layer into windows and keeps every layer actor in step.

A plain class: it reaches layer actors through a ``LayerTransport`` (Ray's in
``moeray.actors._ray``, ``InProcessTransport`` for replays and tests), takes ``timer=`` and an
``on_ack`` hook. It is the source of truth:
- routing is buffered (``WindowBuffer``) and sent as one ``LayerWindow`` per layer and one call
  per layer actor per window (``window_steps`` submits, or ``window_ms`` since the window
  opened), ids in the smallest integer type that holds them;
- windows are numbered per layer and kept until acknowledged; on ack their counters join the
  layer's statistics and the ack's affinity becomes the coordinator's copy of the layer's state;
- when a layer actor fails it is re-created, restored from that copy (last acknowledged window,
  affinity and, for a policy that relearns, the recent routing: ``Warmup``) and sent every
  unacknowledged window again, so nothing is lost or counted twice.

A predictive policy (``PolicyEntry.predictive``) also gets, per window, the sequence starts,
engine hints, the previous layer's routing on an actor's first layer, and the capacity re-split
(``predict.split``) that the coordinator runs over every layer's routing. Budgets are a function
of the configuration only, never of timing: a stream gives the same decisions whatever its
windows and transport. docs/design.md has the restart rules.

With ``expert_placement``, every flushed window's routing also goes to a ``Rebalancer``, which
re-plans the expert placement off the submit path and publishes versions
(``expert_placement()``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from moeray.actors.config import ServiceConfig
from moeray.actors.messages import (
    LayerAck,
    LayerState,
    LayerStats,
    LayerWindow,
    ServiceStats,
    Warmup,
)
from moeray.actors.rebalancer import Rebalancer
from moeray.actors.steps import WindowBuffer, check_step, schedule_step
from moeray.placement.balancer import Rebalance
from moeray.placement.placement import Placement
from moeray.policy.affinity import ExpertAffinity
from moeray.policy.split import CapacitySplit, SplitSchedule

__all__ = ["Coordinator", "LayerTransport"]


class LayerTransport(Protocol):
    """How the coordinator reaches layer actors; every call is non-blocking."""

    def send(self, actor: int, windows: list[LayerWindow]) -> None: ...

    def restore(
        self, actor: int, states: list[LayerState], warmup: Warmup | None = None
    ) -> None: ...

    def recreate(self, actor: int) -> None: ...

    def poll(self, wait: bool) -> list[tuple[int, int, object]]:
        """Finished calls as (actor, generation, acks or exception), in send order per actor."""
        ...

    def generation(self, actor: int) -> int: ...

    def outstanding(self) -> int: ...

    def settle_shards(self) -> dict[int, dict]:
        """Blocking: every live actor's ``LayerCaches.settle_shards()`` (asked of all at once),
        merged: layer -> shard counters."""
        ...


class Coordinator:
    """Coalesces routing per layer into windows and keeps layer actors in step (see module doc)."""

    def __init__(
        self,
        config: ServiceConfig,
        transport: LayerTransport,
        timer: Callable[[], float] = time.monotonic,
        on_ack: Callable[[LayerAck], None] | None = None,
        on_rebalance: Callable[[Rebalance], None] | None = None,
        run_in_background: Callable[[Callable[[], None]], object] | None = None,
    ):
        """on_rebalance: called for every planned load window (``expert_placement`` on), on
        this object's thread. run_in_background(job): where placement planning runs (None: a
        worker thread of the coordinator's own; a test passes its own to decide when)."""
        self.config = config
        self._transport = transport
        self._on_ack_hook = on_ack  # e.g. Prometheus counters
        self._groups = config.actor_layers()
        layers = range(config.num_layers)
        self._buffer = WindowBuffer(config, timer)
        self._predictive = config.entry.predictive
        self._budgets = config.prefetch_budgets()
        self._sent = {layer: 0 for layer in layers}  # last window number sent, per layer
        self._unacked: dict[int, deque[LayerWindow]] = {layer: deque() for layer in layers}
        empty = ExpertAffinity(config.affinity_config())
        self._state = {
            layer: LayerState(layer, 0, empty.scores(), empty.activation_counts())
            for layer in layers
        }
        self._stats = {layer: LayerStats(layer=layer) for layer in layers}
        self._submits = 0
        # Recent windows' routing, every layer (a policy that relearns): (window number,
        # ids [layers, T, top_k], seq_starts or None), at least the last warmup_tokens tokens
        # every layer acknowledged, for a restarted actor to relearn from.
        self._recent: deque[tuple[int, np.ndarray, np.ndarray | None]] = deque()
        # One capacity re-split across layers: it runs over every layer's routing as it
        # comes; its plans go out with the windows of their tokens.
        self._split: SplitSchedule | None = None
        if self._predictive and config.predict.split is not None:
            self._split = SplitSchedule(
                CapacitySplit.for_model(
                    config.num_layers,
                    config.num_experts,
                    config.top_k,
                    config.capacity,
                    config.predict.split,
                )
            )
        self._rebalancer: Rebalancer | None = None
        if config.expert_placement is not None:
            self._rebalancer = Rebalancer(
                config.expert_placement,
                config.num_layers,
                config.num_experts,
                run_in_background,
                timer,
                on_rebalance,
            )

    # --- submitting ---

    def submit(
        self, expert_ids, weights=None, schedule_batches: bool = True, seq_starts=None, hints=None
    ):
        """Takes one step (see ``moeray.actors.steps.check_step``). Returns each layer's
        ``ExpertBatches`` (when ``schedule_batches`` and weights are given), after buffering
        the routing; never waits on a layer actor."""
        step = check_step(self.config, expert_ids, weights, seq_starts, hints)
        batches = None
        if schedule_batches and step.weights is not None:
            batches = schedule_step(step.expert_ids, step.weights, self.config.num_experts)
        self.add_routing(step.expert_ids, seq_starts=step.seq_starts, hints=step.hints)
        return batches

    def add_routing(
        self,
        ids: np.ndarray,
        steps: int = 1,
        close_window: bool = False,
        seq_starts: np.ndarray | None = None,
        hints: np.ndarray | None = None,
    ) -> None:
        """Buffers checked routing (ints [num_layers, T, top_k]) of ``steps`` submits and
        closes the window if due, or at once with ``close_window`` (a client that coalesced a
        whole window itself). seq_starts, hints: checked (``check_step``) or None."""
        self._buffer.add(ids, steps, seq_starts, hints)
        if self._split is not None:
            self._split.observe(ids.transpose(1, 0, 2))
        self._submits += steps
        if close_window or self._buffer.due():
            self.flush()
        self._collect(wait=False)

    def flush(self) -> None:
        """Sends the open window: one call per layer actor, carrying each of its layers."""
        window = self._buffer.take()
        if window is None:
            return
        routing = window.expert_ids
        starts = hints = None
        if self._predictive:  # only predictive policies read starts and hints
            starts, hints = window.seq_starts, window.hints
        resplits = self._split.window(routing.shape[1]) if self._split is not None else ()
        if self._predictive and self.config.warmup_tokens:
            self._keep_recent(routing, starts)
        if self._rebalancer is not None:
            self._rebalancer.feed(routing)
        for actor, layers in enumerate(self._groups):
            windows = []
            for layer in layers:
                self._sent[layer] += 1
                previous = None
                if self._predictive and layer == layers[0] and layer > 0:
                    previous = routing[layer - 1]  # the actor's cross-layer predictor reads it
                layer_window = LayerWindow(
                    layer=layer,
                    number=self._sent[layer],
                    expert_ids=routing[layer],
                    prefetch_budget=self._budgets[layer],
                    previous_layer_ids=previous,
                    seq_starts=starts,
                    hints=None if hints is None else hints[layer],
                    resplits=resplits,
                )
                self._unacked[layer].append(layer_window)
                windows.append(layer_window)
            self._transport.send(actor, windows)

    def _keep_recent(self, routing: np.ndarray, starts: np.ndarray | None) -> None:
        """Keeps the window about to be sent in ``_recent``, and drops the oldest windows while
        warmup_tokens tokens acknowledged by every layer remain (a restart relearns from tokens
        up to its last acknowledged window)."""
        self._recent.append((self._sent[0] + 1, routing, starts))  # the window's own arrays
        acked = min(state.window for state in self._state.values())
        covered = sum(ids.shape[1] for number, ids, _ in self._recent if number <= acked)
        while self._recent[0][0] <= acked:
            first = self._recent[0][1].shape[1]
            if covered - first < self.config.warmup_tokens:
                break
            self._recent.popleft()
            covered -= first

    def _warmup(self, layers: list[int]) -> Warmup | None:
        """The routing a restarted actor hosting ``layers`` relearns from (a predictive
        policy): its rows (the previous layer's first) of the last warmup_tokens tokens up to
        its last acknowledged window; None without any."""
        acked = self._state[layers[0]].window  # its layers advance together
        kept = [(ids, starts) for number, ids, starts in self._recent if number <= acked]
        if not self._predictive or not kept:
            return None
        rows = slice(max(layers[0] - 1, 0), layers[-1] + 1)
        ids = np.concatenate([routing[rows].transpose(1, 0, 2) for routing, _ in kept])
        ids = ids[-self.config.warmup_tokens :]
        starts = None
        if any(s is not None for _, s in kept):
            starts = np.concatenate(
                [np.zeros(r.shape[1], dtype=bool) if s is None else s for r, s in kept]
            )[-self.config.warmup_tokens :]
        return Warmup(ids, starts)

    # --- acknowledgements and failures ---

    def sync(self) -> None:
        """Flushes and waits until every window sent so far is acknowledged."""
        self.flush()
        while self._transport.outstanding():
            self._collect(wait=True)

    def _collect(self, wait: bool) -> None:
        if self._rebalancer is not None:
            self._rebalancer.drain()
        for actor, generation, result in self._transport.poll(wait):
            if generation != self._transport.generation(actor):
                continue  # a call to an actor already replaced
            if isinstance(result, BaseException):
                self._recover(actor)
            else:
                for ack in result or ():
                    self._on_ack(ack)

    def _on_ack(self, ack: LayerAck) -> None:
        window = self._unacked[ack.layer].popleft()
        assert window.number == ack.number == self._state[ack.layer].window + 1, "acks in order"
        self._state[ack.layer] = LayerState(
            ack.layer, ack.number, ack.affinity_scores, ack.activation_counts
        )
        s = self._stats[ack.layer]
        s.add(ack.counters)
        s.windows += 1
        s.tokens += len(window.expert_ids)
        if self._on_ack_hook is not None:
            self._on_ack_hook(ack)

    def _recover(self, actor: int) -> None:
        """Re-creates a failed layer actor, restores it and resends what it had not acked."""
        self._transport.recreate(actor)
        layers = self._groups[actor]
        self._transport.restore(
            actor, [self.layer_state(layer) for layer in layers], self._warmup(layers)
        )
        for layer in layers:
            self._stats[layer].restarts += 1
        resend = [w for layer in layers for w in self._unacked[layer]]
        if resend:
            self._transport.send(actor, sorted(resend, key=lambda w: (w.number, w.layer)))

    def layer_state(self, layer: int) -> LayerState:
        """The coordinator's copy of ``layer`` as of its last acknowledged window."""
        return self._state[layer]

    # --- reading ---

    def stats(self, sync: bool = True) -> ServiceStats:
        """Per-layer statistics of acknowledged windows (after a sync, of everything submitted;
        with shards, a sync also waits for the layer actors' prefetches in flight and counts
        their bytes and a last resident reading)."""
        if sync:
            self.sync()
            if self.config.shards is not None:
                for layer, counters in self._transport.settle_shards().items():
                    self._stats[layer].add(counters)
        else:
            self._collect(wait=False)
        pending = sum(len(q) for q in self._unacked.values())
        layers = [LayerStats(**vars(self._stats[layer])) for layer in sorted(self._stats)]
        split = self._split
        return ServiceStats(
            layers=layers,
            submits=self._submits,
            pending_windows=pending,
            resplit_moved=split.moved if split else 0,
            capacity=split.capacity if split else self.config.capacity,
            capacity_max=split.capacity_max if split else self.config.capacity,
            expert_placement=self._rebalancer.stats() if self._rebalancer else None,
        )

    # --- expert placement ---

    def expert_placement(self, after_version: int = 0) -> Placement | None:
        """The latest published expert placement (its ``version`` from 1) when newer than
        ``after_version``, else None (also when ``expert_placement`` is off)."""
        if self._rebalancer is None:
            return None
        self._rebalancer.drain()
        return self._rebalancer.latest(after_version)

    def close(self) -> None:
        """Stops the placement worker (the coordinator takes no more routing after this)."""
        if self._rebalancer is not None:
            self._rebalancer.close()

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
  unacknowledged window again, so nothing is lost or counted twice;
- a client that numbers its windows (``add_routing(..., client=, seq=)``, as ``ServiceHandle``
  does) has each window sent once to each layer actor, in order (a gap raises
  ``ClientGapError``), and learns which of its windows every layer actor has acknowledged;
- a restarted coordinator (``adopt=True``) rebuilds itself from the layer actors' reports
  (``LayerTransport.adopt``): windows, statistics, affinity, each client's last window per
  actor. Its clients then resend what was not acknowledged everywhere; a window some actors
  already applied goes only to the others (layers may stand at different windows after a
  crash), so nothing is lost or doubled end to end.

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
from dataclasses import replace
from typing import Protocol

import numpy as np

from moeray.actors.config import ServiceConfig
from moeray.actors.messages import (
    ClientGapError,
    EngineUpdate,
    LayerAck,
    LayerState,
    LayerStats,
    LayerWindow,
    PlacementStats,
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

    def adopt(self) -> tuple[list[LayerState], list[int]]:
        """Blocking, for a restarted coordinator: every layer actor's ``LayerCaches.adopt()``
        report (every layer's, in layer order), and the actors that were gone and had to be
        re-created empty."""
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
        adopt: bool = False,
    ):
        """on_rebalance: called for every planned load window (``expert_placement`` on), on
        this object's thread. run_in_background(job): where placement planning runs (None: a
        worker thread of the coordinator's own; a test passes its own to decide when). adopt:
        this coordinator replaces one that died: it rebuilds itself from the layer actors
        (``transport.adopt()``, blocking)."""
        self.config = config
        self._transport = transport
        self._on_ack_hook = on_ack  # e.g. Prometheus counters
        self._groups = config.actor_layers()
        self._actor_of = {layer: a for a, group in enumerate(self._groups) for layer in group}
        actors = range(len(self._groups))
        # per actor: each client's last window sent to it and acknowledged by it (all of an
        # actor's layers advance together), the submits it acknowledged, and its epoch
        self._client_sent: list[dict[str, int]] = [{} for _ in actors]
        self._client_acked: list[dict[str, int]] = [{} for _ in actors]
        self._acked_submits = [0 for _ in actors]
        self._epoch = [0 for _ in actors]
        self._open_clients: dict[str, int] = {}  # client windows in the open window
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
        # Recent windows' routing, every layer (a policy that relearns): (each layer's number
        # for it, 0 where a layer did not get it; ids [layers, T, top_k]; seq_starts or None),
        # at least the last warmup_tokens tokens every layer acknowledged, for a restarted
        # actor to relearn from.
        self._recent: deque[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = deque()
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
        self._engine_state: tuple | None = None  # what the last engine update carried
        self._engine_version = 0
        self._rebalancer: Rebalancer | None = None
        # the latest placement and its copy numbered as this incarnation publishes it
        self._numbered: tuple[Placement, Placement] | None = None
        self._on_rebalance_hook = on_rebalance
        if config.expert_placement is not None:
            hook = self._on_rebalance if on_rebalance is not None else None
            self._rebalancer = Rebalancer(
                config.expert_placement,
                config.num_layers,
                config.num_experts,
                run_in_background,
                timer,
                hook,
            )
        if adopt:
            self._adopt(*transport.adopt())

    def _adopt(self, states: list[LayerState], lost: list[int]) -> None:
        """Rebuilds the per-layer copies, statistics, window numbers and client marks from the
        layer actors' reports. An actor that was gone (``lost``) was re-created from the report
        its predecessor saved (``LayerCaches(state_store=)``) and counts a restart there; one
        without such a report, or that had replaced one that died and never got its restore
        (``LayerState.unrestored``), starts from the marks every other actor holds: its
        layers' earlier statistics died with it (a restart is counted)."""
        by_layer = {state.layer: state for state in states}
        for layer, state in by_layer.items():
            self._state[layer] = LayerState(
                layer, state.window, state.affinity_scores, state.activation_counts
            )
            self._sent[layer] = state.window
            self._stats[layer] = LayerStats(**vars(state.totals or LayerStats(layer=layer)))
        heads = [by_layer[group[0]] for group in self._groups]
        # a re-created actor (in ``lost``) that resumed its predecessor's report is whole
        lost = {a for a, head in enumerate(heads) if head.unrestored}
        kept = [head.clients for a, head in enumerate(heads) if a not in lost]
        floor = {c: min(marks.get(c, 0) for marks in kept) for c in set().union(*kept)}
        for actor, head in enumerate(heads):
            self._epoch[actor] = max(head.epoch for head in heads)
            marks = floor if actor in lost else head.clients
            self._client_sent[actor] = dict(marks)
            self._client_acked[actor] = dict(marks)
            self._acked_submits[actor] = head.submits
        self._submits = max((head.submits for head in heads), default=0)
        for actor in sorted(lost):
            for layer in self._groups[actor]:
                self._stats[layer].restarts += 1
                self._stats[layer].restart_tokens += (0,)
            self._transport.restore(actor, [self._copy_of(layer) for layer in self._groups[actor]])

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
        client: str | None = None,
        seq: int | None = None,
    ) -> tuple[int, int] | None:
        """Buffers checked routing (ints [num_layers, T, top_k]) of ``steps`` submits and
        closes the window if due, or at once with ``close_window`` (a client that coalesced a
        whole window itself). seq_starts, hints: checked (``check_step``) or None.

        client, seq: a client's id and this window's sequence number (from 1, each once, in
        order): a window every layer actor already has is dropped, one some have goes to the
        others alone (after a coordinator restart), one that skips ahead raises
        ClientGapError before anything changes. Returns the client's marks
        (``client_marks``), or None without a client."""
        if client is None:
            self._make_room(ids, hints)
            self._buffer.add(ids, steps, seq_starts, hints)
            self._observe(ids, steps)
            if close_window or self._buffer.due():
                self.flush()
            self._collect(wait=False)
            return None
        actors = self._admit(client, seq)
        if len(actors) == len(self._groups):
            self._make_room(ids, hints)
            self._buffer.add(ids, steps, seq_starts, hints)
            self._observe(ids, steps)
            self._open_clients[client] = seq
            if close_window or self._buffer.due():
                self.flush()
        elif actors:  # resent after a restart: only some actors lack it; the open window first
            self.flush()
            self._buffer.add(ids, steps, seq_starts, hints)
            self._observe(ids, 0)  # the actors that have it counted its submits
            self._send(self._buffer.take(), actors, ((client, seq),))
        for actor in actors:
            self._client_sent[actor][client] = seq
        self._collect(wait=False)
        return self.client_marks(client)

    def _make_room(self, ids: np.ndarray, hints: np.ndarray | None) -> None:
        """Sends the open window first when this routing would make it outgrow
        ``max_window_bytes`` or pad its hints past twice their own size."""
        if not self._buffer.fits(ids, hints):
            self.flush()

    def _admit(self, client: str, seq: int) -> list[int]:
        """The actors that lack window ``seq`` of ``client`` (ClientGapError when one lacks an
        earlier window)."""
        if not isinstance(client, str) or not 0 < len(client) <= 128:
            raise ValueError("client: expected a non-empty id of at most 128 characters")
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 1:
            raise ValueError(f"seq: expected an int >= 1, got {seq!r}")
        marks = [sent.get(client, 0) for sent in self._client_sent]
        low = min(marks)
        if seq > low + 1:
            raise ClientGapError(client, low + 1, int(seq))
        return [actor for actor, mark in enumerate(marks) if mark < seq]

    def client_marks(self, client: str, sync: bool = False) -> tuple[int, int]:
        """(confirmed, low) for ``client``: its last window every layer actor has acknowledged
        (the client may forget it and every earlier one), and its last window every layer
        actor has been sent (it resends those after it). With ``sync``, waits for every
        acknowledgement first."""
        if sync:
            self.sync()
        confirmed = min(acked.get(client, 0) for acked in self._client_acked)
        low = min(sent.get(client, 0) for sent in self._client_sent)
        return confirmed, low

    def _observe(self, ids: np.ndarray, steps: int) -> None:
        if self._split is not None:
            self._split.observe(ids.transpose(1, 0, 2))
        self._submits += steps

    def flush(self) -> None:
        """Sends the open window: one call per layer actor, carrying each of its layers."""
        window = self._buffer.take()
        if window is None:
            return
        clients, self._open_clients = tuple(self._open_clients.items()), {}
        self._send(window, range(len(self._groups)), clients)

    def _send(self, window, actors, clients: tuple[tuple[str, int], ...]) -> None:
        """Sends ``window`` (``steps.Window``) to ``actors``: one call each, carrying each of
        its layers."""
        routing = window.expert_ids
        starts = hints = None
        if self._predictive:  # only predictive policies read starts and hints
            starts, hints = window.seq_starts, window.hints
        resplits = self._split.window(routing.shape[1]) if self._split is not None else ()
        if self._rebalancer is not None:
            self._rebalancer.feed(routing)
        numbers = np.zeros(self.config.num_layers, dtype=np.int64)
        for actor in actors:
            layers = self._groups[actor]
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
                    clients=clients,
                    steps=window.steps,
                    epoch=self._epoch[actor],
                )
                numbers[layer] = self._sent[layer]
                self._unacked[layer].append(layer_window)
                windows.append(layer_window)
            self._transport.send(actor, windows)
        if self._predictive and self.config.warmup_tokens:
            self._keep_recent(numbers, routing, starts)

    def _keep_recent(
        self, numbers: np.ndarray, routing: np.ndarray, starts: np.ndarray | None
    ) -> None:
        """Keeps the window just sent (each layer's number for it) in ``_recent``, and drops
        the oldest windows while warmup_tokens tokens acknowledged by every layer remain (a
        restart relearns from tokens up to its last acknowledged window)."""
        self._recent.append((numbers, routing, starts))  # the window's own arrays
        acked = np.array([self._state[layer].window for layer in range(len(numbers))])

        def done(entry) -> bool:  # acknowledged by every layer it went to
            return bool((entry[0] <= acked).all())

        covered = sum(entry[1].shape[1] for entry in self._recent if done(entry))
        while done(self._recent[0]):
            first = self._recent[0][1].shape[1]
            if covered - first < self.config.warmup_tokens:
                break
            self._recent.popleft()
            covered -= first

    def _warmup(self, layers: list[int]) -> Warmup | None:
        """The routing a restarted actor hosting ``layers`` relearns from (a predictive
        policy): its rows (the previous layer's first) of the last warmup_tokens tokens up to
        its last acknowledged window; None without any."""
        first, acked = layers[0], self._state[layers[0]].window  # its layers advance together
        kept = [
            (ids, starts) for numbers, ids, starts in self._recent if 0 < numbers[first] <= acked
        ]
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
        actor = self._actor_of[ack.layer]
        if ack.layer == self._groups[actor][0]:  # once per actor
            self._client_acked[actor].update(window.clients)
            self._acked_submits[actor] += window.steps
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
        for layer in layers:
            self._stats[layer].restarts += 1
            self._stats[layer].restart_tokens += (self._stats[layer].tokens,)
        self._transport.restore(
            actor, [self._copy_of(layer) for layer in layers], self._warmup(layers)
        )
        resend = [w for layer in layers for w in self._unacked[layer]]
        if resend:
            self._transport.send(actor, sorted(resend, key=lambda w: (w.number, w.layer)))

    def layer_state(self, layer: int) -> LayerState:
        """The coordinator's copy of ``layer`` as of its last acknowledged window."""
        return self._state[layer]

    def _copy_of(self, layer: int) -> LayerState:
        """What a re-created actor is restored to for ``layer``: the copy, with the statistics,
        client marks and submits as of its last acknowledged window."""
        state, actor = self._state[layer], self._actor_of[layer]
        return LayerState(
            layer,
            state.window,
            state.affinity_scores,
            state.activation_counts,
            dict(self._client_acked[actor]),
            LayerStats(**vars(self._stats[layer])),
            self._acked_submits[actor],
            self._epoch[actor],
        )

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
            coordinator_restarts=max(self._epoch, default=0),
            resplit_moved=split.moved if split else 0,
            capacity=split.capacity if split else self.config.capacity,
            capacity_max=split.capacity_max if split else self.config.capacity,
            expert_placement=self._placement_stats() if self._rebalancer else None,
        )

    # --- engine sessions ---

    def engine_update(self, after_version: int = 0) -> EngineUpdate | None:
        """What engine sessions take from the service (``EngineUpdate``: every layer's capacity
        now, the prefetch budget, the latest placement's version) when it is newer than
        ``after_version``, else None. The version moves when any of them changes."""
        split = self._split
        placement = self.expert_placement(0) if self._rebalancer is not None else None
        current = (
            tuple(int(c) for c in (split.capacity if split else self.config.capacity)),
            self._budgets[0],
            placement.version if placement is not None else 0,
        )
        if current != self._engine_state:
            self._engine_state = current
            self._engine_version += 1
        version = (max(self._epoch, default=0) << 32) + self._engine_version
        if version <= after_version:
            return None
        capacity, budget, placement_version = current
        return EngineUpdate(
            version,
            capacity=capacity,
            prefetch_budget=budget if self._predictive else None,
            placement_version=placement_version,
        )

    # --- expert placement ---

    def _version_base(self) -> int:
        """What this incarnation adds to its balancer's placement versions (1, 2, ...): the
        coordinator's restarts << 32, so versions keep rising across restarts, as engine
        updates' do (a restarted coordinator's balancer counts from 1 again)."""
        return max(self._epoch, default=0) << 32

    def expert_placement(self, after_version: int = 0) -> Placement | None:
        """The latest published expert placement when newer than ``after_version``, else None
        (also when ``expert_placement`` is off). Versions rise across coordinator restarts:
        restarts << 32 plus the count of placements this incarnation published (from 1)."""
        if self._rebalancer is None:
            return None
        self._rebalancer.drain()
        base = self._version_base()
        placement = self._rebalancer.latest(max(after_version - base, 0))
        if placement is None or not base:
            return placement
        if self._numbered is None or self._numbered[0] is not placement:
            self._numbered = (placement, placement.with_version(base + placement.version))
        return self._numbered[1]

    def _placement_stats(self) -> PlacementStats:
        stats = self._rebalancer.stats()
        if stats.version:
            stats.version += self._version_base()
        return stats

    def _on_rebalance(self, result: Rebalance) -> None:
        """The on_rebalance hook, given ``result`` with this incarnation's versions."""
        base = self._version_base()
        if base and result.version:
            placement = result.placement
            if placement is not None:
                placement = placement.with_version(base + placement.version)
            result = replace(result, version=base + result.version, placement=placement)
        self._on_rebalance_hook(result)

    def close(self) -> None:
        """Stops the placement worker (the coordinator takes no more routing after this)."""
        if self._rebalancer is not None:
            self._rebalancer.close()

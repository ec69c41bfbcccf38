"""The layer actor's body: one policy over one or more consecutive MoE layers in one process.

A plain class: ``moeray.actors._ray`` wraps it with ``ray.remote`` where it is created,
``InProcessTransport`` calls it directly. The coordinator sends it ``LayerWindow``s numbered per
layer (1, 2, 3, ...): every hosted layer's window of one number comes in the same call; it
applies each number exactly once, in order, through the policy's one per-window interface
(``moeray.policy.windows``), and answers with a ``LayerAck`` per layer. It keeps, with its state,
what a restarted coordinator rebuilds itself from (``adopt``): each layer's statistics, each
client's last window applied and the submits applied; windows from a coordinator older than the
one that last adopted it are ignored.

With a ``state_store`` (the service's: a key in Ray's GCS, ``moeray.actors._ray``), that report
is also saved whenever it changes, before the change is acknowledged: an actor that replaces one
that died (``replacement``) starts from it, so a layer actor and the coordinator dying together
lose nothing that was acknowledged (docs/design.md, "Two failures at once").

With ``shards`` (a checkpoint directory on the actor's node) each hosted layer also keeps the
bytes of its shard resident for its hot set (``moeray.shards.residency``): after each window the
experts that left the hot set are released and the ones that entered it are prefetched by the
native prefetcher. Trace layer i is the checkpoint's i-th MoE layer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np

from moeray.actors.messages import (
    Counters,
    LayerAck,
    LayerState,
    LayerStats,
    LayerWindow,
    Warmup,
    WindowGapError,
)
from moeray.policy.affinity import AffinityConfig, ExpertAffinity
from moeray.policy.registry import POLICIES, PolicyEntry, PolicySettings, policy_entry
from moeray.policy.windows import PolicyWindow
from moeray.shards.residency import ShardResidency
from moeray.shards.store import ShardStore

__all__ = ["LayerCaches", "StateStore"]


class StateStore(Protocol):
    """Where a layer actor keeps its report (``LayerCaches.adopt``'s) outside its process."""

    def save(self, states: list[LayerState]) -> None: ...

    def load(self) -> list[LayerState] | None:
        """The last saved report, or None when none was saved."""
        ...


class LayerCaches:
    """The policy ``policy`` over ``layers`` (consecutive), each num_experts wide with
    ``capacity[layer]`` hot experts."""

    def __init__(
        self,
        layers: list[int],
        num_experts: int,
        capacity: dict[int, int],
        policy: str = "lru",
        affinity_config: AffinityConfig | None = None,
        settings: PolicySettings | None = None,
        shards: str | None = None,
        settle: bool = False,
        policies: dict[str, PolicyEntry] = POLICIES,
        replacement: bool = False,
        state_store: StateStore | None = None,
    ):
        """affinity_config: the service's affinity EMA of each layer's routing (restored after
        a restart; the demand policies decide by it). settings: what the policy reads besides
        the shape (None: the defaults). shards: checkpoint directory whose bytes follow the hot
        sets (None: decisions only). settle: model the consumer of a replay: read the experts a
        window stalled on and wait for its prefetches before reading resident bytes (exact
        peaks); otherwise (the service, whose consumer is the engine) the reading is taken when
        the next window arrives, without waiting. policies: the registry to build from.
        replacement: this actor replaces one that died: it starts from the report its
        predecessor saved in ``state_store`` (a restart counted at its tokens), or, without
        one, reports itself unrestored. state_store: where the report is saved before each
        change is acknowledged (None: not kept outside this process)."""
        entry = policy_entry(policy, policies)
        if not entry.online:
            raise ValueError(f"policy: {policy!r} is an oracle; a layer actor runs online ones")
        self._layers = list(layers)
        if self._layers != list(range(self._layers[0], self._layers[0] + len(self._layers))):
            raise ValueError(f"layers: expected consecutive layers, got {self._layers}")
        affinity_config = affinity_config or AffinityConfig.with_num_experts(num_experts)
        self._affinity = {layer: ExpertAffinity(affinity_config) for layer in layers}
        self._policy = entry.build(
            self._layers, num_experts, capacity, self._affinity, settings or PolicySettings()
        )
        self._applied = {layer: 0 for layer in layers}
        # what a restarted coordinator reads back (``adopt``): every hosted layer advances
        # together, so the clients' marks and the submits are the actor's
        self._totals = {layer: LayerStats(layer=layer) for layer in layers}
        self._clients: dict[str, int] = {}
        self._submits = 0
        self._epoch = 0
        self._unrestored = replacement
        self._settle = settle
        self._residency = _open_residency(shards, layers, num_experts, capacity) if shards else {}
        # each layer's residency counters as last reported (an ack or settle_shards): the
        # prefetcher's bytes keep arriving between windows, and each is reported once
        self._reported = {layer: r.stats() for layer, r in self._residency.items()}
        self._store = state_store
        saved = state_store.load() if replacement and state_store is not None else None
        if saved:
            self._resume(saved)

    def _resume(self, saved: list[LayerState]) -> None:
        """A replacement takes over its predecessor's saved report: a restart of each layer at
        the tokens it had applied (its hot sets start empty, as after a restore)."""
        by_layer = {state.layer: state for state in saved}
        if sorted(by_layer) != self._layers:
            raise ValueError(f"state_store: layers {sorted(by_layer)}, this actor {self._layers}")
        for state in saved:
            totals = _copy_stats(state.totals, state.layer)
            totals.restarts += 1
            totals.restart_tokens += (totals.tokens,)
            self._set_state(replace(state, totals=totals))
        # a report saved while unrestored is no better than none
        self._unrestored = any(state.unrestored for state in saved)
        self._save()  # a second replacement counts a second restart

    def _set_state(self, state: LayerState) -> None:
        self._affinity[state.layer].load_state(state.affinity_scores, state.activation_counts)
        self._applied[state.layer] = state.window
        self._totals[state.layer] = _copy_stats(state.totals, state.layer)
        self._clients = dict(state.clients)
        self._submits = state.submits
        self._epoch = state.epoch

    def _report(self) -> list[LayerState]:
        """Each hosted layer's state with what a restarted coordinator rebuilds from."""
        return [
            LayerState(
                layer,
                self._applied[layer],
                self._affinity[layer].scores(),
                self._affinity[layer].activation_counts(),
                dict(self._clients),
                _copy_stats(self._totals[layer], layer),
                self._submits,
                self._epoch,
                self._unrestored,
            )
            for layer in self._layers
        ]

    def _save(self) -> None:
        if self._store is not None:
            self._store.save(self._report())

    def layers(self) -> list[int]:
        return list(self._layers)

    def tables(self) -> tuple[int, dict] | None:
        """(first hosted layer, the predictive policy's learned tables of the hosted layers:
        ``PredictiveCaches.tables``), what an engine session joining the service starts from;
        None for a demand policy or before the first window."""
        tables = getattr(self._policy, "tables", None)
        learned = tables() if tables is not None else None
        return None if learned is None else (self._layers[0], learned)

    def applied(self) -> dict[int, int]:
        """layer -> number of the last window applied."""
        return dict(self._applied)

    def restore(self, states: list[LayerState], warmup: Warmup | None = None) -> None:
        """Takes the coordinator's copy after a restart: affinity and the last applied window,
        the statistics, client marks and submits up to it, and the recent routing a relearning
        policy steps through (``warmup``). A restore from an older coordinator is ignored."""
        if states and states[0].epoch < self._epoch:
            return
        for state in states:
            self._set_state(state)
        self._unrestored = False
        if warmup is not None:
            self._policy.warm_up(np.asarray(warmup.expert_ids), warmup.seq_starts)
        self._save()

    def adopt(self) -> list[LayerState]:
        """A restarted coordinator takes this actor over: from now on windows of the coordinator
        before it are ignored (they may still be on their way). Returns each hosted layer's
        state: last window applied, affinity, statistics, client marks, submits and the new
        epoch (``LayerState``)."""
        self._epoch += 1
        self._save()
        return self._report()

    def apply(self, windows: list[LayerWindow]) -> list[LayerAck]:
        """Applies windows in number order, every hosted layer's window of one number together;
        a number already applied is skipped (a resend after a failure), one that skips ahead
        raises WindowGapError before anything changes. Windows of a coordinator older than the
        one that last adopted this actor are ignored (no acks)."""
        if windows and windows[0].epoch < self._epoch:
            return []  # sent by a coordinator that has died since: its routing comes again
        by_number: dict[int, dict[int, LayerWindow]] = {}
        for window in windows:
            if window.layer not in self._applied:
                raise ValueError(
                    f"windows: layer {window.layer} is not hosted here ({self._layers})"
                )
            by_number.setdefault(window.number, {})[window.layer] = window
        acks = []
        first = self._layers[0]
        for number in sorted(by_number):
            last = self._applied[first]  # every hosted layer advances together
            if number <= last:
                continue
            if number != last + 1:
                raise WindowGapError(first, last + 1, number)
            group = by_number[number]
            if sorted(group) != self._layers:
                raise ValueError(
                    f"windows: every hosted layer's window of one number comes together; window "
                    f"{number} has layers {sorted(group)}, this actor hosts {self._layers}"
                )
            acks.extend(self._apply_group([group[layer] for layer in self._layers]))
            head = group[first]
            self._clients.update(head.clients)
            self._submits += head.steps
            self._epoch = max(self._epoch, head.epoch)
        if acks:
            self._save()  # before the acks: what was acknowledged outlives this process
        return acks

    def _apply_group(self, ordered: list[LayerWindow]) -> list[LayerAck]:
        head = ordered[0]
        budget = head.prefetch_budget
        if any(w.prefetch_budget != budget for w in ordered):
            raise ValueError(
                f"prefetch_budget: one budget per actor and window, got "
                f"{[w.prefetch_budget for w in ordered]} in window {head.number}"
            )
        hints = None
        if any(w.hints is not None for w in ordered):
            hints = tuple(w.hints for w in ordered)
        window = PolicyWindow(
            tuple(w.expert_ids for w in ordered),
            head.previous_layer_ids,
            head.seq_starts,
            hints,
            budget,
            head.resplits,
        )
        begun = [self._shard_begin(w) for w in ordered]
        counts = self._policy.apply(window)
        sets = self._policy.hot_sets() if self._residency else [None] * len(ordered)
        acks = []
        for w, count, b, hot_set in zip(ordered, counts, begun, sets):
            self._applied[w.layer] = w.number
            shard = self._shard_end(b, *hot_set) if b is not None else {}
            affinity = self._affinity[w.layer]
            counters = Counters(**count, **shard)
            totals = self._totals[w.layer]
            totals.add(counters)
            totals.windows += 1
            totals.tokens += len(w.expert_ids)
            acks.append(
                LayerAck(
                    w.layer,
                    w.number,
                    counters,
                    affinity.scores(),
                    affinity.activation_counts(),
                )
            )
        return acks

    def _shard_begin(self, window: LayerWindow):
        """Before a window is applied: the consumer uses its experts' bytes. Returns what
        ``_shard_end`` needs (None without shards)."""
        residency = self._residency.get(window.layer)
        if residency is None:
            return None
        if not self._settle:
            residency.measure()  # the previous window's prefetches had this window's gap
        return window.layer, residency.use(np.unique(window.expert_ids), wait=self._settle)

    def _shard_end(self, begun, hot, ahead) -> dict:
        """After a window: the bytes follow the hot set (``ahead``: those of its experts brought
        in ahead of use); returns the window's shard counters."""
        layer, cold = begun
        residency = self._residency[layer]
        residency.sync(hot, ahead)
        if self._settle:  # a replay's consumer reads what it stalled on, even if not kept
            residency.read_cold(cold - {int(e) for e in hot})
            residency.settle()
            residency.measure()
        return self._shard_report(layer)

    def _shard_report(self, layer: int) -> dict:
        """The shard counters since the last report, and the latest reading."""
        now, last = self._residency[layer].stats(), self._reported[layer]
        self._reported[layer] = now
        return dict(
            bytes_moved=now.bytes_moved - last.bytes_moved,
            late_prefetches=now.late - last.late,
            cold_reads=now.cold_reads - last.cold_reads,
            resident_bytes_max=now.resident_bytes,
        )

    def settle_shards(self) -> dict[int, Counters]:
        """Waits for every hosted layer's prefetches in flight and reads its resident bytes:
        layer -> the shard counters since the last window (the bytes that arrived after it);
        empty without shards. The service's final count (``Coordinator.stats``)."""
        for residency in self._residency.values():
            residency.settle()
            residency.measure()
        out = {layer: Counters(**self._shard_report(layer)) for layer in self._residency}
        for layer, counters in out.items():
            self._totals[layer].add(counters)  # the coordinator adds them to its statistics too
        if out:
            self._save()
        return out

    def shard_capacity_bytes(self) -> dict[int, int]:
        """layer -> capacity in bytes (hot experts x an expert's bytes); empty without shards."""
        return {layer: r.stats().capacity_bytes for layer, r in self._residency.items()}

    def ping(self) -> bool:
        return True


def _copy_stats(stats: LayerStats | None, layer: int) -> LayerStats:
    """A copy of ``stats`` (None: zeros) for ``layer``."""
    return LayerStats(layer=layer) if stats is None else LayerStats(**vars(stats))


def _open_residency(
    path: str, layers: list[int], num_experts: int, capacity: dict[int, int]
) -> dict[int, ShardResidency]:
    """layer -> ShardResidency over the checkpoint at ``path`` (its i-th MoE layer for layer i)."""
    store = ShardStore(path)
    moe_layers = store.layers
    if max(layers) >= len(moe_layers):
        raise ValueError(
            f"shards: {path} has {len(moe_layers)} MoE layers, the service "
            f"{max(layers) + 1} or more"
        )
    out = {}
    for layer in layers:
        stored = moe_layers[layer]
        if store.num_experts(stored) != num_experts:
            raise ValueError(
                f"shards: {path} layer {stored} has {store.num_experts(stored)} "
                f"experts, the service {num_experts}"
            )
        out[layer] = ShardResidency(store, stored, capacity[layer])
    return out

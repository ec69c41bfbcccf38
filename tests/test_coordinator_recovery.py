"""A coordinator that dies and is rebuilt from its layer actors, without Ray.

The coordinator's death is played in-process: the calls it had queued reach each layer actor up
to a chosen point (``InProcessTransport.lose_queued``: actors left at different windows), then a
new ``Coordinator(..., adopt=True)`` over a new transport adopts the same layer actor bodies, and
the client resends its journal (``ClientJournal``), as ``ServiceHandle`` does over Ray. The
expectation is the uninterrupted run of the same windows: with the layer actors' state kept, a
coordinator's death changes no decision, loses no routing and counts none twice.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeray.actors.config import ServiceConfig
from moeray.actors.coordinator import Coordinator
from moeray.actors.journal import ClientJournal, JournalGapError
from moeray.actors.layer import LayerCaches
from moeray.actors.messages import ClientGapError, LayerWindow
from moeray.actors.steps import Window
from moeray.actors.transport import InProcessTransport
from moeray.traces import default_trace_path, load_trace

pytestmark = pytest.mark.pure


@pytest.fixture(scope="module")
def stream():
    """int32 [6 layers, 1200 tokens, 4] of the bundled slice and its seq_starts bool [1200]."""
    trace = load_trace(default_trace_path()).head(1200)
    ids = np.ascontiguousarray(trace.expert_ids[:, :6].transpose(1, 0, 2), dtype=np.int32)
    starts = np.zeros(1200, dtype=bool)
    starts[trace.seq_offsets[:-1]] = True
    return ids, starts


class LaggingTransport(InProcessTransport):
    """Layer actors that run their calls only when the coordinator waits for them: calls pile
    up, so a coordinator that dies leaves some on the wire."""

    def poll(self, wait: bool):
        return super().poll(wait) if wait else []


class Client:
    """A client as ``ServiceHandle`` is one: numbered windows kept in a journal until
    confirmed, resent after the coordinator restarts."""

    def __init__(self, name: str, max_windows: int = 256):
        self.journal = ClientJournal(name, max_windows)

    def send(self, coordinator: Coordinator, seq: int, window: Window) -> None:
        confirmed, _ = coordinator.add_routing(
            window.expert_ids,
            window.steps,
            True,
            window.seq_starts,
            window.hints,
            client=self.journal.client,
            seq=seq,
        )
        self.journal.confirm(confirmed)

    def submit(self, coordinator: Coordinator, window: Window) -> None:
        if self.journal.full():
            self.journal.confirm(coordinator.client_marks(self.journal.client, sync=True)[0])
        self.send(coordinator, self.journal.add(window), window)

    def resend(self, coordinator: Coordinator) -> int:
        confirmed, low = coordinator.client_marks(self.journal.client)
        self.journal.confirm(confirmed)
        again = self.journal.after(low)
        for seq, window in again:
            self.send(coordinator, seq, window)
        return len(again)


def windows_of(ids, starts, step_tokens=60):
    return [
        Window(ids[:, lo : lo + step_tokens], 1, starts[lo : lo + step_tokens], None)
        for lo in range(0, ids.shape[1], step_tokens)
    ]


def restart(config, transport, delivered, transport_type=InProcessTransport):
    """The coordinator dies: ``delivered[actor]`` of its queued calls still reach each actor;
    a new coordinator adopts the same actors."""
    transport.lose_queued(delivered)
    successor = transport_type(config, actors=transport.survivors())
    return Coordinator(config, successor, adopt=True), successor


def counters(stats):
    return [
        (
            s.hits,
            s.stalls,
            s.prefetches,
            s.prefetch_hits,
            s.wasted_prefetches,
            s.tokens,
            tuple(s.predictor_hits),
        )
        for s in stats.layers
    ]


def uninterrupted(config, windows):
    coordinator = Coordinator(config, InProcessTransport(config))
    client = Client("reference")
    for window in windows:
        client.submit(coordinator, window)
    return coordinator.stats()


@pytest.mark.parametrize(
    "policy,layers_per_actor,delivered",
    [
        ("lru", 2, {0: 3, 1: 0, 2: 7}),  # actors left at different windows
        ("lru", 1, {}),  # every queued call arrived
        ("moeray", 2, {0: 0, 1: 4, 2: 2}),
        ("moeray", 3, {0: 1, 1: 0}),
    ],
)
def test_a_killed_coordinator_is_rebuilt_and_counts_equal_the_uninterrupted_run(
    stream, policy, layers_per_actor, delivered
):
    ids, starts = stream
    config = ServiceConfig(
        num_layers=6, num_experts=32, top_k=4, policy=policy, layers_per_actor=layers_per_actor
    )
    windows = windows_of(ids, starts)
    expected = uninterrupted(config, windows)
    transport = LaggingTransport(config)
    coordinator = Coordinator(config, transport)
    client = Client("c1")
    resent = []
    for i, window in enumerate(windows):
        client.submit(coordinator, window)
        if i in (7, 13):  # twice, with calls on the wire each time
            coordinator, transport = restart(config, transport, delivered, LaggingTransport)
            resent.append(client.resend(coordinator))
    stats = coordinator.stats()
    assert counters(stats) == counters(expected)
    assert stats.submits == expected.submits == len(windows)
    assert stats.coordinator_restarts == 2 and stats.pending_windows == 0
    assert all(s.restarts == 0 and s.windows >= len(windows) for s in stats.layers)
    # windows lost on the wire were resent; with every call delivered, nothing was
    assert all(resent) if delivered else not any(resent)
    # every actor's affinity copy was rebuilt too
    for layer in range(6):
        assert np.array_equal(
            coordinator.layer_state(layer).affinity_scores,
            transport.actors[layer // layers_per_actor]
            .adopt()[layer % layers_per_actor]
            .affinity_scores,
        )
    assert client.resend(coordinator) == 0 and len(client.journal) == 0


def test_a_layer_actor_killed_before_and_after_a_coordinator_restart(stream):
    """Layer-actor recovery still works around a coordinator restart: the restarted
    coordinator restores a re-created actor from the rebuilt copy, its statistics included."""
    ids, starts = stream
    config = ServiceConfig(num_layers=6, num_experts=32, top_k=4, policy="lru", layers_per_actor=2)
    windows = windows_of(ids, starts)
    expected = uninterrupted(config, windows)
    transport = InProcessTransport(config)
    coordinator = Coordinator(config, transport)
    client = Client("c1")
    for i, window in enumerate(windows):
        if i in (4, 15):
            transport.kill(1)  # layers 2, 3
        client.submit(coordinator, window)
        if i == 9:
            coordinator, transport = restart(config, transport, {})
            client.resend(coordinator)
    stats = coordinator.stats()
    for s, e in zip(stats.layers, expected.layers):
        assert (s.tokens, s.hits + s.stalls) == (e.tokens, e.hits + e.stalls), s.layer
        if s.layer in (2, 3):
            assert s.restarts == 2 and s.hits <= e.hits  # LRU restarted empty: never more hits
        else:
            assert (s.restarts, s.hits, s.stalls) == (0, e.hits, e.stalls)


def test_a_layer_actor_lost_while_the_coordinator_is_down(stream):
    """Both at once: the restarted coordinator re-creates the lost actor, counts a restart and
    feeds it from the windows every other actor has; nothing else changes."""
    ids, starts = stream
    config = ServiceConfig(num_layers=6, num_experts=32, top_k=4, policy="lru", layers_per_actor=2)
    windows = windows_of(ids, starts)
    expected = uninterrupted(config, windows)
    transport = LaggingTransport(config)
    coordinator = Coordinator(config, transport)
    client = Client("c1")
    for i, window in enumerate(windows):
        client.submit(coordinator, window)
        if i == 9:
            transport.kill(0)
            coordinator, transport = restart(config, transport, {1: 2, 2: 5}, LaggingTransport)
            client.resend(coordinator)
    stats = coordinator.stats()
    for s, e in zip(stats.layers, expected.layers):
        if s.layer in (0, 1):
            assert s.restarts == 1 and 0 < s.tokens < e.tokens  # its earlier counts died with it
        else:
            assert (s.restarts, s.tokens, s.hits, s.stalls) == (0, e.tokens, e.hits, e.stalls)


def test_windows_of_a_client_arrive_once_and_in_order(stream):
    ids, starts = stream
    config = ServiceConfig(num_layers=6, num_experts=32, top_k=4, policy="lru", layers_per_actor=3)
    transport = InProcessTransport(config)
    coordinator = Coordinator(config, transport)
    window = windows_of(ids, starts)[0]

    def send(seq, client="c1"):
        return coordinator.add_routing(
            window.expert_ids, 1, True, None, None, client=client, seq=seq
        )

    assert send(1) == (1, 1)  # acknowledged by every actor at once (in-process)
    with pytest.raises(ClientGapError, match="expected window 2, got 3") as gap:
        send(3)
    assert (gap.value.expected, gap.value.got) == (2, 3)
    assert send(1) == (1, 1) and len(transport.sends) == 2  # a duplicate: dropped
    assert send(2) == (2, 2) and send(1, client="c2") == (1, 1)
    for client, seq in (("", 1), ("x" * 129, 1), ("c1", 0), ("c1", True), ("c1", 2.0)):
        with pytest.raises(ValueError, match="client|seq"):
            send(seq, client)
    stats = coordinator.stats()
    assert stats.submits == 3 and all(s.tokens == 180 for s in stats.layers)


def test_layer_actor_ignores_windows_of_a_dead_coordinator():
    body = LayerCaches([0], 8, {0: 2})
    ids = np.array([[1, 2]], dtype=np.int32)
    assert len(body.apply([LayerWindow(0, 1, ids, clients=(("c", 1),), steps=1)])) == 1
    (state,) = body.adopt()
    assert (state.window, state.epoch, state.clients, state.submits) == (1, 1, {"c": 1}, 1)
    assert state.totals.tokens == 1 and state.totals.hits + state.totals.stalls == 2
    assert body.apply([LayerWindow(0, 2, ids, epoch=0)]) == []  # the old coordinator's
    assert body.applied() == {0: 1}
    assert [a.number for a in body.apply([LayerWindow(0, 2, ids, epoch=1)])] == [2]


def test_client_journal_bound_and_gaps():
    journal = ClientJournal("c", max_windows=2)
    window = Window(np.zeros((1, 1, 1), np.uint8), 1, None, None)
    assert [journal.add(window), journal.add(window)] == [1, 2] and journal.full()
    journal.confirm(1)
    assert len(journal) == 1 and journal.add(window) == 3
    assert [seq for seq, _ in journal.after(1)] == [2, 3]
    assert journal.after(3) == []
    with pytest.raises(JournalGapError, match="windows 1..1"):
        journal.after(0)
    with pytest.raises(ValueError, match="max_windows"):
        ClientJournal("c", max_windows=0)

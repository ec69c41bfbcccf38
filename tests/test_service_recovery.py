"""A service whose coordinator dies, on a real local Ray: nothing lost or counted twice, and a
service that can always be shut down and started again.

The coordinator is SIGKILLed (by its pid) or killed through Ray mid-stream; Ray restarts it,
it rebuilds itself from the layer actors, and the handle resends its journal. The counts must
equal the in-process replay of the same steps (``replay_steps``): the layer actors kept their
state, so a coordinator's death changes no decision.
"""

from __future__ import annotations

import os
import pickle
import signal
import time

import numpy as np
import pytest
from service_helpers import config

from moeray import service
from moeray.actors import _ray
from moeray.actors.coordinator import Coordinator
from moeray.actors.journal import ClientJournal
from moeray.actors.layer import LayerCaches
from moeray.actors.steps import Window
from moeray.actors.transport import InProcessTransport
from moeray.placement.balancer import PlacementConfig
from moeray.replay.inprocess import replay_steps
from moeray.traces import default_trace_path, load_trace


@pytest.fixture(scope="module")
def routing():
    """int32 [24 layers, 2048 tokens, 4] of the bundled gpt-oss-20b slice."""
    trace = load_trace(default_trace_path())
    return np.ascontiguousarray(trace.expert_ids[:2048].transpose(1, 0, 2), dtype=np.int32)


def counters(stats):
    """Every count of every layer, restarts included."""
    return [
        (s.layer, s.hits, s.stalls, s.evictions, s.tokens, s.windows, s.restart_tokens)
        for s in stats.layers
    ]


def poll(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def test_coordinator_killed_mid_stream_loses_and_doubles_nothing(ray_local, routing):
    ids = routing
    cfg = config("svc-coordinator-kill")
    steps = [(ids[:, lo : lo + 64], None, None) for lo in range(0, ids.shape[1], 64)]
    handle = service.start(cfg)
    try:
        coordinator = ray_local.get_actor(_ray.coordinator_name(cfg.name), namespace=cfg.namespace)
        for i, (step, _, _) in enumerate(steps):
            handle.submit(step)
            if i == 9:  # a real SIGKILL of its process, windows in flight
                os.kill(handle.coordinator_pid(), signal.SIGKILL)
            if i == 21:
                handle.coordinator_pid()  # the first restart is over (the handle waits for it)
                ray_local.kill(coordinator, no_restart=False)
        stats = handle.stats()
        assert stats.coordinator_restarts == 2
        assert counters(stats) == counters(replay_steps(cfg, steps))
        assert stats.submits == len(steps)
        assert len(handle.recoveries_s) >= 1 and max(handle.recoveries_s) < 30
        # the handle keeps serving, and a second client sees the same service
        handle.submit(ids[:, :64])
        handle.flush()
        assert service.connect(cfg.name).stats().layers[0].tokens == ids.shape[1] + 64
        assert handle.unconfirmed_windows <= 1
    finally:
        handle.shutdown()


def test_shutdown_frees_the_name_even_when_the_coordinator_is_dead(ray_local, routing):
    ids = routing
    cfg = config("svc-dead-coordinator")
    handle = service.start(cfg)
    handle.submit(ids[:, :64])
    handle.submit(ids[:, 64:128])
    coordinator = ray_local.get_actor(_ray.coordinator_name(cfg.name), namespace=cfg.namespace)
    ray_local.kill(coordinator, no_restart=True)  # gone for good; its layer actors stay

    def refused() -> bool:  # no silent drops: a submit soon says the coordinator is gone
        try:
            handle.submit(ids[:, :64])
        except RuntimeError as exc:
            assert "coordinator is gone" in str(exc)
            return True
        return False

    poll(refused, 30, "a submit to a dead coordinator raises")
    with pytest.raises(RuntimeError, match="coordinator is gone"):
        handle.flush()
    # the orphaned layer actors do not block a new service of that name ...
    again = service.start(cfg)
    again.submit(ids[:, :64])
    assert again.stats().layers[0].tokens == 64
    # ... and a shutdown while the coordinator restarts removes every actor by name
    os.kill(again.coordinator_pid(), signal.SIGKILL)
    again.shutdown()
    handle.shutdown()  # a second shutdown of a gone service is harmless
    for name in [_ray.coordinator_name(cfg.name), _ray.layer_actor_name(cfg.name, 0)]:
        with pytest.raises(ValueError):
            ray_local.get_actor(name, namespace=cfg.namespace)
    with pytest.raises(ValueError, match="no moeray service"):
        service.connect(cfg.name)
    service.start(cfg).shutdown()  # the name is free


def test_connect_waits_for_a_restarting_coordinator_then_says_so(ray_local, routing):
    ids = routing
    cfg = config("svc-connect-restart", layers_per_actor=24)
    handle = service.start(cfg)
    try:
        handle.submit(ids[:, :64])
        handle.submit(ids[:, 64:128])
        assert handle.stats().layers[0].tokens == 128  # every layer actor has it
        os.kill(handle.coordinator_pid(), signal.SIGKILL)
        other = service.connect(cfg.name, timeout_s=60)  # waits for the restart
        assert other.stats().layers[0].tokens == 128
    finally:
        handle.shutdown()
    # a coordinator that cannot come up (its node resource is nowhere): one clear error
    stuck = config("svc-connect-stuck", coordinator_placement="no-such-node")
    _ray.create_coordinator(stuck)
    try:
        with pytest.raises(TimeoutError, match="did not answer within 1 s"):
            service.connect(stuck.name, timeout_s=1)
    finally:
        _ray.remove_service(stuck)


class _Ref:
    """A fake call's outcome: its answer, or the error ray.get would raise."""

    def __init__(self, outcome):
        self.outcome = outcome


class _FakeCoordinator:
    """A coordinator whose calls answer or fail as the test scripts them (no Ray cluster)."""

    def __init__(self):
        self.sent: list[int] = []  # the window numbers add_routing received
        self.failure = None  # raised by every call while set
        self.marks_failures = 0  # client_marks calls that fail before one answers
        self.marks = (0, 0)

    def _answer(self, value):
        return _Ref(self.failure if self.failure is not None else value)

    @property
    def add_routing(self):
        fake = self

        class Method:
            def remote(self, ids, steps, close, starts, hints, client, seq):
                fake.sent.append(seq)
                return fake._answer((0, seq))

        return Method()

    @property
    def client_marks(self):
        fake = self

        class Method:
            def remote(self, client, sync=False):
                if fake.marks_failures:
                    fake.marks_failures -= 1
                    return _Ref(fake.failure)
                fake.failure = None  # it is back
                return _Ref(fake.marks)

        return Method()


@pytest.fixture
def fake_ray(monkeypatch):
    def get(ref, timeout_s=None):
        if isinstance(ref.outcome, BaseException):
            raise ref.outcome
        return ref.outcome

    monkeypatch.setattr(_ray, "ready", lambda ref: True)
    monkeypatch.setattr(_ray, "get", get)
    monkeypatch.setattr(
        _ray, "call_within", lambda timeout, method, *args: get(method.remote(*args))
    )
    monkeypatch.setattr(_ray, "coordinator_exists", lambda name, namespace: False)
    return get


def _handle(coordinator, now=None, **options):
    cfg = config("svc-fake", num_layers=2, window_steps=1, layers_per_actor=1)
    timer = (lambda: now[0]) if now is not None else time.perf_counter
    return service.ServiceHandle(coordinator, cfg, timer=timer, **options)


def test_a_handle_waits_for_a_restarted_coordinator_and_resends_its_journal(fake_ray):
    from ray.exceptions import ActorUnavailableError, RayTaskError

    from moeray.actors.messages import ClientGapError

    step = np.zeros((2, 3, 4), np.int32)
    coordinator = _FakeCoordinator()
    handle = _handle(coordinator)
    for _ in range(3):
        handle.submit(step)
    assert coordinator.sent == [1, 2, 3] and handle.unconfirmed_windows == 3  # none confirmed
    coordinator.failure = ActorUnavailableError("restarting", None)
    handle.submit(step)  # window 4 goes out; its failure is seen at the next send
    coordinator.marks_failures, coordinator.marks = 2, (1, 2)  # back after two refusals
    handle.submit(step)
    # forgot window 1 (confirmed), resent what not every layer actor was sent, then window 5
    assert coordinator.sent == [1, 2, 3, 4, 3, 4, 5]
    assert len(handle.recoveries_s) == 1 and handle.unconfirmed_windows == 4
    # a window that skipped ahead of what a restarted coordinator holds: resent from its gap
    coordinator.failure = RayTaskError("add_routing", "", ClientGapError("c", 4, 6))
    handle.submit(step)
    coordinator.marks = (2, 3)  # every actor acknowledged 2 and was sent 3
    handle.submit(step)
    assert coordinator.sent[-5:] == [6, 4, 5, 6, 7] and handle.unconfirmed_windows == 5


def test_a_handle_says_why_it_cannot_go_on(fake_ray):
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    step = np.zeros((2, 3, 4), np.int32)
    now = [0.0]
    coordinator = _FakeCoordinator()
    # each poll of the restarting coordinator finds it still down, 7 s later
    handle = _handle(
        coordinator, now, recovery_timeout_s=60, sleep=lambda s: now.__setitem__(0, now[0] + 7)
    )
    handle.submit(step)
    coordinator.failure = ActorUnavailableError("restarting", None)
    coordinator.marks_failures = 10**9  # never back
    handle.submit(step)
    with pytest.raises(RuntimeError, match="did not come back within 60 s"):
        handle.submit(step)
    with pytest.raises(RuntimeError, match="did not come back"):  # and says so from then on
        handle.submit(step)
    gone = _FakeCoordinator()
    handle = _handle(gone)
    handle.submit(step)
    gone.failure = ActorDiedError()  # shut down: no coordinator of that name is left
    handle.submit(step)
    with pytest.raises(RuntimeError, match="coordinator is gone"):
        handle.submit(step)


def test_a_full_journal_waits_for_acknowledgements(ray_local, routing):
    ids = routing
    cfg = config("svc-journal-bound", window_steps=1)
    handle = service.start(cfg, max_journal_windows=2, max_in_flight=1)
    try:
        for lo in range(0, 1024, 64):
            handle.submit(ids[:, lo : lo + 64])
            assert handle.unconfirmed_windows <= 2
        assert handle.stats().layers[0].tokens == 1024
    finally:
        handle.shutdown()


class _DictStore:
    """A layer actor's saved report in a dict, as the service's is in Ray's GCS."""

    def __init__(self, saved: dict, actor: int):
        self._saved, self._actor = saved, actor

    def save(self, states):
        self._saved[self._actor] = pickle.dumps(states)

    def load(self):
        data = self._saved.get(self._actor)
        return None if data is None else pickle.loads(data)


class _StoredTransport(InProcessTransport):
    """In-process layer actors that save their report (``_DictStore``) and run their calls
    only when the coordinator waits, so a coordinator that dies leaves calls on the wire."""

    def __init__(self, config, saved: dict, **kw):
        self.saved = saved
        super().__init__(config, **kw)

    def _create(self, actor, replacement=False):
        cfg, layers = self._config, self._groups[actor]
        return LayerCaches(
            layers,
            cfg.num_experts,
            {layer: cfg.capacity[layer] for layer in layers},
            cfg.policy,
            cfg.affinity_config(),
            cfg.settings(),
            replacement=replacement,
            state_store=_DictStore(self.saved, actor),
        )

    def poll(self, wait):
        return super().poll(wait) if wait else []


def test_a_layer_actor_lost_with_the_coordinator_resumes_its_saved_state(routing):
    """Both at once, in-process: the lost actor's replacement resumes the report it saved
    before its last acknowledgement, the client resends what that actor lacks, and every
    count equals the replay with that actor restarted (empty hot set) where it resumed."""
    ids = routing[:, :1536]
    cfg = config("in-process", window_steps=1, layers_per_actor=8)  # 3 actors
    steps = [(ids[:, lo : lo + 64], None, None) for lo in range(0, ids.shape[1], 64)]
    saved: dict = {}
    transport = _StoredTransport(cfg, saved)
    coordinator = Coordinator(cfg, transport)
    journal = ClientJournal("c1")

    def send(seq, window):
        confirmed, _ = coordinator.add_routing(
            window.expert_ids, window.steps, True, client=journal.client, seq=seq
        )
        journal.confirm(confirmed)

    for i, (step, _, _) in enumerate(steps):
        window = Window(step, 1, None, None)
        send(journal.add(window), window)
        if i % 4 == 3:  # acknowledged: the journal forgets those windows
            journal.confirm(coordinator.client_marks(journal.client, sync=True)[0])
        if i in (9, 17):  # actor 1, then actor 0, die with the coordinator; calls on the wire
            transport.kill(1 if i == 9 else 0)
            transport.lose_queued({0: 1, 1: 1, 2: 0})
            transport = _StoredTransport(cfg, saved, actors=transport.survivors())
            coordinator = Coordinator(cfg, transport, adopt=True)
            confirmed, low = coordinator.client_marks(journal.client)
            journal.confirm(confirmed)
            for seq, window in journal.after(low):  # never a JournalGapError
                send(seq, window)
    stats = coordinator.stats()
    restart_tokens = {
        a: stats.layers[g[0]].restart_tokens for a, g in enumerate(cfg.actor_layers())
    }
    assert restart_tokens[0][0] > 0 and restart_tokens[1][0] > 0  # resumed, not from zero
    assert restart_tokens[2] == ()
    assert all(s.tokens == ids.shape[1] for s in stats.layers)  # nothing lost or doubled
    assert counters(stats) == counters(replay_steps(cfg, steps, restart_tokens))
    assert stats.submits == len(steps) and stats.coordinator_restarts == 2


def test_a_layer_actor_killed_with_the_coordinator_loses_nothing(ray_local, routing):
    """Both at once on Ray, a few times: a layer actor and the coordinator killed in the same
    instant. The replacement resumes the report the actor saved in the GCS, so the counts equal
    the in-process replay with that actor restarted where the service says it resumed."""
    ids = routing
    cfg = config("svc-double-kill")
    steps = [(ids[:, lo : lo + 64], None, None) for lo in range(0, ids.shape[1], 64)]
    handle = service.start(cfg)
    try:
        coordinator = ray_local.get_actor(_ray.coordinator_name(cfg.name), namespace=cfg.namespace)
        for i, (step, _, _) in enumerate(steps):
            handle.submit(step)
            if i in (7, 15, 23):
                victim = handle.layer_actor_handles()[(i // 8) % 2]
                pid = handle.coordinator_pid()  # also: the last restart is over
                ray_local.kill(victim, no_restart=True)
                if i == 15:
                    ray_local.kill(coordinator, no_restart=False)
                else:
                    os.kill(pid, signal.SIGKILL)
        stats = handle.stats()
        saved = _ray.GcsStateStore(cfg, 0).load()
        # what a lagging saved report looked like, if one ever does (seen once in CI's pure
        # pass on a slow host, not reproduced since): every layer's tokens and restarts
        assert saved[0].totals.tokens == ids.shape[1], (
            [(s.layer, s.totals.tokens, s.totals.restart_tokens, s.window, s.epoch) for s in saved],
            [(s.tokens, s.restart_tokens, s.windows) for s in stats.layers],
            stats.pending_windows,
            stats.coordinator_restarts,
        )
    finally:
        handle.shutdown()
    assert _ray.GcsStateStore(cfg, 0).load() is None  # shutdown deleted the saved reports
    restart_tokens = {
        a: stats.layers[g[0]].restart_tokens for a, g in enumerate(cfg.actor_layers())
    }
    assert sorted(map(len, restart_tokens.values())) == [1, 2]  # every kill counted
    assert all(0 < t < ids.shape[1] for tokens in restart_tokens.values() for t in tokens)
    assert all(s.tokens == ids.shape[1] for s in stats.layers)  # nothing lost or doubled
    assert counters(stats) == counters(replay_steps(cfg, steps, restart_tokens))
    assert stats.coordinator_restarts == 3 and stats.submits == len(steps)


def test_placement_versions_keep_rising_across_coordinator_restarts(routing):
    """A restarted coordinator's balancer counts from 1 again: its versions are numbered after
    every earlier one's (restarts << 32), in ``expert_placement``, stats and the hook."""
    cfg = config(
        "in-process-placement",
        num_layers=4,
        window_steps=1,
        layers_per_actor=2,
        expert_placement=PlacementConfig(gpus=4, every_tokens=256),
    )
    ids = routing[:4]
    hooked = []

    def start(transport, adopt=False):
        return Coordinator(
            cfg,
            transport,
            on_rebalance=lambda result: hooked.append(result.version),
            run_in_background=lambda job: job(),
            adopt=adopt,
        )

    transport = InProcessTransport(cfg)
    coordinator = start(transport)
    seen = [0]
    for restart in range(3):
        if restart:
            transport.lose_queued({})
            transport = InProcessTransport(cfg, actors=transport.survivors())
            coordinator = start(transport, adopt=True)
            assert coordinator.expert_placement(seen[-1]) is None  # none newer yet
        for lo in range(512 * restart, 512 * (restart + 1), 128):  # two load windows
            coordinator.add_routing(ids[:, lo : lo + 128])
            placement = coordinator.expert_placement(seen[-1])
            if placement is not None:
                seen.append(placement.version)
        assert coordinator.stats().expert_placement.version == seen[-1]
        coordinator.close()
    assert seen == sorted(set(seen))  # strictly rising
    assert {v >> 32 for v in seen[1:]} == {0, 1, 2}  # every incarnation published
    assert hooked == sorted(hooked) and hooked[-1] == seen[-1]  # the metrics' versions too

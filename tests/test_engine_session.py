"""The engine-side session: its decisions are the replay's, its plans keep an engine's tier
equal to the hot sets, and bad input fails one call alone."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from moeray.engine import PROTOCOL_VERSION, EngineSession, EngineUpdate
from moeray.policy.registry import online_policy_names
from moeray.policy.windows import COUNTER_KEYS
from moeray.replay.config import ReplayConfig
from moeray.replay.inprocess import replay_policy, service_config_for, trace_seq_starts
from moeray.traces import default_trace_path, load_trace

pytestmark = pytest.mark.pure

TOKENS = 600


@pytest.fixture(scope="module")
def trace():
    return load_trace(default_trace_path()).head(TOKENS)


def route_trace(session, trace, batch: int, check_tier: bool = False, begin=0, end=None):
    """Routes ``trace`` (tokens ``begin`` to ``end``) through ``session`` in batches of ``batch``
    tokens, layer after layer. With check_tier, follows every plan as an engine would and
    checks the tier it keeps."""
    ids, starts = trace.expert_ids, trace_seq_starts(trace)
    L = trace.num_layers
    tier = [set() for _ in range(L)]
    for first in range(begin, trace.num_tokens if end is None else end, batch):
        rows = slice(first, first + batch)
        for layer in range(L):
            used = set(ids[rows, layer].ravel().tolist())
            plan = session.route(
                layer, ids[rows, layer], new_sequence=starts[rows] if layer == 0 else None
            )
            assert plan.layer == layer
            if not check_tier:
                continue
            load, evict = set(plan.load.tolist()), set(plan.evict.tolist())
            assert not load & tier[layer], "a plan loads what the tier holds"
            assert used <= tier[layer] | load, "the batch uses an expert the plan left out"
            assert evict <= tier[layer] | load
            tier[layer] = (tier[layer] | load) - evict
            assert tier[layer] == set(session.hot(layer).tolist())
            if layer + 1 < L:
                fetch, drop = set(plan.prefetch.tolist()), set(plan.prefetch_evict.tolist())
                assert not fetch & tier[layer + 1] and drop <= tier[layer + 1]
                tier[layer + 1] = (tier[layer + 1] | fetch) - drop
                assert tier[layer + 1] == set(session.hot(layer + 1).tolist())
            else:
                assert plan.prefetch.size == plan.prefetch_evict.size == 0


@pytest.mark.parametrize("policy", online_policy_names())
@pytest.mark.parametrize("batch", [1, 7])
def test_decisions_equal_the_local_replay(trace, policy, batch):
    config = ReplayConfig(capacity=8)
    stats, _ = replay_policy(trace, config, policy)
    session = EngineSession(service_config_for(trace, config, policy))
    route_trace(session, trace, batch)
    got = session.stats()
    for layer, expected in enumerate(stats.layers):
        assert got[layer] == {key: getattr(expected, key) for key in COUNTER_KEYS}, layer
    assert sum(c["stalls"] for c in got) > 0  # the comparison saw real work


@pytest.mark.parametrize("policy", online_policy_names())
def test_plans_keep_the_tier_equal_to_the_hot_sets(trace, policy):
    session = EngineSession(service_config_for(trace.head(200), ReplayConfig(capacity=6), policy))
    route_trace(session, trace.head(200), batch=1, check_tier=True)
    route_trace(session, trace.head(60), batch=5, check_tier=False)


def test_predictive_plans_prefetch_the_next_layer(trace):
    session = EngineSession(service_config_for(trace, ReplayConfig(capacity=8), "moeray"))
    prefetched = 0
    for t in range(100):
        for layer in range(trace.num_layers):
            plan = session.route(layer, trace.expert_ids[t : t + 1, layer])
            prefetched += plan.prefetch.size
    assert prefetched > 0
    assert sum(c["prefetches"] for c in session.stats()) >= prefetched


def test_a_plan_is_read_only_and_equals_itself_alone(trace):
    """A LayerPlan's fields cannot be reassigned, and two plans with equal ids are still two
    plans (their arrays would compare element by element)."""
    session = EngineSession(service_config_for(trace, ReplayConfig(capacity=8), "lru"))
    ids = trace.expert_ids[:1]
    first = [session.route(layer, ids[:, layer]) for layer in range(trace.num_layers)]
    plan = first[0]
    with pytest.raises(AttributeError):
        plan.load = plan.evict
    again = type(plan)(plan.layer, plan.load, plan.evict, plan.prefetch, plan.prefetch_evict)
    assert plan == plan and plan != again and hash(plan) != hash(again)
    assert again.version == 0 and again.load is plan.load
    assert plan.load.size == 4 and plan.evict.size == 0  # a cold tier loads the token's 4


def session_for(trace, policy="lru", capacity=8):
    return EngineSession(service_config_for(trace, ReplayConfig(capacity=capacity), policy))


@pytest.mark.parametrize(
    "layer, ids, message",
    [
        (1, [[0, 1, 2, 3]], "layer: expected layer 0 next"),
        (0, [[0, 1, 2, 32]], "ids: expected ids in [0, 32)"),
        (0, [[0, 1, 2, -1]], "ids: expected ids in [0, 32)"),
        (0, [[0, 1, 2]], "ids: expected integers of shape [tokens, 4]"),
        (0, [[0.0, 1.0, 2.0, 3.0]], "ids: expected integers"),
        (24, [[0, 1, 2, 3]], "layer: expected an int in [0, 24)"),
    ],
)
def test_bad_route_fails_that_call_alone(trace, layer, ids, message):
    session = session_for(trace)
    with pytest.raises(ValueError, match=re.escape(message)):
        session.route(layer, np.asarray(ids))
    route_trace(session, trace.head(3), batch=1)  # the session serves on
    assert sum(c["hits"] + c["stalls"] for c in session.stats()) == 3 * 24 * 4


def test_a_batch_keeps_its_size_and_order(trace):
    session = session_for(trace)
    session.route(0, trace.expert_ids[:2, 0])
    with pytest.raises(ValueError, match="needs its 2 tokens"):
        session.route(1, trace.expert_ids[:3, 1])
    with pytest.raises(ValueError, match="expected layer 1 next"):
        session.route(2, trace.expert_ids[:2, 2])
    with pytest.raises(ValueError, match="new_sequence: give it with layer 0"):
        session.route(1, trace.expert_ids[:2, 1], new_sequence=True)
    with pytest.raises(ValueError, match="weights"):
        session.route(1, trace.expert_ids[:2, 1], weights=np.ones((2, 3)))
    session.route(1, trace.expert_ids[:2, 1], weights=np.ones((2, 4)))


def test_budget_below_top_k_is_refused(trace):
    with pytest.raises(ValueError, match="capacity: the tier must hold one token's 4 experts"):
        session_for(trace, capacity=3)


def test_updates_apply_between_batches_and_newer_protocols_are_refused(trace):
    session = session_for(trace, "moeray")
    with pytest.raises(ValueError, match="protocol"):
        session.apply_update(EngineUpdate(1, protocol=PROTOCOL_VERSION + 1))
    assert session.version == 0
    capacity = tuple([6] * 12 + [10] * 12)
    session.apply_update(EngineUpdate(3, capacity=capacity, prefetch_budget=1))
    assert session.version == 3 and session.config.capacity == capacity
    session.apply_update(EngineUpdate(2, capacity=(8,) * 24))  # older: ignored
    assert session.config.capacity == capacity
    route_trace(session, trace.head(50), batch=1)
    assert all(len(session.hot(layer)) <= capacity[layer] for layer in range(24))
    assert len(session.hot(23)) == 10
    session.route(0, trace.expert_ids[:1, 0])
    with pytest.raises(ValueError, match="between batches"):
        session.apply_update(EngineUpdate(4, prefetch_budget=2))
    with pytest.raises(ValueError, match="capacity"):
        session_for(trace, "lru").apply_update(EngineUpdate(1, capacity=(6,) * 24))


class FakeService:
    """A handle's two calls the link makes; ``fail`` makes both raise, ``gate`` holds submits."""

    def __init__(self, config, update=None):
        self.config = config
        self.update = update
        self.tokens = 0
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def submit(self, expert_ids, seq_starts=None):
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("service gone")
        assert expert_ids.shape[0] == self.config.num_layers and seq_starts.dtype == bool
        self.tokens += expert_ids.shape[1]

    def predictor_tables(self):
        return []  # a service that learned nothing yet

    def engine_update(self, after_version):
        if self.fail:
            raise RuntimeError("service gone")
        if self.update is not None and self.update.version > after_version:
            return self.update
        return None

    def link_metrics(self):
        self.metrics = RecordedMetrics()
        return self.metrics


class RecordedMetrics:
    """The link's metrics sink (ServiceHandle.link_metrics's Ray metrics, recorded here)."""

    def __init__(self):
        self.seen = []

    def observe(self, stats):
        self.seen.append(stats)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_linked_session_reports_its_routing_and_applies_updates(trace):
    config = service_config_for(trace, ReplayConfig(capacity=8), "moeray")
    capacity = tuple([6] * 12 + [10] * 12)
    service = FakeService(config, EngineUpdate(5, capacity=capacity))
    session = EngineSession.attach(service, poll_s=0.01)
    try:
        routed = 0  # the update comes in while the engine routes, taken at a batch's start
        deadline = time.monotonic() + 30
        while session.link.stats().updates == 0 or routed < 20:
            assert routed < 400 and time.monotonic() < deadline, "no update taken"
            route_trace(session, trace, batch=1, begin=routed, end=routed + 1)
            routed += 1
            time.sleep(0.002)
        route_trace(session, trace.head(30), batch=3)
        assert session.link.flush()
        assert service.tokens == routed + 30 == session.link.stats().reported_tokens
        assert session.version == 5 and session.config.capacity == capacity
        (at, update), *_ = session.applied_updates
        assert update.version == 5 and 0 <= at <= routed
    finally:
        session.close()
    # the decisions are reproducible from the routing and the updates applied
    again = EngineSession(config)
    route_trace(again, trace, batch=1, end=at)
    again.apply_update(update)
    route_trace(again, trace, batch=1, begin=at, end=routed)
    route_trace(again, trace.head(30), batch=3)
    assert again.stats() == session.stats()


def test_a_session_outlives_its_service_and_resynchronises(trace, caplog):
    config = service_config_for(trace, ReplayConfig(capacity=8), "lru")
    service = FakeService(config)
    session = EngineSession.attach(service, poll_s=0.01)
    try:
        service.fail = True
        with caplog.at_level("WARNING", logger="moeray.engine.link"):
            route_trace(session, trace.head(10), batch=1)  # the engine is never stopped
            wait_for(lambda: not session.link.stats().connected)
        assert "decides on its own" in caplog.text
        assert session.link.stats().failures >= 1
        # the metric shows the lost service
        wait_for(lambda: any(not s.connected and s.failures for s in service.metrics.seen))
        service.fail = False
        wait_for(lambda: session.link.stats().connected)
        route_trace(session, trace.head(10), batch=1)
        assert session.link.flush()
        stats = session.link.stats()
        assert stats.reported_tokens + stats.dropped_tokens == 20 and stats.reported_tokens >= 10
    finally:
        session.close()
    last = service.metrics.seen[-1]  # the link's final export: every count, and connected again
    assert last == session.link.stats() and last.connected


def test_a_full_queue_drops_for_the_service_never_blocks_the_engine(trace):
    config = service_config_for(trace, ReplayConfig(capacity=8), "lru")
    service = FakeService(config)
    service.gate.clear()  # the service takes nothing
    session = EngineSession.attach(service, max_queued_tokens=4, poll_s=0.01)
    try:
        route_trace(session, trace.head(20), batch=2)  # returns: nothing waits on the service
        assert session.link.stats().dropped_tokens >= 20 - 4 - 2
        service.gate.set()
        assert session.link.flush()
        stats = session.link.stats()
        assert stats.reported_tokens + stats.dropped_tokens == 20
    finally:
        session.close()


def test_the_coordinator_versions_its_engine_updates(trace):
    """In process: the update moves when the capacity re-split moves, never otherwise."""
    from moeray.actors.coordinator import Coordinator
    from moeray.actors.transport import InProcessTransport
    from moeray.policy.predict import PredictConfig
    from moeray.policy.split import SplitConfig

    predict = PredictConfig(split=SplitConfig())
    config = service_config_for(trace, ReplayConfig(capacity=8, predict=predict), "moeray")
    coordinator = Coordinator(config, InProcessTransport(config))
    first = coordinator.engine_update(0)
    assert first.version == 1 and first.capacity == (8,) * 24 and first.prefetch_budget == 4
    assert coordinator.engine_update(first.version) is None
    ids = np.ascontiguousarray(trace.expert_ids.transpose(1, 0, 2))
    versions = [first.version]
    for begin in range(0, TOKENS, 100):
        coordinator.submit(ids[:, begin : begin + 100])
        update = coordinator.engine_update(versions[-1])
        if update is not None:
            assert update.version == versions[-1] + 1 and sum(update.capacity) == 8 * 24
            versions.append(update.version)
    assert coordinator.stats().resplit_moved > 0 and len(versions) > 1


def test_a_session_that_takes_learned_tables_starts_warm(trace):
    """Tables round-trip, and a session that starts from another's stalls less than a cold one
    on the tokens after."""
    config = service_config_for(trace, ReplayConfig(capacity=8), "moeray")
    teacher = EngineSession(config)
    route_trace(teacher, trace, batch=1, end=400)
    warm, cold = EngineSession(config), EngineSession(config)
    warm.load_tables(teacher.tables())
    for name, value in teacher.tables().items():
        np.testing.assert_allclose(warm.tables()[name], value, rtol=1e-12, err_msg=name)
    for session in (warm, cold):
        route_trace(session, trace, batch=1, begin=400, end=500)
    stalls = [sum(c["stalls"] for c in s.stats()) for s in (warm, cold)]
    assert stalls[0] < stalls[1]
    assert warm.loaded_tables == [(0, 0)]
    bad = teacher.tables() | {"cross": np.full((24, 32, 31), 1.0)}
    with pytest.raises(ValueError, match="tables: cross: expected"):
        cold.load_tables(bad)
    with pytest.raises(ValueError, match="learns no tables"):
        session_for(trace, "lru").load_tables(teacher.tables())
    cold.route(0, trace.expert_ids[:1, 0])
    with pytest.raises(ValueError, match="between batches"):
        cold.load_tables(teacher.tables())


@pytest.mark.parametrize("policy", online_policy_names())
def test_an_aborted_batch_leaves_the_session_serving(trace, policy):
    """A forward that fails after some layers: the session ends the batch, the next one starts
    at layer 0, and only the layers routed saw the aborted tokens."""
    session = session_for(trace, policy)
    route_trace(session, trace, batch=1, end=20)
    for layer in range(10):
        session.route(layer, trace.expert_ids[20:22, layer])
    with pytest.raises(ValueError, match="expected layer 10 next"):
        session.route(0, trace.expert_ids[22:23, 0])
    session.abort_batch()
    session.abort_batch()  # between batches: nothing to do
    assert session.aborted_batches == 1 and session.batches == 20
    route_trace(session, trace, batch=1, begin=22, end=40)
    uses = [c["hits"] + c["stalls"] for c in session.stats()]
    assert uses == [(38 + 2 * (layer < 10)) * 4 for layer in range(24)]
    for layer in range(24):
        assert len(session.hot(layer)) <= 8

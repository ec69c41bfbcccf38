"""The coordinator and layer-actor bodies without Ray: coalescing, ordering, failures, bad input.

``InProcessTransport`` hosts ``LayerCaches`` in-process and delivers calls when polled, in send
order; it can kill an actor, which loses its state and fails every call in flight, as a dead
Ray actor does. Expectations come from replaying the same routing through plain ``ExpertCache``s.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeray import ExpertAffinity, ExpertCache, ExpertCacheConfig
from moeray.actors.config import ServiceConfig
from moeray.actors.coordinator import Coordinator
from moeray.actors.layer import LayerCaches
from moeray.actors.messages import LayerState, LayerWindow, WindowGapError
from moeray.actors.transport import InProcessTransport
from moeray.policy.predict import PREDICTOR_NAMES, PredictConfig, PredictiveCaches
from moeray.traces import default_trace_path, load_trace
from moeray.traces.wire import decode_batches, decode_step, encode_batches, encode_step

pytestmark = pytest.mark.pure


@pytest.fixture(scope="module")
def routing():
    """int32 [layers=6, T=1200, top_k=4] from the bundled gpt-oss-20b slice, and its weights."""
    trace = load_trace(default_trace_path())
    ids = np.ascontiguousarray(trace.expert_ids[:1200, :6].transpose(1, 0, 2), dtype=np.int32)
    weights = np.ascontiguousarray(trace.weights[:1200, :6].transpose(1, 0, 2))
    return ids, weights


def in_process_hits(ids, config: ServiceConfig) -> list[int]:
    hits = []
    for layer in range(config.num_layers):
        cache = ExpertCache(config.num_experts, ExpertCacheConfig(config.capacity[layer]))
        hits.append(int(cache.access_batch(ids[layer]).sum()))
    return hits


def make(config: ServiceConfig, timer=None):
    transport = InProcessTransport(config)
    kwargs = {"timer": timer} if timer else {}
    return Coordinator(config, transport, **kwargs), transport


def submit_all(coordinator, ids, weights, step_tokens=100, on_step=None):
    for i, start in enumerate(range(0, ids.shape[1], step_tokens)):
        coordinator.submit(
            ids[:, start : start + step_tokens], weights[:, start : start + step_tokens]
        )
        if on_step:
            on_step(i)


@pytest.mark.parametrize("window_steps,layers_per_actor", [(1, 1), (3, 2), (5, 6)])
def test_replay_through_coordinator_equals_in_process(routing, window_steps, layers_per_actor):
    ids, weights = routing
    config = ServiceConfig(
        num_layers=6,
        num_experts=32,
        top_k=4,
        capacity=(8, 8, 4, 4, 12, 8),
        policy="lru",
        window_steps=window_steps,
        layers_per_actor=layers_per_actor,
    )
    coordinator, _ = make(config)
    submit_all(coordinator, ids, weights)
    stats = coordinator.stats()
    assert [s.hits for s in stats.layers] == in_process_hits(ids, config)
    assert all(s.tokens == ids.shape[1] for s in stats.layers)
    assert all(s.hits + s.stalls == ids.shape[1] * 4 for s in stats.layers)
    assert stats.pending_windows == 0 and stats.submits == 12
    assert all(s.restarts == 0 for s in stats.layers)


def test_affinity_policy_matches_in_process_and_coordinator_keeps_affinity(routing):
    ids, weights = routing
    config = ServiceConfig(
        num_layers=6,
        num_experts=32,
        top_k=4,
        capacity=8,
        policy="affinity-lru",
        window_steps=2,
        layers_per_actor=3,
    )
    coordinator, _ = make(config)
    submit_all(coordinator, ids, weights)
    stats = coordinator.stats()
    for layer in range(6):
        cache = ExpertCache(32, ExpertCacheConfig(8))
        affinity = ExpertAffinity(config.affinity_config())
        expected = int(cache.access_batch(ids[layer], affinity, config.affinity_weight).sum())
        assert stats.layers[layer].hits == expected
        # the coordinator's copy of the affinity, the source of truth for restarts
        assert np.array_equal(coordinator.layer_state(layer).affinity_scores, affinity.scores())


def test_windows_coalesce_steps_into_one_call_per_actor(routing):
    ids, weights = routing
    config = ServiceConfig(
        num_layers=6, num_experts=32, top_k=4, window_steps=3, layers_per_actor=2
    )
    coordinator, transport = make(config)
    coordinator.submit(ids[:, :10], weights[:, :10])
    coordinator.submit(ids[:, 10:30], weights[:, 10:30])
    assert transport.sends == []
    coordinator.submit(ids[:, 30:35], weights[:, 30:35])
    assert [actor for actor, _ in transport.sends] == [0, 1, 2]
    for actor, windows in transport.sends:
        assert [w.layer for w in windows] == config.actor_layers()[actor]
        for w in windows:
            assert w.number == 1
            assert np.array_equal(w.expert_ids, ids[w.layer, :35])


def test_window_ms_closes_a_window_by_age(routing):
    ids, weights = routing
    now = [0.0]
    config = ServiceConfig(num_layers=6, num_experts=32, top_k=4, window_steps=100, window_ms=50.0)
    coordinator, transport = make(config, timer=lambda: now[0])
    coordinator.submit(ids[:, :10], weights[:, :10])
    now[0] = 0.049
    coordinator.submit(ids[:, 10:20], weights[:, 10:20])
    assert transport.sends == []
    now[0] = 0.050
    coordinator.submit(ids[:, 20:30], weights[:, 20:30])
    assert len(transport.sends) == 6 and all(len(w[0].expert_ids) == 30 for _, w in transport.sends)


def test_killed_actor_is_restored_and_nothing_is_lost_or_counted_twice(routing):
    ids, weights = routing
    config = ServiceConfig(
        num_layers=6,
        num_experts=32,
        top_k=4,
        capacity=8,
        policy="lru",
        window_steps=2,
        layers_per_actor=2,
    )
    coordinator, transport = make(config)

    def maybe_kill(step):
        if step == 5:
            transport.kill(1)  # layers 2 and 3; the windows in flight to it fail

    submit_all(coordinator, ids, weights, on_step=maybe_kill)
    stats = coordinator.stats()
    expected = in_process_hits(ids, config)
    for s in stats.layers:
        assert s.tokens == ids.shape[1], f"layer {s.layer} lost or repeated routing"
        assert s.hits + s.stalls == ids.shape[1] * 4
        if s.layer in (2, 3):
            assert s.restarts == 1
            # LRU restarted empty holds a subset of what it would have held: never more hits
            assert s.hits < expected[s.layer]
        else:
            assert s.restarts == 0 and s.hits == expected[s.layer]
    assert stats.pending_windows == 0


def test_layer_caches_apply_each_window_once_in_order():
    body = LayerCaches([0], 8, {0: 2})
    w = [
        LayerWindow(0, seq, np.array([[seq % 8, (seq + 1) % 8]], dtype=np.int32))
        for seq in (1, 2, 3)
    ]
    assert [a.number for a in body.apply(w[:2])] == [1, 2]
    assert [a.number for a in body.apply(w[:3])] == [3]  # 1 and 2 are resends: skipped
    with pytest.raises(WindowGapError):
        body.apply([LayerWindow(0, 5, w[0].expert_ids)])
    assert body.applied() == {0: 3}
    scores = np.linspace(0, 1, 8)
    body.restore([LayerState(0, 7, scores, np.arange(8, dtype=np.int64))])
    assert body.applied() == {0: 7}


@pytest.mark.parametrize(
    "mutate,error",
    [
        (lambda ids, w: (ids[:5], w[:5]), ValueError),  # wrong number of layers
        (lambda ids, w: (ids[:, :, :2], w[:, :, :2]), ValueError),  # wrong top_k
        (lambda ids, w: (np.where(ids == 3, 32, ids), w), ValueError),  # id out of range
        (lambda ids, w: (np.where(ids == 3, -1, ids), w), ValueError),  # negative id
        (lambda ids, w: (ids.astype(np.float32), w), TypeError),  # float ids
        (lambda ids, w: (ids, np.where(ids == 3, np.nan, w).astype(np.float32)), ValueError),
        (lambda ids, w: (ids, w[:, :5]), ValueError),  # weights shape
    ],
)
def test_bad_step_is_refused_and_state_is_intact(routing, mutate, error):
    ids, weights = routing
    config = ServiceConfig(
        num_layers=6, num_experts=32, top_k=4, capacity=8, policy="lru", window_steps=1
    )
    coordinator, _ = make(config)
    coordinator.submit(ids[:, :600], weights[:, :600])
    bad_ids, bad_weights = mutate(ids[:, 600:700].copy(), weights[:, 600:700].copy())
    with pytest.raises(error):
        coordinator.submit(bad_ids, bad_weights)
    coordinator.submit(ids[:, 600:], weights[:, 600:])
    stats = coordinator.stats()
    assert stats.submits == 2
    assert [s.hits for s in stats.layers] == in_process_hits(ids, config)


def test_msgpack_step_round_trip_and_malformed_payloads(routing):
    ids, weights = routing
    step_ids, step_weights, starts, hints = decode_step(encode_step(ids[:, :7], weights[:, :7]))
    assert step_ids.dtype == np.int32 and np.array_equal(step_ids, ids[:, :7])
    assert step_weights.dtype == np.float32 and np.array_equal(step_weights, weights[:, :7])
    assert starts is None and hints is None  # no positions: the step continues the stream
    assert decode_step(encode_step(ids[:, :3]))[1] is None
    for payload in (b"\xc1garbage", b"\x93\x01\x02\x03", encode_step(ids[:, :3])[:-5]):
        with pytest.raises(ValueError, match="step|expert_ids"):
            decode_step(payload)
    import msgpack

    wrong_size = msgpack.packb(
        {"expert_ids": {"shape": [6, 2, 4], "dtype": "int32", "data": b"\0" * 8}}
    )
    with pytest.raises(ValueError, match="expert_ids"):
        decode_step(wrong_size)
    config = ServiceConfig(num_layers=6, num_experts=32, top_k=4)
    coordinator, _ = make(config)
    step = decode_step(encode_step(ids[:, :50], weights[:, :50]))
    batches = coordinator.submit(step.expert_ids, step.weights)
    again = decode_batches(encode_batches(batches))
    for a, b in zip(batches, again):
        assert np.array_equal(a.offsets, b.offsets) and np.array_equal(
            a.token_indices, b.token_indices
        )
        assert np.array_equal(a.weights, b.weights)
    # expert 0's tokens of layer 0, in order, as the schedule's contract says
    expected = [t for t in range(50) if 0 in ids[0, t]]
    assert batches[0].tokens_of(0).tolist() == expected


def test_msgpack_steps_carry_sequence_starts_and_hints(stream):
    """A stream sent as msgpack steps (positions and hints on the wire) is served exactly as
    the same steps submitted as numpy arrays."""
    trace, ids, weights, starts = stream
    rng = np.random.default_rng(3)
    hints = np.where(rng.random((6, 1200, 2)) < 0.8, ids[:, :, :2], -1)
    config = ServiceConfig(num_layers=6, num_experts=32, top_k=4, window_steps=2)
    direct, _ = make(config)
    wired, _ = make(config)
    for lo in range(0, 1200, 70):  # steps that start mid-sequence and span several sequences
        hi = min(lo + 70, 1200)
        direct.submit(
            ids[:, lo:hi], weights[:, lo:hi], seq_starts=starts[lo:hi], hints=hints[:, lo:hi]
        )
        step = decode_step(
            encode_step(
                ids[:, lo:hi], weights[:, lo:hi], seq_starts=starts[lo:hi], hints=hints[:, lo:hi]
            )
        )
        assert np.array_equal(step.seq_starts, starts[lo:hi]) and np.array_equal(
            step.hints, hints[:, lo:hi]
        )
        wired.submit(step.expert_ids, step.weights, seq_starts=step.seq_starts, hints=step.hints)
    a, b = direct.stats(), wired.stats()
    assert [s.stalls for s in a.layers] == [s.stalls for s in b.layers]
    assert [list(s.predictor_hits) for s in a.layers] == [list(s.predictor_hits) for s in b.layers]
    assert b.total().predictor_uses[PREDICTOR_NAMES.index("hints")] > 0
    import msgpack

    bad = msgpack.unpackb(encode_step(ids[:, :5], hints=hints[:, :5]), raw=False)
    bad["hints"]["dtype"] = "float32"
    with pytest.raises(ValueError, match="hints"):
        decode_step(msgpack.packb(bad, use_bin_type=True))


def test_service_config_validates():
    with pytest.raises(ValueError, match="capacity"):
        ServiceConfig(num_layers=2, num_experts=8, top_k=2, capacity=(4,))
    with pytest.raises(ValueError, match="capacity"):
        ServiceConfig(num_layers=2, num_experts=8, top_k=2, capacity=9)
    with pytest.raises(ValueError, match="policy"):
        ServiceConfig(num_layers=2, num_experts=8, top_k=2, policy="fifo")
    with pytest.raises(ValueError, match="placement"):
        ServiceConfig(num_layers=4, num_experts=8, top_k=2, layers_per_actor=2, placement=("a",))
    assert ServiceConfig(
        num_layers=5, num_experts=8, top_k=2, layers_per_actor=2
    ).actor_layers() == [[0, 1], [2, 3], [4]]


# --- the moeray policy hosted by the layer actors ---


@pytest.fixture(scope="module")
def stream():
    """The first 1200 tokens and 6 layers of the bundled slice as a Trace (sequences start at
    0, 511, 612, 677, 1188), its routing int32 [6, 1200, 4], weights, and seq_starts bool [1200]."""
    from moeray.traces import Trace

    full = load_trace(default_trace_path()).head(1200)
    trace = Trace(full.expert_ids[:, :6], full.weights[:, :6], full.seq_offsets, 32, "head")
    ids = np.ascontiguousarray(trace.expert_ids.transpose(1, 0, 2), dtype=np.int32)
    weights = np.ascontiguousarray(trace.weights.transpose(1, 0, 2))
    starts = np.zeros(1200, dtype=bool)
    starts[trace.seq_offsets[:-1]] = True
    return trace, ids, weights, starts


def submit_stream(coordinator, ids, weights, starts, step_tokens=100, on_step=None):
    for i, lo in enumerate(range(0, ids.shape[1], step_tokens)):
        hi = lo + step_tokens
        coordinator.submit(ids[:, lo:hi], weights[:, lo:hi], seq_starts=starts[lo:hi])
        if on_step:
            on_step(i)


@pytest.mark.parametrize(
    "window_steps,layers_per_actor,budget", [(1, 1, 4), (3, 2, 4), (5, 4, 2), (2, 6, 4)]
)
def test_moeray_through_coordinator_equals_the_whole_model(
    stream, window_steps, layers_per_actor, budget
):
    trace, ids, weights, starts = stream
    capacity = (8, 8, 6, 10, 8, 8)
    predict = PredictConfig(prefetch_budget=budget)
    config = ServiceConfig(
        num_layers=6,
        num_experts=32,
        top_k=4,
        capacity=capacity,
        policy="moeray",
        window_steps=window_steps,
        layers_per_actor=layers_per_actor,
        predict=predict,
    )
    coordinator, _ = make(config)
    submit_stream(coordinator, ids, weights, starts)
    stats = coordinator.stats()
    expected = PredictiveCaches(6, 32, 4, capacity, predict).run(
        trace.expert_ids, trace.seq_offsets
    )
    assert [s.hits for s in stats.layers] == expected.hits.tolist()
    assert [s.stalls for s in stats.layers] == expected.stalls.tolist()
    assert [s.prefetches for s in stats.layers] == expected.prefetches.tolist()
    assert [s.prefetch_hits for s in stats.layers] == expected.prefetch_hits.tolist()
    assert [s.wasted_prefetches for s in stats.layers] == expected.wasted_prefetches.tolist()
    for key in ("predictor_hits", "predictor_guesses", "predictor_uses"):
        assert [list(getattr(s, key)) for s in stats.layers] == getattr(expected, key).T.tolist()
        assert list(getattr(stats.total(), key)) == getattr(expected, key).sum(axis=1).tolist()
    assert all(s.tokens == 1200 and s.restarts == 0 for s in stats.layers)
    assert stats.total().prefetches > 0


@pytest.mark.parametrize("window_steps,layers_per_actor", [(3, 2), (1, 6)])
def test_engine_hints_through_coordinator_equal_the_whole_model(
    stream, window_steps, layers_per_actor
):
    """Steps with hints of 4 slots, of 2 and none, coalesced into windows (narrower steps padded
    with -1): every layer counts what the whole model counts with the same hints per token,
    hint precision and recall included."""
    from moeray.replay import synthetic_hints

    trace, ids, weights, starts = stream
    made = synthetic_hints(trace.expert_ids, 32, 0.8, np.random.default_rng(1))  # [T, L, 4]
    per_token = np.full_like(made, -1)
    config = ServiceConfig(
        num_layers=6,
        num_experts=32,
        top_k=4,
        capacity=8,
        policy="moeray",
        window_steps=window_steps,
        layers_per_actor=layers_per_actor,
    )
    coordinator, _ = make(config)
    for i, lo in enumerate(range(0, 1200, 100)):
        hi = lo + 100
        width = (0, 4, 2)[i % 3]
        hints = None
        if width:
            hints = np.ascontiguousarray(made[lo:hi, :, :width].transpose(1, 0, 2))
            per_token[lo:hi, :, :width] = made[lo:hi, :, :width]
        coordinator.submit(ids[:, lo:hi], weights[:, lo:hi], seq_starts=starts[lo:hi], hints=hints)
    stats = coordinator.stats()
    expected = PredictiveCaches(6, 32, 4, 8).run(
        trace.expert_ids, trace.seq_offsets, hints=per_token
    )
    assert [s.hits for s in stats.layers] == expected.hits.tolist()
    assert [s.prefetches for s in stats.layers] == expected.prefetches.tolist()
    for key in ("predictor_hits", "predictor_guesses", "predictor_uses"):
        assert [list(getattr(s, key)) for s in stats.layers] == getattr(expected, key).T.tolist()
    assert stats.total().predictor_uses[PREDICTOR_NAMES.index("hints")] > 0


@pytest.mark.parametrize("window_steps,layers_per_actor", [(1, 1), (3, 4), (2, 6)])
def test_moeray_resplit_through_coordinator_equals_the_whole_model(
    stream, window_steps, layers_per_actor
):
    """One total capacity re-split across layers: the coordinator runs the split over every
    layer's routing and sends each window its capacities; the layer actors decide exactly as
    the whole model's PredictiveCaches with the same SplitConfig, re-split costs included."""
    from moeray.policy.split import SplitConfig

    trace, ids, weights, starts = stream
    capacity = (8, 8, 6, 10, 8, 8)
    predict = PredictConfig(split=SplitConfig(every_tokens=64, max_move=2, min_gain=0.0))
    coordinator, _ = make(
        ServiceConfig(
            num_layers=6,
            num_experts=32,
            top_k=4,
            capacity=capacity,
            window_steps=window_steps,
            layers_per_actor=layers_per_actor,
            predict=predict,
        )
    )
    submit_stream(coordinator, ids, weights, starts, step_tokens=70)
    coordinator.submit(ids[:, :0], weights[:, :0])  # an empty step, maybe an empty window
    stats = coordinator.stats()
    caches = PredictiveCaches(6, 32, 4, capacity, predict)
    expected = caches.run(trace.expert_ids, trace.seq_offsets)
    assert expected.resplit_moved > 0 and expected.resplit_evictions.sum() > 0  # it re-split
    for key, mine in (
        ("hits", "hits"),
        ("stalls", "stalls"),
        ("prefetches", "prefetches"),
        ("wasted_prefetches", "wasted_prefetches"),
        ("resplit_evictions", "resplit_evictions"),
        ("resplit_transfers", "resplit_transfers"),
    ):
        assert [getattr(s, mine) for s in stats.layers] == getattr(expected, key).tolist(), key
    assert stats.resplit_moved == expected.resplit_moved
    assert stats.capacity == tuple(caches.capacity) and sum(stats.capacity) == sum(capacity)
    assert all(m >= max(c, f) for m, c, f in zip(stats.capacity_max, capacity, stats.capacity))
    assert stats.capacity_max != capacity  # some layer grew


def test_a_service_configured_with_the_model_shape_alone_serves_moeray(stream):
    """No policy and no parameters named: the predictive policy with its defaults."""
    trace, ids, weights, starts = stream
    coordinator, _ = make(
        ServiceConfig(num_layers=6, num_experts=32, top_k=4, window_steps=2, layers_per_actor=3)
    )
    submit_stream(coordinator, ids, weights, starts)
    stats = coordinator.stats()
    expected = PredictiveCaches(6, 32, 4, 8).run(trace.expert_ids, trace.seq_offsets)
    assert [s.stalls for s in stats.layers] == expected.stalls.tolist()
    assert [s.prefetches for s in stats.layers] == expected.prefetches.tolist()
    assert stats.total().prefetches > 0  # it predicted and prefetched


def test_engine_hints_are_checked_at_submit(stream):
    trace, ids, weights, starts = stream
    step = ids[:, :10]
    moeray_service, transport = make(
        ServiceConfig(num_layers=6, num_experts=32, top_k=4, policy="moeray")
    )
    good = np.full((6, 10, 2), -1, np.int64)
    for bad, error, match in (
        (good[:, :9], ValueError, "shape"),
        (good[..., :0], ValueError, "h >= 1"),
        (good + 33, ValueError, "-1"),
        (good - 1, ValueError, "-1"),
        (good.astype(np.float32), TypeError, "integer"),
        (good.tolist(), TypeError, "numpy"),
    ):
        with pytest.raises(error, match=match):
            moeray_service.submit(step, hints=bad)
    lru_service, _ = make(ServiceConfig(num_layers=6, num_experts=32, top_k=4, policy="lru"))
    with pytest.raises(ValueError, match="only the moeray policy"):
        lru_service.submit(step, hints=good)
    assert moeray_service.stats().submits == 0 and transport.sends == []


def test_moeray_windows_carry_the_previous_layer_sequence_starts_and_budgets(stream):
    trace, ids, weights, starts = stream
    config = ServiceConfig(
        num_layers=6,
        num_experts=32,
        top_k=4,
        policy="moeray",
        window_steps=2,
        layers_per_actor=4,
        predict={"prefetch_budget": 3},
    )
    assert config.predict == PredictConfig(prefetch_budget=3)  # a JSON config's dict
    coordinator, transport = make(config)
    coordinator.submit(ids[:, 500:520], weights[:, 500:520], seq_starts=starts[500:520])
    coordinator.submit(ids[:, 520:530], weights[:, 520:530])  # no starts: continues
    (a0, first), (a1, second) = transport.sends
    assert (a0, [w.layer for w in first]) == (0, [0, 1, 2, 3])
    assert (a1, [w.layer for w in second]) == (1, [4, 5])
    assert first[0].previous_layer_ids is None  # layer 0 has no layer before it
    assert np.array_equal(second[0].previous_layer_ids, ids[3, 500:530])
    assert all(w.previous_layer_ids is None for w in first[1:] + second[1:])
    for w in first + second:
        assert w.prefetch_budget == 3
        assert np.flatnonzero(w.seq_starts).tolist() == [11]  # token 511 starts a sequence
    # a demand policy neither needs nor gets them
    lru, lru_transport = make(
        ServiceConfig(
            num_layers=6,
            num_experts=32,
            top_k=4,
            policy="lru",
            layers_per_actor=4,
            prefetch_budget=2,
        )
    )
    lru.submit(ids[:, 500:520], weights[:, 500:520], seq_starts=starts[500:520])
    for _, windows in lru_transport.sends:
        assert all(w.previous_layer_ids is None and w.seq_starts is None for w in windows)
        assert all(w.prefetch_budget == 2 for w in windows)


@pytest.mark.parametrize("warmup_tokens", [0, 100, 4096])
def test_moeray_killed_actor_relearns_and_nothing_is_lost_or_applied_twice(stream, warmup_tokens):
    """Actor 1 (layers 2, 3) dies after window 3 (600 tokens) was acknowledged: layers 2 and 3
    count windows 1-3 as the whole model does, then what a predictor over layers 1..3 (1 as the
    shadow) decides from token 600 on after relearning from the last warmup_tokens tokens the
    coordinator kept (none: empty tables; all 600: the restart changes nothing); the other
    actors are untouched."""
    trace, ids, weights, starts = stream
    config = ServiceConfig(
        num_layers=6,
        num_experts=32,
        top_k=4,
        capacity=8,
        policy="moeray",
        window_steps=2,
        layers_per_actor=2,
        warmup_tokens=warmup_tokens,
    )
    coordinator, transport = make(config)

    def maybe_kill(step):
        if step == 5:  # window 3 (steps 4-5) is acknowledged; window 4 will find actor 1 dead
            transport.kill(1)

    submit_stream(coordinator, ids, weights, starts, on_step=maybe_kill)
    stats = coordinator.stats()
    whole = PredictiveCaches(6, 32, 4, 8).run(trace.expert_ids, trace.seq_offsets)
    before = PredictiveCaches(6, 32, 4, 8).run(trace.expert_ids[:600], [0, 511])
    after = PredictiveCaches(3, 32, 4, 8)
    for t in range(600 - min(warmup_tokens, 600), 1200):
        if t == 600:
            warm = {
                key: getattr(after.stats, key).copy() for key in ("hits", "stalls", "prefetches")
            }
        after.step(trace.expert_ids[t, 1:4], new_sequence=bool(starts[t]))
    for s in stats.layers:
        assert s.tokens == 1200 and s.hits + s.stalls == 1200 * 4, f"layer {s.layer}"
        if s.layer in (2, 3):
            j = s.layer - 1
            assert s.restarts == 1
            assert s.hits == before.hits[s.layer] + after.stats.hits[j] - warm["hits"][j]
            assert s.stalls == before.stalls[s.layer] + after.stats.stalls[j] - warm["stalls"][j]
            assert s.prefetches == (
                before.prefetches[s.layer] + after.stats.prefetches[j] - warm["prefetches"][j]
            )
        else:
            assert s.restarts == 0
        if s.layer not in (2, 3) or warmup_tokens >= 600:  # a full relearning: as if no restart
            assert (s.hits, s.stalls, s.prefetches) == (
                whole.hits[s.layer],
                whole.stalls[s.layer],
                whole.prefetches[s.layer],
            )
        else:
            assert s.hits != whole.hits[s.layer]  # the restart really cost its tables
    assert stats.pending_windows == 0


def test_moeray_resplit_survives_a_killed_actor(stream):
    """With a re-split, a re-created actor takes the split in force from its first window (the
    coordinator runs the split from routing alone): the other actors' layers decide exactly as
    the whole model does, and the restarted layers hold no more than their capacity allows."""
    from moeray.policy.split import SplitConfig

    trace, ids, weights, starts = stream
    predict = PredictConfig(split=SplitConfig(every_tokens=64, max_move=2, min_gain=0.0))
    config = ServiceConfig(
        num_layers=6,
        num_experts=32,
        top_k=4,
        capacity=8,
        window_steps=2,
        layers_per_actor=2,
        predict=predict,
    )
    coordinator, transport = make(config)

    def maybe_kill(step):
        if step == 5:
            transport.kill(1)  # layers 2 and 3

    submit_stream(coordinator, ids, weights, starts, on_step=maybe_kill)
    stats = coordinator.stats()
    caches = PredictiveCaches(6, 32, 4, 8, predict)
    whole = caches.run(trace.expert_ids, trace.seq_offsets)
    assert stats.capacity == tuple(caches.capacity) and stats.resplit_moved == whole.resplit_moved
    for s in stats.layers:
        assert s.tokens == 1200 and s.hits + s.stalls == 1200 * 4, f"layer {s.layer}"
        if s.layer in (2, 3):
            assert s.restarts == 1
        else:
            assert (s.hits, s.stalls, s.prefetches, s.resplit_evictions) == (
                whole.hits[s.layer],
                whole.stalls[s.layer],
                whole.prefetches[s.layer],
                whole.resplit_evictions[s.layer],
            )
    restarted = transport.actors[1]._policy  # layers 1 (shadow), 2, 3
    assert restarted._caches.capacity.tolist() == list(stats.capacity[1:4])
    for row, layer in ((1, 2), (2, 3)):
        assert len(restarted._caches.hot_set(row)[0]) <= stats.capacity[layer]


def test_seq_starts_and_moeray_config_are_checked(stream):
    trace, ids, weights, starts = stream
    config = ServiceConfig(num_layers=6, num_experts=32, top_k=4, policy="moeray")
    coordinator, transport = make(config)
    for bad, error in (
        (starts[:50], ValueError),
        (starts[:100].astype(np.int8), TypeError),
        (list(starts[:100]), TypeError),
    ):
        with pytest.raises(error, match="seq_starts"):
            coordinator.submit(ids[:, :100], weights[:, :100], seq_starts=bad)
    assert transport.sends == [] and coordinator.stats().submits == 0
    with pytest.raises(ValueError, match="prefetch_budget"):
        ServiceConfig(num_layers=2, num_experts=8, top_k=2, policy="moeray", prefetch_budget=2)
    with pytest.raises(ValueError, match="predict"):
        ServiceConfig(num_layers=2, num_experts=8, top_k=2, policy="moeray", predict={"budget": 2})
    with pytest.raises(ValueError, match="prefetch_budget"):
        ServiceConfig(
            num_layers=2, num_experts=8, top_k=2, policy="moeray", predict={"prefetch_budget": -1}
        )
    with pytest.raises(TypeError, match="predict"):
        ServiceConfig(num_layers=2, num_experts=8, top_k=2, predict=4)
    from moeray.policy.split import SplitConfig

    from_json = ServiceConfig(
        num_layers=2, num_experts=8, top_k=2, predict={"split": {"every_tokens": 128}}
    )  # moeray serve --config
    assert from_json.predict.split == SplitConfig(every_tokens=128)
    with pytest.raises(ValueError, match="split"):
        ServiceConfig(num_layers=2, num_experts=8, top_k=2, predict={"split": {"every": 128}})


def test_one_clients_oversized_hints_or_step_cannot_wedge_the_window(routing):
    """Hints wider than num_experts, or a step over max_step_tokens, are refused before they are
    buffered (one padded window once asked for 129 GiB and failed every later call): the
    window's other steps go out and later calls work."""
    ids, _ = routing
    config = ServiceConfig(
        num_layers=6, num_experts=32, top_k=4, window_steps=3, max_step_tokens=500
    )
    coordinator, transport = make(config)
    narrow = np.full((6, 100, 1), -1, np.int32)
    coordinator.submit(ids[:, :100], hints=narrow)
    with pytest.raises(ValueError, match="exceeds num_experts=32"):
        coordinator.submit(ids[:, 100:101], hints=np.full((6, 1, 2**21), -1, np.int32))
    with pytest.raises(ValueError, match="max_step_tokens=500"):
        coordinator.submit(ids[:, :501])
    coordinator.submit(ids[:, 100:200], hints=np.full((6, 100, 32), -1, np.int32))
    coordinator.submit(ids[:, 200:300])
    stats = coordinator.stats()
    assert stats.submits == 3 and all(s.tokens == 300 for s in stats.layers)
    # padded to the widest accepted step, no wider; the hint-less third step would have
    # doubled the padding, so it went in a window of its own
    first, second = [windows[0] for actor, windows in transport.sends if actor == 0][:2]
    assert first.hints.shape == (200, 32) and second.hints is None
    with pytest.raises(ValueError, match="max_step_tokens"):
        ServiceConfig(num_layers=2, num_experts=8, top_k=2, max_step_tokens=0)


def test_a_window_stays_within_its_bytes_and_pads_hints_at_most_twice(routing):
    """A small step with wide hints after a long one with narrow hints (once: +514 MiB of
    padding from 656 KB of steps) goes in a window of its own; a step larger than
    max_window_bytes is refused naming it; windows never pass max_window_bytes; the counts are
    those of the whole stream."""
    ids, _ = routing
    config = ServiceConfig(
        num_layers=6, num_experts=32, top_k=4, window_steps=64, max_window_bytes=64 * 2**10
    )
    coordinator, transport = make(config)
    rng = np.random.default_rng(0)
    sent = 0
    for start in range(0, 1150, 50):
        width = int(rng.choice([0, 1, 32]))
        hints = None if width == 0 else np.full((6, 50, width), -1, np.int32)
        coordinator.submit(ids[:, start : start + 50], hints=hints)
        sent += 50
    big = np.full((6, 400, 32), -1, np.int32)  # 400 x 6 x (4 + 128) + 400 bytes > 64 KiB
    with pytest.raises(ValueError, match="max_window_bytes=65,536"):
        coordinator.submit(ids[:, :400], hints=big)
    coordinator.submit(ids[:, 1150:1151], hints=np.full((6, 1, 32), -1, np.int32))
    coordinator.flush()
    windows = [windows[0] for actor, windows in transport.sends if actor == 0]
    assert len(windows) > 1
    for window in windows:
        tokens = len(window.expert_ids)
        width = 0 if window.hints is None else window.hints.shape[1]
        assert tokens * 6 * (4 + 4 * width) + tokens <= config.max_window_bytes
    assert all(s.tokens == sent + 1 for s in coordinator.stats().layers)


def test_config_bounds_what_it_allocates_per_expert():
    with pytest.raises(ValueError, match="transition tables"):
        ServiceConfig(num_layers=24, num_experts=2**16, top_k=4)
    ServiceConfig(num_layers=24, num_experts=2**16, top_k=4, policy="lru")
    with pytest.raises(ValueError, match="num_experts"):
        ServiceConfig(num_layers=2, num_experts=2**24, top_k=4, policy="lru")
    with pytest.raises(ValueError, match="max_window_bytes"):
        ServiceConfig(num_layers=2, num_experts=8, top_k=2, max_window_bytes=100)

"""Per-layer streaming: the prefetch node's body (no Ray), its socket, the engine's side, one
stream through Ray, and ``moeray replay --realtime``.

Timeliness is asserted without timing: a stream whose sender waits for the node's pages
(``settle``) must find every prefetched expert resident at use, and a stream that never reaches
the node must find them cold (the measurement can fail)."""

from __future__ import annotations

import socket
import time
from dataclasses import replace

import numpy as np
import pytest

from moeray.actors.channel import (
    ChannelClient,
    RouteMessage,
    decode_message,
    encode_message,
)
from moeray.actors.prefetch_node import PrefetchNode, check_checkpoint
from moeray.cli import main
from moeray.engine.session import EngineSession
from moeray.engine.stream import CheckpointReader, StreamingSession
from moeray.replay.config import ReplayConfig
from moeray.replay.inprocess import service_config_for
from moeray.shards.store import ShardStore
from moeray.shards.synth import ModelShape, SynthConfig, write_checkpoint
from moeray.traces import default_trace_path, load_trace

LAYERS, EXPERTS = 24, 32  # the bundled trace's shape


@pytest.fixture(scope="module")
def trace():
    return load_trace(default_trace_path()).head(12)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The bundled trace's shape, experts of 24 KiB (BF16 64 x 64: each tensor has an interior
    page, so a neighbour's read never makes an expert look resident); 18 MiB."""
    out = tmp_path_factory.mktemp("ckpt")
    shape = ModelShape("tiny", "mlp", LAYERS, EXPERTS, 64, 64)
    write_checkpoint(SynthConfig(shape, LAYERS), out, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """2 layers of 32 experts of 384 bytes."""
    out = tmp_path_factory.mktemp("small")
    write_checkpoint(SynthConfig(ModelShape("t", "mlp", 2, EXPERTS, 8, 8), 2), out, progress=False)
    return str(out)


@pytest.fixture
def node(checkpoint):
    node = PrefetchNode(checkpoint, LAYERS, EXPERTS)
    yield node
    node.close()


@pytest.fixture
def reader(checkpoint):
    reader = CheckpointReader(checkpoint, LAYERS, EXPERTS)
    yield reader
    reader.close()


def message(layer, batch=0, load=(), prefetch=(), evict=(), prefetch_evict=(), sent_ns=0):
    return RouteMessage(layer, batch, load, prefetch, evict, prefetch_evict, sent_ns)


# ---------------------------------------------------------------------- the node's body


def test_a_new_node_starts_cold(node, reader):
    reader.drop_page_cache()
    assert reader.resident_total() == 0
    assert not any(reader.resident(layer, e) for layer in range(LAYERS) for e in range(EXPERTS))


def test_load_and_prefetch_page_in_at_once(node, reader):
    node.on_route(message(3, load=(1, 5), prefetch=(2,)))
    node.settle()
    assert node.resident_experts(3) == [1, 5]
    assert node.resident_experts(4) == [2]
    assert reader.resident(3, 1) and reader.resident(3, 5) and reader.resident(4, 2)
    assert not reader.resident(3, 2) and not reader.resident(4, 1)
    s = node.stats()
    assert (s.messages, s.rejected, s.experts_told, s.experts_released) == (1, 0, 3, 0)
    assert s.bytes_populated >= 3 * 3 * 64 * 64 * 2


def test_evictions_wait_for_the_next_message(node, reader):
    node.on_route(message(0, load=(1, 2, 3), prefetch=(7,)))
    node.on_route(message(0, evict=(1, 2), prefetch_evict=(7,)))
    node.settle()
    # the engine has not run layer 0 yet: nothing freed
    assert node.resident_experts(0) == [1, 2, 3] and node.resident_experts(1) == [7]
    # layer 1 is routed, so layer 0 ran: its evictions go, but not one asked for again
    node.on_route(message(1, load=(7,)))
    node.settle()
    assert node.resident_experts(0) == [3]
    assert node.resident_experts(1) == [7]
    assert not reader.resident(0, 1) and not reader.resident(0, 2) and reader.resident(1, 7)
    node.flush()
    assert node.stats().experts_released == 2


def test_latency_is_send_to_prefetcher_told_on_the_given_clock(small_checkpoint):
    ticks = iter([5_000, 9_000, 20_000])
    # a node on a fake clock: the latency is the clock after telling minus sent_ns
    node = PrefetchNode(small_checkpoint, 2, EXPERTS, clock=lambda: next(ticks))
    try:
        node.on_route(message(0, load=(1,), sent_ns=4_000))  # 1 us
        node.on_route(message(0, sent_ns=6_000))  # 3 us
        node.on_route(message(0, sent_ns=0))  # 20 us
        s = node.stats()
        assert s.samples == 3
        assert s.latency_p50_us == pytest.approx(3.0)
        assert s.latency_max_us == pytest.approx(20.0)
        node.reset_stats()
        assert node.stats().samples == 0 and node.stats().latency_p50_us is None
    finally:
        node.close()


@pytest.mark.parametrize(
    "bad, field",
    [
        (message(24), "layer"),
        (message(-1), "layer"),
        (message(0, load=(32,)), "load"),
        (message(0, prefetch=(-1,)), "prefetch"),
        (message(23, prefetch=(1,)), "prefetch"),  # the last layer has no next one
        (message(0, evict=(True,)), "evict"),
        (message(0, load=[1]), "load"),
        (message(0, sent_ns=1.5), "sent_ns"),
        ("layer 0", "message"),
    ],
)
def test_a_bad_message_is_counted_and_changes_nothing(node, bad, field):
    node.on_route(bad)
    s = node.stats()
    assert (s.messages, s.rejected, s.experts_told) == (0, 1, 0)
    assert s.last_error.startswith(f"{field}:") and "\n" not in s.last_error
    assert node.received() == 1
    assert all(node.resident_experts(layer) == [] for layer in range(LAYERS))


def test_a_checkpoint_that_does_not_fit_the_routing_is_refused(checkpoint):
    with ShardStore(checkpoint) as store:
        with pytest.raises(ValueError, match="^shards: .* 24 MoE layers, the routing 25$"):
            check_checkpoint(store, 25, EXPERTS)
        with pytest.raises(ValueError, match="^shards: .* 32 experts, the routing 64"):
            check_checkpoint(store, LAYERS, 64)
    with pytest.raises(ValueError, match="^shards: "):
        CheckpointReader(checkpoint, LAYERS, 16)
    with pytest.raises(ValueError, match="^shards: "):
        PrefetchNode(checkpoint, 30, EXPERTS)


# ---------------------------------------------------------------------- the socket


def test_frames_round_trip():
    m = RouteMessage(7, 123456789, (0, 31), (4,), (), (1, 2, 3), time.monotonic_ns())
    frame = encode_message(m)
    assert int.from_bytes(frame[:4], "little") == len(frame) - 4
    assert decode_message(frame[4:]) == m
    with pytest.raises(ValueError, match="^frame: "):
        decode_message(frame[4:-4])
    with pytest.raises(ValueError, match="^frame: "):
        decode_message(b"\0" * 5)


def test_the_socket_delivers_in_order_to_one_engine(node):
    client = ChannelClient(node.listen())
    try:
        client.send(message(0, load=(1,), sent_ns=time.monotonic_ns()))
        client.send(message(0, load=(2,), evict=(1,), sent_ns=time.monotonic_ns()))
        client.send(message(1, load=(3,), sent_ns=time.monotonic_ns()))
        _poll(lambda: node.received() == 3)
        assert node.resident_experts(0) == [2] and node.resident_experts(1) == [3]
        s = node.stats()
        assert s.messages == 3 and s.samples == 3 and s.latency_p50_us > 0
        # a second engine is refused: its connection is closed at once
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.connect(node.listen())
        other.settimeout(10)
        assert other.recv(1) == b""
        other.close()
        # a frame that does not decode is counted, and ends the stream
        client._socket.sendall((8).to_bytes(4, "little") + b"\0" * 8)
        _poll(lambda: node.received() == 4)
        assert node.stats().rejected == 1 and node.stats().last_error.startswith("frame:")
    finally:
        client.close()


# ---------------------------------------------------------------------- the engine's side


def _config(trace, policy):
    return service_config_for(trace, ReplayConfig(capacity=8, policies=(policy,)), policy)


def _pace(trace, streaming):
    for t in range(trace.num_tokens):
        for layer in range(LAYERS):
            streaming.route(layer, trace.expert_ids[t, layer][None])
            streaming.use(layer, trace.expert_ids[t, layer])


def test_messages_are_the_plans(trace, checkpoint):
    sent = []
    streaming = StreamingSession(EngineSession(_config(trace, "moeray")), sent.append)
    twin = EngineSession(_config(trace, "moeray"))
    for t in range(trace.num_tokens):
        for layer in range(LAYERS):
            plan = streaming.route(layer, trace.expert_ids[t, layer][None])
            expected = twin.route(layer, trace.expert_ids[t, layer][None])
            m = sent[-1]
            assert (m.layer, m.batch) == (layer, t)
            for name in ("load", "prefetch", "evict", "prefetch_evict"):
                assert getattr(m, name) == tuple(getattr(plan, name).tolist())
                assert np.array_equal(getattr(plan, name), getattr(expected, name))
    assert len(sent) == trace.num_tokens * LAYERS and streaming.batch == trace.num_tokens
    assert any(m.prefetch for m in sent)  # the predictive policy prefetches
    with pytest.raises(ValueError, match="^layer: "):
        streaming.route(5, trace.expert_ids[0, 5][None])
    assert len(sent) == trace.num_tokens * LAYERS  # nothing sent for a refused route
    with pytest.raises(ValueError, match="^reader: "):
        streaming.use(0, [1])


def test_prefetches_the_node_finished_are_resident_at_use(trace, node, reader):
    def send(m):  # the node pages in before the engine goes on: never late
        node.on_route(m)
        node.settle()

    streaming = StreamingSession(EngineSession(_config(trace, "moeray")), send, reader)
    _pace(trace, streaming)
    u = streaming.uses
    assert u.prefetched > 0
    assert u.late_prefetches == 0 and u.prefetched_in_time == 1.0
    assert u.loaded_resident == u.loaded > 0
    assert u.prefetched + u.loaded + u.other == trace.num_tokens * LAYERS * trace.top_k
    assert u.bytes_read >= (u.prefetched + u.loaded + u.other) * 3 * 64 * 64 * 2


def test_prefetches_the_node_never_started_are_late(trace, node, reader):
    def send(m):  # the node frees what the plans evict, and never pages anything in
        node.on_route(replace(m, load=(), prefetch=()))
        node.settle()  # its frees done

    streaming = StreamingSession(EngineSession(_config(trace, "moeray")), send, reader)
    _pace(trace, streaming)
    u = streaming.uses
    assert u.prefetched > 0 and u.late_prefetches == u.prefetched
    assert u.loaded_resident == 0 < u.loaded


# ---------------------------------------------------------------------- through Ray


def test_a_stream_through_the_prefetch_actor(ray_local, trace, checkpoint, reader):
    from moeray.actors import _ray

    handle = _ray.PrefetchNodeHandle(checkpoint, LAYERS, EXPERTS, timeout_s=30)
    try:
        streaming = StreamingSession(EngineSession(_config(trace, "lru")), handle.on_route)
        for layer in range(LAYERS):
            plan = streaming.route(layer, trace.expert_ids[0, layer][None])
        handle.settle()
        s = handle.stats()
        assert (s.messages, s.rejected, s.samples) == (LAYERS, 0, LAYERS)
        assert s.experts_told > 0 and s.latency_p99_us is not None
        assert all(reader.resident(LAYERS - 1, e) for e in plan.load.tolist())
    finally:
        handle.close()
    with pytest.raises(ray_local.exceptions.RayActorError):  # a bad checkpoint, at creation
        _ray.PrefetchNodeHandle(checkpoint, 30, EXPERTS, timeout_s=30)


def test_cli_realtime_through_the_prefetch_actor(ray_local, checkpoint, capsys):
    argv = ["replay", "--realtime", "0", "--tokens", "2", "--policy", "lru"]
    assert main([*argv, "--shards", checkpoint]) == 0
    captured = capsys.readouterr()
    assert "prefetch node a Ray actor on this node" in captured.err
    assert "route-to-prefetch-start over 48 messages" in captured.out


# ---------------------------------------------------------------------- the CLI


def test_cli_realtime_reports_observed_beside_in_process(checkpoint, capsys):
    argv = ["replay", "--realtime", "0.5", "--backend", "local", "--tokens", "4"]
    assert main([*argv, "--shards", checkpoint]) == 0
    out = capsys.readouterr().out
    assert "policy moeray, 4 tokens x 24 layers at 0.5 ms" in out
    assert "late prefetches (not resident)" in out
    assert "route-to-prefetch-start over 96 messages: p50 " in out


def test_cli_realtime_synthesises_a_cold_checkpoint(capsys, tmp_path):
    argv = ["replay", "--realtime", "0", "--backend", "local", "--tokens", "2", "--policy", "lru"]
    assert main([*argv, "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "synthesised a checkpoint of 72.2 MiB" in captured.err
    assert "(synthesised, 72.0 MiB, 0.0 MiB resident at the start)" in captured.out
    assert '"prefetched_in_time"' in (tmp_path / "r.json").read_text()


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--realtime", "-1"], "--realtime"),
        (["--realtime", "nan"], "--realtime"),
        (["--realtime", "1", "--policy", "belady"], "--policy"),
        (["--realtime", "1", "--policy", "lru", "--policy", "moeray"], "--policy"),
    ],
)
def test_cli_realtime_bad_input(extra, field, checkpoint, capsys):
    assert main(["replay", "--backend", "local", "--shards", checkpoint, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moeray replay: error: {field}: ") and "\n" not in err


def test_cli_realtime_shards_that_do_not_fit_the_trace(small_checkpoint, capsys):
    argv = ["replay", "--realtime", "1", "--backend", "local", "--shards", small_checkpoint]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeray replay: error: shards: ") and "2 MoE layers" in err
    assert "\n" not in err


# ---------------------------------------------------------------------- helpers


def _poll(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_a_free_asked_back_before_it_ran_is_cancelled():
    import threading

    from moeray.actors.prefetch_node import _Freer

    gate, released = threading.Event(), []

    class Core:
        def release(self, e):
            gate.wait(20)
            released.append(e)

    freer = _Freer([Core()])
    try:
        freer.free(0, 1)
        _poll(lambda: freer._running == (0, 1))  # blocked in its release
        freer.free(0, 2)
        freer.free(0, 3)
        freer.cancel(0, 2)  # not run yet: taken back
        gate.set()
        freer.cancel(0, 1)  # running: waits for it
        assert released[:1] == [1]
        freer.drain()
        assert released == [1, 3]
    finally:
        gate.set()
        freer.close()

"""The service on a real local Ray: start / connect / shutdown, replay parity with the
in-process path, a layer actor killed mid-replay, bad input that must not hurt the service."""

from __future__ import annotations

import time

import numpy as np
import pytest
from service_helpers import config

from moeray import ExpertCache, ExpertCacheConfig, service
from moeray.traces import default_trace_path, load_trace
from moeray.traces.wire import decode_batches, encode_step


@pytest.fixture(scope="module")
def routing():
    """int32 [24 layers, 2048 tokens, 4] of the bundled gpt-oss-20b slice, and its weights."""
    trace = load_trace(default_trace_path())
    ids = np.ascontiguousarray(trace.expert_ids[:2048].transpose(1, 0, 2), dtype=np.int32)
    return ids, np.ascontiguousarray(trace.weights[:2048].transpose(1, 0, 2))


def in_process_hits(ids, capacity):
    return [int(ExpertCache(32, ExpertCacheConfig(capacity)).access_batch(x).sum()) for x in ids]


def replay(handle, ids, weights, step_tokens=256, on_step=None):
    for i, start in enumerate(range(0, ids.shape[1], step_tokens)):
        handle.submit(ids[:, start : start + step_tokens], weights[:, start : start + step_tokens])
        if on_step:
            on_step(i)


def test_start_connect_replay_shutdown(ray_local, routing):
    ids, weights = routing
    handle = service.start(config("svc-parity"))
    try:
        with pytest.raises(ValueError, match="already runs"):
            service.start(config("svc-parity"))
        other = service.connect("svc-parity")  # as another driver or job would
        assert other.config.num_layers == 24
        replay(handle, ids, weights)
        stats = other.stats()
        assert [s.hits for s in stats.layers] == in_process_hits(ids, 8)
        assert all(s.tokens == ids.shape[1] and s.restarts == 0 for s in stats.layers)
        assert stats.total().hits == sum(in_process_hits(ids, 8))
    finally:
        handle.shutdown()
    with pytest.raises(ValueError, match="no moeray service"):
        service.connect("svc-parity")


def test_layer_actor_killed_mid_replay(ray_local, routing):
    ids, weights = routing
    handle = service.start(config("svc-kill", layers_per_actor=12))
    try:
        victims = handle.layer_actor_handles()

        def kill_second(step):
            if step == 3:
                ray_local.kill(victims[1], no_restart=True)  # layers 12..23

        replay(handle, ids, weights, on_step=kill_second)
        stats = handle.stats()
        expected = in_process_hits(ids, 8)
        for s in stats.layers:
            assert s.tokens == ids.shape[1], f"layer {s.layer} lost or repeated routing"
            assert s.hits + s.stalls == ids.shape[1] * 4
            if s.layer < 12:
                assert s.restarts == 0 and s.hits == expected[s.layer]
            else:
                assert s.restarts >= 1 and s.hits <= expected[s.layer]
    finally:
        handle.shutdown()


def test_bad_input_fails_for_its_caller_only(ray_local, routing):
    ids, weights = routing
    handle = service.start(config("svc-bad", window_steps=1))
    try:
        handle.submit(ids[:, :1024], weights[:, :1024])
        bad_steps = [
            (ids[:5, :8], weights[:5, :8], ValueError),  # wrong number of layers
            (np.where(ids[:, :8] == 1, 99, ids[:, :8]), weights[:, :8], ValueError),  # id range
            (ids[:, :8], np.full(ids[:, :8].shape, np.nan, np.float32), ValueError),  # NaN
            (ids[:, :8].astype(np.float64), weights[:, :8], TypeError),  # dtype
        ]
        for bad_ids, bad_weights, error in bad_steps:
            with pytest.raises(error):
                handle.submit(bad_ids, bad_weights)
        with pytest.raises(Exception, match="msgpack|step"):
            handle.submit_msgpack(b"\xc1 not msgpack")
        reply = decode_batches(
            handle.submit_msgpack(encode_step(ids[:, 1024:1100], weights[:, 1024:1100]))
        )
        assert len(reply) == 24 and int(reply[0].counts().sum()) == 76 * 4
        handle.submit(ids[:, 1100:], weights[:, 1100:])
        stats = handle.stats()
        assert [s.hits for s in stats.layers] == in_process_hits(ids, 8)
    finally:
        handle.shutdown()


def test_cli_replay_through_the_service_matches_local(ray_local, tmp_path, capsys):
    """`moeray replay` (service backend, the default) reports the in-process hit rates."""
    import json

    from moeray import cli
    from moeray.replay import ReplayConfig, replay_trace

    trace = load_trace(default_trace_path())
    small = tmp_path / "small.npz"
    np.savez(
        small,
        expert_ids=trace.expert_ids[:1500, :6],
        expert_probs=trace.weights[:1500, :6],
        num_experts=np.array(32),
    )
    out = tmp_path / "service.json"
    argv = [
        "replay",
        str(small),
        "--policy",
        "lru",
        "--policy",
        "affinity-lru",
        "--policy",
        "belady",
        "--layers-per-actor",
        "3",
        "--json",
        str(out),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "service throughput" in printed and "tokens/s" in printed
    document = json.loads(out.read_text())
    local = replay_trace(
        load_trace(small), ReplayConfig(capacity=8, policies=("lru", "affinity-lru", "belady"))
    )
    for name, result in local.results.items():
        assert document["policies"][name]["per_layer_hit_rate"] == pytest.approx(
            result.per_layer_hit_rate, abs=0
        )
    assert set(document["service"]) == {"lru", "affinity-lru"}


# The driver of the metrics test, run as its own process: every Ray process gives the node's
# metrics agent 30 one-second health checks when it starts and then drops its metrics for good
# (Ray's kMetricAgentInitMaxRetries). On a loaded 2-core VM the agent can answer later than that
# for the processes started with the session's Ray (this driver included), so the metrics test
# starts a fresh driver, and with it fresh layer actors, once the agent answers.
METRICS_DRIVER = r"""
import json, re, sys, time, urllib.request
import numpy as np
import ray
from moeray import service
from moeray.traces import default_trace_path, load_trace

address, url, name = sys.argv[1], sys.argv[2], sys.argv[3]
ray.init(address=address, log_to_driver=False, logging_level="ERROR")
trace = load_trace(default_trace_path())
ids = np.ascontiguousarray(trace.expert_ids[:1024].transpose(1, 0, 2), dtype=np.int32)
weights = np.ascontiguousarray(trace.weights[:1024].transpose(1, 0, 2))
handle = service.start(service.ServiceConfig(num_layers=24, num_experts=32, top_k=4, capacity=8,
                                             layers_per_actor=12, window_steps=4, name=name))


def value(text, metric, layer):
    pattern = rf'^{metric}\{{[^}}]*layer="{layer}"[^}}]*service="{name}"[^}}]*\}} (\S+)$'
    alt = rf'^{metric}\{{[^}}]*service="{name}"[^}}]*layer="{layer}"[^}}]*\}} (\S+)$'
    found = re.findall(pattern, text, re.M) + re.findall(alt, text, re.M)
    return sum(float(v) for v in found) if found else None


try:
    for start in range(0, ids.shape[1], 256):
        handle.submit(ids[:, start:start + 256], weights[:, start:start + 256])
    stats = handle.stats()
    expected = {layer: [stats.layers[layer].hits, stats.layers[layer].stalls,
                        stats.layers[layer].stalls + stats.layers[layer].prefetches] for layer in (0, 23)}
    # scrape while the service runs: a layer actor's last second of counts leaves with it
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
        except OSError:  # the endpoint is busy on a loaded machine: poll again
            text = ""
        got = {layer: [value(text, f"ray_moeray_{n}", layer)
                       for n in ("cache_hits_total", "cache_stalls_total", "transfers_total")]
               for layer in expected}
        latency = bool(re.search(
            rf'^ray_moeray_submit_latency_ms_count\{{[^}}]*service="{name}"', text, re.M))
        if (got == expected and latency) or time.monotonic() > deadline:
            break
        time.sleep(2)  # each scrape makes the agent render ~0.5 MB: don't starve it
finally:
    handle.shutdown()
print(json.dumps({"expected": expected, "got": got, "latency_seen": latency}))
"""


def _wait_for_metrics_agent(url: str, timeout_s: float) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10):
                return
        except OSError:
            assert time.monotonic() < deadline, f"the node's metrics endpoint {url} never answered"
            time.sleep(1)


def test_metrics_reach_the_nodes_prometheus_endpoint(ray_local, tmp_path):
    """Per-layer counters and the submit-latency histogram, read back from the metrics port."""
    import json
    import subprocess
    import sys

    url = ray_local.moeray_test_metrics_url
    _wait_for_metrics_agent(url, timeout_s=180)
    address = ray_local.get_runtime_context().gcs_address
    # A Ray process that cannot reach the node's metrics agent in its first 30 health checks
    # drops its metrics for good (kMetricAgentInitMaxRetries); on a loaded 2-core VM that can
    # befall the coordinator's process. Then not one moeray counter reaches the endpoint, and
    # a second service (fresh processes) is tried once. Any counter that does arrive must match.
    for attempt in range(2):
        run = subprocess.run(
            [sys.executable, "-c", METRICS_DRIVER, address, url, f"svc-metrics-{attempt}"],
            capture_output=True,
            text=True,
            timeout=400,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        if any(v is not None for values in result["got"].values() for v in values):
            break
    assert result["got"] == result["expected"], "metrics never matched the service's own stats"
    assert result["latency_seen"], "no submit-latency histogram for svc-metrics"
    # the counters are the layers' real counts, not zeros that happen to agree
    assert all(hits > 0 and misses > 0 for hits, misses, _ in result["expected"].values())


def test_layer_actors_keep_the_hot_sets_resident_in_real_bytes(ray_local, tmp_path):
    """With shards, the layer actors move the checkpoint's bytes, under a demand policy and
    under moeray: every expert the hot sets took in was populated, and no reading of a layer's
    shard exceeds capacity plus one expert."""
    from moeray.replay import ReplayConfig, replay_trace
    from moeray.replay.service import replay_through_service
    from moeray.shards import ShardStore
    from moeray.shards.synth import MODEL_SHAPES, SynthConfig, write_checkpoint
    from moeray.traces import Trace

    write_checkpoint(
        SynthConfig(MODEL_SHAPES["gpt-oss-20b"].scaled(8), num_layers=2), tmp_path, progress=False
    )
    with ShardStore(tmp_path) as store:
        expert = store.expert_bytes(store.layers[0], 0)
    full = load_trace(default_trace_path())
    trace = Trace(
        full.expert_ids[:256, :2],
        full.weights[:256, :2],
        np.array([0, 256]),
        full.num_experts,
        "head",
    )
    config = ReplayConfig(capacity=8, policies=("lru", "moeray"))  # a demand policy, moeray
    report, _ = replay_through_service(
        trace, config, step_tokens=16, window_steps=1, layers_per_actor=2, shards=str(tmp_path)
    )
    local = replay_trace(trace, config)
    for name in config.policies:
        assert report.results[name].per_layer_hits == local.results[name].per_layer_hits, name
        shards = report.shards[name]
        assert shards.capacity_bytes == (8 * expert,) * 2
        # the prefetcher populates whole experts; a window's admissions are queued to it
        assert all(moved % expert == 0 for moved in shards.bytes_moved)
        assert all(0 < cold for cold in shards.cold_reads)
        assert shards.over_bound() == [], (name, shards.resident_bytes_max)
        # stats() waits for the prefetches in flight: at least the last hot set's bytes moved
        # and were read resident. (How many more bytes move depends on timing: the native
        # prefetcher works behind the windows, and a prefetch a later window releases before
        # its thread gets there moves none.)
        assert all(moved >= 8 * expert for moved in shards.bytes_moved), (name, shards.bytes_moved)
        assert all(r >= 8 * expert for r in shards.resident_bytes_max), name
    # the whole replay in one window per layer: nothing after it to take a reading, but stats()
    # still counts the bytes its prefetches moved
    one, _ = replay_through_service(
        trace,
        ReplayConfig(capacity=8, policies=("moeray",)),
        step_tokens=256,
        window_steps=1,
        layers_per_actor=2,
        shards=str(tmp_path),
    )
    assert all(moved >= 8 * expert for moved in one.shards["moeray"].bytes_moved)
    assert all(r >= 8 * expert for r in one.shards["moeray"].resident_bytes_max)


def test_window_ms_timer_sends_a_window_no_submit_closes(monkeypatch):
    """A handle's window_ms closes its window by a wake-up: an engine that pauses after one
    step still has its routing sent (a fake coordinator records what reaches it; a fake clock
    and wake-up stand in for time and threads; no Ray)."""
    from moeray.actors import _ray
    from moeray.service import ServiceConfig, ServiceHandle

    received = []
    now = [0.0]
    wakeups = []  # (seconds, callback) as armed
    monkeypatch.setattr(_ray, "ready", lambda ref: False)  # no answer comes back

    class FakeMethod:
        def remote(self, routing, steps, close_window, starts, hints, client, seq):
            assert starts is None and hints is None  # none submitted
            assert seq == len(received) + 1  # the handle numbers its windows
            received.append((routing.copy(), steps, close_window))
            return object()

    coordinator = type("FakeCoordinator", (), {"add_routing": FakeMethod()})()
    config = ServiceConfig(
        num_layers=2, num_experts=8, top_k=2, capacity=4, window_steps=1000, window_ms=50.0
    )
    handle = ServiceHandle(
        coordinator,
        config,
        timer=lambda: now[0],
        wake_after=lambda seconds, callback: wakeups.append((seconds, callback)),
    )
    ids = np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]], dtype=np.int32)  # [layers, T=2, k]
    handle.submit(ids)
    assert received == []  # the window is open: 1 of 1,000 steps, younger than 50 ms
    assert [seconds for seconds, _ in wakeups] == [0.05]  # and a wake-up is armed for it
    now[0] = 0.05
    wakeups[0][1]()  # 50 ms later, no submit came: the wake-up sends the window
    routing, steps, close_window = received[0]
    assert steps == 1 and close_window and np.array_equal(routing, ids)
    # the next window gets its own wake-up and carries both steps submitted while it was open
    handle.submit(ids)
    handle.submit(ids)
    assert len(wakeups) == 2 and len(received) == 1
    wakeups[0][1]()  # the first window's wake-up again: that window is gone, nothing is sent
    assert len(received) == 1
    now[0] = 0.2
    wakeups[1][1]()
    assert len(received) == 2 and received[1][1] == 2
    # a submit that finds its window window_ms old sends it at once, wake-up or not
    handle.submit(ids)
    now[0] = 0.3
    handle.submit(ids)
    assert len(received) == 3 and received[2][1] == 2


def test_a_service_with_expert_placement_publishes_versions(ray_local, routing):
    """Placement on: a few windows of the bundled trace, and the handle reads the placement the
    coordinator's worker thread published (polled with a deadline), as Python and as msgpack."""
    from moeray.placement.balancer import PlacementConfig, decode_placement

    ids, weights = routing
    placement_config = PlacementConfig(gpus=8, every_tokens=1024)
    handle = service.start(
        config("svc-placement", window_steps=1, expert_placement=placement_config)
    )
    try:
        assert handle.placement() == (None, 0)
        assert decode_placement(handle.placement_msgpack()) is None
        replay(handle, ids[:, :1024], weights[:, :1024], step_tokens=512)
        placement, version = handle.wait_placement(0, timeout_s=120)
        assert version == placement.version >= 1
        assert placement.physical_to_logical.shape == (24, 48)  # 32 experts + 16 redundant
        assert (placement.replica_counts >= 1).all()
        replay(handle, ids[:, 1024:2048], weights[:, 1024:2048], step_tokens=512)
        stats = handle.stats()
        deadline = time.monotonic() + 120
        while stats.expert_placement.windows < 2 and time.monotonic() < deadline:
            stats = handle.stats()  # the second load window is planned off the submit path
        assert stats.expert_placement.windows == 2 and stats.expert_placement.errors == 0
        latest, latest_version = handle.placement()
        assert latest_version == stats.expert_placement.version >= version
        assert len(stats.expert_placement.realised_balancedness) == 24
        decoded = decode_placement(handle.placement_msgpack())
        assert decoded.version == latest_version
        assert np.array_equal(decoded.physical_to_logical, latest.physical_to_logical)
        assert decode_placement(handle.placement_msgpack(after_version=latest_version)) is None
        assert handle.wait_placement(latest_version, timeout_s=0.2) is None
        assert handle.layer_actor_resources() == [None, None]
    finally:
        handle.shutdown()

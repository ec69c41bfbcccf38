"""The service on a real local Ray: start / connect / shutdown, replay parity with the
in-process path, a layer actor killed mid-replay, bad input that must not hurt the service."""

from __future__ import annotations

import numpy as np
import pytest

from moeray import ExpertCache, ExpertCacheConfig, service
from moeray.traces import default_trace_path, load_trace
from moeray.wire import decode_batches, encode_step


@pytest.fixture(scope="module")
def routing():
    """int32 [24 layers, 2048 tokens, 4] of the bundled gpt-oss-20b slice, and its weights."""
    trace = load_trace(default_trace_path())
    ids = np.ascontiguousarray(trace.expert_ids[:2048].transpose(1, 0, 2), dtype=np.int32)
    return ids, np.ascontiguousarray(trace.weights[:2048].transpose(1, 0, 2))


def in_process_hits(ids, capacity):
    return [int(ExpertCache(32, ExpertCacheConfig(capacity)).access_batch(x).sum()) for x in ids]


def config(name, **kw):
    base = dict(num_layers=24, num_experts=32, top_k=4, capacity=8, layers_per_actor=12,
                window_steps=2, name=name)
    base.update(kw)
    return service.ServiceConfig(**base)


def replay(handle, ids, weights, step_tokens=256, on_step=None):
    for i, start in enumerate(range(0, ids.shape[1], step_tokens)):
        handle.submit(ids[:, start:start + step_tokens], weights[:, start:start + step_tokens])
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
            assert s.hits + s.misses == ids.shape[1] * 4
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
        reply = decode_batches(handle.submit_msgpack(encode_step(ids[:, 1024:1100], weights[:, 1024:1100])))
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
    np.savez(small, expert_ids=trace.expert_ids[:1500, :6], expert_probs=trace.weights[:1500, :6],
             num_experts=np.array(32))
    out = tmp_path / "service.json"
    argv = ["replay", str(small), "--policy", "lru", "--policy", "affinity-lru", "--policy", "belady",
            "--layers-per-actor", "3", "--json", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "service throughput" in printed and "tokens/s" in printed
    document = json.loads(out.read_text())
    local = replay_trace(load_trace(small), ReplayConfig(capacity=8, policies=("lru", "affinity-lru", "belady")))
    for name, result in local.results.items():
        assert document["policies"][name]["per_layer_hit_rate"] == pytest.approx(result.per_layer_hit_rate, abs=0)
    assert set(document["service"]) == {"lru", "affinity-lru"}


def test_metrics_reach_the_nodes_prometheus_endpoint(ray_local, routing):
    """Per-layer counters and the submit-latency histogram, read back from the metrics port."""
    import re
    import time
    import urllib.request

    ids, weights = routing
    handle = service.start(config("svc-metrics", window_steps=4))
    try:
        replay(handle, ids[:, :1024], weights[:, :1024])
        stats = handle.stats()
    finally:
        handle.shutdown()
    want = {layer: stats.layers[layer] for layer in (0, 23)}

    def scrape() -> str:
        try:
            with urllib.request.urlopen(ray_local.moeray_test_metrics_url, timeout=10) as response:
                return response.read().decode()
        except OSError:  # the endpoint is busy on a loaded machine: poll again
            return ""

    def value(text: str, name: str, layer: int) -> float | None:
        pattern = rf'^{name}\{{[^}}]*layer="{layer}"[^}}]*service="svc-metrics"[^}}]*\}} (\S+)$'
        alt = rf'^{name}\{{[^}}]*service="svc-metrics"[^}}]*layer="{layer}"[^}}]*\}} (\S+)$'
        found = re.findall(pattern, text, re.M) + re.findall(alt, text, re.M)
        return sum(float(v) for v in found) if found else None

    deadline = time.monotonic() + 180
    while True:
        text = scrape()
        got = {layer: (value(text, "ray_moeray_cache_hits_total", layer),
                       value(text, "ray_moeray_cache_misses_total", layer),
                       value(text, "ray_moeray_transfers_total", layer)) for layer in want}
        expected = {layer: (s.hits, s.misses, s.misses + s.prefetches) for layer, s in want.items()}
        latency_seen = re.search(r'^ray_moeray_submit_latency_ms_count\{[^}]*service="svc-metrics"', text, re.M)
        if got == expected and latency_seen:
            break
        assert time.monotonic() < deadline, f"metrics never matched: {got} != {expected}"
        time.sleep(0.5)

"""A service whose coordinator dies, on a real local Ray: nothing lost or counted twice, and a
service that can always be shut down and started again.

The coordinator is SIGKILLed (by its pid) or killed through Ray mid-stream; Ray restarts it,
it rebuilds itself from the layer actors, and the handle resends its journal. The counts must
equal the in-process replay of the same steps (``replay_steps``): the layer actors kept their
state, so a coordinator's death changes no decision.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from moeray import service
from moeray.actors import _ray
from moeray.replay.inprocess import replay_steps
from moeray.traces import default_trace_path, load_trace


@pytest.fixture(scope="module")
def routing():
    """int32 [24 layers, 2048 tokens, 4] of the bundled gpt-oss-20b slice."""
    trace = load_trace(default_trace_path())
    return np.ascontiguousarray(trace.expert_ids[:2048].transpose(1, 0, 2), dtype=np.int32)


def config(name, **kw):
    base = dict(
        num_layers=24,
        num_experts=32,
        top_k=4,
        capacity=8,
        policy="lru",
        layers_per_actor=12,
        window_steps=2,
        name=name,
    )
    base.update(kw)
    return service.ServiceConfig(**base)


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

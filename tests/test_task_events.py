"""A service's actor calls leave no Ray task events in the GCS.

Ray stores one task event per actor call in the GCS; at a service's call rate its memory grew by
22-98 MiB/min (RAY-NOTES.md, benchmarks/bench_soak.py). The coordinator and layer actors are
created with task events off, which holds for calls through any handle: the creating driver's,
one found by name, and the coordinator's own calls to its layer actors.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from moeray import service
from moeray.actors import _ray

SERVICE = "svc-task-events"


@pytest.mark.skipif(
    os.environ.get("MOERAY_TASK_EVENTS") == "1", reason="task events turned on for debugging"
)
def test_service_calls_record_no_task_events(ray_local):
    ray = ray_local
    from ray._private.state import state  # the GCS's own store: no dashboard needed

    class Probe:  # local: pickled by value, this module stays here
        def noop(self) -> None:
            return None

    def call_probe(_actor, probe) -> None:  # runs in a service actor's process
        import ray

        ray.get(probe.noop.remote())

    def task_names() -> list[str]:
        return [e.task_info.name for e in state._get_all_task_events() if e.HasField("task_info")]

    config = service.ServiceConfig(
        num_layers=4,
        num_experts=16,
        top_k=2,
        capacity=4,
        window_steps=1,
        layers_per_actor=2,
        name=SERVICE,
    )
    handle = service.start(config)
    try:
        other = service.connect(SERVICE)  # as another driver finds it
        ids = np.random.default_rng(0).integers(0, 16, size=(4, 32, 2), dtype=np.int32)
        for _ in range(20):
            handle.submit(ids)
            other.submit(ids)
        assert other.stats().layers[0].tokens == 20 * 2 * 32
        # Task events reach the GCS from a buffer in each process. A probe with task events on,
        # called from inside every service actor after the service's calls, shows each buffer
        # has been flushed since: then the service's events would be there too.
        probe = ray.remote(num_cpus=0)(Probe).remote()
        actors = [_ray.get_coordinator(SERVICE, config.namespace), *handle.layer_actor_handles()]
        ray.get([actor.__ray_call__.remote(call_probe, probe) for actor in actors])
        deadline = time.monotonic() + 60
        while (names := task_names()).count("Probe.noop") < len(actors):
            assert time.monotonic() < deadline, f"the probe's task events never came: {names}"
            time.sleep(0.2)
    finally:
        handle.shutdown()
    service_events = [n for n in names if n.startswith(("CoordinatorHost.", "_LayerActor."))]
    assert service_events == []

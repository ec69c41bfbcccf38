"""Placement on a three-node ``ray.cluster_utils.Cluster`` (a head and two expert nodes), and
re-placement after a node is removed. Runs in a subprocess: one driver holds one Ray session,
and the rest of the suite shares another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, os
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from moeray import service

    store = 120 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head": 1}, "object_store_memory": store,
        "include_dashboard": False})
    node_a = cluster.add_node(num_cpus=1, resources={"node_a": 1}, object_store_memory=store)
    node_b = cluster.add_node(num_cpus=1, resources={"node_b": 1}, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    out = {"node_a": node_a.node_id, "node_b": node_b.node_id}
    try:
        config = service.ServiceConfig(num_layers=4, num_experts=16, top_k=2, capacity=4,
                                       placement=("node_a", "node_b", "node_a", "node_b"),
                                       coordinator_placement="head", name="multinode")
        handle = service.start(config)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 16, size=(4, 400, 2)).astype(np.int32)
        weights = np.full(ids.shape, 0.5, np.float32)
        handle.submit(ids[:, :200], weights[:, :200])
        handle.stats()
        out["nodes_before"] = handle.layer_actor_nodes()
        cluster.remove_node(node_a)
        for first in range(200, 400, 50):
            handle.submit(ids[:, first:first + 50], weights[:, first:first + 50])
        stats = handle.stats()
        out["placement_after"] = handle.layer_actor_resources()
        out["nodes_after"] = handle.layer_actor_nodes()
        out["tokens"] = [s.tokens for s in stats.layers]
        out["restarts"] = [s.restarts for s in stats.layers]
        handle.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out))
    """
)


def test_layer_actors_follow_placement_and_move_when_a_node_is_lost():
    env = dict(
        os.environ,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    a, b = out["node_a"], out["node_b"]
    assert out["nodes_before"] == [a, b, a, b]
    # node_a's layers 0 and 2 moved to node_b, the only placement node left
    assert out["placement_after"] == ["node_b"] * 4
    assert out["nodes_after"] == [b] * 4
    assert out["tokens"] == [400] * 4, "routing was lost or counted twice"
    assert out["restarts"][0] >= 1 and out["restarts"][2] >= 1
    assert out["restarts"][1] == out["restarts"][3] == 0

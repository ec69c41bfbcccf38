"""`moeray serve` as a Ray job: a head started with `ray start` on free loopback ports, the
service submitted with `ray job submit`, checked from another driver, then stopped.

Only what the test started is stopped: the head runs as `ray start --block` in its own process
group (its Ray processes share its fate), so a SIGTERM to that group ends this cluster and no
other (never `ray stop`, which kills every Ray process on the host). The drivers run in
subprocesses because this pytest process may already be connected to the session's local Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

SERVICE = {"num_layers": 3, "num_experts": 16, "top_k": 2, "capacity": 4, "window_steps": 1,
           "layers_per_actor": 2, "name": "jobtest"}


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    return env


def _ray_cli() -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _wait_for(what: str, probe, timeout_s: float, head: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head is not None and head.poll() is not None:
            raise AssertionError(f"the Ray head exited ({head.returncode}) while waiting for {what}")
        result = probe()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of this test's own on free loopback ports, with the dashboard (job server)."""
    gcs, dashboard, client, agent_http, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="moeray-job-", dir="/tmp")
    env = _ray_env()
    command = _ray_cli() + [
        "start", "--head", "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        "--min-worker-port=0", "--max-worker-port=0",  # the OS picks: no clash with another Ray
        "--num-cpus=2", f"--object-store-memory={150 * 2**20}",
    ]
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    dashboard_url = f"http://127.0.0.1:{dashboard}"

    def job_server_up():
        try:
            with urllib.request.urlopen(f"{dashboard_url}/api/version", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        _wait_for("the job server", job_server_up, 120, head)
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": dashboard_url, "env": env,
               "log": Path(temp_dir) / "head.log"}
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # this head's process group only
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)  # session logs: 2-15 MB each


def _job(ray_head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["dashboard"])
    return subprocess.run(_ray_cli() + ["job", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _job_status(ray_head, job_id: str) -> str:
    result = _job(ray_head, "status", job_id)
    return result.stdout + result.stderr


_CLIENT = """
import json, sys
import numpy as np
import ray
from moeray import service
from moeray.policy.scheduler import schedule

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
handle = service.connect(sys.argv[2])
steps = np.load(sys.argv[3])
ids, weights = steps["ids"], steps["weights"]
groups = []
for first in range(0, ids.shape[1], 8):
    batches = handle.submit(ids[:, first:first + 8], weights[:, first:first + 8])
    for layer, batch in enumerate(batches):
        expected = schedule(ids[layer, first:first + 8], weights[layer, first:first + 8],
                            handle.config.num_experts)
        groups.append(bool(np.array_equal(batch.offsets, expected.offsets)
                           and np.array_equal(batch.token_indices, expected.token_indices)))
stats = handle.stats()
print(json.dumps({"schedules_match": all(groups),
                  "tokens": [s.tokens for s in stats.layers],
                  "hits": [s.hits for s in stats.layers],
                  "misses": [s.misses for s in stats.layers]}))
ray.shutdown()
"""


def _expected_counts(ids: np.ndarray) -> tuple[list[int], list[int]]:
    """Hits and misses of each layer's LRU cache, replayed in this process."""
    from moeray.policy import EvictionPolicy, ExpertCache, ExpertCacheConfig

    hits, misses = [], []
    for layer in range(ids.shape[0]):
        cache = ExpertCache(SERVICE["num_experts"],
                            ExpertCacheConfig(max_hot_experts=SERVICE["capacity"],
                                              eviction_policy=EvictionPolicy.LRU))
        for token in ids[layer]:
            for expert in token:
                cache.access(int(expert))
        stats = cache.stats()
        hits.append(stats.hits)
        misses.append(stats.misses)
    return hits, misses


@pytest.mark.skipif(
    os.environ.get("MOERAY_JOB_TEST") != "1",
    reason="opt-in (MOERAY_JOB_TEST=1): on a loaded 2-core VM the head's job server sometimes "
    "never registers its agent or drops its connection, which CI cannot tell from a bug",
)
def test_moeray_serve_as_a_ray_job(ray_head, tmp_path):
    config = tmp_path / "service.json"
    config.write_text(json.dumps(SERVICE))
    job_id = f"moeray-serve-test-{os.getpid()}"
    failures = []

    def submit():
        result = _job(ray_head, "submit", "--no-wait", "--submission-id", job_id, "--",
                      sys.executable, "-m", "moeray.cli", "serve", "--config", str(config),
                      "--report-s", "0")
        output = result.stdout + result.stderr
        if result.returncode == 0 or "already exists" in output:  # a retry of one that got in
            return True
        # the job server answers before its agent has registered ("No available agent"), and
        # a loaded machine drops a connection now and then: try again
        failures.append(output[-2000:])
        return None

    try:
        _wait_for("the job server to take the job", submit, 150)
    except AssertionError:
        raise AssertionError("\n---\n".join(failures[-2:])) from None

    rng = np.random.default_rng(7)
    tokens = 40
    ids = np.stack([
        np.stack([rng.choice(SERVICE["num_experts"], SERVICE["top_k"], replace=False)
                  for _ in range(tokens)])
        for _ in range(SERVICE["num_layers"])
    ]).astype(np.int32)
    weights = rng.random(ids.shape, dtype=np.float32)
    steps = tmp_path / "steps.npz"
    np.savez(steps, ids=ids, weights=weights)

    def service_answers():
        if "FAILED" in _job_status(ray_head, job_id):
            raise AssertionError(_job(ray_head, "logs", job_id).stdout)
        result = subprocess.run([sys.executable, "-c", _CLIENT, ray_head["gcs"], SERVICE["name"],
                                 str(steps)], env=ray_head["env"], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)  # workers put the cwd on sys.path
        if result.returncode != 0:
            if "no moeray service" in result.stderr:
                return None  # the job has not started the service yet
            raise AssertionError(result.stderr[-3000:])
        return json.loads(result.stdout.strip().splitlines()[-1])

    try:
        answer = _wait_for("the service to answer", service_answers, 180)
        hits, misses = _expected_counts(ids)
        assert answer["schedules_match"]
        assert answer["tokens"] == [tokens] * SERVICE["num_layers"]
        assert answer["hits"] == hits and answer["misses"] == misses

        status = subprocess.run(
            [sys.executable, "-m", "moeray.cli", "status", "--name", SERVICE["name"],
             "--address", ray_head["gcs"]],
            env=ray_head["env"], capture_output=True, text=True, timeout=120,
        )
        assert status.returncode == 0, status.stderr
        rows = {line.split()[0]: line.split() for line in status.stdout.splitlines() if line.strip()}
        assert rows["all"][2].replace(",", "") == str(sum(hits))
        assert rows["all"][3].replace(",", "") == str(sum(misses))
        assert "RUNNING" in _job_status(ray_head, job_id)  # serve stays up until stopped
    finally:
        stopped = _job(ray_head, "stop", job_id)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    _wait_for("the job to stop", lambda: "RUNNING" not in _job_status(ray_head, job_id), 60)
    logs = _job(ray_head, "logs", job_id).stdout
    assert f"started service {SERVICE['name']!r}" in logs
    # serve shut down the service it started: no coordinator is left to connect to
    gone = subprocess.run([sys.executable, "-m", "moeray.cli", "status", "--name", SERVICE["name"],
                           "--address", ray_head["gcs"]], env=ray_head["env"], capture_output=True,
                          text=True, timeout=120)
    assert gone.returncode == 2 and "no moeray service" in gone.stderr

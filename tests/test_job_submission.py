"""`moeray serve` as a Ray job, the user guide's flow with token auth on: a head started with
`ray start` on free loopback ports under a token of this test's own, the service submitted to
its job server (Ray's ``JobSubmissionClient`` with the token, the REST calls `ray job submit`
makes, without a CLI process per retry), checked from another driver and `moeray status` that
find the token themselves (only ``RAY_AUTH_TOKEN_PATH`` in their environment, as a client that
has the cluster's token file), refused in one line with a wrong token, then stopped.

Only what the test started is stopped: the head runs as `ray start --block` in its own process
group (its Ray processes share its fate), so a SIGTERM to that group ends this cluster and no
other (never `ray stop`, which kills every Ray process on the host). The drivers run in
subprocesses because this pytest process may already be connected to the session's local Ray.
"""

from __future__ import annotations

import json
import os
import secrets
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

SERVICE = {
    "num_layers": 3,
    "num_experts": 16,
    "top_k": 2,
    "capacity": 4,
    "window_steps": 1,
    "layers_per_actor": 2,
    "name": "jobtest",
}


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


def _ray_env(token_path: Path) -> dict[str, str]:
    """The head's environment: loopback only, token auth on with this test's token."""
    env = _client_env(token_path)
    env.update(RAY_AUTH_MODE="token")
    return env


def _client_env(token_path: Path) -> dict[str, str]:
    """A client that holds the cluster's token file but sets no auth mode: moeray's commands
    must turn token auth on themselves, as Ray's CLI does."""
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    return env


def _ray_cli() -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _wait_for(what: str, probe, timeout_s: float, head: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head is not None and head.poll() is not None:
            raise AssertionError(
                f"the Ray head exited ({head.returncode}) while waiting for {what}"
            )
        result = probe()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class _Head:
    """One `ray start --head --block` on free loopback ports, in its own process group."""

    def __init__(self):
        ports = _free_ports(9)
        gcs, dashboard, client, agent_http, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = (
            ports
        )
        self.temp_dir = tempfile.mkdtemp(prefix="moeray-job-", dir="/tmp")
        self.token = secrets.token_hex(32)
        self.token_path = Path(self.temp_dir) / "auth_token"
        self.token_path.write_text(self.token)
        self.env = _ray_env(self.token_path)
        self.gcs = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        self.log_path = Path(self.temp_dir) / "head.log"
        command = _ray_cli() + [
            "start",
            "--head",
            "--block",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={env_agent}",
            f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
            "--min-worker-port=0",
            "--max-worker-port=0",  # the OS picks: no clash with another Ray
            "--num-cpus=2",
            f"--object-store-memory={150 * 2**20}",
        ]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_until_up(self) -> None:
        """Until `ray start` says the node is up and the job server answers. The dashboard can
        answer before the head gives up on a raylet that missed Ray's fixed 30 s registration
        wait, so both are needed."""

        def up():
            if "Ray runtime started" not in self.log_path.read_text(errors="replace"):
                return False
            try:
                request = urllib.request.Request(
                    f"{self.dashboard}/api/version",
                    headers={"Authorization": f"Bearer {self.token}"},  # token auth is on
                )
                with urllib.request.urlopen(request, timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        _wait_for("the Ray head and its job server", up, 240, self.process)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # this head's process group only
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # session logs: 2-15 MB each


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of this test's own, with the dashboard (job server); a head that timed out
    during startup on a loaded machine is replaced once by a fresh one."""
    head = _Head()
    try:
        head.wait_until_up()
    except AssertionError as exc:
        if "timed out during startup" not in head.log_path.read_text(errors="replace"):
            head.stop()
            raise AssertionError(f"{exc}: {head.log_path.read_text()[-2000:]}") from None
        head.stop()
        head = _Head()
        head.wait_until_up()
    try:
        yield {
            "gcs": head.gcs,
            "dashboard": head.dashboard,
            "env": _client_env(head.token_path),
            "token": head.token,
            "log": head.log_path,
            "logs": Path(head.temp_dir) / "session_latest" / "logs",
        }
    finally:
        head.stop()


def _retry(what: str, call, timeout_s: float = 300):
    """call() until it returns, retrying what a loaded machine's job server does now and then:
    refuse a connection, or answer before its agent has registered ("No available agent")."""
    failures = []

    def attempt():
        try:
            return (call(),)
        except (OSError, RuntimeError) as exc:  # requests errors are OSErrors
            failures.append(repr(exc)[-500:])
            return None

    try:
        return _wait_for(what, attempt, timeout_s)[0]
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last errors: {failures[-2:]}") from None


def _client(ray_head):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {ray_head['token']}"}
    return _retry(
        "the job server", lambda: JobSubmissionClient(ray_head["dashboard"], headers=headers)
    )


_CLIENT = """
import json, sys
import numpy as np
from moeray import service
from moeray.policy.scheduler import schedule

session = service.session(sys.argv[1])  # finds the token: the user guide's flow
session.__enter__()
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
                  "stalls": [s.stalls for s in stats.layers]}))
session.__exit__(None, None, None)
"""


def _moeray_status(ray_head, cwd: Path, env: dict[str, str] | None = None):
    """`moeray status` of the test's service on the head, as a client holding its token file."""
    return subprocess.run(
        [sys.executable, "-m", "moeray.cli", "status", "--name", SERVICE["name"]]
        + ["--address", ray_head["gcs"]],
        env=ray_head["env"] if env is None else env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
    )


def _expected_counts(ids: np.ndarray) -> tuple[list[int], list[int]]:
    """Hits and stalls of each layer under the service's default policy (moeray, its default
    parameters), replayed in this process: ids [layers, T, top_k], one sequence."""
    from moeray.policy.predict import PredictiveCaches

    caches = PredictiveCaches(
        SERVICE["num_layers"], SERVICE["num_experts"], SERVICE["top_k"], SERVICE["capacity"]
    )
    stats = caches.run(ids.transpose(1, 0, 2))
    return stats.hits.tolist(), stats.stalls.tolist()


def test_moeray_serve_as_a_ray_job(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    config = tmp_path / "service.json"
    config.write_text(json.dumps(SERVICE))
    job_id = f"moeray-serve-test-{os.getpid()}"
    client = _client(ray_head)

    def submit():
        try:
            return client.submit_job(
                entrypoint=f"{sys.executable} -m moeray.cli serve --config {config} --report-s 0",
                submission_id=job_id,
            )
        except RuntimeError as exc:
            if "already exists" in str(exc):  # a retry of a submit that got in
                return job_id
            raise

    try:
        _retry("the job server to take the job", submit)
    except AssertionError as exc:
        tails = {
            name: (ray_head["logs"] / name).read_text(errors="replace")[-1500:]
            for name in ("dashboard.log", "dashboard.err")
            if (ray_head["logs"] / name).exists()
        }
        raise AssertionError(
            f"{exc}\n{tails}\nhead: {ray_head['log'].read_text()[-1500:]}"
        ) from None
    status = lambda: _retry("the job status", lambda: client.get_job_status(job_id))  # noqa: E731

    rng = np.random.default_rng(7)
    tokens = 40
    ids = np.stack(
        [
            np.stack(
                [
                    rng.choice(SERVICE["num_experts"], SERVICE["top_k"], replace=False)
                    for _ in range(tokens)
                ]
            )
            for _ in range(SERVICE["num_layers"])
        ]
    ).astype(np.int32)
    weights = rng.random(ids.shape, dtype=np.float32)
    steps = tmp_path / "steps.npz"
    np.savez(steps, ids=ids, weights=weights)

    def service_answers():
        if status() == JobStatus.FAILED:
            raise AssertionError(client.get_job_logs(job_id))
        result = subprocess.run(
            [sys.executable, "-c", _CLIENT, ray_head["gcs"], SERVICE["name"], str(steps)],
            env=ray_head["env"],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
        )  # workers put the cwd on sys.path
        if result.returncode != 0:
            if "no moeray service" in result.stderr:
                return None  # the job has not started the service yet
            raise AssertionError(result.stderr[-3000:])
        return json.loads(result.stdout.strip().splitlines()[-1])

    try:
        answer = _wait_for("the service to answer", service_answers, 300)
        hits, stalls = _expected_counts(ids)
        assert answer["schedules_match"]
        assert answer["tokens"] == [tokens] * SERVICE["num_layers"]
        assert answer["hits"] == hits and answer["stalls"] == stalls

        moeray_status = _moeray_status(ray_head, tmp_path)
        assert moeray_status.returncode == 0, moeray_status.stderr
        rows = {
            line.split()[0]: line.split()
            for line in moeray_status.stdout.splitlines()
            if line.strip()
        }
        assert rows["all"][2].replace(",", "") == str(sum(hits))
        assert rows["all"][3].replace(",", "") == str(sum(stalls))
        assert rows["all"][6].replace(",", "") == str(tokens)  # the service's, once
        assert status() == JobStatus.RUNNING  # serve stays up until stopped
    finally:
        _retry("the job server to stop the job", lambda: client.stop_job(job_id))
    _wait_for("the job to stop", lambda: status() != JobStatus.RUNNING, 120)
    logs = _retry("the job's logs", lambda: client.get_job_logs(job_id))
    assert f"started service {SERVICE['name']!r}" in logs
    # serve shut down the service it started: no coordinator is left to connect to
    gone = _moeray_status(ray_head, tmp_path)
    assert gone.returncode == 2 and "no moeray service" in gone.stderr


def test_a_client_without_the_right_token_is_told_in_one_line(ray_head, tmp_path):
    """Ray refuses a wrong token after its own retries (about 20 s); moeray says so in one line,
    naming the address and where the token goes, with no traceback and none of Ray's logs."""
    env = dict(ray_head["env"], RAY_AUTH_TOKEN="0" * 64)  # takes precedence over the file
    proc = _moeray_status(ray_head, tmp_path, env)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert f"address {ray_head['gcs']}" in errors[0] and "refused this token" in errors[0]
    assert "RAY_AUTH_TOKEN" in errors[0]

"""A new user's first hour: no hang on a wrong address, a quiet Ctrl-C and `| head`, progress
while Ray starts, clear messages for what went wrong, a handle that refuses steps after
shutdown. CLI cases run the real ``moeray`` command in a subprocess, from a directory outside
the checkout; each fails on the behaviour the issue reported.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from moeray.actors.address import ClusterUnreachableError, resolve_address
from moeray.actors.messages import LayerStats, ServiceStats


def moeray(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["moeray", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# --- a wrong address: one line, in seconds ---


@pytest.mark.parametrize(
    "command",
    [
        ["status", "--address", "127.0.0.1:{port}"],
        ["replay", "--address", "127.0.0.1:{port}", "--policy", "lru", "--tokens", "100"],
    ],
)
def test_nothing_listening_is_one_line_within_seconds(tmp_path, command):
    port = free_port()
    start = time.monotonic()
    proc = moeray(*(arg.format(port=port) for arg in command), cwd=tmp_path, timeout=60)
    assert time.monotonic() - start < 10
    line = one_line_error(proc)
    assert f"127.0.0.1:{port}" in line and "no Ray cluster answers there" in line


def test_an_unknown_host_is_one_line_within_seconds(tmp_path):
    start = time.monotonic()
    proc = moeray("replay", "--address", "nosuchhost.invalid:6379", "--policy", "lru", cwd=tmp_path)
    assert time.monotonic() - start < 10
    line = one_line_error(proc)
    assert "nosuchhost.invalid" in line and "unknown host" in line


@pytest.mark.pure
def test_resolve_address_names_what_is_wrong(tmp_path):
    port = free_port()
    with pytest.raises(ClusterUnreachableError, match="dashboard"):
        resolve_address("http://127.0.0.1:8265")
    with pytest.raises(ClusterUnreachableError, match="expected HOST:PORT"):
        resolve_address("127.0.0.1")
    missing = tmp_path / "ray_current_cluster"
    with pytest.raises(ClusterUnreachableError, match="no running Ray cluster found"):
        resolve_address("auto", environ={}, current_cluster=missing)
    missing.write_text(f"127.0.0.1:{port}\n")  # a cluster that has gone
    with pytest.raises(ClusterUnreachableError, match="no Ray cluster answers"):
        resolve_address("auto", environ={}, current_cluster=missing)
    with socket.socket() as server:  # something listens: the address is returned as is
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        assert resolve_address(address) == address
        env = {"RAY_ADDRESS": address}
        assert resolve_address("auto", environ=env, current_cluster=missing) == address
        env = {"RAY_ADDRESS": "http://127.0.0.1:8265"}  # a job server's: not for ray.init
        missing.write_text(address)
        assert resolve_address("auto", environ=env, current_cluster=missing) == address


# --- Ctrl-C and a reader that goes away ---


def test_ctrl_c_exits_quietly_with_130_and_start_up_shows_progress(tmp_path):
    proc = subprocess.Popen(
        ["moeray", "replay", "--policy", "lru"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if not line or "local Ray up" in line:
            break
    assert any("starting a local Ray" in line for line in seen), seen
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + err
    assert "Traceback" not in err and err.strip().endswith("moeray replay: interrupted"), err


def test_a_reader_that_goes_away_ends_quietly(tmp_path):
    proc = subprocess.Popen(
        ["moeray", "replay", "--backend", "local", "--tokens", "300", "--per-layer"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # as `| head` does once it has its lines
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == ""


# --- small gaps ---


def test_help_says_what_status_does_and_what_replay_reads(tmp_path):
    status = moeray("status", "--help", cwd=tmp_path)
    assert status.returncode == 0 and "Joins a Ray cluster" in status.stdout
    replay = moeray("replay", "--help", cwd=tmp_path)
    assert ".mtrace or .npz" in replay.stdout
    version = moeray("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("moeray ")


@pytest.mark.pure
def test_rates_print_with_a_prefix_that_fits():
    from moeray.cli import _rate

    assert [_rate(x) for x in (3120.0, 45_300_000.0, 987.0, 2.5e9)] == [
        "3.12 k",
        "45.3 M",
        "987",
        "2.5 G",
    ]


@pytest.mark.pure
def test_the_all_row_counts_the_services_tokens_once():
    stats = ServiceStats(layers=[LayerStats(layer=0, tokens=8), LayerStats(layer=1, tokens=8)])
    assert stats.total().tokens == 8


@pytest.mark.pure
def test_the_pure_core_fallback_says_why_and_what_to_run(tmp_path):
    from moeray.native import _fallback_reason

    here = tmp_path / "checkout" / "moeray" / "native" / "__init__.py"
    here.parent.mkdir(parents=True)
    error = ImportError("cannot import name '_core' (most likely due to a circular import)")
    installed = _fallback_reason(error, here)  # no pyproject.toml above it: an install
    assert "reinstall" in installed and "source tree" not in installed
    (tmp_path / "checkout" / "pyproject.toml").write_text("")
    reason = _fallback_reason(error, here)
    assert "source tree" in reason and "pip install -e ." in reason and "circular" not in reason


def test_a_bad_msgpack_step_is_refused_in_the_callers_process():
    from moeray.service import ServiceConfig, ServiceHandle
    from moeray.traces.wire import encode_step

    class NoCalls:  # the coordinator is never reached
        def __getattr__(self, name):
            raise AssertionError(f"{name} reached the coordinator")

    config = ServiceConfig(num_layers=2, num_experts=8, top_k=2, capacity=4, policy="lru")
    handle = ServiceHandle(NoCalls(), config, wake_after=lambda s, cb: None)
    with pytest.raises(ValueError, match="expert_ids"):
        handle.submit_msgpack(encode_step(np.full((2, 3, 2), 9, np.int32)))  # ids >= 8
    with pytest.raises(ValueError, match="top_k"):
        handle.submit_msgpack(encode_step(np.zeros((2, 3, 4), np.int32)))
    with pytest.raises((ValueError, TypeError)):
        handle.submit_msgpack(b"\x00not msgpack")


def test_a_handle_refuses_steps_after_shutdown(ray_local):
    from moeray import service

    config = service.ServiceConfig(
        num_layers=2, num_experts=8, top_k=2, capacity=4, policy="lru", name="first-hour-closed"
    )
    handle = service.start(config)
    ids = np.zeros((2, 3, 2), np.int32)
    ids[..., 1] = 1
    handle.submit(ids)
    handle.shutdown()
    for call in (lambda: handle.submit(ids), handle.flush, handle.stats):
        with pytest.raises(RuntimeError, match="shut down"):
            call()


def test_without_address_the_replay_starts_a_ray_of_its_own(tmp_path):
    """A RAY_ADDRESS left in the shell (or a stale record of a stopped `ray start`) does not
    make `moeray replay` join a cluster that is gone: without --address it starts its own."""
    import os

    env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    proc = subprocess.run(
        ["moeray", "replay", "--policy", "lru", "--tokens", "100"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "starting a local Ray" in proc.stderr and "lru" in proc.stdout

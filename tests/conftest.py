"""Shared fixtures of moeray's test suite.

- ``core_pair``: (native core module, pure-Python reference module), to compare decisions.
- ``core``: each of the two core modules in turn (parametrized ``native`` / ``reference``).
- ``shared_traces``: the folder of real routing traces beside the checkout (skips without it).
- the ``pure`` marker: a test marked ``pure`` fails if it imports ``ray``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACES = Path(__file__).parents[1] / ".." / "shared" / "traces"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "pure: the test exercises only moeray's policy layer and must not import ray",
    )


def pytest_sessionstart(session):
    """An unbuilt native core must not pass as a green run of the pure-Python twin."""
    import moeray.native

    if not moeray.native.IS_NATIVE and os.environ.get("MOERAY_PURE_PYTHON", "") in ("", "0"):
        pytest.exit(
            "moeray's native core (_core) is not importable: build it with `pip install .`, "
            "or set MOERAY_PURE_PYTHON=1 to test the pure-Python twin on purpose",
            returncode=1,
        )


def _import_native():
    try:
        return importlib.import_module("moeray.native._core")
    except ImportError as exc:
        pytest.skip(f"moeray's native core is not built: {exc}")


@pytest.fixture(scope="session")
def core_pair():
    """(moeray.native._core, moeray.native._reference); skips when _core cannot be imported."""
    native = _import_native()
    reference = importlib.import_module("moeray.native._reference")
    assert native is not reference
    return native, reference


@pytest.fixture(params=["native", "reference"])
def core(request):
    """Each core module in turn: the C++ extension (skipped when unbuilt), then the reference."""
    if request.param == "native":
        return _import_native()
    return importlib.import_module("moeray.native._reference")


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    """Path of ``shared/traces`` beside the repository; skips when it is not there (CI)."""
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"no shared traces at {SHARED_TRACES}")
    return SHARED_TRACES


@pytest.fixture(autouse=True)
def _pure_tests_do_not_import_ray(request):
    """Fails a test marked ``pure`` when ``ray`` was imported while it ran."""
    if request.node.get_closest_marker("pure") is None:
        yield
        return
    had_ray = "ray" in sys.modules
    yield
    if not had_ray and "ray" in sys.modules:
        pytest.fail(f"{request.node.nodeid} is marked pure but imported ray", pytrace=False)


@pytest.fixture(scope="session")
def ray_local():
    """One quiet, loopback-only local Ray for every Ray test of the session (RAY-NOTES.md),
    started as the CLI starts one (``moeray.actors._ray.local_session``)."""
    import ray

    from moeray.actors import _ray

    # metrics reach the node's endpoint within about a second instead of ten
    options = dict(num_cpus=2, _system_config={"metrics_report_interval_ms": 1000})
    with _ray.local_session(**options) as context:
        ray.moeray_test_metrics_url = (
            f"http://127.0.0.1:{context.address_info['metrics_export_port']}/metrics"
        )
        yield ray

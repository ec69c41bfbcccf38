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
def ray_local(tmp_path_factory):
    """One quiet, loopback-only local Ray for every Ray test of the session (RAY-NOTES.md)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    options = dict(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
        logging_level="ERROR",
        # metrics reach the node's endpoint within about a second instead of ten
        _system_config={
            "worker_maximum_startup_concurrency": 16,
            "metrics_report_interval_ms": 1000,
        },
    )
    # Ray puts the driver's working directory first on every worker's sys.path: started from a
    # checkout, the workers would import its unbuilt moeray/ (the pure-Python fallback) instead
    # of the installed package. Start the session from an empty directory.
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray-driver"))
    try:
        context = ray.init(**options)
    except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception on startup timeouts
        # A loaded 2-core VM can miss Ray's fixed 30 s raylet registration wait: start once more.
        if "timed out during startup" not in str(exc):
            raise
        ray.shutdown()
        context = ray.init(**options)
    finally:
        os.chdir(cwd)
    ray.moeray_test_metrics_url = (
        f"http://127.0.0.1:{context.address_info['metrics_export_port']}/metrics"
    )
    yield ray
    ray.shutdown()

"""Ray workers run the same moeray as the driver: the same files, the same core.

Ray puts the driver's working directory first on every worker's sys.path; a driver started in a
checkout made the workers import its unbuilt ``moeray/`` and fall back to the pure-Python core,
silently (CI's clean clone did, for every service test and for the README's main job).
"""

from __future__ import annotations

import moeray
import moeray.native


def test_workers_import_the_drivers_moeray_and_core(ray_local):
    ray = ray_local

    def worker_moeray() -> tuple[str, bool]:  # local: pickled by value, this module stays here
        import moeray
        import moeray.native

        return moeray.__file__, moeray.native.IS_NATIVE

    path, native = ray.get(ray.remote(num_cpus=0)(worker_moeray).remote())
    assert path == moeray.__file__
    assert native == moeray.native.IS_NATIVE


def test_start_warns_when_the_services_actors_fell_back_to_pure_python():
    import warnings

    import pytest

    from moeray.service import _warn_if_core_differs

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_core_differs(moeray.__file__, moeray.native.IS_NATIVE)  # same core: silent
    if moeray.native.IS_NATIVE:
        with pytest.warns(RuntimeWarning, match="pure-Python core, imported from /src/moeray"):
            _warn_if_core_differs("/src/moeray/__init__.py", False)

"""The predict kernel built as one version for any x86-64 plans exactly as the extension does.

The extension compiles the kernel's entry points twice, for AVX2 and for any x86-64, and the
loader runs the AVX2 clone on every CPU that has it, so the suite alone never runs the other.
This builds bench_session's C++ harness with ``-DMOERAY_KERNEL_ENTRY=`` (one version, no AVX2:
the same code as the default clone) and checks its plans against the extension's session on the
same tokens, and its window step's counts against the extension's ``run_window``.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from moeray.actors.config import ServiceConfig
from moeray.native import IS_NATIVE
from moeray.policy.predict import PredictiveCaches
from moeray.traces import default_trace_path, load_trace

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(not IS_NATIVE, reason="the native core is not in use"),
    pytest.mark.skipif(
        platform.machine() != "x86_64" or not sys.platform.startswith("linux"),
        reason="the clones are built on x86-64 Linux only",
    ),
    pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler"),
]


def bench_session():
    spec = importlib.util.spec_from_file_location(
        "bench_session_for_tests", ROOT / "benchmarks/bench_session.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def single_version(tmp_path_factory):
    """bench_session's module and its harness built as one version."""
    bench = bench_session()
    workdir = tmp_path_factory.mktemp("harness")
    return bench, bench.build_harness(workdir, defines=("MOERAY_KERNEL_ENTRY=",))


def test_single_version_kernel_plans_as_the_extension(single_version, tmp_path):
    bench, harness = single_version
    trace = load_trace(default_trace_path())
    warm, tokens = 20, 160
    ids = trace.expert_ids[:tokens].astype("int64")
    config = ServiceConfig(
        num_layers=trace.num_layers,
        num_experts=trace.num_experts,
        top_k=trace.top_k,
        capacity=8,
        policy="moeray",
    )
    planned = bench.run_harness(harness, config, ids, warm, 1, tmp_path)
    expected = bench.plan_totals(config, ids, warm)
    assert expected["loads"] > 0 and expected["prefetches"] > 0  # every phase ran
    assert {key: planned[key] for key in expected} == expected


def test_single_version_window_step_counts_as_the_extension(single_version, tmp_path):
    """The window step (what a layer actor runs; bench_policy --core-baseline times it this
    way): the same stalls, evictions and prefetches as the extension's run_window."""
    bench, harness = single_version
    trace = load_trace(default_trace_path())
    ids = np.ascontiguousarray(trace.expert_ids[:300], dtype=np.int64)
    _, L, k = ids.shape
    E = trace.num_experts
    config = ServiceConfig(num_layers=L, num_experts=E, top_k=k, capacity=8, policy="moeray")
    got = bench.run_harness(harness, config, ids, 0, 1, tmp_path, mode="window")
    caches = PredictiveCaches(L, E, k, 8)
    caches.run_window(ids)
    st = caches.stats
    assert st.prefetches.sum() > 0 and st.evictions.sum() > 0  # every phase ran
    assert (got["loads"], got["evictions"], got["prefetches"]) == (
        st.stalls.sum(),
        st.evictions.sum(),
        st.prefetches.sum(),
    )

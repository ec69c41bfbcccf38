"""Routing traces, the replay of a trace through every policy, and the ``moeray`` command line.

Expected hit counts come from hand-worked traces (each step reasoned in the comments) or from an
independent few-line LRU over the bundled trace, never from the code under test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import moeray
import moeray.native
from moeray import cli
from moeray.policy.registry import POLICIES
from moeray.replay import (
    POLICY_NAMES,
    ReplayConfig,
    capacity_from_fraction,
    replay_trace,
)
from moeray.traces import Trace, default_trace_path, load_trace

# Policies that load only on demand (no prefetch): Belady's hit count bounds theirs.
DEMAND_POLICY_NAMES = tuple(n for n, e in POLICIES.items() if not e.predictive)

pytestmark = pytest.mark.pure


# --------------------------------------------------------------------------- helpers

# Two layers, top-1, 4 experts, 9 tokens.
# Layer 0: 0 1 0 2 0 3 1 0 1.  Layer 1: 0 0 0 1 2 1 2 1 2.
HAND_LAYERS = ([0, 1, 0, 2, 0, 3, 1, 0, 1], [0, 0, 0, 1, 2, 1, 2, 1, 2])

# Capacity 2, worked by hand (hot set listed oldest touch first):
# Layer 0, LRU: 0m [0], 1m [0 1], 0h [1 0], 2m ev 1 [0 2], 0h [2 0], 3m ev 2 [0 3], 1m ev 0 [3 1],
#   0m ev 3 [1 0], 1h -> 3 hits.
# Layer 0, LFU (counts include misses): at 2: {0:2, 1:1} ev 1; at 3: {0:3, 2:1} ev 2;
#   at 1: {0:3, 3:1} ev 3; then 0h, 1h -> hits at steps 2, 4, 7, 8 = 4.
# Layer 0, ADAPTIVE (LFU while max >= 3 min > 0, else LRU): at 2: {0:2, 1:1} not skewed, LRU
#   evicts 1; at 3: {0:3, 2:1} skewed, evicts 2; at 1: {0:3, 3:1} skewed, evicts 3 -> 4 hits.
# Layer 0, Belady: at 2 evict 1 (next use 6) over 0 (4); at 3 evict 2 (never) over 0 (7);
#   at 1 evict 3 (never) over 0 (7); hits at steps 2, 4, 7, 8 = 4.
# Layer 1, LRU: 0m 0h 0h 1m [0 1], 2m ev 0 [1 2], then 1h 2h 1h 2h -> 6 hits.
# Layer 1, LFU: at 2 (step 4): {0:3, 1:1} ev 1; 1 (2): {0:3, 2:1} ev 2; 2 (2): {0:3, 1:2} ev 1;
#   1 (3): {0:3, 2:2} ev 2; 2 (3): {0:3, 1:3} tie, 0 touched least recently, ev 0 -> 2 hits.
# Layer 1, ADAPTIVE: step 4 {0:3, 1:1} skewed ev 1; step 5 {0:3, 2:1} skewed ev 2; step 6
#   {0:3, 1:2} not skewed, LRU ev 0 [1 2]; 1h 2h -> hits at steps 1, 2, 7, 8 = 4.
# Layer 1, Belady: 0m 0h 0h 1m, 2m evicts 0 (never used again), then 4 hits -> 6.
HAND_HITS_CAP2 = {
    "lru": (3, 6),
    "lfu": (4, 2),
    "adaptive": (4, 4),
    "belady": (4, 6),
    "affinity-lru": (3, 6),  # with affinity_weight 0 the blend is plain LRU
}
# Capacity 1, top-1, loading on demand only: a hit is exactly a repeat of the previous access:
# layer 0 none, layer 1 two. (moeray prefetches, so it may do better: tests/test_predict.py.)
HAND_HITS_CAP1 = {name: (0, 2) for name in DEMAND_POLICY_NAMES}


def hand_ids() -> np.ndarray:
    return np.array(HAND_LAYERS, dtype=np.uint8).T[:, :, None]  # [9 tokens, 2 layers, top-1]


def hand_trace() -> Trace:
    return Trace(hand_ids(), None, np.array([0, 4, 9], dtype=np.int64), 4, "hand")


def write_hand_trace(path: Path) -> Path:
    np.savez(path, expert_ids=hand_ids(), seq_offsets=np.array([0, 4, 9]), num_experts=np.array(4))
    return path


def simple_lru_hits(ids: np.ndarray, capacity: int) -> int:
    """Independent LRU over one layer's [T, k] ids in row-major order."""
    hot: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for e in ids.ravel().tolist():
        if e in hot:
            hits += 1
            hot.move_to_end(e)
        else:
            if len(hot) >= capacity:
                hot.popitem(last=False)
            hot[e] = None
    return hits


@pytest.fixture(scope="module")
def bundled() -> Trace:
    return load_trace(default_trace_path())


def head(trace: Trace, tokens: int) -> Trace:
    """The first ``tokens`` tokens of a trace as one sequence."""
    return Trace(
        trace.expert_ids[:tokens],
        None if trace.weights is None else trace.weights[:tokens],
        np.array([0, min(tokens, trace.num_tokens)], dtype=np.int64),
        trace.num_experts,
        trace.name,
    )


# --------------------------------------------------------------------------- traces


def test_bundled_trace_shape(bundled):
    assert default_trace_path().is_file()
    assert bundled.name == default_trace_path().name
    assert (bundled.num_layers, bundled.top_k, bundled.num_experts) == (24, 4, 32)
    assert bundled.expert_ids.shape == (bundled.num_tokens, 24, 4) and bundled.num_tokens > 2000
    assert bundled.expert_ids.dtype.kind in "iu"
    assert 0 <= bundled.expert_ids.min() and bundled.expert_ids.max() < 32
    # A router picks top_k distinct experts per token and layer.
    srt = np.sort(bundled.expert_ids, axis=2)
    assert (np.diff(srt.astype(np.int64), axis=2) > 0).all()


def test_bundled_trace_weights(bundled):
    w = bundled.weights
    assert w is not None and w.dtype == np.float32 and w.shape == bundled.expert_ids.shape
    assert np.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    # The top-4 router probabilities of each token renormalise to 1 (stored as float16).
    np.testing.assert_allclose(w.sum(axis=2), 1.0, atol=5e-3)


def test_bundled_trace_sequences(bundled):
    offs = bundled.seq_offsets
    assert offs.dtype == np.int64 and offs.ndim == 1
    assert offs[0] == 0 and offs[-1] == bundled.num_tokens
    assert (np.diff(offs) >= 0).all()
    assert bundled.num_sequences == len(offs) - 1 > 1


def test_layer_ids_and_weights(bundled):
    for layer in range(bundled.num_layers):
        ids = bundled.layer_ids(layer)
        assert ids.dtype == np.int32 and ids.flags.c_contiguous
        assert ids.shape == (bundled.num_tokens, bundled.top_k)
        np.testing.assert_array_equal(ids, bundled.expert_ids[:, layer, :])
        w = bundled.layer_weights(layer)
        assert w.dtype == np.float32 and w.flags.c_contiguous
        np.testing.assert_array_equal(w, bundled.weights[:, layer, :])
    for bad in (-1, bundled.num_layers):
        with pytest.raises(ValueError, match="layer"):
            bundled.layer_ids(bad)
        with pytest.raises(ValueError, match="layer"):
            bundled.layer_weights(bad)


def test_load_trace_defaults(tmp_path):
    """Without seq_offsets the trace is one sequence; without num_experts it is max id + 1."""
    ids = np.array([[[0, 5]], [[2, 1]], [[5, 0]]], dtype=np.uint8)
    np.savez(tmp_path / "t.npz", expert_ids=ids)
    trace = load_trace(tmp_path / "t.npz")
    assert trace.num_experts == 6 and trace.weights is None
    assert trace.seq_offsets.tolist() == [0, 3] and trace.num_sequences == 1
    assert trace.layer_weights(0) is None
    assert load_trace(str(tmp_path / "t.npz"), num_experts=9).num_experts == 9


# --------------------------------------------------------------------------- replay


@pytest.mark.parametrize(
    "capacity,expected", [(2, HAND_HITS_CAP2), (1, HAND_HITS_CAP1)], ids=["cap2", "cap1"]
)
def test_replay_hand_trace(capacity, expected):
    report = replay_trace(hand_trace(), ReplayConfig(capacity=capacity, affinity_weight=0.0))
    assert set(report.results) == set(POLICY_NAMES)
    assert (report.num_experts, report.capacity) == (4, capacity)
    for name, hits in expected.items():
        r = report.results[name]
        assert r.per_layer_hits == hits, name
        assert r.accesses_per_layer == 9
        assert r.per_layer_hit_rate == pytest.approx([h / 9 for h in hits])
        assert r.hit_rate == pytest.approx(sum(hits) / 18)
        assert r.worst_layer == int(np.argmin(hits))


def test_belady_bounds_every_policy_on_a_hand_trace():
    """Capacity 2, tokens (0,1) x3, (2,3), (0,1): accesses 0 1 0 1 0 1 2 3 0 1 in row-major order.

    LFU: 2 evicts 0 (tie at count 3, older touch), 3 evicts 2 (count 1), keeping 1; token 4: 0
    misses, 1 hits -> 4 + 1 = 5 hits. Belady (MIN): 4 hits on tokens 1-2; 2 evicts 1 (next use
    at position 9, after 0's at 8); 3 evicts 2 (never used again); 0 hits, 1 misses -> 5 hits.
    A variant that never evicts an expert of the current token would get only 4.
    """
    ids = np.array([[0, 1], [0, 1], [0, 1], [2, 3], [0, 1]], dtype=np.uint8)[:, None, :]
    report = replay_trace(
        Trace(ids, None, np.array([0, 5]), 4, "lfu-beats-belady"), ReplayConfig(capacity=2)
    )
    assert report.results["lfu"].per_layer_hits == (5,)  # the hand counts above
    assert report.results["belady"].per_layer_hits == (5,)
    best = report.results["belady"].per_layer_hits[0]
    for name in DEMAND_POLICY_NAMES:  # the optimum of demand caching; moeray prefetches
        assert report.results[name].per_layer_hits[0] <= best, f"{name} beats the 'optimum'"


@pytest.fixture(scope="module")
def bundled_quarter_report(bundled):
    trace = head(bundled, 2000)
    capacity = capacity_from_fraction(0.25, trace.num_experts)
    return trace, replay_trace(trace, ReplayConfig(capacity=capacity))


def test_replay_invariants_quarter_capacity(bundled_quarter_report):
    trace, report = bundled_quarter_report
    assert report.capacity == 8 and report.capacity_fraction == 0.25
    assert set(report.results) == set(POLICY_NAMES)
    belady = report.results["belady"].per_layer_hits
    assert len(belady) == trace.num_layers
    for name, r in report.results.items():
        assert r.accesses_per_layer == 2000 * 4
        assert len(r.per_layer_hits) == len(r.per_layer_hit_rate) == trace.num_layers
        assert all(0.0 <= x <= 1.0 for x in r.per_layer_hit_rate), name
        assert 0.0 <= r.hit_rate <= 1.0
        assert r.hit_rate == pytest.approx(np.mean(r.per_layer_hit_rate))
        if name not in DEMAND_POLICY_NAMES:  # moeray prefetches: Belady does not bound it
            continue
        for layer, (h, b) in enumerate(zip(r.per_layer_hits, belady)):
            assert h <= b, f"{name} beats Belady at layer {layer}: {h} > {b}"
    # Real routing is far from the all-miss and all-hit extremes at 1/4 capacity.
    assert 0.3 < report.results["lru"].hit_rate < report.results["belady"].hit_rate < 0.95


def test_replay_lru_matches_an_independent_lru(bundled_quarter_report):
    trace, report = bundled_quarter_report
    expected = tuple(simple_lru_hits(trace.layer_ids(l), 8) for l in range(trace.num_layers))
    assert report.results["lru"].per_layer_hits == expected


def test_replay_full_capacity_misses_once_per_expert(bundled):
    trace = head(bundled, 1000)
    n = trace.num_experts
    report = replay_trace(trace, ReplayConfig(capacity=n))
    accesses = trace.num_tokens * trace.top_k
    unique = [len(np.unique(trace.expert_ids[:, l, :])) for l in range(trace.num_layers)]
    expected = [1 - u / accesses for u in unique]
    for name, r in report.results.items():
        if name in DEMAND_POLICY_NAMES:
            assert r.per_layer_hit_rate == pytest.approx(expected, abs=1e-12), name
        else:  # a prefetch can serve even an expert's first use; nothing is ever evicted
            assert all(s <= u for s, u in zip(r.stalls, unique)), name
            assert r.wasted_prefetches == 0


def test_replay_config_and_capacity_errors():
    with pytest.raises(ValueError, match="capacity"):
        replay_trace(hand_trace(), ReplayConfig(capacity=5))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="capacity"):
            ReplayConfig(capacity=bad)
    with pytest.raises(ValueError, match="policies"):
        ReplayConfig(capacity=1, policies=("lru", "fifo"))
    with pytest.raises(ValueError, match="policies"):
        ReplayConfig(capacity=1, policies=())
    with pytest.raises(ValueError, match="affinity_weight"):
        ReplayConfig(capacity=1, affinity_weight=1.5)
    for bad in (0.0, -0.25, 1.01, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="capacity"):
            capacity_from_fraction(bad, 32)
    assert [capacity_from_fraction(f, 32) for f in (0.25, 1.0, 0.001, 0.5)] == [8, 32, 1, 16]


# --------------------------------------------------------------------------- CLI


def table_rows(out: str) -> dict[str, float]:
    """policy name -> hit rate, from the table that ``moeray replay`` prints."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if re.match(r"policy\s+hit rate", line))
    rows = {}
    for line in lines[header + 1 :]:
        m = re.match(r"([a-z-]+)\s+(\d\.\d{3})\s", line)
        if m:
            rows[m.group(1)] = float(m.group(2))
    return rows


def check_json_schema(doc, names, num_layers):
    assert isinstance(doc, dict)
    assert isinstance(doc["trace"], str)
    assert isinstance(doc["capacity"], float)
    assert isinstance(doc["policies"], dict) and set(doc["policies"]) == set(names)
    for name, result in doc["policies"].items():
        assert isinstance(result["hit_rate"], float), name
        rates = result["per_layer_hit_rate"]
        assert isinstance(rates, list) and len(rates) == num_layers
        assert all(isinstance(x, float) for x in rates)
        assert result["hit_rate"] == pytest.approx(sum(rates) / num_layers)


@pytest.mark.parametrize(
    "extra,capacity,expected",
    [([], 0.25, HAND_HITS_CAP1), (["--capacity", "0.5"], 0.5, HAND_HITS_CAP2)],
    ids=["default-capacity", "capacity-0.5"],
)
def test_cli_replay_json(tmp_path, capsys, extra, capacity, expected):
    trace = write_hand_trace(tmp_path / "hand.npz")
    out = tmp_path / "out" / "result.json"
    out.parent.mkdir()
    argv = [
        "replay",
        str(trace),
        "--backend",
        "local",
        "--json",
        str(out),
        "--policy",
        "lru",
        "--policy",
        "belady",
        *extra,
    ]
    assert cli.main(argv) == 0
    stdout, stderr = capsys.readouterr()
    assert stderr == ""
    rows = table_rows(stdout)
    assert list(rows) == ["lru", "belady"]
    for name in rows:
        assert rows[name] == pytest.approx(sum(expected[name]) / 18, abs=5e-4)
    assert str(out) in stdout
    doc = json.loads(out.read_text())
    check_json_schema(doc, ["lru", "belady"], num_layers=2)
    assert doc["trace"] == "hand.npz"
    assert doc["capacity"] == capacity
    for name in ("lru", "belady"):
        assert doc["policies"][name]["per_layer_hit_rate"] == pytest.approx(
            [h / 9 for h in expected[name]]
        )


def test_cli_replay_all_policies_by_default(tmp_path, capsys):
    trace = write_hand_trace(tmp_path / "hand.npz")
    out = tmp_path / "all.json"
    assert (
        cli.main(
            ["replay", str(trace), "--backend", "local", "--capacity", "0.5", "--json", str(out)]
        )
        == 0
    )
    assert list(table_rows(capsys.readouterr().out)) == list(POLICY_NAMES)
    check_json_schema(json.loads(out.read_text()), POLICY_NAMES, num_layers=2)


@pytest.mark.parametrize(
    "args",
    [
        ["{missing}"],
        ["{trace}", "--capacity", "0"],
        ["{trace}", "--capacity", "1.5"],
        ["{trace}", "--capacity=-0.25"],
        ["{trace}", "--capacity", "nan"],
        ["{trace}", "--affinity-weight", "2"],
        ["{notzip}"],
    ],
    ids=[
        "missing",
        "capacity-0",
        "capacity-1.5",
        "capacity-negative",
        "capacity-nan",
        "weight-2",
        "not-a-zip",
    ],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, args):
    trace = write_hand_trace(tmp_path / "hand.npz")
    notzip = tmp_path / "notzip.npz"
    notzip.write_text("not a trace\n")
    fill = {"missing": tmp_path / "missing.npz", "trace": trace, "notzip": notzip}
    argv = ["replay"] + [a.format(**fill) for a in args]
    json_out = tmp_path / "never.json"
    assert cli.main(argv + ["--json", str(json_out)]) == 2
    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeray replay: error:"), stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not json_out.exists()


def test_cli_npy_file_exits_2(tmp_path, capsys):
    path = tmp_path / "ids.npy"
    np.save(path, hand_ids())
    assert cli.main(["replay", str(path)]) == 2


def test_cli_unknown_policy_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["replay", "--policy", "fifo"])
    assert info.value.code == 2
    assert "fifo" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["replay", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--capacity" in out and "--json" in out and "--policy" in out
    for name in POLICY_NAMES:
        assert name in out
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0 and "replay" in capsys.readouterr().out


def moeray_command() -> list[str]:
    script = shutil.which("moeray", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "moeray.cli"]


def test_console_script_replays_the_bundled_trace(bundled):
    proc = subprocess.run(
        moeray_command() + ["replay", "--backend", "local", "--policy", "lru"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert default_trace_path().name in proc.stdout
    # The subprocess inherits MOERAY_PURE_PYTHON and reports the core it ran on.
    assert ("core: native" if moeray.native.IS_NATIVE else "core: pure Python") in proc.stdout
    rows = table_rows(proc.stdout)
    assert list(rows) == ["lru"]
    expected = np.mean(
        [simple_lru_hits(bundled.layer_ids(l), 8) for l in range(bundled.num_layers)]
    ) / (bundled.num_tokens * bundled.top_k)
    assert rows["lru"] == pytest.approx(expected, abs=5e-4)


def test_cli_module_entry_point_matches(tmp_path):
    trace = write_hand_trace(tmp_path / "hand.npz")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeray.cli",
            "replay",
            str(trace),
            "--backend",
            "local",
            "--capacity",
            "0.5",
            "--policy",
            "belady",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the checkout: `-m` puts the cwd first on sys.path
    )
    assert proc.returncode == 0, proc.stderr
    assert table_rows(proc.stdout) == {"belady": pytest.approx(10 / 18, abs=5e-4)}
    bad = subprocess.run(
        [sys.executable, "-m", "moeray.cli", "replay", str(tmp_path / "missing.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_cli_notes_a_capacity_below_top_k(capsys):
    """2 of 32 experts per layer, top-4: the replay runs and says why its policies look alike."""
    assert (
        cli.main(
            [
                "replay",
                "--backend",
                "local",
                "--capacity",
                "0.05",
                "--tokens",
                "20",
                "--policy",
                "lru",
                "--no-progress",
            ]
        )
        == 0
    )
    stderr = capsys.readouterr().err
    assert "capacity of 2 experts per layer is below top_k 4" in stderr
    assert (
        cli.main(
            ["replay", "--backend", "local", "--tokens", "20", "--policy", "lru", "--no-progress"]
        )
        == 0
    )
    assert "below top_k" not in capsys.readouterr().err  # 8 of 32: no note

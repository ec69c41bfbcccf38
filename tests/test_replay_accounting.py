"""Stall, transfer and wasted-prefetch accounting of ``moeray replay``, its --json
keys, --per-layer table and --plot. Expected counts are worked by hand in the comments."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from moeray import cli
from moeray.policy.predict import PredictConfig
from moeray.policy.registry import POLICIES
from moeray.replay import (
    POLICY_NAMES,
    ReplayConfig,
    replay_trace,
    synthetic_hints,
)
from moeray.traces import Trace

pytestmark = pytest.mark.pure

# Policies that load only on demand (no prefetch): Belady's hit count bounds theirs.
DEMAND_POLICY_NAMES = tuple(n for n, e in POLICIES.items() if not e.predictive)

# The hand trace of test_traces_replay_cli: 2 layers, top-1, 4 experts, 9 tokens.
# Layer 0: 0 1 0 2 0 3 1 0 1.  Layer 1: 0 0 0 1 2 1 2 1 2. At capacity 2, LRU hits (3, 6) and
# Belady (4, 6) (worked there): stalls = misses = (6, 3) and (5, 3); transfers the same.
HAND_LAYERS = ([0, 1, 0, 2, 0, 3, 1, 0, 1], [0, 0, 0, 1, 2, 1, 2, 1, 2])
NEW_KEYS = ("stall_rate", "per_layer_stall_rate", "transfers_per_token", "wasted_prefetches")

CROSS_ONLY = PredictConfig(
    prefetch_budget=1,
    previous_weight=0.0,
    affinity_weight=0.0,
    keep_previous_weight=0.0,
    keep_affinity_weight=0.0,
    prefetch_margin=0.0,
)


def hand_trace() -> Trace:
    ids = np.array(HAND_LAYERS, dtype=np.uint8).T[:, :, None]
    return Trace(ids, None, np.array([0, 4, 9], dtype=np.int64), 4, "hand")


def write(path, tokens, num_experts):
    ids = np.asarray(tokens, dtype=np.uint8)[:, :, None]
    np.savez(path, expert_ids=ids, num_experts=np.array(num_experts))
    return path


def test_demand_policies_stall_on_every_miss_and_transfer_every_miss():
    report = replay_trace(
        hand_trace(), ReplayConfig(capacity=2, affinity_weight=0.0, policies=DEMAND_POLICY_NAMES)
    )
    lru, belady = report.results["lru"], report.results["belady"]
    assert lru.stalls == (6, 3) and lru.transfers == (6, 3)
    assert belady.stalls == (5, 3) and belady.transfers == (5, 3)
    assert lru.per_layer_stall_rate == pytest.approx([6 / 9, 3 / 9])
    assert lru.stall_rate == pytest.approx(9 / 18)
    assert lru.transfers_per_token == pytest.approx(9 / 9)  # all layers' transfers per token
    assert belady.transfers_per_token == pytest.approx(8 / 9)
    for r in report.results.values():
        assert r.wasted_prefetches == 0 and r.prefetches == 0
        assert r.stall_rate == pytest.approx(1 - r.hit_rate)


def test_moeray_accounting_on_a_hand_stream():
    """Tokens (layer 0, layer 1): (0,2) (1,3) (0,2) (1,3) (0,3), capacity 1, cross-layer only.

    Layer 1: t0, t1 stall (first sightings: the table learns 0->2, 1->3 only after the use, so
    that learning is no prefetch in time for them). t2, t3: prefetched in time from layer 0's
    routing of the same token -> hits. t4: layer 0 says 0 -> prefetch 2 (evicting 3); the token
    uses 3: a stall whose load evicts the unused 2 -> 1 wasted. Stalls 3, prefetches 3,
    transfers 6. Layer 0 (no predictor there): 5 stalls, 5 transfers. Per token: 11 / 5."""
    tokens = [[0, 2], [1, 3], [0, 2], [1, 3], [0, 3]]
    trace = Trace(np.array(tokens, dtype=np.uint8)[:, :, None], None, np.array([0, 5]), 4, "h")
    config = ReplayConfig(capacity=1, policies=("lru", "belady", "moeray"), predict=CROSS_ONLY)
    r = replay_trace(trace, config).results["moeray"]
    assert r.per_layer_hits == (0, 2)
    assert r.stalls == (5, 3)
    assert r.transfers == (5, 6)
    assert r.per_layer_wasted == (0, 1) and r.wasted_prefetches == 1
    assert r.prefetches == 3 and r.prefetch_hits == 2
    assert r.transfers_per_token == pytest.approx(11 / 5)
    assert r.per_layer_stall_rate == pytest.approx([1.0, 3 / 5])
    # Belady at capacity 1 on layer 1 (2 3 2 3 3): one hit; prediction beats it with 2.
    assert replay_trace(trace, config).results["belady"].per_layer_hits == (0, 1)


def test_moeray_counts_of_a_token_ignore_later_tokens():
    rng = np.random.default_rng(3)
    ids = np.stack(
        [np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(60)]
    ).astype(np.uint8)
    changed = ids.copy()
    changed[40:] = rng.integers(0, 8, changed[40:].shape)
    config = ReplayConfig(capacity=3, policies=("moeray",))

    def result(stream):
        return replay_trace(Trace(stream[:40], None, np.array([0, 40]), 8, "r"), config).results[
            "moeray"
        ]

    a, b = result(ids), result(changed)
    assert (a.per_layer_hits, a.stalls, a.transfers) == (b.per_layer_hits, b.stalls, b.transfers)


def test_cli_json_has_the_accounting_keys_for_every_policy(tmp_path, capsys):
    trace = write(tmp_path / "hand.npz", np.array(HAND_LAYERS).T, 4)
    out = tmp_path / "all.json"
    argv = [
        "replay",
        str(trace),
        "--backend",
        "local",
        "--capacity",
        "0.5",
        "--json",
        str(out),
        "--per-layer",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "stall rate" in printed and "transfers/token" in printed and "wasted" in printed
    assert "stall rate per layer" in printed and "moeray predictors" in printed
    doc = json.loads(out.read_text())
    assert list(doc["policies"]) == list(POLICY_NAMES)
    for name, result in doc["policies"].items():
        for key in ("hit_rate", "per_layer_hit_rate", "decisions_per_s") + NEW_KEYS:
            assert key in result, (name, key)
        assert len(result["per_layer_stall_rate"]) == 2
        assert result["stall_rate"] == pytest.approx(np.mean(result["per_layer_stall_rate"]))
        assert isinstance(result["transfers_per_token"], float)
        assert isinstance(result["wasted_prefetches"], int)
    lru = doc["policies"]["lru"]
    assert lru["per_layer_stall_rate"] == pytest.approx([6 / 9, 3 / 9])
    assert lru["transfers_per_token"] == pytest.approx(1.0) and lru["wasted_prefetches"] == 0
    recall = doc["policies"]["moeray"]["predictors"]
    assert set(recall) == {"cross-layer", "previous-token", "affinity", "combined"}
    assert all(0 <= v["recall"] <= 1 and 0 <= v["precision"] <= 1 for v in recall.values())


def test_cli_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    trace = write(tmp_path / "hand.npz", np.array(HAND_LAYERS).T, 4)
    png = tmp_path / "plots" / "replay.png"
    argv = [
        "replay",
        str(trace),
        "--backend",
        "local",
        "--policy",
        "lru",
        "--policy",
        "moeray",
        "--plot",
        str(png),
    ]
    assert cli.main(argv) == 0
    assert str(png) in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    trace = write(tmp_path / "hand.npz", np.array(HAND_LAYERS).T, 4)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    png = tmp_path / "never.png"
    assert cli.main(["replay", str(trace), "--backend", "local", "--plot", str(png)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before replaying
    assert "moeray[plot]" in captured.err and "Traceback" not in captured.err
    assert not png.exists()


def test_cli_service_backend_serves_every_online_policy(tmp_path, capsys, monkeypatch):
    """`moeray replay` (service backend) sends moeray to the layer actors with the other
    policies, engine hints and a capacity re-split included, and starts no service for belady
    alone. A fake service stands in for Ray here (it returns the in-process results, without
    top_k, as the service does)."""
    import contextlib
    import types

    from moeray.replay import PolicyResult, ReplayReport

    asked = []

    def fake_replay_through_service(trace, config, **kwargs):
        asked.append(config.policies)
        local = replay_trace(trace, config)
        results = {
            n: PolicyResult(n, r.per_layer_hits, r.accesses_per_layer, r.per_layer_seconds)
            for n, r in local.results.items()
        }
        return ReplayReport(trace.name, trace.num_experts, config.capacity, results), []

    import moeray.actors
    import moeray.replay

    fake = types.ModuleType("moeray.replay.service")
    fake.replay_through_service = fake_replay_through_service
    monkeypatch.setitem(sys.modules, "moeray.replay.service", fake)
    monkeypatch.setattr(moeray.replay, "service", fake, raising=False)
    fake_ray = types.ModuleType("moeray.actors._ray")
    fake_ray.local_session = lambda address, **_: contextlib.nullcontext()
    monkeypatch.setitem(sys.modules, "moeray.actors._ray", fake_ray)
    monkeypatch.setattr(moeray.actors, "_ray", fake_ray, raising=False)
    trace = write(tmp_path / "hand.npz", np.array(HAND_LAYERS).T, 4)
    out = tmp_path / "service.json"
    argv = [
        "replay",
        str(trace),
        "--capacity",
        "0.5",
        "--policy",
        "lru",
        "--policy",
        "moeray",
        "--json",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert asked == [("lru", "moeray")]
    doc = json.loads(out.read_text())
    assert list(doc["policies"]) == ["lru", "moeray"]
    assert doc["policies"]["lru"]["transfers_per_token"] == pytest.approx(1.0)  # 9 misses / 9
    asked.clear()
    assert (
        cli.main(
            [
                "replay",
                str(trace),
                "--policy",
                "moeray",
                "--json",
                str(out),
                "--hint-accuracy",
                "0.9",
            ]
        )
        == 0
    )
    assert asked == [("moeray",)]  # the hints go with the steps
    asked.clear()
    assert (
        cli.main(
            ["replay", str(trace), "--policy", "moeray", "--json", str(out), "--resplit-every", "4"]
        )
        == 0
    )
    assert asked == [("moeray",)]  # the coordinator re-splits
    asked.clear()
    assert cli.main(["replay", str(trace), "--policy", "belady", "--json", str(out)]) == 0
    assert asked == []  # an oracle: nothing to serve
    assert json.loads(out.read_text())["policies"]["belady"]["transfers_per_token"] > 0
    assert "moeray" in capsys.readouterr().out


def test_synthetic_hints_name_only_the_hinted_layers_routing():
    rng = np.random.default_rng(11)
    ids = np.stack(
        [np.stack([rng.choice(16, 3, replace=False) for _ in range(4)]) for _ in range(3000)]
    ).astype(np.int32)
    used = np.zeros((3000, 4, 17), dtype=bool)
    np.put_along_axis(used, ids, True, axis=2)

    def hints(stream, accuracy, seed=0):
        return synthetic_hints(stream, 16, accuracy, np.random.default_rng(seed), chunk_tokens=700)

    np.testing.assert_array_equal(hints(ids, 1.0), ids)
    wrong = hints(ids, 0.0)
    assert not np.take_along_axis(used, wrong, axis=2).any()
    assert all(len(set(row)) == 3 for row in wrong.reshape(-1, 3)[:500])  # distinct wrong ones
    some = hints(ids, 0.6)
    assert abs((some == ids).mean() - 0.6) < 0.02
    assert (np.take_along_axis(used, some, axis=2) == (some == ids)).all()  # right = the slot's
    np.testing.assert_array_equal(hints(ids, 0.6), some)  # seeded
    # Hints of (token, layer) depend on that routing only: change every other layer and token.
    changed = ids.copy()
    changed[:, 1:] = (changed[:, 1:] + 5) % 16
    changed[1:, 0] = (changed[1:, 0] + 7) % 16
    np.testing.assert_array_equal(hints(changed, 0.6)[0, 0], some[0, 0])
    with pytest.raises(ValueError, match="accuracy"):
        synthetic_hints(ids, 16, 1.5, rng)


def test_cli_hints_and_resplit_reach_the_json(tmp_path):
    rng = np.random.default_rng(12)
    tokens = np.stack([rng.choice(4, 2, replace=False) for _ in range(400)])
    layered = np.stack([tokens[:, 0], tokens[:, 1], (tokens[:, 0] + 1) % 4], axis=1)  # top-1
    trace = write(tmp_path / "t.npz", layered, 4)
    out = tmp_path / "hints.json"
    argv = [
        "replay",
        str(trace),
        "--backend",
        "local",
        "--capacity",
        "0.5",
        "--policy",
        "lru",
        "--policy",
        "moeray",
        "--json",
        str(out),
    ]
    assert cli.main(argv + ["--hint-accuracy", "1", "--resplit-every", "16"]) == 0
    moeray = json.loads(out.read_text())["policies"]["moeray"]
    assert moeray["predictors"]["hints"] == {"recall": 1.0, "precision": 1.0}
    resplit = moeray["resplit"]
    assert sum(resplit["final_capacity"]) == 3 * 2
    assert set(resplit) == {
        "moved",
        "evictions",
        "transfers",
        "per_layer_transfers",
        "final_capacity",
    }
    assert resplit["transfers"] <= resplit["evictions"]
    assert cli.main(argv + ["--resplit-every", "0"]) == 0
    moeray = json.loads(out.read_text())["policies"]["moeray"]
    assert "hints" not in moeray["predictors"] and "resplit" not in moeray


def test_hint_and_resplit_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="hint_accuracy"):
        ReplayConfig(capacity=2, hint_accuracy=1.5)
    trace = write(tmp_path / "hand.npz", np.array(HAND_LAYERS).T, 4)
    for flag, value, name in (
        ("--hint-accuracy", "-0.5", "hint_accuracy"),
        ("--resplit-every", "-1", "--resplit-every"),
    ):
        assert cli.main(["replay", str(trace), "--backend", "local", flag, value]) == 2
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err

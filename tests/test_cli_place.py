"""`moeray place`: the table names every algorithm, --json holds the report's schema, the oracle
bounds eplb where windows differ, --write-map round-trips through read_map, --plot draws, and
every bad input is one line on stderr with exit 2 naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeray import cli
from moeray.placement import ALGORITHMS, MAP_FORMATS, PlaceConfig, read_map
from moeray.placement.replay import final_placement
from moeray.traces import default_trace_path, load_trace

pytestmark = pytest.mark.pure

LAYERS, EXPERTS, TOP_K = 3, 16, 2
SMALL = ["--gpus", "4", "--every", "256", "--batch", "64"]  # 8 windows of the synthetic trace


def write_trace(folder, tokens: int = 2048, seed: int = 0, shift_every: int = 256) -> str:
    """An .npz of [tokens, LAYERS, TOP_K] distinct ids whose four hot experts (80 % of routing)
    move on every ``shift_every`` tokens: each window's load differs from the last."""
    rng = np.random.default_rng(seed)
    ids = np.empty((tokens, LAYERS, TOP_K), dtype=np.uint8)
    for start in range(0, tokens, shift_every):
        stop = min(start + shift_every, tokens)
        hot = (np.arange(4) + 5 * (start // shift_every)) % EXPERTS
        prior = np.full(EXPERTS, 0.2 / (EXPERTS - 4))
        prior[hot] = 0.8 / 4
        for t in range(start, stop):
            for layer in range(LAYERS):
                ids[t, layer] = rng.choice(EXPERTS, TOP_K, replace=False, p=np.roll(prior, layer))
    path = folder / f"routing-{seed}.npz"
    np.savez(path, expert_ids=ids, seq_offsets=np.array([0, tokens], dtype=np.int64))
    return str(path)


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory) -> str:
    return write_trace(tmp_path_factory.mktemp("place"))


def place(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(["place", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_default_run_prints_every_algorithm(capsys):
    code, out, _ = place([], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for name in ALGORITHMS:
        assert name in rows, out
    assert rows["moeray"][1] == "dispatched" and rows["eplb"][1] == "even"
    assert "gpt-oss-20b-slice" in out and "oracle knows each window's load in advance" in out


def test_json_has_the_schema(trace_path, tmp_path, capsys):
    target = tmp_path / "place.json"
    code, out, _ = place([trace_path, *SMALL, "--json", str(target)], capsys)
    assert code == 0 and f"wrote {target}" in out
    report = json.loads(target.read_text())
    assert {"trace", "topology", "algorithms"} <= set(report)
    assert report["topology"]["num_nodes"] * report["topology"]["gpus_per_node"] == 4
    assert set(report["algorithms"]) == set(ALGORITHMS)
    for name, result in report["algorithms"].items():
        for key in ("balancedness", "batch_balancedness"):
            summary = result[key]
            assert 0 <= summary["p10"] <= summary["mean"] <= 1, (name, key)
        assert len(result["balancedness"]["per_layer"]) == LAYERS
        assert all(0 <= v <= 1 for v in result["balancedness"]["per_layer"])
        for key in ("slots_moved_per_rebalance", "rebalances", "skipped", "planner_ms"):
            assert result[key] >= 0, (name, key)
        assert result["bytes_moved_per_rebalance"] is None  # no --expert-bytes
        assert len(result["window_series"]) == report["windows_scored"] == 7
        assert all(len(row) == 4 for row in result["gpu_load_ratio"])
    assert report["algorithms"]["static"]["rebalances"] == 0


def test_json_to_stdout_moves_the_table_to_stderr(trace_path, capsys):
    code, out, err = place([trace_path, *SMALL, "--algorithm", "eplb", "--json", "-"], capsys)
    assert code == 0
    assert list(json.loads(out)["algorithms"]) == ["eplb"]
    assert "window balancedness" in err


def test_oracle_bounds_eplb_where_windows_differ(trace_path, tmp_path, capsys):
    target = tmp_path / "place.json"
    assert place([trace_path, *SMALL, "--json", str(target)], capsys)[0] == 0
    algorithms = json.loads(target.read_text())["algorithms"]
    # eplb places for all load seen, and every window moves the hot experts elsewhere
    assert algorithms["oracle"]["balancedness"]["mean"] > algorithms["eplb"]["balancedness"]["mean"]


def test_budget_in_bytes_counts_whole_experts(trace_path, tmp_path, capsys):
    target = tmp_path / "place.json"
    argv = [trace_path, *SMALL, "--algorithm", "moeray,eplb", "--json", str(target)]
    argv += ["--migration-budget", "2.5GiB", "--expert-bytes", "1GiB"]
    code, out, _ = place(argv, capsys)
    assert code == 0 and "GiB" in out
    report = json.loads(target.read_text())
    assert report["migration_budget"] == 2
    for result in report["algorithms"].values():
        assert result["bytes_moved_per_rebalance"] == result["slots_moved_per_rebalance"] * 2**30


def test_a_slot_budget_reaches_the_planner(trace_path, tmp_path, capsys):
    target = tmp_path / "place.json"
    argv = [trace_path, *SMALL, "--algorithm", "moeray", "--migration-budget", "1"]
    assert place([*argv, "--json", str(target)], capsys)[0] == 0
    report = json.loads(target.read_text())
    assert report["migration_budget"] == 1
    assert report["algorithms"]["moeray"]["slots_moved_per_rebalance"] <= LAYERS


@pytest.mark.parametrize("format", MAP_FORMATS)
def test_write_map_round_trips(trace_path, tmp_path, capsys, format):
    target = tmp_path / f"map.{format}"
    argv = [trace_path, *SMALL, "--algorithm", "static", "--write-map", format, str(target)]
    code, out, _ = place(argv, capsys)
    assert code == 0 and f"wrote {target}" in out
    trace = load_trace(trace_path)
    config = PlaceConfig(gpus=4, every=256, batch=64)
    expected = final_placement(trace, config)
    read = read_map(target, format, config.topology(EXPERTS), EXPERTS)
    np.testing.assert_array_equal(read.physical_to_logical, expected.physical_to_logical)
    # the forecast's hot experts hold the replicas
    assert (expected.replica_counts > 1).any()


def test_write_map_first_layer(trace_path, tmp_path, capsys):
    target = tmp_path / "map.json"
    argv = [trace_path, *SMALL, "--algorithm", "static", "--first-layer", "3"]
    assert place([*argv, "--write-map", "sglang", str(target)], capsys)[0] == 0
    assert len(json.loads(target.read_text())["physical_to_logical_map"]) == 3 + LAYERS
    topology = PlaceConfig(gpus=4).topology(EXPERTS)
    assert read_map(target, "sglang", topology, EXPERTS, first_layer=3).num_layers == LAYERS


def test_plot_writes_a_png(trace_path, tmp_path, capsys):
    target = tmp_path / "plots" / "place.png"
    code, out, _ = place([trace_path, *SMALL, "--plot", str(target)], capsys)
    assert code == 0 and f"wrote {target}" in out
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_line(trace_path, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = place([trace_path, *SMALL, "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and out == ""
    assert (
        err.strip() == "moeray place: error: --plot: needs matplotlib (pip install 'moeray[plot]')"
    )


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--redundant", "-4"], "redundant"),  # fewer slots than experts
        (["--gpus", "6", "--nodes", "4"], "gpus"),
        (["--gpus", "4", "--redundant", "3"], "redundant"),  # 19 slots over 4 GPUs
        (["--gpus", "0"], "gpus"),
        (["--every", "1500"], "every"),  # 2,048 tokens: fewer than two windows
        (["--every", "128", "--batch", "256"], "batch"),
        (["--algorithm", "eplb,magic"], "--algorithm"),
        (["--write-map", "onnx", "map.onnx"], "--write-map"),
        (["--migration-budget", "lots"], "--migration-budget"),
        (["--migration-budget", "512MiB"], "--migration-budget"),  # bytes without --expert-bytes
        (["--expert-bytes", "0"], "--expert-bytes"),
        (["--groups", "3"], "num_groups"),  # 16 experts in 3 groups
    ],
)
def test_bad_input_is_one_line_naming_the_field(trace_path, capsys, argv, field):
    code, _, err = place([trace_path, *argv], capsys)
    assert code == 2
    line = err.strip()
    assert "\n" not in line, err
    assert line.startswith("moeray place: error: ") and field in line, line


def test_missing_or_corrupt_trace_is_one_line(tmp_path, capsys):
    code, _, err = place([str(tmp_path / "missing.npz")], capsys)
    assert code == 2 and "\n" not in err.strip() and "missing.npz" in err
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip archive")
    code, _, err = place([str(corrupt)], capsys)
    assert code == 2 and "\n" not in err.strip() and "corrupt.npz" in err


def test_every_on_the_bundled_trace_is_checked(capsys):
    tokens = load_trace(default_trace_path()).num_tokens
    code, _, err = place(["--every", str(tokens // 2 + 1)], capsys)
    assert code == 2 and "\n" not in err.strip() and "every:" in err


def test_load_places_once_from_a_counts_table(tmp_path, capsys):
    # one layer whose expert 0 carries half the load: only a replica spreads it
    counts = np.array([[40, 6, 6, 6, 6, 6, 6, 4], [5, 5, 5, 5, 5, 5, 5, 5]])
    table = tmp_path / "counts.csv"
    table.write_text("\n".join(",".join(str(c) for c in row) for row in counts) + "\n")
    out_map = tmp_path / "map.json"
    report = tmp_path / "load.json"
    argv = ["--load", str(table), "--gpus", "4", "--json", str(report)]
    code, out, _ = place([*argv, "--write-map", "sglang", str(out_map)], capsys)
    assert code == 0, out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert {"static", "eplb", "moeray"} <= rows.keys() and "in sample" in out
    data = json.loads(report.read_text())
    for name in ("static", "eplb", "moeray"):
        assert 0 < data["algorithms"][name]["balancedness"]["min"] <= 1
    # the static map cannot split expert 0's load; placements from the load do
    static = data["algorithms"]["static"]["balancedness"]["per_layer"][0]
    assert data["algorithms"]["moeray"]["balancedness"]["per_layer"][0] > static
    topology = PlaceConfig(gpus=4).topology(8)
    written = read_map(out_map, "sglang", topology, 8)
    assert written.replica_counts[0, 0] == written.replica_counts[0].max() > 1
    code, _, err = place(["--load", str(table), str(table)], capsys)
    assert code == 2 and "--load" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.csv").write_text("1,2\n3,-4\n")
    code, _, err = place(["--load", str(tmp_path / "bad.csv")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_shared_budget_adds_a_row_at_the_same_memory(trace_path, tmp_path, capsys):
    target = tmp_path / "shared.json"
    argv = [trace_path, *SMALL, "--redundant", "8", "--shared-budget", "--json", str(target)]
    code, out, _ = place(argv, capsys)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["shared"][1] == "dispatched"
    assert "shared: the same 24 redundant slots over 3 layers" in out
    report = json.loads(target.read_text())
    assert set(report["algorithms"]) == set(ALGORITHMS) | {"shared"}
    shared = report["shared"]
    assert shared["topology"]["redundant_budget"] == LAYERS * 8
    counts = shared["redundant_per_layer"]
    assert len(counts) == LAYERS and sum(counts) <= LAYERS * 8
    assert max(counts) <= shared["topology"]["slots_per_gpu"] * 4 - EXPERTS
    result = report["algorithms"]["shared"]
    assert 0 < result["balancedness"]["mean"] <= 1
    assert len(result["window_series"]) == report["windows_scored"]


def test_shared_budget_with_a_load_table(tmp_path, capsys):
    load = tmp_path / "load.csv"
    rows = np.ones((LAYERS, EXPERTS), dtype=np.int64)
    rows[1, :2] = 40
    load.write_text("\n".join(",".join(str(v) for v in row) for row in rows) + "\n")
    code, out, _ = place(["--load", str(load), "--gpus", "4", "--shared-budget"], capsys)
    assert code == 0
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert "shared" in table and 0 < float(table["shared"][1]) <= 1


def test_shared_budget_map_is_written_filled(trace_path, tmp_path, capsys):
    target = tmp_path / "map.json"
    argv = [trace_path, *SMALL, "--redundant", "8", "--shared-budget"]
    code, out, _ = place([*argv, "--write-map", "sglang", str(target)], capsys)
    assert code == 0 and "empty slots of the shared budget filled" in out
    config = PlaceConfig(gpus=4, redundant=8, every=256, batch=64, shared_budget=True)
    placement = final_placement(load_trace(trace_path), config)
    assert placement.topology.redundant_budget == LAYERS * 8
    grid = placement.topology
    fixed = type(grid)(grid.num_nodes, grid.gpus_per_node, grid.slots_per_gpu)
    read = read_map(target, "sglang", fixed, EXPERTS)
    np.testing.assert_array_equal(read.physical_to_logical, placement.filled().physical_to_logical)
    code, _, err = place([*argv, "--write-map", "vllm", str(tmp_path / "v.json")], capsys)
    assert code == 2 and "is empty (a shared budget)" in err and err.count("\n") == 1

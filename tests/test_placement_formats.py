"""Engines' placement files (moeray.placement.formats): each format written and read back, its
on-disk structure checked against the engine's documented layout, every bad input refused in
one line that names the field, and the loads read_load accepts."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import yaml

from moeray.placement import Placement, PlacementError, Topology
from moeray.placement.formats import (
    MAP_FORMATS,
    MAX_FILE_BYTES,
    read_load,
    read_map,
    write_map,
    write_sglang,
    write_trtllm,
    write_vllm,
)
from moeray.traces import Trace, write_trace

pytestmark = pytest.mark.pure

# 12 experts on 8 GPUs in 2 nodes, 2 slots per GPU: 16 slots per layer.
NUM_EXPERTS = 12
TOPOLOGY = Topology(num_nodes=2, gpus_per_node=4, slots_per_gpu=2)
P2L = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
SUFFIX = {"sglang": ".json", "trtllm": ".yaml", "vllm": ".json"}


@pytest.fixture
def placement() -> Placement:
    return Placement(np.array(P2L), TOPOLOGY, NUM_EXPERTS)


def refuses(match: str):
    return pytest.raises(PlacementError, match=match)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", MAP_FORMATS)
def test_round_trip_gives_the_same_physical_to_logical(placement, fmt, tmp_path):
    path = write_map(placement, fmt, tmp_path / f"map{SUFFIX[fmt]}")
    back = read_map(path, fmt, TOPOLOGY, NUM_EXPERTS)
    np.testing.assert_array_equal(back.physical_to_logical, P2L)
    assert back.topology == TOPOLOGY and back.num_experts == NUM_EXPERTS


@pytest.mark.parametrize("fmt", ["sglang", "trtllm"])
def test_round_trip_after_dense_layers(placement, fmt, tmp_path):
    path = write_map(placement, fmt, tmp_path / f"map{SUFFIX[fmt]}", first_layer=3)
    back = read_map(path, fmt, TOPOLOGY, NUM_EXPERTS, first_layer=3)
    np.testing.assert_array_equal(back.physical_to_logical, P2L)


def test_writing_replaces_the_file_whole(placement, tmp_path):
    path = tmp_path / "map.json"
    path.write_text("old contents, longer than nothing")
    write_sglang(placement, path)
    assert json.loads(path.read_text())["physical_to_logical_map"] == P2L
    assert [p.name for p in tmp_path.iterdir()] == ["map.json"]  # no temporary file left


# --------------------------------------------------------------------------- golden structure


def test_sglang_file_is_init_by_mapping_input(placement, tmp_path):
    # SGLang's compute_initial_expert_location_metadata reads a .json whose keys all go to
    # init_by_mapping(physical_to_logical_map=...): one key, [layers][num_physical_experts].
    data = json.loads(write_sglang(placement, tmp_path / "m.json").read_text())
    assert list(data) == ["physical_to_logical_map"]
    assert data["physical_to_logical_map"] == P2L


def test_sglang_dense_layers_get_the_trivial_row(placement, tmp_path):
    rows = json.loads(write_sglang(placement, tmp_path / "m.json", first_layer=2).read_text())[
        "physical_to_logical_map"
    ]
    trivial = [slot % NUM_EXPERTS for slot in range(16)]  # SGLang's init_trivial
    assert rows == [trivial, trivial, *P2L]


def test_trtllm_file_is_a_moe_load_balancer_config(placement, tmp_path):
    # MoeLoadBalancerConfig (a strict model): num_slots, initial_global_assignments
    # {layer_idx: [num_slots expert ids]}, layer_updates_per_iter; nothing else.
    path = write_trtllm(placement, tmp_path / "moe_load_balancer.yaml", first_layer=3)
    data = yaml.safe_load(path.read_text())
    assert set(data) == {"num_slots", "initial_global_assignments", "layer_updates_per_iter"}
    assert data["num_slots"] == 2 * 4 * 2  # nodes x GPUs per node x slots per GPU
    assert data["initial_global_assignments"] == {3: P2L[0], 4: P2L[1]}
    assert data["layer_updates_per_iter"] == 0
    # EP rank r owns slots [r * num_local_slots, (r + 1) * num_local_slots), num_local_slots =
    # num_slots // ep_size: moeray's GPU r.
    assert data["num_slots"] // TOPOLOGY.num_gpus == TOPOLOGY.slots_per_gpu


def test_vllm_file_is_an_expert_map_per_rank(placement, tmp_path):
    data = json.loads(write_vllm(placement, tmp_path / "expert_map.json").read_text())
    assert data["moe_layer_count"] == 2
    assert [layer["layer_id"] for layer in data["layer_list"]] == [0, 1]
    for l, layer in enumerate(data["layer_list"]):
        assert layer["device_count"] == 8
        assert [d["device_id"] for d in layer["device_list"]] == list(range(8))
        for g, device in enumerate(layer["device_list"]):
            held = P2L[l][2 * g : 2 * g + 2]
            assert device["device_expert"] == held
            expected_map = [held.index(e) if e in held else -1 for e in range(NUM_EXPERTS)]
            assert device["expert_map"] == expected_map


def test_docs_show_what_moeray_writes(tmp_path):
    """docs/placement-formats.md's example files are the writers' output for its placement."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "placement-formats.md").read_text()
    blocks = {lang: [] for lang in ("json", "yaml")}
    for lang, body in re.findall(r"^```(json|yaml)\n(.*?)^```", doc, re.MULTILINE | re.DOTALL):
        blocks[lang].append(body)
    topology = Topology(num_nodes=1, gpus_per_node=2, slots_per_gpu=3)
    placement = Placement(np.array([[0, 1, 2, 3, 0, 1], [2, 3, 0, 1, 2, 3]]), topology, 4)
    assert write_sglang(placement, tmp_path / "s.json").read_text() == blocks["json"][0]
    assert write_vllm(placement, tmp_path / "v.json").read_text() == blocks["json"][1]
    assert write_trtllm(placement, tmp_path / "t.yaml").read_text() == blocks["yaml"][0]


# --------------------------------------------------------------------------- bad maps


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def sglang_file(tmp_path, rows):
    return write(tmp_path, "m.json", json.dumps({"physical_to_logical_map": rows}))


@pytest.mark.parametrize(
    "rows, match",
    [
        (
            [P2L[0], P2L[1][:15]],
            "physical_to_logical_map: layer 1 has 15 slots, the topology has 16",
        ),
        (
            [P2L[0], [12] + P2L[1][1:]],
            r"layer 1 slot 0 holds expert 12; expected an expert id in \[0, 12\)",
        ),
        ([[-1] + P2L[0][1:]], "layer 0 slot 0 holds expert -1"),
        ([[5.0] + P2L[0][1:]], "layer 0 slot 0 holds a float"),
        ([[True] + P2L[0][1:]], "layer 0 slot 0 holds a bool"),
        ([[2**70] + P2L[0][1:]], "layer 0 slot 0 holds expert 1180591620717411303424"),
        ([[0] * 16], "physical_to_logical_map: expert 1 holds no slot in layer 0"),
        ([P2L[0], 7], "physical_to_logical_map: layer 1 is an int, expected a list"),
        ({"0": P2L[0]}, "physical_to_logical_map: expected a list of layers, got a dict"),
        ([], "physical_to_logical_map: no layers"),
    ],
)
def test_sglang_bad_rows(tmp_path, rows, match):
    with refuses(match):
        read_map(sglang_file(tmp_path, rows), "sglang", TOPOLOGY, NUM_EXPERTS)


def test_sglang_more_than_4096_layers_is_refused_before_the_rows_are_read(tmp_path):
    path = write(tmp_path, "m.json", '{"physical_to_logical_map": [' + "[]," * 4096 + "[]]}")
    with refuses("physical_to_logical_map: 4097 layers, more than the 4096"):
        read_map(path, "sglang", TOPOLOGY, NUM_EXPERTS)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"physical_to_logical_map": [[1, 2]', r"m.json: not valid JSON \(Expecting"),
        ("[[1, 2]]", "m.json: expected a JSON object with 'physical_to_logical_map', got a list"),
        ('{"p2l": []}', "physical_to_logical_map: missing from m.json"),
        ('{"logical_count": [[1]]}', "logical_count file, expert loads: read_load reads it"),
        ("\xff\xfe", "m.json: not valid JSON"),
    ],
)
def test_sglang_malformed_files(tmp_path, text, match):
    path = tmp_path / "m.json"
    path.write_bytes(text.encode("latin-1"))
    with refuses(match):
        read_map(path, "sglang", TOPOLOGY, NUM_EXPERTS)


def test_sglang_first_layer_past_the_map(tmp_path):
    with refuses("first_layer: 2, but physical_to_logical_map has 2 layers"):
        read_map(sglang_file(tmp_path, P2L), "sglang", TOPOLOGY, NUM_EXPERTS, first_layer=2)


def trtllm_file(tmp_path, config) -> object:
    return write(tmp_path, "lb.yaml", yaml.safe_dump(config, default_flow_style=None))


def trtllm_config(**changes):
    config = {"num_slots": 16, "initial_global_assignments": {0: P2L[0], 1: P2L[1]}}
    config.update(changes)
    return config


@pytest.mark.parametrize(
    "config, match",
    [
        (
            trtllm_config(num_slots=288),
            "num_slots: the file has 288 slots per layer, the topology has 16",
        ),
        (trtllm_config(num_slots=None), "num_slots: expected an int, got nothing"),
        (
            trtllm_config(initial_global_assignments=None),
            "initial_global_assignments: expected a mapping",
        ),
        (
            trtllm_config(initial_global_assignments={0: P2L[0], 2: P2L[1]}),
            "initial_global_assignments: layer 1 is missing",
        ),
        (
            trtllm_config(initial_global_assignments={-1: P2L[0]}),
            "initial_global_assignments: layer keys must be ints >= 0, got -1",
        ),
        (
            trtllm_config(initial_global_assignments={"x": P2L[0]}),
            "layer keys must be ints >= 0, got 'x'",
        ),
        (
            trtllm_config(initial_global_assignments={0: P2L[0][:15]}),
            "initial_global_assignments: layer 0 has 15 slots, the topology has 16",
        ),
        (
            trtllm_config(initial_global_assignments={0: P2L[0], 1: [99] * 16}),
            "initial_global_assignments: layer 1 slot 0 holds expert 99",
        ),
        (
            [1, 2],
            "lb.yaml: expected a YAML mapping with num_slots and initial_global_assignments, got a list",
        ),
        (
            {"moe_config": {"load_balancer": "lb2.yaml"}},
            "moe_config.load_balancer: names the file 'lb2.yaml'",
        ),
    ],
)
def test_trtllm_bad_configs(tmp_path, config, match):
    with refuses(match):
        read_map(trtllm_file(tmp_path, config), "trtllm", TOPOLOGY, NUM_EXPERTS)


def test_trtllm_reads_an_llm_api_options_file(tmp_path):
    path = trtllm_file(tmp_path, {"moe_config": {"load_balancer": trtllm_config()}})
    placement = read_map(path, "trtllm", TOPOLOGY, NUM_EXPERTS)
    np.testing.assert_array_equal(placement.physical_to_logical, P2L)


def test_trtllm_layers_before_first_layer(tmp_path):
    with refuses("initial_global_assignments: layer 0 comes before first_layer=3"):
        read_map(
            trtllm_file(tmp_path, trtllm_config()), "trtllm", TOPOLOGY, NUM_EXPERTS, first_layer=3
        )


def test_trtllm_alias_layers_are_refused(tmp_path):
    row = "[" + ", ".join(map(str, P2L[0])) + "]"
    text = f"num_slots: 16\ninitial_global_assignments:\n  0: &row {row}\n  1: *row\n"
    with refuses("initial_global_assignments: layer 1 is an alias of layer 0"):
        read_map(write(tmp_path, "lb.yaml", text), "trtllm", TOPOLOGY, NUM_EXPERTS)


def test_trtllm_malformed_yaml(tmp_path):
    path = write(tmp_path, "lb.yaml", "num_slots: 16\ninitial_global_assignments: {0: [1, 2\n")
    with refuses(r"lb.yaml: not valid YAML \(.* at line \d+ column \d+\)"):
        read_map(path, "trtllm", TOPOLOGY, NUM_EXPERTS)


def vllm_data(placement, tmp_path) -> dict:
    return json.loads(write_vllm(placement, tmp_path / "v.json").read_text())


def test_vllm_bad_maps(placement, tmp_path):
    cases = []
    data = vllm_data(placement, tmp_path)
    data["moe_layer_count"] = 3
    cases.append((data, "moe_layer_count: 3, but layer_list holds 2 layers"))
    data = vllm_data(placement, tmp_path)
    data["layer_list"][1]["device_list"].pop()
    cases.append((data, r"layer_list\[1\].device_list: 7 EP ranks, the topology has 8 GPUs"))
    data = vllm_data(placement, tmp_path)
    data["layer_list"][0]["device_list"][3]["device_expert"] = [3]
    cases.append(
        (
            data,
            r"layer_list\[0\].device_list\[3\].device_expert: expected the experts of the "
            "topology's 2 slots per GPU, got 1 slots",
        )
    )
    data = vllm_data(placement, tmp_path)
    data["layer_list"][0]["device_list"][6]["expert_map"][0] = 1
    cases.append(
        (
            data,
            r"layer_list\[0\].device_list\[6\].expert_map: disagrees with its device_expert \[0, 1\]",
        )
    )
    data = vllm_data(placement, tmp_path)
    data["layer_list"][0]["device_count"] = 4
    cases.append((data, r"layer_list\[0\].device_count: 4, but device_list holds 8 ranks"))
    data = vllm_data(placement, tmp_path)
    data["layer_list"] = {}
    cases.append((data, "layer_list: expected a list of layers, got a dict"))
    cases.append(
        ([], "v.json: expected a JSON object with moe_layer_count and layer_list, got a list")
    )
    for data, match in cases:
        path = write(tmp_path, "v.json", json.dumps(data))
        with refuses(match):
            read_map(path, "vllm", TOPOLOGY, NUM_EXPERTS)


def test_vllm_refuses_two_replicas_of_an_expert_on_one_gpu(tmp_path):
    twins = [P2L[0][:2] + [4, 4] + P2L[0][4:6] + [7, 3] + P2L[0][8:]]  # GPU 1: expert 4 twice
    placement = Placement(np.array(twins), TOPOLOGY, NUM_EXPERTS)
    with refuses("placement: GPU 1 holds expert 4 twice in layer 0"):
        write_vllm(placement, tmp_path / "v.json")
    layer = {"device_list": [{"device_expert": twins[0][2 * g : 2 * g + 2]} for g in range(8)]}
    path = write(tmp_path, "v.json", json.dumps({"moe_layer_count": 1, "layer_list": [layer]}))
    with refuses("layer_list: GPU 1 holds expert 4 twice in layer 0"):
        read_map(path, "vllm", TOPOLOGY, NUM_EXPERTS)


def test_unknown_format_and_vllm_first_layer(placement, tmp_path):
    with refuses("format: expected one of sglang, trtllm, vllm, got 'deepspeed'"):
        write_map(placement, "deepspeed", tmp_path / "m")
    with refuses("format: expected one of"):
        read_map(tmp_path / "m", "json", TOPOLOGY, NUM_EXPERTS)
    with refuses("first_layer: the vllm map counts MoE layers only"):
        write_map(placement, "vllm", tmp_path / "v.json", first_layer=3)


@pytest.mark.parametrize("fmt", MAP_FORMATS)
def test_missing_empty_and_oversized_files(tmp_path, fmt):
    with refuses("path: no file at"):
        read_map(tmp_path / "none", fmt, TOPOLOGY, NUM_EXPERTS)
    with refuses("path: .* is empty"):
        read_map(write(tmp_path, "empty", ""), fmt, TOPOLOGY, NUM_EXPERTS)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written
    with refuses("path: .* is 256 MiB, more than the 256 MiB moeray reads"):
        read_map(big, fmt, TOPOLOGY, NUM_EXPERTS)


# --------------------------------------------------------------------------- loads

IDS = np.array(
    [
        [[0, 3], [2, 1]],
        [[3, 0], [2, 2]],
        [[1, 3], [0, 2]],
    ],
    dtype=np.uint8,
)  # [tokens=3, layers=2, top_k=2] over 4 experts


def counted(ids: np.ndarray, num_experts: int) -> np.ndarray:
    load = np.zeros((ids.shape[1], num_experts))
    for token in ids:
        for layer, chosen in enumerate(token):
            for expert in chosen:
                load[layer, expert] += 1
    return load


def test_load_of_an_npz_trace(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, expert_ids=IDS, seq_offsets=np.array([0, 2, 3], dtype=np.int64))
    load, source = read_load(path)
    assert load.dtype == np.float64
    np.testing.assert_array_equal(load, counted(IDS, 4))
    assert "routing trace t.npz: 3 tokens x top-2, 2 layers x 4 experts" in source


def test_load_of_an_mtrace(tmp_path):
    trace = Trace(IDS, None, np.array([0, 3], dtype=np.int64), num_experts=6)
    write_trace(trace, tmp_path / "t.mtrace")
    load, _ = read_load(tmp_path / "t.mtrace")
    np.testing.assert_array_equal(load, counted(IDS, 6))


def test_load_of_sglang_logical_count_json(tmp_path):
    steps = np.arange(3 * 2 * 4).reshape(3, 2, 4)
    path = write(tmp_path, "d.json", json.dumps({"logical_count": steps.tolist(), "rank": 0}))
    load, source = read_load(path)
    np.testing.assert_array_equal(load, steps[0] + steps[1] + steps[2])
    assert source == "SGLang logical_count in d.json: 2 layers x 4 experts, 3 steps summed"
    path = write(tmp_path, "d2.json", json.dumps({"logical_count": steps[0].tolist()}))
    np.testing.assert_array_equal(read_load(path)[0], steps[0])


def test_load_json_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"logical_count": [[1, 2]]}).encode())
    np.testing.assert_array_equal(read_load(path)[0], [[1, 2]])


def test_load_first_layer_drops_dense_layers(tmp_path):
    counts = [[0, 0, 0], [0, 0, 0], [4, 1, 2], [1, 1, 1]]
    path = write(tmp_path, "d.json", json.dumps({"logical_count": counts}))
    load, source = read_load(path, first_layer=2)
    np.testing.assert_array_equal(load, [[4, 1, 2], [1, 1, 1]])
    assert "layers before 2 dropped" in source
    with refuses("first_layer: layer 2 of d.json has load 7, so it is no dense layer"):
        read_load(path, first_layer=3)
    with refuses("first_layer: 4, but d.json has 4 layers"):
        read_load(path, first_layer=4)


def test_load_of_a_counts_csv(tmp_path):
    path = write(tmp_path, "c.csv", "e0,e1,e2\n1,2,3\n\n4,5.5,0\n")
    load, source = read_load(path)
    np.testing.assert_array_equal(load, [[1, 2, 3], [4, 5.5, 0]])
    assert source == "counts CSV c.csv: 2 layers x 3 experts"
    tabs = write(tmp_path, "c.tsv", "7\t8\n9\t10\n")
    np.testing.assert_array_equal(read_load(tabs)[0], [[7, 8], [9, 10]])


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("c.csv", "1,2,3\n4,5\n", "c.csv: line 2 has 2 columns, the first row has 3"),
        (
            "c.csv",
            "1,-2,3\n",
            r"c.csv: line 1 column 2: '-2' is not a count \(a finite number >= 0\)",
        ),
        ("c.csv", "1,nan\n", "c.csv: line 1 column 2: 'nan' is not a count"),
        ("c.csv", "1,x\n", "c.csv: line 1 column 2: 'x' is not a count"),
        ("c.csv", "e0,e1\n", "c.csv: no rows of counts"),
        (
            "c.csv",
            "layer,token,e0\n0,0,1\n",
            r"c.csv: line 1: the header names \['layer', 'token'\]",
        ),
        ("c.csv", ",0,1\n0,5,6\n", "c.csv: line 1: the header's first cell is empty"),
        ("c.csv", "1\n" * 4097, "c.csv: more than 4096 rows"),
        (
            "d.json",
            '{"logical_count": [[1, 2], [3]]}',
            "logical_count: not a rectangular array of numbers",
        ),
        (
            "d.json",
            '{"logical_count": [[1, -2]]}',
            r"logical_count: layer 0 expert 1 is -2.0; loads are finite counts >= 0",
        ),
        ("d.json", '{"logical_count": [[1, NaN]]}', "logical_count: layer 0 expert 1 is nan"),
        ("d.json", '{"logical_count": [[1, "2"]]}', "logical_count: expected numbers, got '2'"),
        ("d.json", '{"logical_count": [[1, true]]}', "logical_count: expected numbers, got True"),
        (
            "d.json",
            '{"logical_count": [1, 2]}',
            r"logical_count: expected \[layers, experts\] or \[steps, layers, experts\] numbers, got 1 levels",
        ),
        ("d.json", '{"logical_count": []}', "logical_count: expected a non-empty nested list"),
        (
            "d.json",
            '{"logical_count": [' + "[1]," * 4096 + "[1]]}",
            "logical_count: 4097 layers, more than the 4096",
        ),
        (
            "d.json",
            '{"physical_to_logical_map": [[0]]}',
            "logical_count: missing from d.json.*a placement map: read_map reads it",
        ),
        ("d.json", '{"logical_count": ', "d.json: not valid JSON"),
        (
            "d.json",
            "[[1, 2]]",
            "logical_count: expected a JSON object holding it in d.json, got a list",
        ),
    ],
)
def test_bad_loads(tmp_path, name, text, match):
    with refuses(match):
        read_load(write(tmp_path, name, text))


def test_binary_that_is_no_load_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(range(256)))
    with refuses("x.bin: not a load file moeray reads"):
        read_load(path)


def test_pt_without_torch_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    path = tmp_path / "dump.pt"
    path.write_bytes(b"PK\x03\x04 not really")
    with refuses(
        r"dump.pt: a .pt dump needs torch to read; install it with pip install 'moeray\[hf\]'"
    ):
        read_load(path)


def test_pt_stat_dump(tmp_path):
    torch = pytest.importorskip("torch")
    steps = torch.arange(3 * 2 * 4, dtype=torch.int32).reshape(3, 2, 4)
    path = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save(
        {"rank": 0, "logical_count": steps, "average_utilization_rate_over_window": None}, path
    )
    load, source = read_load(path)
    np.testing.assert_array_equal(load, steps.sum(0).numpy())
    assert "2 layers x 4 experts, 3 steps summed" in source
    torch.save({"records": [], "last_physical_to_logical_map": steps[0]}, path)
    with refuses("logical_count: missing from .*per_pass/per_token dump"):
        read_load(path)


class _StubTensor:
    """The few Tensor methods read_load calls, over a numpy array."""

    def __init__(self, array):
        self.array = np.asarray(array)
        self.shape = self.array.shape

    def dim(self):
        return self.array.ndim

    def detach(self):
        return self

    def cpu(self):
        return self

    def double(self):
        return _StubTensor(self.array.astype(np.float64))

    def numpy(self):
        return self.array


def test_pt_reading_logic_with_a_stub_torch(tmp_path, monkeypatch):
    """The .pt branch where torch is not installed: a stand-in torch whose load returns what
    SGLang's recorder saves (the real round trip is test_pt_stat_dump)."""
    saved = {}
    stub = type(sys)("torch")
    stub.Tensor = _StubTensor
    stub.load = lambda path, map_location, weights_only: saved["data"]
    monkeypatch.setitem(sys.modules, "torch", stub)
    path = write(tmp_path, "dump.pt", "zip")
    steps = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    saved["data"] = {"rank": 0, "logical_count": _StubTensor(steps)}
    load, source = read_load(path)
    np.testing.assert_array_equal(load, steps.sum(0))
    assert source == "SGLang logical_count in dump.pt: 3 layers x 4 experts, 2 steps summed"
    saved["data"] = {"logical_count": _StubTensor(np.zeros(4))}
    with refuses(r"logical_count: expected \[layers, experts\] or .* got shape \[4\]"):
        read_load(path)
    saved["data"] = {"records": []}
    with refuses("logical_count: missing from dump.pt, an SGLang per_pass/per_token dump"):
        read_load(path)
    saved["data"] = [1, 2]
    with refuses("logical_count: missing from dump.pt .*got a list"):
        read_load(path)

    def broken(path, map_location, weights_only):
        raise RuntimeError("Weights only load failed\nmore lines")

    stub.load = broken
    with refuses(
        r"dump.pt: torch cannot load it with weights_only=True \(Weights only load failed\)"
    ):
        read_load(path)

"""``moeray convert`` and ``moeray trace info``: converted traces replay with the hit rates of their
originals; CSV and SGLang inputs written here by hand from the bundled trace; the info numbers
against independent computations.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from moeray import cli
from moeray.replay import ReplayConfig, replay_trace
from moeray.traces import Trace, default_trace_path, load_trace
from moeray.traces.convert import convert, read_csv, read_sglang
from moeray.traces.info import summarize_trace
from moeray.traces.mtrace import TraceReader

pytestmark = pytest.mark.pure

CONFIG = ReplayConfig(capacity=8, policies=("lru", "belady"))
HEAD_TOKENS = 2000  # enough routing to tell traces apart, quick on the pure-Python core too


@pytest.fixture(scope="module")
def bundled() -> Trace:
    return load_trace(default_trace_path())


@pytest.fixture(scope="module")
def small(bundled) -> Trace:
    """The first three sequences of the bundled trace."""
    stop = int(bundled.seq_offsets[3])
    return Trace(
        bundled.expert_ids[:stop], bundled.weights[:stop], bundled.seq_offsets[:4], 32, "small"
    )


def head(trace: Trace) -> Trace:
    n = min(HEAD_TOKENS, trace.num_tokens)
    return Trace(trace.expert_ids[:n], None, np.array([0, n]), trace.num_experts, trace.name)


def same_hits(a: Trace, b: Trace) -> None:
    ra, rb = replay_trace(head(a), CONFIG), replay_trace(head(b), CONFIG)
    for name in CONFIG.policies:
        assert ra.results[name].per_layer_hits == rb.results[name].per_layer_hits, name


def test_npz_to_trace_and_back_replays_the_same(bundled, tmp_path, capsys):
    mtrace, npz = tmp_path / "b.mtrace", tmp_path / "back.npz"
    assert (
        cli.main(["convert", str(default_trace_path()), str(mtrace), "--record-tokens", "300"]) == 0
    )
    assert "10,331 tokens x 24 layers x top-4" in capsys.readouterr().out
    with TraceReader(mtrace) as reader:
        assert reader.header.weights_dtype == "float16"  # as in the source
        assert max(r.num_tokens for r in reader) == 300
    assert cli.main(["convert", str(mtrace), str(npz)]) == 0
    for path in (mtrace, npz):
        trace = load_trace(path)
        np.testing.assert_array_equal(trace.expert_ids, bundled.expert_ids)
        np.testing.assert_array_equal(trace.weights, bundled.weights)
        np.testing.assert_array_equal(trace.seq_offsets, bundled.seq_offsets)
        same_hits(trace, bundled)


def test_shared_traces_convert_with_the_same_hit_rates(shared_traces, tmp_path):
    for npz in sorted(shared_traces.glob("*/*_routing.npz")):
        original = load_trace(npz)
        stop = int(original.seq_offsets[min(20, original.num_sequences)])
        part = tmp_path / "part.npz"
        np.savez(
            part,
            expert_ids=original.expert_ids[:stop],
            seq_offsets=original.seq_offsets[:21],
            num_experts=np.array(original.num_experts),
        )
        converted = convert(part, tmp_path / (npz.stem + ".mtrace"))
        again = load_trace(converted.destination)
        np.testing.assert_array_equal(again.expert_ids, original.expert_ids[:stop])
        same_hits(again, load_trace(part))
    # moe_layer_ids of the DeepSeek trace travel into the header
    deepseek = next(shared_traces.glob("deepseek*/*.npz"))
    result = convert(deepseek, tmp_path / "ds.mtrace")
    assert result.layer_ids == tuple(range(1, 27))
    with TraceReader(tmp_path / "ds.mtrace") as reader:
        assert reader.header.layer_ids == tuple(range(1, 27))


def write_csv_rows(
    path, trace: Trace, header: bool, list_column: bool, seq_column: bool, shuffle=None
):
    """One row per (token, layer), written from the trace's arrays with the csv module; rows of
    each sequence in shuffled order (sequences keep their order of first appearance)."""
    rows = []
    for seq in range(trace.num_sequences):
        block = []
        for t in range(int(trace.seq_offsets[seq]), int(trace.seq_offsets[seq + 1])):
            for layer in range(trace.num_layers):
                ids = trace.expert_ids[t, layer].tolist()
                token = t - int(trace.seq_offsets[seq]) if seq_column else t
                cells = [" ".join(map(str, ids))] if list_column else ids
                block.append(([f"prompt-{seq}"] if seq_column else []) + [layer + 5, token] + cells)
        if shuffle is not None:
            shuffle.shuffle(block)
        rows.extend(block)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            k = trace.top_k
            w.writerow(
                (["prompt"] if seq_column else [])
                + ["layer", "token"]
                + (["expert_ids"] if list_column else [f"expert_{i}" for i in range(k)])
            )
        w.writerows(rows)


@pytest.mark.parametrize(
    "header,list_column,seq_column",
    [(False, False, False), (True, True, True), (True, False, True)],
    ids=["bare", "header-list-seq", "header-columns-seq"],
)
def test_csv_converts_with_the_same_hit_rates(small, tmp_path, header, list_column, seq_column):
    path = tmp_path / "routing.csv"
    write_csv_rows(path, small, header, list_column, seq_column, shuffle=np.random.default_rng(3))
    trace, layer_ids = read_csv(path, num_experts=32)
    assert layer_ids == tuple(range(5, 29))
    np.testing.assert_array_equal(trace.expert_ids, small.expert_ids)
    if seq_column:
        np.testing.assert_array_equal(trace.seq_offsets, small.seq_offsets)
    result = convert(path, tmp_path / "routing.mtrace", num_experts=32)
    assert result.layer_ids == tuple(range(5, 29))
    same_hits(load_trace(result.destination), small)


def test_csv_errors_name_the_line_or_token(small, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("layer,token,expert_ids\n0,0,1 2\n1,0,3 4\n0,1,1 2\n")
    with pytest.raises(
        ValueError, match="token 1 of sequence 0 does not have each of the 2 layers"
    ):
        read_csv(path)
    path.write_text("layer,token,expert_ids\n0,0,1 2\n1,x,3 4\n")
    with pytest.raises(ValueError, match="line 3"):
        read_csv(path)
    path.write_text("0,0,1,2\n1,0,3\n")
    with pytest.raises(ValueError, match="row 2: 1 expert ids, the first row has 2"):
        read_csv(path)


def sglang_records(trace: Trace, pad: int = 2):
    """Per-forward records as SGLang's per_token recorder dumps them: [layer, token, top_k] with a
    dense layer 0 and ``pad`` padding tokens of -1, one record per sequence (an extend pass)."""
    records = []
    for seq in range(trace.num_sequences):
        ids = trace.expert_ids[trace.seq_offsets[seq] : trace.seq_offsets[seq + 1]].astype(np.int64)
        a = np.full((trace.num_layers + 1, len(ids) + pad, trace.top_k), -1, dtype=np.int64)
        a[1:, : len(ids)] = ids.transpose(1, 0, 2)
        records.append(
            {
                "topk_ids_of_layer": a,
                "rids": [f"r{seq}"],
                "forward_mode": 1,
                "extend_seq_lens": [len(ids)],
            }
        )
    return records


def test_sglang_npy_dump_converts(small, tmp_path):
    one = Trace(small.expert_ids[:50], None, np.array([0, 50]), 32, "one")
    path = tmp_path / "dump.npy"
    np.save(path, sglang_records(one)[0]["topk_ids_of_layer"])
    trace, layer_ids = read_sglang(path, num_experts=32)
    assert layer_ids == tuple(range(1, 25))
    np.testing.assert_array_equal(trace.expert_ids, one.expert_ids)
    result = convert(path, tmp_path / "dump.mtrace", num_experts=32)
    same_hits(load_trace(result.destination), one)


def test_sglang_torch_dump_converts_with_sequences_and_physical_map(small, tmp_path):
    torch = pytest.importorskip(
        "torch", reason="reading a torch.save dump needs torch (the hf extra)"
    )
    records = [
        {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in r.items()}
        for r in sglang_records(small, pad=0)
    ]
    # Physical expert p of every layer is logical expert p // 2 (64 physical slots, 32 experts):
    # the dump holds 2 * id + 1, which must map back to id.
    for r in records:
        ids = r["topk_ids_of_layer"]
        r["topk_ids_of_layer"] = torch.where(ids >= 0, ids * 2 + 1, ids)
    mapping = torch.arange(64).div(2, rounding_mode="floor").repeat(small.num_layers + 1, 1)
    path = tmp_path / "expert_distribution_recorder.pt"
    torch.save({"records": records, "last_physical_to_logical_map": mapping}, path)
    trace, layer_ids = read_sglang(path)
    assert trace.num_experts == 32 and layer_ids == tuple(range(1, 25))
    np.testing.assert_array_equal(trace.expert_ids, small.expert_ids)
    np.testing.assert_array_equal(trace.seq_offsets, small.seq_offsets)
    same_hits(load_trace(convert(path, tmp_path / "sg.mtrace").destination), small)


def test_convert_cli_errors_exit_2(tmp_path, capsys):
    garbage = tmp_path / "x.bin"
    garbage.write_bytes(b"\x00\x01")
    for argv in (
        ["convert", str(tmp_path / "missing.npz"), str(tmp_path / "o.mtrace")],
        ["convert", str(garbage), str(tmp_path / "o.mtrace")],
        ["convert", str(default_trace_path()), str(default_trace_path())],
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("moeray convert: error:"), err
    assert not (tmp_path / "o.mtrace").exists()


# --------------------------------------------------------------------------- trace info


def test_trace_info_numbers_match_an_independent_count(small, tmp_path, capsys):
    path = tmp_path / "small.mtrace"
    np.savez(
        tmp_path / "small.npz",
        expert_ids=small.expert_ids,
        seq_offsets=small.seq_offsets,
        num_experts=np.array(32),
    )
    convert(tmp_path / "small.npz", path, record_tokens=7)  # records split sequences
    ids = small.expert_ids
    load = np.zeros((24, 32), dtype=np.int64)
    overlap, pairs = np.zeros(24), 0
    for seq in range(small.num_sequences):
        s, e = small.seq_offsets[seq], small.seq_offsets[seq + 1]
        for t in range(s, e):
            for layer in range(24):
                for x in ids[t, layer]:
                    load[layer, x] += 1
                if t > s:
                    overlap[layer] += len(set(ids[t, layer]) & set(ids[t - 1, layer]))
            pairs += t > s
    for source in (path, tmp_path / "small.npz"):
        summary = summarize_trace(source)
        np.testing.assert_array_equal(summary.load, load)
        np.testing.assert_allclose(summary.previous_token_overlap, overlap / (pairs * 4))
        assert summary.num_sequences == 3 and summary.num_tokens == len(ids)
    png, doc = tmp_path / "load.png", tmp_path / "info.json"
    assert cli.main(["trace", "info", str(path), "--plot", str(png), "--json", str(doc)]) == 0
    out = capsys.readouterr().out
    assert f"{len(ids):,} tokens x 24 layers x top-4, 32 experts; 3 sequences" in out
    assert "(0.125 at random)" in out and png.stat().st_size > 1000
    assert json.loads(doc.read_text())["load"] == load.tolist()
    ratio = load.max(axis=1) / load.mean(axis=1)
    assert f"{ratio[0]:.2f}" in out.splitlines()[3]


def test_trace_info_on_a_corrupt_file_exits_2(tmp_path, capsys):
    path = tmp_path / "cut.mtrace"
    convert(default_trace_path(), path)
    path.write_bytes(path.read_bytes()[:-100])
    assert cli.main(["trace", "info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "record" in err


def test_new_subcommands_have_help(capsys):
    for argv in (
        ["convert", "--help"],
        ["record", "--help"],
        ["trace", "info", "--help"],
        ["trace", "--help"],
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert ("info" in out) if argv == ["trace", "--help"] else len(out) > 300, argv

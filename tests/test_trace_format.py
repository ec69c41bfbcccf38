"""The moeray trace format: round trips, streaming, the spec as a non-Python client would write it,
and clear errors on truncated, corrupted or inconsistent files.

Expected values come from the arrays the tests build, from msgpack maps written by hand from
docs/trace-format.md, or from an independent LRU, never from the code under test.
"""

from __future__ import annotations

import io
import re
import zlib
from collections import OrderedDict

import msgpack
import numpy as np
import pytest

from moeray.replay import ReplayConfig, replay_trace
from moeray.traces import Trace, default_trace_path, load_trace
from moeray.traces.mtrace import (
    FORMAT_NAME,
    TraceFormatError,
    TraceHeader,
    TraceReader,
    TraceWriter,
    is_trace_file,
    read_trace,
    write_trace,
)
from moeray.traces.wire import decode_step

pytestmark = pytest.mark.pure


def lru_hits(ids: np.ndarray, capacity: int) -> int:
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


def hand_header(**overrides) -> dict:
    header = {
        "format": "moeray-trace",
        "version": 1,
        "model": "hand",
        "num_layers": 2,
        "num_experts": 4,
        "top_k": 1,
        "dtypes": {"expert_ids": "uint8", "weights": None},
    }
    header.update(overrides)
    return header


def hand_record(ids_lt: list[list[int]], seq: int = 0, **extra) -> dict:
    """A record map written from the spec: ids [L][T] at top-1, uint8."""
    a = np.array(ids_lt, dtype="<u1")[:, :, None]
    record = {
        "expert_ids": {"shape": list(a.shape), "dtype": "uint8", "data": a.tobytes()},
        "seq": seq,
    }
    record.update(extra)
    return record


def pack(*objs) -> bytes:
    return b"".join(msgpack.packb(o, use_bin_type=True) for o in objs)


@pytest.fixture(scope="module")
def bundled() -> Trace:
    return load_trace(default_trace_path())


# --------------------------------------------------------------------------- round trips


def test_bundled_trace_round_trips_and_replays_identically(bundled, tmp_path):
    path = tmp_path / "bundled.mtrace"
    header = write_trace(
        bundled, path, model="gpt-oss-20b", weights_dtype="float16", record_tokens=500
    )
    assert (header.ids_dtype, header.weights_dtype) == ("uint8", "float16")
    assert is_trace_file(path) and not is_trace_file(default_trace_path())
    again = load_trace(path)
    assert again.name == "bundled.mtrace" and again.num_experts == 32
    np.testing.assert_array_equal(again.expert_ids, bundled.expert_ids)
    np.testing.assert_array_equal(again.seq_offsets, bundled.seq_offsets)
    # The bundled weights were float16 to begin with, so float16 storage is exact.
    np.testing.assert_array_equal(again.weights, bundled.weights)
    config = ReplayConfig(capacity=8, policies=("lru", "belady"))
    first = slice(
        0, 2000
    )  # quick on the pure-Python core too; the arrays are compared in full above
    a = replay_trace(Trace(bundled.expert_ids[first], None, np.array([0, 2000]), 32), config)
    b = replay_trace(Trace(again.expert_ids[first], None, np.array([0, 2000]), 32), config)
    for name in config.policies:
        assert a.results[name].per_layer_hits == b.results[name].per_layer_hits
    assert b.results["lru"].per_layer_hits[3] == lru_hits(bundled.layer_ids(3)[first], 8)


def test_writer_streams_records_and_continues_positions(tmp_path):
    rng = np.random.default_rng(0)
    header = TraceHeader(num_layers=3, num_experts=300, top_k=2, weights_dtype="float32", model="m")
    assert header.ids_dtype == "uint16"  # 300 experts do not fit uint8
    buf = io.BytesIO()
    steps = []
    with TraceWriter(buf, header) as writer:
        for seq, tokens in [(7, 5), (7, 1), (7, 1), (2, 4)]:
            ids = rng.integers(0, 300, size=(3, tokens, 2))
            weights = rng.random((3, tokens, 2), dtype=np.float32)
            writer.write(ids, weights, seq=seq)
            steps.append((seq, ids, weights))
    assert writer.records_written == 4
    buf.seek(0)
    reader = TraceReader(buf)
    assert reader.header == header
    records = list(reader)
    assert [r.seq for r in records] == [7, 7, 7, 2]
    assert [r.positions.tolist() for r in records] == [[0, 1, 2, 3, 4], [5], [6], [0, 1, 2, 3]]
    for record, (_, ids, weights) in zip(records, steps):
        assert record.expert_ids.dtype == np.dtype("<u2")
        np.testing.assert_array_equal(record.expert_ids, ids)
        np.testing.assert_array_equal(record.weights, weights)
    buf.seek(0)
    trace = TraceReader(buf).to_trace(name="t")
    assert trace.expert_ids.shape == (11, 3, 2) and trace.seq_offsets.tolist() == [0, 7, 11]


def test_a_hand_written_stream_from_the_spec_is_read(tmp_path):
    """What a non-Python client writes from docs/trace-format.md: no positions, no checksum."""
    path = tmp_path / "hand.bin"  # the name does not matter, the header does
    path.write_bytes(
        pack(hand_header(), hand_record([[0, 1], [2, 3]], seq=0), hand_record([[3], [0]], seq=1))
    )
    trace = load_trace(path)
    assert trace.expert_ids[:, :, 0].tolist() == [[0, 2], [1, 3], [3, 0]]
    assert trace.seq_offsets.tolist() == [0, 2, 3] and trace.weights is None
    with TraceReader(path) as reader:
        assert [r.positions.tolist() for r in reader] == [[0, 1], [0]]


def test_a_trace_record_is_a_valid_wire_step(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 8, size=(2, 3, 2))
    weights = rng.random((2, 3, 2)).astype(np.float16)
    buf = io.BytesIO()
    with TraceWriter(buf, TraceHeader(2, 8, 2, weights_dtype="float16")) as writer:
        writer.write(ids, weights)
    unpacker = msgpack.Unpacker(io.BytesIO(buf.getvalue()), raw=False)
    unpacker.unpack()  # the header
    record_bytes = msgpack.packb(unpacker.unpack(), use_bin_type=True)
    step_ids, step_weights, seq_starts, hints = decode_step(record_bytes)
    assert hints is None
    assert seq_starts.tolist() == [True, False, False]  # position 0: the record begins a sequence
    assert step_ids.dtype == np.int32 and step_weights.dtype == np.float32
    np.testing.assert_array_equal(step_ids, ids)
    np.testing.assert_array_equal(step_weights, weights.astype(np.float32))


# --------------------------------------------------------------------------- errors


def three_records() -> list[bytes]:
    """Header, then three records of a 2-layer, 4-expert top-1 trace, each as its own bytes."""
    return [
        pack(hand_header()),
        pack(hand_record([[0, 1], [2, 3]])),
        pack(hand_record([[1], [1]])),
        pack(hand_record([[2, 2, 2], [0, 0, 0]])),
    ]


def read_until_error(data: bytes) -> tuple[list, TraceFormatError | None]:
    records = []
    try:
        with TraceReader(io.BytesIO(data)) as reader:
            for record in reader:
                records.append(record)
    except TraceFormatError as exc:
        return records, exc
    return records, None


@pytest.mark.parametrize("cut", [1, 5, 17])
def test_truncated_file_names_the_record_and_keeps_the_ones_before(cut):
    parts = three_records()
    data = b"".join(parts)[:-cut]
    records, error = read_until_error(data)
    assert len(records) == 2 and error is not None and error.record == 2
    assert "record 2" in str(error) and "truncated" in str(error)
    assert records[1].expert_ids[:, :, 0].tolist() == [[1], [1]]


def test_flipped_data_byte_fails_its_checksum():
    header, *records = three_records()
    # A record as TraceWriter writes it, with a checksum; flip one id byte: still in range.
    good = hand_record([[1, 2], [3, 0]])
    good["crc32"] = zlib.crc32(good["expert_ids"]["data"])
    corrupted = pack(good).replace(bytes([1, 2, 3, 0]), bytes([1, 2, 3, 1]))
    got, error = read_until_error(header + records[0] + pack(good) + corrupted)
    assert len(got) == 2 and error.record == 2 and "crc32" in str(error)


@pytest.mark.parametrize(
    "bad,message",
    [
        (hand_record([[0, 1]]), "expected shape \\[2, T, 1\\]"),  # one layer, header says two
        (hand_record([[0, 9], [0, 0]]), "id 9 is outside \\[0, 4\\)"),
        (
            {"expert_ids": {"shape": [2, 2**40, 1], "dtype": "uint8", "data": b"\0" * 4}},
            "shape|bytes",
        ),
        (
            {"expert_ids": {"shape": [2, 2, 1], "dtype": "int32", "data": b"\0" * 16}},
            "dtype must be one of \\['uint8'\\]",
        ),
        (hand_record([[0], [0]], seq=-1), "seq"),
        (hand_record([[0], [0]], extra=1), "unknown fields"),
        (
            hand_record(
                [[0], [0]], weights={"shape": [2, 1, 1], "dtype": "float32", "data": b"\0" * 8}
            ),
            "no weights",
        ),
        (
            hand_record(
                [[0, 1], [0, 1]], positions={"shape": [3], "dtype": "int32", "data": b"\0" * 12}
            ),
            "positions",
        ),
        ([1, 2, 3], "expected a map"),
    ],
    ids=[
        "layers",
        "id-range",
        "huge-shape",
        "dtype",
        "seq",
        "unknown-field",
        "weights",
        "positions",
        "not-a-map",
    ],
)
def test_inconsistent_record_is_refused_with_its_index(bad, message):
    header, first, *_ = three_records()
    got, error = read_until_error(header + first + pack(bad))
    assert len(got) == 1 and error is not None and error.record == 1
    assert "record 1:" in str(error)
    assert re.search(message, str(error)), str(error)


@pytest.mark.parametrize(
    "header,message",
    [
        (hand_header(format="other"), "not a moeray-trace stream"),
        (hand_header(version=2), "version"),
        (hand_header(num_layers=10**6), "num_layers"),
        (hand_header(top_k=5), "top_k"),
        (hand_header(dtypes={"expert_ids": "uint8", "weights": "float64"}), "weights_dtype"),
        (hand_header(num_experts=1000), "uint8 cannot hold"),
        (hand_header(dtypes={"expert_ids": ["uint8"], "weights": None}), "ids_dtype"),
        ([1], "not a moeray-trace"),
    ],
    ids=[
        "format",
        "version",
        "layers",
        "top-k",
        "weights-dtype",
        "ids-dtype-width",
        "dtype-list",
        "array",
    ],
)
def test_bad_header_is_refused(header, message):
    with pytest.raises(TraceFormatError, match=message) as info:
        TraceReader(io.BytesIO(pack(header)))
    assert info.value.record is None and "header:" in str(info.value)


def test_empty_and_garbage_files(tmp_path):
    empty = tmp_path / "empty.mtrace"
    empty.write_bytes(b"")
    with pytest.raises(TraceFormatError, match="empty"):
        TraceReader(empty)
    with pytest.raises(TraceFormatError, match="msgpack"):
        TraceReader(io.BytesIO(b"\xc1\xc1\xc1"))


def test_record_larger_than_the_limit_is_refused_before_reading_it():
    ids = np.zeros((2, 5000, 1), dtype="<u1")
    big = {"expert_ids": {"shape": [2, 5000, 1], "dtype": "uint8", "data": ids.tobytes()}}
    data = pack(hand_header(), hand_record([[0], [1]]), big)
    got, error = read_until_error(data)
    assert len(got) == 2 and error is None  # the default limits allow it
    with TraceReader(io.BytesIO(data), max_record_bytes=4096) as reader:
        records = []
        with pytest.raises(TraceFormatError, match="record 1") as info:
            for r in reader:
                records.append(r)
    assert len(records) == 1 and "max" in str(info.value).lower()
    with TraceReader(io.BytesIO(data), max_record_tokens=100) as reader:
        with pytest.raises(TraceFormatError, match="record 1: expert_ids: 5000 tokens exceed"):
            list(reader)


def test_load_trace_names_the_file_and_record(tmp_path):
    parts = three_records()
    path = tmp_path / "cut.mtrace"
    path.write_bytes(b"".join(parts)[:-3])
    with pytest.raises(ValueError, match=r"cut\.mtrace: record 2: truncated"):
        load_trace(path)
    assert read_trace.__module__ == "moeray.traces.mtrace" and FORMAT_NAME == "moeray-trace"


def test_writer_validates_and_removes_a_failed_file(tmp_path):
    header = TraceHeader(num_layers=2, num_experts=4, top_k=1)
    path = tmp_path / "w.mtrace"
    with pytest.raises(ValueError, match="id 4 is outside"):
        with TraceWriter(path, header) as writer:
            writer.write(np.zeros((2, 3, 1), dtype=np.int64))
            writer.write(np.full((2, 1, 1), 4))
    assert not path.exists()
    with TraceWriter(path, header) as writer:
        with pytest.raises(TypeError, match="integer"):
            writer.write(np.zeros((2, 1, 1), dtype=np.float32))
        with pytest.raises(ValueError, match="weights"):
            writer.write(np.zeros((2, 1, 1), dtype=np.int32), np.zeros((2, 1, 1), dtype=np.float32))
        with pytest.raises(ValueError, match="expected shape \\[2, T, 1\\]"):
            writer.write(np.zeros((3, 1, 1), dtype=np.int32))
    assert list(TraceReader(path)) == []
    for bad in (
        dict(num_layers=0),
        dict(top_k=9),
        dict(ids_dtype="int64"),
        dict(metadata={"a": [1]}),
    ):
        fields = dict(num_layers=2, num_experts=8, top_k=2) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            TraceHeader(**fields)

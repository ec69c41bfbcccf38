"""What a user is told about a trace file that is not right, and salvaging a truncated one.

The reader is chosen by content (an .npz is a zip, a moeray trace a msgpack stream opening with
its header), so a damaged, empty or foreign file is described as what it is, whatever its name.
A moeray trace cut inside a record is an error that says what ``--salvage`` would keep; with it,
every whole record is read and the caller is told how many records and tokens were kept. The
traces here are msgpack maps written by hand from docs/trace-format.md; expected counts and
offsets come from those bytes, never from the reader. CLI cases run the installed ``moeray``
command in a subprocess from a directory outside the checkout.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import msgpack
import numpy as np
import pytest

from moeray import cli
from moeray.traces import load_trace
from moeray.traces.convert import convert
from moeray.traces.info import summarize_trace
from moeray.traces.mtrace import SalvageReport, TraceFormatError, TraceReader

pytestmark = pytest.mark.pure

NUM_LAYERS, NUM_EXPERTS, TOP_K = 2, 8, 2
TOKENS = (3, 1, 4, 2, 5)  # tokens of each record
SEQS = (0, 0, 1, 1, 1)


def header_map(**overrides) -> dict:
    header = {
        "format": "moeray-trace",
        "version": 1,
        "model": "hand",
        "num_layers": NUM_LAYERS,
        "num_experts": NUM_EXPERTS,
        "top_k": TOP_K,
        "dtypes": {"expert_ids": "uint8", "weights": None},
    }
    header.update(overrides)
    return header


def record_ids(index: int) -> np.ndarray:
    """uint8 [layers, T, top_k] of record ``index``: distinct experts per token."""
    t = np.arange(TOKENS[index])[None, :, None]
    layer = np.arange(NUM_LAYERS)[:, None, None]
    first = (index + t + 3 * layer) % NUM_EXPERTS
    return np.concatenate([first, (first + 1) % NUM_EXPERTS], axis=2).astype("<u1")


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def parts() -> list[bytes]:
    """The header, then each record, as its own bytes."""
    out = [pack(header_map())]
    for i, seq in enumerate(SEQS):
        a = record_ids(i)
        array = {"shape": list(a.shape), "dtype": "uint8", "data": a.tobytes()}
        out.append(pack({"expert_ids": array, "seq": seq}))
    return out


def truncated(path: Path, whole_records: int, keep_of_next: int) -> Path:
    """The header, ``whole_records`` records and the first ``keep_of_next`` bytes of the next."""
    p = parts()
    path.write_bytes(b"".join(p[: 1 + whole_records]) + p[1 + whole_records][:keep_of_next])
    return path


def ids_of(records: range) -> np.ndarray:
    """uint8 [tokens, layers, top_k] of those records, as ``load_trace`` returns them."""
    return np.concatenate([record_ids(i).transpose(1, 0, 2) for i in records], axis=0)


def write_npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


# --------------------------------------------------------------------------- bad files


def test_an_empty_file_is_called_empty_whatever_its_name(tmp_path):
    for name in ("empty.mtrace", "empty.npz", "empty"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ValueError) as info:
            load_trace(tmp_path / name)
        assert (
            str(info.value) == f"path: '{tmp_path / name}' is empty (0 bytes), not a routing trace"
        )


@pytest.mark.parametrize(
    "content",
    [
        np.random.default_rng(7).bytes(300),
        b"\x81\xa1a\x01" + np.random.default_rng(8).bytes(100),  # a msgpack map, not a header
        b"\x80\x04\x95" + b"\x00" * 40,  # a pickle: never handed to a loader
    ],
    ids=["random", "other-msgpack", "pickle"],
)
def test_random_bytes_are_neither_kind(tmp_path, content):
    path = tmp_path / "random.mtrace"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_trace(path)
    assert str(info.value) == (
        f"path: '{path}' is not a routing trace: neither a moeray trace (a msgpack stream "
        "opening with a moeray-trace header) nor an .npz (a zip archive); its first bytes are "
        + content[:8].hex(" ")
    )
    assert "pickle" not in str(info.value) and "npz trace (" not in str(info.value)


def test_a_text_file_is_named_text(tmp_path):
    path = tmp_path / "routing.mtrace"
    path.write_text("layer,token,e0,e1\n0,0,1,2\n")
    with pytest.raises(ValueError, match=r"it looks like text \(a CSV\? `moeray convert`"):
        load_trace(path)


@pytest.mark.parametrize("where", ["format-key", "cut-in-header"])
def test_a_damaged_header_is_called_a_damaged_header(tmp_path, where):
    data = bytearray(b"".join(parts()))
    if where == "format-key":
        data[3] = 0x90  # inside the "format" key: no longer valid UTF-8
    else:
        data = data[:20]  # a recording killed while writing its header
    path = tmp_path / "trace.mtrace"
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError) as info:
        load_trace(path)
    assert info.value.record is None
    assert str(info.value).startswith(f"{path}: header: the moeray trace's header is damaged: ")
    detail = "not valid msgpack at byte 0" if where == "format-key" else "truncated"
    assert info.value.detail.startswith(f"the moeray trace's header is damaged: {detail}")


def test_a_header_with_a_bad_field_names_the_field(tmp_path):
    path = tmp_path / "future.mtrace"
    path.write_bytes(pack(header_map(version=99)) + b"".join(parts()[1:]))
    with pytest.raises(TraceFormatError) as info:
        load_trace(path)
    assert str(info.value) == (
        f"{path}: header: version: 99 is not a version this moeray reads (<= 1)"
    )


def test_a_bare_npy_is_named(tmp_path):
    path = tmp_path / "ids.npz"
    np.save(open(path, "wb"), ids_of(range(5)))
    with pytest.raises(ValueError, match=r"is a bare \.npy array, not a routing trace"):
        load_trace(path)


@pytest.mark.parametrize("salvage", [False, True])
def test_a_truncated_npz_is_called_truncated(tmp_path, salvage):
    whole = write_npz(tmp_path / "whole.npz", expert_ids=ids_of(range(5))).read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError) as info:
        load_trace(path, salvage=salvage)
    assert str(info.value) == (
        f"path: '{path}' is a truncated or damaged .npz: it starts as a zip archive but has no "
        "readable zip directory at its end"
        + (" (--salvage reads moeray traces only)" if salvage else "")
    )


def test_an_npz_member_larger_than_its_bytes_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (2**40, 2, 2)}
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("expert_ids.npy", header.getvalue() + b"\x00" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            load_trace(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith(
        f"path: '{path}' is a damaged .npz: array 'expert_ids' cannot be read (its header declares "
        "uint8 [1099511627776, 2, 2] (4,398,046,511,104 bytes) but the archive holds"
    )
    assert peak < 2**20


@pytest.mark.parametrize("records", [[], [0, 0]], ids=["no-records", "zero-token-records"])
def test_an_mtrace_of_no_tokens_is_called_empty(tmp_path, records):
    empty = np.zeros((NUM_LAYERS, 0, TOP_K), dtype="<u1")
    array = {"shape": list(empty.shape), "dtype": "uint8", "data": b""}
    path = tmp_path / "empty.mtrace"
    path.write_bytes(pack(header_map()) + b"".join(pack({"expert_ids": array}) for _ in records))
    what = "no records" if not records else "2 records of 0 tokens"
    for read in (load_trace, summarize_trace):
        with pytest.raises(ValueError) as info:
            read(path)
        assert str(info.value) == f"path: '{path}': the trace is empty (a header and {what})"


def test_an_npz_of_no_tokens_is_called_empty(tmp_path):
    path = write_npz(tmp_path / "empty.npz", expert_ids=np.zeros((0, 4, 2), dtype=np.uint8))
    for read in (load_trace, summarize_trace):
        with pytest.raises(ValueError) as info:
            read(path)
        assert str(info.value) == f"path: '{path}': the trace is empty (expert_ids has 0 tokens)"


def test_the_format_is_told_by_content_not_name(tmp_path):
    as_npz = tmp_path / "really-an-mtrace.npz"
    as_npz.write_bytes(b"".join(parts()))
    as_mtrace = write_npz(tmp_path / "really-an-npz.mtrace", expert_ids=ids_of(range(5)))
    for path in (as_npz, as_mtrace):
        trace = load_trace(path)
        np.testing.assert_array_equal(trace.expert_ids, ids_of(range(5)))


# --------------------------------------------------------------------------- salvage


def test_a_truncated_mtrace_says_what_salvage_would_keep(tmp_path):
    p = parts()
    path = truncated(tmp_path / "cut.mtrace", 4, 9)
    with pytest.raises(TraceFormatError) as info:
        load_trace(path)
    start = sum(map(len, p[:5]))
    assert info.value.record == 4 and info.value.offset == start
    assert str(info.value) == (
        f"{path}: record 4: truncated: the file ends 9 bytes into this record (which starts at "
        f"byte {start:,}); --salvage keeps the 4 whole records ({sum(TOKENS[:4])} tokens) before it"
    )


def test_salvage_keeps_every_whole_record_and_reports_it(tmp_path):
    p = parts()
    path = truncated(tmp_path / "cut.mtrace", 3, len(p[4]) - 1)
    reports: list[SalvageReport] = []
    trace = load_trace(path, salvage=True, on_salvage=reports.append)
    np.testing.assert_array_equal(trace.expert_ids, ids_of(range(3)))
    assert trace.seq_offsets.tolist() == [0, TOKENS[0] + TOKENS[1], sum(TOKENS[:3])]
    start = sum(map(len, p[:4]))
    [report] = reports
    assert (report.records_kept, report.tokens_kept) == (3, sum(TOKENS[:3]))
    assert (report.dropped_at, report.bytes_dropped) == (start, len(p[4]) - 1)
    assert str(report) == (
        f"kept 3 whole records (8 tokens) of cut.mtrace; dropped its last {len(p[4]) - 1} bytes, "
        f"from record 3 on: truncated: the file ends {len(p[4]) - 1} bytes into this record "
        f"(which starts at byte {start:,})"
    )


def test_salvage_stops_at_a_corrupted_record(tmp_path):
    p = parts()
    a = record_ids(2)
    bad = {"expert_ids": {"shape": list(a.shape), "dtype": "uint8", "data": a.tobytes()}}
    bad["crc32"] = 12345  # not the checksum of those bytes
    path = tmp_path / "corrupt.mtrace"
    path.write_bytes(b"".join(p[:3]) + pack(bad) + b"".join(p[4:]))
    reports = []
    trace = load_trace(path, salvage=True, on_salvage=reports.append)
    np.testing.assert_array_equal(trace.expert_ids, ids_of(range(2)))
    assert reports[0].records_kept == 2 and reports[0].reason.startswith("crc32:")
    assert reports[0].bytes_dropped == len(pack(bad)) + sum(map(len, p[4:]))


def test_salvage_of_a_whole_file_drops_nothing(tmp_path):
    path = tmp_path / "whole.mtrace"
    path.write_bytes(b"".join(parts()))
    reports = []
    trace = load_trace(path, salvage=True, on_salvage=reports.append)
    assert trace.num_tokens == sum(TOKENS)
    assert (
        str(reports[0])
        == f"kept all 5 whole records ({sum(TOKENS)} tokens) of whole.mtrace: nothing to drop"
    )


def test_salvage_with_no_whole_record_is_an_empty_trace(tmp_path):
    path = truncated(tmp_path / "cut.mtrace", 0, 5)
    with pytest.raises(
        TraceFormatError, match="no whole record precedes it, so --salvage would keep nothing"
    ):
        load_trace(path)
    with pytest.raises(ValueError) as info:
        load_trace(path, salvage=True, on_salvage=pytest.fail)
    assert str(info.value).startswith(
        f"path: '{path}': nothing to salvage, the trace is empty: record 0 is already damaged "
        "(truncated: the file ends 5 bytes into this record"
    )


def test_salvage_in_trace_info_and_convert(tmp_path):
    path = truncated(tmp_path / "cut.mtrace", 4, 9)
    with pytest.raises(TraceFormatError, match="--salvage keeps the 4 whole records"):
        summarize_trace(path)
    reports = []
    summary = summarize_trace(path, salvage=True, on_salvage=reports.append)
    assert (summary.num_records, summary.num_tokens, summary.num_sequences) == (4, 10, 2)
    assert summary.load.sum() == sum(TOKENS[:4]) * NUM_LAYERS * TOP_K
    with pytest.raises(TraceFormatError, match="--salvage keeps the 4 whole records"):
        convert(path, tmp_path / "out.npz")
    result = convert(path, tmp_path / "out.npz", salvage=True, on_salvage=reports.append)
    np.testing.assert_array_equal(load_trace(result.destination).expert_ids, ids_of(range(4)))
    assert [r.records_kept for r in reports] == [4, 4]


def test_the_streaming_reader_salvages_too():
    data = b"".join(parts())[:-3]
    with TraceReader(io.BytesIO(data), salvage=True) as reader:
        assert sum(r.num_tokens for r in reader) == sum(TOKENS[:4])
        report = reader.salvage_report()
    assert report.records_kept == 4 and report.bytes_dropped is None
    assert (
        "dropped the rest of the file, from record 4 on: truncated: the stream ends inside"
        in str(report)
    )


# --------------------------------------------------------------------------- the command


def moeray(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = shutil.which("moeray", path=str(Path(sys.executable).parent)) or "moeray"
    return subprocess.run(
        [script, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=dict(os.environ)
    )


def one_line_error(proc: subprocess.CompletedProcess, prefix: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    # "moeray trace: error:" or "moeray trace info: error:": either names the command
    assert len(lines) == 1 and lines[0].startswith(f"moeray {prefix}"), proc.stderr
    assert ": error: " in lines[0] and "Error:" not in lines[0], proc.stderr
    return lines[0]


BAD_FILES = {
    "empty": (lambda p: p.write_bytes(b""), "is empty (0 bytes), not a routing trace"),
    "random": (
        lambda p: p.write_bytes(np.random.default_rng(3).bytes(500)),
        "is not a routing trace: neither a moeray trace",
    ),
    "damaged-header": (
        lambda p: p.write_bytes(b"".join(parts())[:20]),
        "header: the moeray trace's header is damaged: truncated",
    ),
    "truncated": (
        lambda p: truncated(p, 4, 9),
        "record 4: truncated: the file ends 9 bytes into this record",
    ),
    "empty-npz": (
        lambda p: write_npz(p, expert_ids=np.zeros((0, 2, 2), np.uint8)),
        "the trace is empty (expert_ids has 0 tokens)",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_replay_of_a_bad_file_is_one_line(tmp_path, kind):
    make, message = BAD_FILES[kind]
    make(tmp_path / "bad.mtrace")
    line = one_line_error(
        moeray("replay", "bad.mtrace", "--backend", "local", "--policy", "lru", cwd=tmp_path),
        "replay",
    )
    assert "bad.mtrace" in line and message in line, line
    assert ("--salvage keeps the 4 whole records" in line) == (kind == "truncated")


@pytest.mark.parametrize(
    "command", [["trace", "info", "bad.mtrace"], ["convert", "bad.mtrace", "out.mtrace"]]
)
def test_info_and_convert_of_a_truncated_file_mention_salvage(tmp_path, command):
    truncated(tmp_path / "bad.mtrace", 4, 9)
    line = one_line_error(moeray(*command, cwd=tmp_path), command[0])
    assert (
        "bad.mtrace: record 4: truncated" in line
        and "--salvage keeps the 4 whole records (10 tokens)" in line
    )
    assert not (tmp_path / "out.mtrace").exists()


@pytest.mark.parametrize(
    "command, prefix",
    [
        (["replay", "cut.mtrace", "--backend", "local", "--policy", "lru", "--salvage"], "replay"),
        (["trace", "info", "--salvage", "cut.mtrace"], "trace info"),
        (["convert", "--salvage", "cut.mtrace", "out.npz"], "convert"),
    ],
    ids=["replay", "trace-info", "convert"],
)
def test_salvage_from_the_command_line(tmp_path, command, prefix):
    p = parts()
    truncated(tmp_path / "cut.mtrace", 4, 9)
    proc = moeray(*command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"moeray {prefix}: salvage: kept 4 whole records (10 tokens) of cut.mtrace; dropped its "
        f"last 9 bytes, from record 4 on: truncated: the file ends 9 bytes into this record "
        f"(which starts at byte {sum(map(len, p[:5])):,})"
    ]
    if prefix == "trace info":
        assert "10 tokens x 2 layers x top-2, 8 experts; 2 sequences, 4 records" in proc.stdout
    if prefix == "convert":
        assert load_trace(tmp_path / "out.npz").num_tokens == 10
    if prefix == "replay":
        assert "lru" in proc.stdout


@pytest.mark.parametrize("argv", [["replay"], ["convert"], ["trace", "info"]])
def test_help_describes_salvage(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "--salvage read a damaged moeray trace (a recording that was killed) up to its last whole record"
        in out
    )

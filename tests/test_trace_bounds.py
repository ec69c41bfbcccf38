"""No size that a file or a client declares sizes an allocation, and every bad input is one line.

Each reader bounds the sizes it takes from bytes before it allocates: by the bytes that really
hold them (an ``.npz`` member's shape against its uncompressed size, and that against its
compressed bytes) or by a documented limit (docs/trace-format.md, "Limits": layers, top_k and
experts of a trace; the load counters of ``moeray trace info``; the maps and lists of a step).
``moeray trace info``, ``convert`` and ``replay`` report every reader error as one line and
exit 2.

The regression cases are the reproductions of "No client can break the service" (items 5-6),
each with what it cost before. The fuzz cases are seeded and sized to run in seconds: mutated
``.npz`` and ``.mtrace`` files through every reader, msgpack steps through ``decode_step`` and
``check_step`` (the ``submit_msgpack`` path), and arbitrary arguments to ``check_step`` (the
``submit`` path). They assert that only the documented error classes escape, that messages are
one printable line naming the file, and that the traced peak memory stays small.
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import msgpack
import numpy as np
import pytest

from moeray import cli
from moeray.actors.config import ServiceConfig
from moeray.actors.steps import check_step
from moeray.traces.convert import convert
from moeray.traces.info import MAX_LOAD_COUNTERS, summarize_trace
from moeray.traces.loading import load_trace
from moeray.traces.mtrace import TraceHeader, TraceWriter
from moeray.traces.wire import decode_step

pytestmark = pytest.mark.pure

SMALL_PEAK = 16 * 2**20  # bytes a refused input may make us allocate
PEAK_LIMIT = 200 * 2**20  # bytes a fuzz run may allocate at its peak
FUZZ_TIME_LIMIT_S = 30  # each fuzz case takes a few seconds here


def traced(fn):
    """(what ``fn()`` returned, or the exception it raised; the peak bytes traced meanwhile)."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def cli_error(capsys, *argv: str) -> tuple[str, int]:
    """Runs ``moeray *argv`` in this process; asserts exit 2, nothing on stdout and one line on
    stderr; returns that line and the peak bytes traced."""
    code, peak = traced(lambda: cli.main(list(argv)))
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert out == "" and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("moeray ") and ": error: " in lines[0], err
    return lines[0], peak


def write_mtrace(path: Path, num_experts: int, num_layers: int = 1, top_k: int = 1) -> Path:
    """A valid trace: a header declaring those sizes, then one token routed to expert 0."""
    header = TraceHeader(num_layers=num_layers, num_experts=num_experts, top_k=top_k)
    with TraceWriter(path, header) as writer:
        writer.write(np.zeros((num_layers, 1, top_k), dtype=np.int64))
    return path


def write_npz(path: Path, compressed: bool = False, **arrays) -> Path:
    with open(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return path


def npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return header.getvalue()


def patch_directory(path: Path, member: str, offset: int, fmt: str, value: int) -> Path:
    """Overwrites one field of ``member``'s central directory entry (what zipfile trusts)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        names = [info.filename for info in archive.infolist()]
    at = -1
    for _ in range(names.index(member) + 1):
        at = data.index(b"PK\x01\x02", at + 1)
    struct.pack_into(fmt, data, at + offset, value)
    path.write_bytes(bytes(data))
    return path


def damage_deflate(path: Path, member: str) -> Path:
    """The member's deflate stream opening with a reserved block type (zlib: invalid block)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len] = 0xFF
    path.write_bytes(bytes(data))
    return path


# --------------------------------------------------------------------------- regressions


@pytest.mark.parametrize(
    "num_experts, json_out",
    [(2**27, False), (2**24, True), (2**31 - 1, False)],
    ids=["2^27", "2^24-json", "2^31-1"],
)
def test_trace_info_refuses_a_header_declaring_more_experts_than_it_counts(
    tmp_path, capsys, num_experts, json_out
):
    # Before: 2^27 took 1.03 GiB and 3-20 s, 2^24 wrote 151 MB of JSON, 2^31-1 took 16 GiB.
    path = write_mtrace(tmp_path / "wide.mtrace", num_experts)
    assert path.stat().st_size < 256
    argv = ["trace", "info", str(path)] + (["--json", str(tmp_path / "info.json")] * json_out)
    start = time.monotonic()
    line, peak = cli_error(capsys, *argv)
    assert time.monotonic() - start < 5 and peak < SMALL_PEAK, peak
    assert line == (
        f"moeray trace: error: path: '{path}': num_experts: 1 layers x {num_experts:,} experts "
        "is more load counters than moeray trace info keeps (num_layers x num_experts <= "
        f"{MAX_LOAD_COUNTERS:,})"
    )
    assert not (tmp_path / "info.json").exists()


def test_trace_info_counts_a_trace_at_the_limit(tmp_path, capsys):
    path = write_mtrace(tmp_path / "at-limit.mtrace", MAX_LOAD_COUNTERS // 4096, num_layers=4096)
    code, peak = traced(lambda: cli.main(["trace", "info", str(path)]))
    assert code == 0 and "1 tokens x 4096 layers x top-1, 256 experts" in capsys.readouterr().out
    assert peak < PEAK_LIMIT, peak


@pytest.mark.parametrize(
    "arrays, got",
    [
        (dict(expert_ids=np.zeros((1, 1, 1), np.uint8), num_experts=np.array(2**40)), 2**40),
        (dict(expert_ids=np.full((1, 1, 1), 2**64 - 1, np.uint64)), 2**64),  # max id + 1
    ],
    ids=["declared-2^40", "inferred-2^64"],
)
def test_an_npz_of_too_many_experts_is_one_line(tmp_path, capsys, arrays, got):
    # Before: a MemoryError traceback (8 TiB asked for the load table).
    path = write_npz(tmp_path / "wide.npz", **arrays)
    for argv in (["trace", "info", str(path)], ["convert", str(path), str(tmp_path / "o.mtrace")]):
        line, peak = cli_error(capsys, *argv)
        assert line.endswith(
            f"path: '{path}': num_experts: expected an int in [1, 2147483647], got {got}"
        )
        assert peak < SMALL_PEAK


def test_an_npz_of_4096_layers_is_bounded(tmp_path, capsys):
    # Before: a MemoryError traceback (4,096 layers x 2^31 - 1 inferred experts: 64 TiB).
    ids = np.zeros((1, 4096, 1), np.int32)
    ids[0, 7, 0] = 2**31 - 2  # num_experts inferred: max id + 1
    path = write_npz(tmp_path / "deep.npz", expert_ids=ids)
    line, peak = cli_error(capsys, "trace", "info", str(path))
    assert "num_experts: 4,096 layers x 2,147,483,647 experts is more" in line and peak < SMALL_PEAK


@pytest.mark.parametrize("shape, field", [((1, 4097, 1), "layers"), ((1, 2, 4097), "top_k")])
def test_npz_layer_and_top_k_limits_apply_before_the_data_is_read(tmp_path, shape, field):
    path = tmp_path / "over.npz"
    with zipfile.ZipFile(path, "w") as archive:  # the header alone: no data behind it
        archive.writestr("expert_ids.npy", npy_header(shape))
    with pytest.raises(ValueError) as info:
        load_trace(path)
    assert str(info.value) == (
        f"path: '{path}': expert_ids: 4,097 {field} exceed the limit of 4,096 "
        "(docs/trace-format.md, Limits)"
    )


def test_trace_info_memory_grows_with_the_ids_not_with_top_k_squared(tmp_path):
    # Before: a 512 KiB trace of top_k 4,096 took 1 GiB (a [layers, T, k, k] comparison).
    rng = np.random.default_rng(5)
    ids = np.argsort(rng.random((64, 8192)), axis=1)[:, :4096]  # 64 tokens, distinct experts
    header = TraceHeader(num_layers=1, num_experts=8192, top_k=4096)
    with TraceWriter(tmp_path / "wide-k.mtrace", header) as writer:
        writer.write(ids[None])
    summary, peak = traced(lambda: summarize_trace(tmp_path / "wide-k.mtrace"))
    assert peak < 64 * 2**20, peak
    shared = sum(len(set(ids[t]) & set(ids[t - 1])) for t in range(1, 64))
    assert summary.overlap_pairs.tolist() == [shared] and summary.pairs == 63
    assert summary.load.sum() == 64 * 4096 and summary.load.max() <= 64


def _damaged_npz(tmp_path: Path, kind: str) -> Path:
    ids = np.random.default_rng(1).integers(0, 8, (64, 2, 2)).astype(np.uint8)
    path = write_npz(tmp_path / "bad.npz", compressed=True, expert_ids=ids)
    if kind == "deflate":  # zlib.error
        return damage_deflate(path, "expert_ids.npy")
    if kind == "method":  # NotImplementedError: compression method 99
        return patch_directory(path, "expert_ids.npy", 10, "<H", 99)
    if kind == "encrypted":  # RuntimeError: a password is required
        return patch_directory(path, "expert_ids.npy", 8, "<H", 0x1)
    if kind == "compressed-size":  # more compressed bytes than the file has
        return patch_directory(path, "expert_ids.npy", 20, "<I", 2**32 - 2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    return path


@pytest.mark.parametrize(
    "kind, says",
    [
        ("deflate", "cannot be read (Error -3 while decompressing data"),
        ("method", "cannot be read (compression method 99 (an .npz is stored or deflated))"),
        ("encrypted", "cannot be read (it is encrypted)"),
        ("compressed-size", "cannot be read (it declares 4,294,967,294 compressed bytes"),
        ("truncated", "is a truncated or damaged .npz"),
    ],
)
def test_a_damaged_npz_is_one_line_in_info_convert_and_replay(tmp_path, capsys, kind, says):
    # Before: zlib.error (until 34e698b), NotImplementedError and RuntimeError tracebacks.
    path = _damaged_npz(tmp_path, kind)
    for argv in (
        ["trace", "info", str(path)],
        ["convert", str(path), str(tmp_path / "out.mtrace")],
        ["replay", str(path), "--backend", "local", "--policy", "lru"],
    ):
        line, peak = cli_error(capsys, *argv)
        assert f"path: '{path}'" in line and says in line, line
        assert peak < SMALL_PEAK
    assert not (tmp_path / "out.mtrace").exists()


def test_a_bare_npy_declaring_a_terabyte_is_one_line(tmp_path, capsys):
    # Before: a MemoryError traceback from np.load (`moeray convert --from sglang x.npy`).
    path = tmp_path / "dump.npy"
    path.write_bytes(npy_header((2**37, 1, 1), "<i8") + b"\0" * 64)
    line, peak = cli_error(capsys, "convert", str(path), str(tmp_path / "o.mtrace"))
    assert f"path: '{path}' is not a readable .npy array (its header declares int64" in line
    assert peak < SMALL_PEAK


@pytest.mark.parametrize(
    "row, says",
    [
        ("0,0,1000000000000000000000000,2", "a layer, token or expert id does not fit 64 bits"),
        ("0,0,9223372036854775808,2", "a layer, token or expert id does not fit 64 bits"),
        ("0,0,3000000000,2", "num_experts: expected an int in [1, 2147483647], got 3000000001"),
    ],
)
def test_a_csv_of_ids_beyond_the_limits_is_one_line(tmp_path, capsys, row, says):
    # Before: an OverflowError traceback, float ids, or an .npz of 3e9 experts written.
    path = tmp_path / "routing.csv"
    path.write_text(row + "\n")
    for out in ("o.mtrace", "o.npz"):
        line, _ = cli_error(capsys, "convert", str(path), str(tmp_path / out))
        assert line == f"moeray convert: error: {path}: {says}"
        assert not (tmp_path / out).exists()


def test_a_step_of_nested_lists_is_refused_at_once():
    # Before: 12 MiB of nested 15-element lists grew memory by 149 MiB (64 MiB: gigabytes).
    nested = b"\x9f" + b"\xc0" * 15
    for _ in range(5):
        nested = b"\x9f" + nested * 15
    payload = b"\x81\xaaexpert_ids" + nested
    assert len(payload) > 10 * 2**20
    error, peak = traced(lambda: decode_step(payload))
    assert isinstance(error, ValueError) and "more than 64 maps and lists" in str(error)
    assert peak < SMALL_PEAK, peak


# --------------------------------------------------------------------------- fuzz: files


def _check_reader_error(exc: Exception, path: Path) -> str | None:
    """Why ``exc`` breaks the contract of a trace reader, or None when it keeps it."""
    if not isinstance(exc, ValueError):
        return f"{type(exc).__name__}: {exc}"
    message = str(exc)
    if str(path) not in message:
        return f"does not name the file: {message}"
    if not message.isprintable():
        return f"not one printable line: {message!r}"
    return None


def _fuzz_readers(tmp_path: Path, name: str, mutants, readers) -> tuple[int, int]:
    """Writes each mutant to ``name`` and runs each reader on it; (refused, accepted)."""
    path = tmp_path / name
    failures, refused, accepted = [], 0, 0
    start = time.monotonic()
    tracemalloc.start()
    try:
        for i, data in enumerate(mutants):
            path.write_bytes(data)
            for reader in readers:
                try:
                    reader(path)
                    accepted += 1
                except Exception as exc:
                    refused += 1
                    why = _check_reader_error(exc, path)
                    if why is not None:
                        failures.append((i, reader.__name__, why[:300]))
            assert time.monotonic() - start < FUZZ_TIME_LIMIT_S, f"only {i} mutants"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not failures, failures[:5]
    assert peak < PEAK_LIMIT, peak
    return refused, accepted


def _npz_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    arrays = dict(
        expert_ids=rng.integers(0, 8, (40, 3, 2)).astype(np.uint8),
        expert_probs=rng.random((40, 3, 2)).astype(np.float16),
        seq_offsets=np.array([0, 15, 40]),
        num_experts=np.array(8),
        moe_layer_ids=np.array([1, 2, 3]),
    )
    seeds = []
    for save in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        save(buf, **arrays)
        seeds.append(buf.getvalue())
    return seeds


_SHAPES = [b"(99999999999, ", b"(-1, ", b"((((", b"(1e9, ", b"(4097, 4097, ", b"(0, "]
_DESCRS = [b"|O1", b"<V0", b"<f8", b"|b1", b">i8", b"<U9", b"<M8"]
_WORDS = [0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


def mutate_npz(data: bytes, rng: np.random.Generator) -> bytes:
    """Bit flips, truncation, extreme 2- or 4-byte fields (anywhere, or at the zip headers'
    method, flag and size fields), and an .npy header's shape or dtype rewritten."""
    b, n = bytearray(data), len(data)
    kind, at = int(rng.integers(6)), int(rng.integers(n))
    if kind == 0:
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(n))] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        del b[at:]
    elif kind in (2, 3):
        if kind == 3:  # a field of a local header or central directory entry
            starts = [i for i in range(n - 4) if b[i : i + 2] == b"PK"]
            at = starts[int(rng.integers(len(starts)))] + int(
                rng.choice([6, 8, 10, 18, 20, 22, 24])
            )
        width = int(rng.choice([2, 4]))
        value = int(rng.choice(_WORDS)) if rng.random() < 0.7 else int(rng.integers(2**16))
        b[at : at + width] = (value & (2 ** (8 * width) - 1)).to_bytes(width, "little")
    elif kind == 4:
        i = b.find(b"'shape': (", at)
        i = i if i >= 0 else b.find(b"'shape': (")
        b[i + 9 : i + 10] = _SHAPES[int(rng.integers(len(_SHAPES)))]
    else:
        i = b.find(b"'descr': '", at)
        i = i if i >= 0 else b.find(b"'descr': '")
        b[i + 10 : i + 13] = _DESCRS[int(rng.integers(len(_DESCRS)))]
    return bytes(b)


def test_fuzz_npz_readers(tmp_path):
    seeds, rng = _npz_seeds(), np.random.default_rng(2025)
    mutants = [mutate_npz(seeds[i % 2], rng) for i in range(1500)]

    def converted(path):
        convert(path, tmp_path / "out.mtrace")

    refused, accepted = _fuzz_readers(
        tmp_path, "m.npz", mutants, [load_trace, summarize_trace, converted]
    )
    assert refused > 1500 and accepted > 300  # most mutants break the file, some do not


_HEADER = {
    "format": "moeray-trace",
    "version": 1,
    "model": "fuzz",
    "num_layers": 2,
    "num_experts": 8,
    "top_k": 2,
    "dtypes": {"expert_ids": "uint8", "weights": "float16"},
}
_VALUES = [0, 1, -1, 2**31 - 1, 2**31, 2**40, 2**63 - 1, -(2**63), 4096, 4097, 2**20, 1.5, "8"]
_VALUES += [None, True, [], {}, b"x"]


def _record(rng: np.random.Generator, tokens: int, seq: int) -> dict:
    ids = np.argsort(rng.random((2, tokens, 8)), axis=2)[:, :, :2].astype("<u1")
    weights = rng.random((2, tokens, 2)).astype("<f2")
    return {
        "expert_ids": {"shape": [2, tokens, 2], "dtype": "uint8", "data": ids.tobytes()},
        "weights": {"shape": [2, tokens, 2], "dtype": "float16", "data": weights.tobytes()},
        "seq": seq,
    }


def mutant_mtrace(rng: np.random.Generator) -> bytes:
    """A trace with a header field, a dtype, layer_ids, a record's shape or seq set to an
    extreme or wrong value, then (half the time) a flipped bit, a cut or a huge length marker."""
    header = dict(_HEADER, dtypes=dict(_HEADER["dtypes"]))
    records = [_record(rng, int(rng.integers(0, 5)), seq) for seq in (0, 0, 1)]
    value = _VALUES[int(rng.integers(len(_VALUES)))]
    kind = int(rng.integers(5))
    if kind == 0:
        header[str(rng.choice(["num_layers", "num_experts", "top_k", "version"]))] = value
    elif kind == 1:
        dtypes = ["uint8", "uint16", "int32", "float16", "float32", "int64", ""]
        header["dtypes"][str(rng.choice(["expert_ids", "weights"]))] = str(rng.choice(dtypes))
    elif kind == 2:
        header["layer_ids"] = rng.integers(-3, 2**33, int(rng.integers(0, 4))).tolist()
    elif kind == 3:
        shape = rng.choice([0, 2, 4096, 2**20, 2**32], 3).tolist()
        records[int(rng.integers(3))]["expert_ids"]["shape"] = shape
    else:
        records[int(rng.integers(3))]["seq"] = value
    b = bytearray(b"".join(msgpack.packb(o, use_bin_type=True) for o in [header, *records]))
    at, damage = int(rng.integers(len(b))), int(rng.integers(6))
    if damage == 0:
        b[at] ^= 1 << int(rng.integers(8))
    elif damage == 1:
        del b[at:]
    elif damage == 2:
        b[at:at] = bytes([int(rng.choice([0xC6, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF]))]) + b"\xff" * 4
    return bytes(b)


def test_fuzz_mtrace_readers(tmp_path):
    rng = np.random.default_rng(2026)
    mutants = [mutant_mtrace(rng) for _ in range(1500)]

    def salvaged(path):
        summarize_trace(path, salvage=True)

    refused, accepted = _fuzz_readers(
        tmp_path, "m.mtrace", mutants, [load_trace, summarize_trace, salvaged]
    )
    assert refused > 1500 and accepted > 300


# --------------------------------------------------------------------------- fuzz: steps

CONFIGS = [
    ServiceConfig(num_layers=3, num_experts=16, top_k=2, capacity=4, policy="lru"),
    ServiceConfig(num_layers=3, num_experts=16, top_k=2, capacity=4, policy="moeray"),
]


def junk(rng: np.random.Generator, depth: int = 0):
    """Any msgpack value: scalars of every type and extreme ints, lists and maps (3 deep)."""
    kind = int(rng.integers(11 if depth < 3 else 9))
    if kind == 9:
        return [junk(rng, depth + 1) for _ in range(int(rng.integers(4)))]
    if kind == 10:
        return {str(i): junk(rng, depth + 1) for i in range(int(rng.integers(4)))}
    return [
        None,
        bool(rng.integers(2)),
        int(rng.integers(-(2**63), 2**63 - 1)),
        float(rng.normal()),
        "x" * int(rng.integers(5)),
        b"\0" * int(rng.integers(20)),
        2**64 - 1,
        -1,
        2**40,
    ][kind]


_DTYPES = ["uint8", "uint16", "int32", "float16", "float32", "int64", "bool", "", "<i4"]
_WIRE = {"uint8": "<u1", "uint16": "<u2", "int32": "<i4", "float16": "<f2", "float32": "<f4"}


def array_map(rng: np.random.Generator, shape: list[int], dtype: str, high: int = 16) -> dict:
    """An ARRAY map of ``shape`` and ``dtype`` holding values in [0, high) (floats in [0, 1));
    each part sometimes wrong: a value out of range or NaN, a negative or huge shape, another
    dtype, too few or too many bytes, a field replaced by junk, an extra field."""
    if rng.random() < 0.15:
        choices = [0, 1, 3, -1, 2**31, 2**32, 2**40]
        shape = [choices[int(rng.integers(len(choices)))] for _ in range(int(rng.integers(5)))]
    if rng.random() < 0.15:
        dtype = _DTYPES[int(rng.integers(len(_DTYPES)))]
    count = int(np.prod([max(d, 0) for d in shape], dtype=object))
    if count > 1024 or rng.random() < 0.1:
        count = int(rng.integers(40))
    values = rng.random(count) if dtype.startswith("float") else rng.integers(0, high, count)
    if count and rng.random() < 0.1:
        bad = [np.nan, np.inf, -1.0] if dtype.startswith("float") else [-1, high, 2**31 - 1]
        values[int(rng.integers(count))] = bad[int(rng.integers(len(bad)))]
    data = np.asarray(values).astype(_WIRE.get(dtype, "<i4")).tobytes()
    array = {"shape": shape, "dtype": dtype, "data": data}
    if rng.random() < 0.05:
        array[str(rng.choice(["shape", "dtype", "data"]))] = junk(rng)
    if rng.random() < 0.03:
        array["extra"] = 1
    return array


def step_payload(rng: np.random.Generator) -> bytes:
    """msgpack of a step for 3 layers, top_k 2, or of junk; then sometimes a flipped bit, a cut
    or a marker declaring 4 GiB."""
    tokens = int(rng.integers(0, 6))
    step = {}
    if rng.random() < 0.97:
        step["expert_ids"] = array_map(rng, [3, tokens, 2], str(rng.choice(["uint8", "int32"])))
    if rng.random() < 0.4:
        step["weights"] = array_map(rng, [3, tokens, 2], str(rng.choice(["float32", "float16"])))
    if rng.random() < 0.3:
        step["positions"] = array_map(rng, [tokens], "int32", high=3)
    if rng.random() < 0.2:
        step["hints"] = array_map(rng, [3, tokens, int(rng.integers(1, 4))], "int32")
    for key in ("seq", "crc32", "other"):
        if rng.random() < 0.1:
            step[key] = junk(rng)
    b = bytearray(msgpack.packb(step if rng.random() < 0.97 else junk(rng), use_bin_type=True))
    at, damage = int(rng.integers(len(b))), int(rng.integers(10))
    if damage == 0:
        b[at] ^= 1 << int(rng.integers(8))
    elif damage == 1:
        del b[at:]
    elif damage == 2:
        b[at:at] = (
            bytes([int(rng.choice([0xC6, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x9F]))]) + b"\xff" * 4
        )
    return bytes(b)


def _fuzz_steps(make_case, submit, cases: int) -> dict[str, int]:
    """Runs ``submit(*make_case(i))`` ``cases`` times; only TypeError and ValueError may escape.
    Returns how many cases ended each way."""
    outcomes, failures = {"ok": 0, "TypeError": 0, "ValueError": 0}, []
    start = time.monotonic()
    tracemalloc.start()
    try:
        for i in range(cases):
            try:
                submit(*make_case(i))
                outcomes["ok"] += 1
            except (TypeError, ValueError) as exc:
                outcomes["TypeError" if isinstance(exc, TypeError) else "ValueError"] += 1
            except Exception as exc:
                failures.append((i, type(exc).__name__, str(exc)[:300]))
            assert time.monotonic() - start < FUZZ_TIME_LIMIT_S, f"only {i} cases"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not failures, failures[:5]
    assert peak < PEAK_LIMIT, peak
    return outcomes


def test_fuzz_msgpack_steps_through_decode_step_and_check_step():
    rng = np.random.default_rng(7)
    payloads = [step_payload(rng) for _ in range(4000)]

    def submit_msgpack(config, payload):
        step = decode_step(payload)
        check_step(config, step.expert_ids, step.weights, step.seq_starts, step.hints)

    outcomes = _fuzz_steps(lambda i: (CONFIGS[i % 2], payloads[i]), submit_msgpack, 4000)
    assert outcomes["ok"] > 100 and outcomes["ValueError"] > 2000, outcomes


_ARRAY_DTYPES = [np.int32, np.int64, np.uint8, np.uint64, np.int8, np.float32, np.float16]
_ARRAY_DTYPES += [np.float64, np.bool_, np.complex64, object, "<M8[s]", ">i4", "V4"]


def random_argument(rng: np.random.Generator, shape: tuple[int, ...]):
    """An argument of about ``shape``: an array of any dtype and values (NaN, inf, out of
    range), of a shape off by one, zero-sized, huge and zero-strided; or not an array at all."""
    kind = int(rng.integers(10))
    if kind == 0:
        return [None, 3, "ids", [[1, 2]], [[1], [2, 3]], 1.5, b"x"][int(rng.integers(7))]
    if kind == 1:  # a huge array that takes no memory
        huge = list(shape)
        huge[int(rng.integers(len(huge)))] = int(rng.choice([2**17, 2**31, 2**40]))
        return np.broadcast_to(np.int32(1), huge)
    if kind == 2 and shape:
        shape = tuple(max(0, d + int(rng.integers(-1, 2))) for d in shape)
    if kind == 3:
        shape = shape[: int(rng.integers(len(shape) + 1))]
    dtype = np.dtype(
        _ARRAY_DTYPES[int(rng.integers(len(_ARRAY_DTYPES)))] if kind >= 6 else np.int32
    )
    values = rng.integers(-3, 20, shape)
    if dtype.kind == "f" and rng.random() < 0.3:
        values = np.where(rng.random(shape) < 0.2, np.nan, rng.random(shape))
    if dtype.kind == "V":
        return np.zeros(shape, dtype=dtype)
    return values.astype(dtype)


def test_fuzz_check_step_arguments():
    rng = np.random.default_rng(8)

    def case(i):
        config, tokens = CONFIGS[i % 2], int(rng.integers(0, 6))
        ids = random_argument(rng, (3, tokens, 2))
        if rng.random() < 0.4:  # valid ids, so the checks behind them run
            ids = np.argsort(rng.random((3, tokens, 16)), axis=2)[:, :, :2].astype(np.int32)
        weights = random_argument(rng, (3, tokens, 2)) if rng.random() < 0.5 else None
        if weights is not None and rng.random() < 0.5:
            weights = rng.random((3, tokens, 2)).astype(rng.choice([np.float32, np.float16]))
        starts = random_argument(rng, (tokens,)) if rng.random() < 0.4 else None
        if rng.random() < 0.3:
            starts = rng.random(tokens) < 0.5
        hints = (
            random_argument(rng, (3, tokens, int(rng.integers(1, 4))))
            if rng.random() < 0.3
            else None
        )
        return config, ids, weights, starts, hints

    outcomes = _fuzz_steps(case, check_step, 4000)
    assert outcomes["ok"] > 200 and outcomes["TypeError"] > 200 and outcomes["ValueError"] > 500, (
        outcomes
    )

"""Fuzzing the trace reader with mutated traces: only TraceFormatError may escape, records before a
corruption come back intact, nothing hangs and memory stays bounded.

A seeded mutation loop (bit flips, overwritten bytes, msgpack markers that declare huge lengths,
truncations, splices, duplicated and deleted spans) drives TraceReader over 100,000 mutants in a
bounded time; Hypothesis adds arbitrary msgpack objects in place of records.
"""

from __future__ import annotations

import io
import resource
import sys
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeray.traces.mtrace import TraceFormatError, TraceHeader, TraceReader, TraceWriter

pytestmark = pytest.mark.pure

MUTANTS = 100_000
TIME_LIMIT_S = 120  # about 15 s here; generous for slow CI machines and the pure-Python run
# msgpack markers of the 32-bit length forms (bin, str, array, map) and of nested containers
_MARKERS = [0xC6, 0xDB, 0xDD, 0xDF, 0xC5, 0xDC, 0xDE, 0x9F, 0x8F, 0xC1, 0xFF, 0x00]


def seed_trace() -> tuple[bytes, list[int], list]:
    """A small valid trace, the byte offset where each record ends, and the records."""
    rng = np.random.default_rng(42)
    buf = io.BytesIO()
    header = TraceHeader(
        num_layers=3, num_experts=8, top_k=2, weights_dtype="float16", model="fuzz"
    )
    ends, records = [], []
    with TraceWriter(buf, header) as writer:
        for seq, tokens in [(0, 4), (0, 1), (1, 3), (1, 1), (2, 2)]:
            ids = np.stack([rng.permutation(8)[:2] for _ in range(3 * tokens)]).reshape(
                3, tokens, 2
            )
            weights = rng.random((3, tokens, 2)).astype(np.float16)
            writer.write(ids, weights, seq=seq)
            ends.append(buf.tell())
            records.append((ids, weights))
    return buf.getvalue(), ends, records


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, int]:
    """A mutant and the first byte offset it changed."""
    b = bytearray(data)
    n = len(b)
    kind = int(rng.integers(8))
    at = int(rng.integers(n))
    if kind == 0:  # flip bits
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(at, n))
            b[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # overwrite bytes
        size = int(rng.integers(1, 9))
        b[at : at + size] = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
    elif kind == 2:  # a marker declaring a huge length or deep nesting
        b[at:at] = (
            bytes([_MARKERS[int(rng.integers(len(_MARKERS)))]])
            + b"\xff\xff\xff"
            + bytes([int(rng.integers(256))])
        )
    elif kind == 3:  # truncate
        del b[at:]
    elif kind == 4:  # splice the tail of the trace at another point
        other = int(rng.integers(n))
        b[at:] = data[other:]
    elif kind == 5:  # duplicate a span
        size = int(rng.integers(1, 64))
        b[at:at] = data[at : at + size]
    elif kind == 6:  # delete a span
        del b[at : at + int(rng.integers(1, 32))]
    else:  # many containers: nested arrays or maps
        b[at:at] = bytes([0x91 if rng.integers(2) else 0x81]) * int(rng.integers(1, 2000))
    return bytes(b), at


def read_all(data: bytes) -> tuple[list, Exception | None]:
    """Records read before the reader stopped, and the TraceFormatError it stopped on (if any)."""
    got = []
    try:
        with TraceReader(io.BytesIO(data), max_record_bytes=2**16) as reader:
            for record in reader:
                got.append(record)
    except TraceFormatError as exc:
        return got, exc
    return got, None


def test_100k_mutated_traces_only_raise_trace_format_error():
    data, ends, originals = seed_trace()
    rng = np.random.default_rng(2024)
    max_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    failures, errors = [], 0
    for i in range(MUTANTS):
        mutant, at = mutate(data, rng)
        try:
            got, error = read_all(mutant)
        except Exception as exc:  # anything but TraceFormatError is a bug
            failures.append((i, type(exc).__name__, str(exc)[:200]))
            if len(failures) > 5:
                break
            continue
        errors += error is not None
        # Every record that ends before the first changed byte is returned, unchanged.
        intact = sum(end <= at for end in ends)
        if len(got) < intact:
            failures.append((i, "lost records", f"{len(got)} < {intact} before byte {at}: {error}"))
        for record, (ids, weights) in zip(got[:intact], originals):
            if not (
                np.array_equal(record.expert_ids, ids) and np.array_equal(record.weights, weights)
            ):
                failures.append((i, "changed record", f"before byte {at}"))
        assert time.monotonic() - start < TIME_LIMIT_S, f"only {i} mutants in {TIME_LIMIT_S} s"
    assert not failures, failures[:5]
    assert errors > MUTANTS // 4  # the mutations really break most traces
    growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max_rss_before
    assert growth_kib < 100 * 1024, f"max RSS grew by {growth_kib} KiB"
    print(
        f"{MUTANTS} mutants in {time.monotonic() - start:.1f} s, {errors} refused", file=sys.stderr
    )


def test_declared_huge_sizes_are_refused_without_allocating():
    header = msgpack.packb(TraceHeader(num_layers=2, num_experts=4, top_k=1).to_map())
    huge = [
        b"\xc6\xff\xff\xff\xf0",  # bin of 4 GiB with no bytes behind it
        b"\xdd\xff\xff\xff\xff",  # array of 4 G elements
        b"\xdf\xff\xff\xff\xff",  # map of 4 G pairs
        msgpack.packb(
            {"expert_ids": {"shape": [2, 2**40, 1], "dtype": "uint8", "data": b"\0" * 8}}
        ),
        b"\x91" * 100_000,  # nesting far deeper than any record
        b"\x9f"
        + b"\x9f\xc0\xc0\xc0\xc0\xc0\xc0\xc0\xc0\xc0\xc0\xc0\xc0\xc0\xc0\xc0" * 15,  # many lists
    ]
    tracemalloc.start()
    try:
        for payload in huge:
            got, error = read_all(header + payload)
            assert got == [] and error is not None and error.record == 0, payload[:8]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak} bytes"


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(
                [
                    "expert_ids",
                    "weights",
                    "seq",
                    "positions",
                    "crc32",
                    "shape",
                    "dtype",
                    "data",
                    "x",
                ]
            )
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(_msgpack_values, max_size=4),
    header_patch=st.dictionaries(
        st.sampled_from(
            [
                "num_layers",
                "num_experts",
                "top_k",
                "version",
                "dtypes",
                "model",
                "layer_ids",
                "metadata",
            ]
        ),
        _msgpack_values,
        max_size=2,
    ),
)
def test_arbitrary_msgpack_objects_only_raise_trace_format_error(records, header_patch):
    header = TraceHeader(num_layers=2, num_experts=4, top_k=1).to_map() | header_patch
    data = b"".join(msgpack.packb(o, use_bin_type=True) for o in [header, *records])
    got, error = read_all(data)
    assert error is not None or len(got) == len(records)

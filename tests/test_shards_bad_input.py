"""Bad checkpoints: each gives a ShardFormatError (a ValueError) naming the file and tensor, and
nothing is read out of bounds. Files are built byte by byte so that they can lie."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeray.shards import ShardFormatError, ShardNotFoundError, ShardStore

pytestmark = pytest.mark.pure

GATE = "model.layers.0.mlp.experts.0.gate_proj.weight"
UP = "model.layers.0.mlp.experts.0.up_proj.weight"
DOWN = "model.layers.0.mlp.experts.0.down_proj.weight"


def raw_file(path, header: dict | bytes, data: bytes = b"", header_length: int | None = None):
    """A safetensors file as given: header JSON (or raw bytes), data, optionally a lying length."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(text) if header_length is None else header_length
    path.write_bytes(struct.pack("<Q", length) + text + data)
    return path


def expert_header(roles=((GATE, (4, 8)), (UP, (4, 8)), (DOWN, (8, 4))), dtype="F32", itemsize=4):
    """A consistent header of back-to-back tensors, and the size of its data section."""
    header, offset = {}, 0
    for name, shape in roles:
        size = int(np.prod(shape)) * itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    return header, offset


def good_file(path, **kwargs):
    header, size = expert_header(**kwargs)
    return raw_file(path, header, bytes(size))


def opens_with_error(path, *fragments, error=ShardFormatError):
    with pytest.raises(error) as info:
        ShardStore(path)
    message = str(info.value)
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


def test_a_good_raw_file_opens(tmp_path):
    """The builder itself is right, so the failures below come from what each test breaks."""
    with ShardStore(good_file(tmp_path / "a.safetensors")) as store:
        assert store.layers == (0,) and store.expert_bytes(0, 0) == 3 * 32 * 4


def test_missing_directory_file_and_empty_directory(tmp_path):
    message = opens_with_error(tmp_path / "nope", tmp_path / "nope", error=ShardNotFoundError)
    assert "no such checkpoint" in message
    assert issubclass(ShardNotFoundError, FileNotFoundError)
    assert issubclass(ShardNotFoundError, ValueError)
    (tmp_path / "empty").mkdir()
    opens_with_error(tmp_path / "empty", "no *.safetensors files", error=ShardNotFoundError)


def test_file_shorter_than_the_length_field(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    opens_with_error(path, path, "truncated", "3 bytes")


def test_header_length_past_end_of_file(tmp_path):
    header, size = expert_header()
    path = raw_file(tmp_path / "a.safetensors", header, bytes(size), header_length=10**6)
    opens_with_error(path, path, "truncated", "runs past the end")


def test_header_length_over_the_limit(tmp_path):
    path = raw_file(tmp_path / "a.safetensors", b"{}", header_length=2**40)
    opens_with_error(path, path, "exceeds the limit")


@pytest.mark.parametrize(
    "text, why",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b'{"__metadata__": {"k": 1}}', "__metadata__"),
    ],
)
def test_header_that_is_not_a_tensor_object(tmp_path, text, why):
    opens_with_error(raw_file(tmp_path / "a.safetensors", text), tmp_path / "a.safetensors", why)


def test_data_past_end_of_file(tmp_path):
    path = good_file(tmp_path / "a.safetensors")
    path.write_bytes(path.read_bytes()[:-10])  # the last tensor loses its tail
    opens_with_error(path, path, DOWN, "run past the end of the data section")


def _lie(tmp_path, tensor, **field):
    header, size = expert_header()
    header[tensor].update(field)
    return raw_file(tmp_path / "a.safetensors", header, bytes(size))


@pytest.mark.parametrize(
    "field, why",
    [
        ({"data_offsets": [128, 0]}, "is before begin"),
        ({"data_offsets": [0, 10**9]}, "run past the end"),
        ({"data_offsets": [0, 64]}, "span 64 bytes but F32 [4, 8] needs 128"),
        ({"data_offsets": [0]}, "data_offsets must be [begin, end]"),
        ({"data_offsets": [-8, 120]}, "data_offsets must be [begin, end]"),
        ({"shape": [4, -8]}, "shape must be a list of non-negative ints"),
        ({"shape": [4, 8.0]}, "shape must be a list"),
        ({"dtype": "F12"}, "unknown dtype 'F12'"),
    ],
)
def test_offsets_shapes_and_dtypes_that_lie(tmp_path, field, why):
    opens_with_error(_lie(tmp_path, UP, **field), tmp_path / "a.safetensors", UP, why)


def test_tensor_entry_without_fields(tmp_path):
    header, size = expert_header()
    header[UP] = {"dtype": "F32"}
    path = raw_file(tmp_path / "a.safetensors", header, bytes(size))
    opens_with_error(path, UP, "expected an object with dtype, shape and data_offsets")


def test_overlapping_tensors(tmp_path):
    header, size = expert_header()
    header[DOWN]["data_offsets"] = [64, 192]  # inside gate_proj's [0, 128) and up_proj's [128, 256)
    path = raw_file(tmp_path / "a.safetensors", header, bytes(size))
    message = opens_with_error(path, path, "overlaps")
    assert DOWN in message and GATE in message


def test_expert_looking_name_matching_no_pattern(tmp_path):
    odd = "model.layers.0.mlp.experts.0.gate.weight"
    path = good_file(tmp_path / "a.safetensors", roles=((odd, (4, 8)),))
    message = opens_with_error(path, path, odd, "matches no recognised name pattern")
    assert "block_sparse_moe.experts.{e}.w1|w2|w3.weight" in message
    assert "mlp.experts.gate_up_proj" in message


def test_checkpoint_without_expert_tensors(tmp_path):
    path = good_file(
        tmp_path / "a.safetensors",
        roles=(
            ("model.layers.0.self_attn.q_proj.weight", (4, 4)),
            ("model.layers.0.mlp.shared_experts.gate_proj.weight", (4, 4)),
        ),
    )
    opens_with_error(path, path, "no expert tensors found", "recognised name patterns")


def test_expert_missing_one_projection(tmp_path):
    header, size = expert_header(roles=((GATE, (4, 8)), (DOWN, (8, 4))))
    path = raw_file(tmp_path / "a.safetensors", header, bytes(size))
    opens_with_error(path, "layer 0 expert 0: no up tensor", GATE, path)


def test_gap_in_expert_numbers(tmp_path):
    roles = [
        (name.replace("experts.0", f"experts.{e}"), shape)
        for e in (0, 2)
        for name, shape in ((GATE, (4, 8)), (UP, (4, 8)), (DOWN, (8, 4)))
    ]
    path = good_file(tmp_path / "a.safetensors", roles=roles)
    opens_with_error(path, "layer 0: expert 1 has no tensors")


def test_projection_shapes_that_disagree(tmp_path):
    path = good_file(
        tmp_path / "a.safetensors", roles=((GATE, (4, 8)), (UP, (4, 6)), (DOWN, (8, 4)))
    )
    opens_with_error(path, "expected gate, up [intermediate, hidden]", UP, "[4, 6]")


def test_projections_of_different_dtypes(tmp_path):
    header, size = expert_header()
    header[UP].update(dtype="F16", data_offsets=[128, 192])
    header[DOWN]["data_offsets"] = [192, 320]
    path = raw_file(tmp_path / "a.safetensors", header, bytes(320))
    opens_with_error(path, path, "projections differ in dtype", f"'{UP}' F16")


def test_ternary_weight_without_metadata_or_scale(tmp_path):
    roles = ((GATE, (4, 2)), (UP, (4, 2)), (DOWN, (8, 1)))
    header, size = expert_header(roles=roles, dtype="U8", itemsize=1)
    path = raw_file(tmp_path / "a.safetensors", header, bytes(size))
    opens_with_error(path, path, GATE, "does not declare quantization='ruvllm-ternary'")
    header["__metadata__"] = {"quantization": "ruvllm-ternary", "ternary_block_size": "16"}
    raw_file(path, header, bytes(size))
    opens_with_error(path, path, "without its", f"{GATE}_scale")


def test_ternary_scale_count_that_lies(tmp_path):
    roles = ((GATE, (4, 2)), (UP, (4, 2)), (DOWN, (8, 1)))
    header, size = expert_header(roles=roles, dtype="U8", itemsize=1)
    for name, count in ((GATE, 2), (UP, 3), (DOWN, 2)):  # 32 weights in blocks of 16: 2 scales
        header[f"{name}_scale"] = {
            "dtype": "F32",
            "shape": [count],
            "data_offsets": [size, size + 4 * count],
        }
        size += 4 * count
    header["__metadata__"] = {"quantization": "ruvllm-ternary", "ternary_block_size": "16"}
    path = raw_file(tmp_path / "a.safetensors", header, bytes(size))
    opens_with_error(path, path, f"{UP}_scale", "expected F32 [2] scales", "got F32 [3]")


def test_stacked_tensors_disagreeing_on_expert_count(tmp_path):
    roles = (
        ("model.layers.0.mlp.experts.gate_up_proj", (4, 8, 12)),
        ("model.layers.0.mlp.experts.down_proj", (3, 6, 8)),
    )
    path = good_file(tmp_path / "a.safetensors", roles=roles)
    opens_with_error(path, "disagree on the number of experts", "down_proj' [3, 6, 8]")


def test_layer_mixing_stacked_and_per_expert_tensors(tmp_path):
    roles = (
        (GATE, (4, 8)),
        (UP, (4, 8)),
        (DOWN, (8, 4)),
        ("model.layers.0.mlp.experts.gate_up_proj", (1, 8, 8)),
    )
    path = good_file(tmp_path / "a.safetensors", roles=roles)
    opens_with_error(path, "mixes stacked and per-expert tensors", GATE)


# -- model.safetensors.index.json ----------------------------------------------------------------
def _index(tmp_path, weight_map):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path / "model.safetensors.index.json"


def test_index_pointing_at_a_missing_file(tmp_path):
    good_file(tmp_path / "model-00001-of-00002.safetensors")
    index = _index(
        tmp_path, {GATE: "model-00001-of-00002.safetensors", UP: "model-00002-of-00002.safetensors"}
    )
    opens_with_error(
        tmp_path, index, "model-00002-of-00002.safetensors", UP, error=ShardNotFoundError
    )


def test_index_listing_a_tensor_its_file_lacks(tmp_path):
    good_file(tmp_path / "a.safetensors")
    index = _index(
        tmp_path,
        {
            GATE: "a.safetensors",
            UP: "a.safetensors",
            DOWN: "a.safetensors",
            "model.layers.0.mlp.experts.1.up_proj.weight": "a.safetensors",
        },
    )
    opens_with_error(tmp_path, index, "experts.1.up_proj.weight", "has no such tensor")


@pytest.mark.parametrize(
    "content, why",
    [
        ("{", "not valid JSON"),
        ('{"weight_map": [1]}', "weight_map"),
        ('{"weight_map": {"x": "../a.safetensors"}}', "not a name inside"),
    ],
)
def test_malformed_index(tmp_path, content, why):
    good_file(tmp_path / "a.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(content)
    opens_with_error(tmp_path, "model.safetensors.index.json", why)


# -- bad requests ----------------------------------------------------------------------------------
def test_unknown_layer_or_expert(tmp_path):
    with ShardStore(good_file(tmp_path / "a.safetensors")) as store:
        with pytest.raises(
            ValueError, match=r"layer: expected one of the checkpoint's MoE layers 0..0"
        ):
            store.expert_ranges(3, 0)
        with pytest.raises(ValueError, match=r"expert: expected an int in \[0, 1\)"):
            store.expert_weights(0, 1)
        with pytest.raises(ValueError, match="expert"):
            store.expert_bytes(0, True)
    with pytest.raises(ValueError, match="closed"):
        store.expert_weights(0, 0)


# -- no input reads out of bounds ------------------------------------------------------------------
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_corrupted_files_fail_cleanly_or_stay_in_bounds(tmp_path, data):
    """Any byte flipped or any truncation: either a ShardFormatError, or a store whose every
    range lies inside its file and whose every view reads."""
    header, size = expert_header()
    text = json.dumps(header).encode()
    blob = bytearray(struct.pack("<Q", len(text)) + text + bytes(range(256)) * (size // 256 + 1))
    blob = blob[: 8 + len(text) + size]
    for _ in range(data.draw(st.integers(0, 3))):
        position = data.draw(st.integers(0, len(blob) - 1))
        blob[position] = data.draw(st.integers(0, 255))
    blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(blob))
    try:
        store = ShardStore(path)
    except ShardFormatError:
        return
    with store:
        for layer in store.layers:
            for expert in range(store.num_experts(layer)):
                for r in store.expert_ranges(layer, expert):
                    assert 0 <= r.offset <= r.end <= len(blob)
                weights = store.expert_weights(layer, expert)
                for view in weights.tensors.values():
                    view.to_float32()
                del weights, view

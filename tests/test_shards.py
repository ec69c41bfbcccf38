"""ShardStore over checkpoints written by the safetensors library; the reference expert_matvec
against plain numpy on independently known weights; synthetic checkpoints of each family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from moeray.policy import expert_memory_footprint
from moeray.shards import (
    GPT_OSS,
    SWIGLU,
    ShardStore,
    bf16_to_float32,
    expert_matvec,
    float32_to_bf16,
    ternary,
)
from moeray.shards import cli as shards_cli
from moeray.shards.synth import MODEL_SHAPES, SynthConfig, planned_tensors, write_checkpoint

pytestmark = pytest.mark.pure

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U8": "uint8"}


def save(path, tensors, metadata=None):
    """Writes {name: (dtype, array)} with the safetensors library (BF16 arrays as uint16 bits)."""
    arrays = {name: np.ascontiguousarray(a) for name, (_, a) in tensors.items()}
    specs = {
        name: safetensors.TensorSpec(
            dtype=_ST_DTYPES[dtype],
            shape=list(arrays[name].shape),
            data_ptr=arrays[name].ctypes.data,
            data_len=arrays[name].nbytes,
        )
        for name, (dtype, _) in tensors.items()
    }
    safetensors.serialize_file(specs, str(path), metadata=metadata)


def exact(rng, shape, fmt):
    """float32 values exactly representable in ``fmt``, and their stored form."""
    values = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    if fmt == "F16":
        stored = values.astype(np.float16)
        return stored.astype(np.float32), stored
    if fmt == "BF16":
        bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exact by design
        return (bits.astype(np.uint32) << 16).view(np.float32), bits
    return values, values


def ternary_tensor(rng, rows, cols, block_size):
    """Random codes and scales; returns (dense float32 [rows, cols], packed [rows, cols/4], scales)."""
    codes = rng.integers(-1, 2, size=rows * cols)
    scales = rng.uniform(0.01, 0.1, size=-(-rows * cols // block_size)).astype(np.float32)
    packed = bytearray((rows * cols + 3) // 4)
    for i, c in enumerate(codes):  # ruvllm: 00 = -1, 01 = 0, 10 = +1, least significant pair first
        packed[i // 4] |= (int(c) + 1) << (2 * (i % 4))
    dense = np.array([c * scales[i // block_size] for i, c in enumerate(codes)], dtype=np.float32)
    return (
        dense.reshape(rows, cols),
        np.frombuffer(bytes(packed), dtype=np.uint8).reshape(rows, cols // 4),
        scales,
    )


def silu(z):
    return z / (1.0 + np.exp(-z))


def swiglu_reference(x, gate, up, down):
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def gpt_oss_reference(x, gate_up, gate_up_bias, down, down_bias):
    """transformers' GptOssExperts for one expert, interleaving undone by a reshape."""
    pairs = (x @ gate_up + gate_up_bias).reshape(len(x), -1, 2)
    gate, up = np.minimum(pairs[..., 0], 7.0), np.clip(pairs[..., 1], -7.0, 7.0)
    return ((up + 1) * gate / (1.0 + np.exp(-1.702 * gate))) @ down + down_bias


# -- per-expert checkpoints -----------------------------------------------------------------------
def write_swiglu(path, fmt, num_experts=3, hidden=8, inter=12, naming="mlp", block_size=16, seed=0):
    """A one-file, one-layer checkpoint (layer 5) plus a router; returns float32 weights per expert."""
    rng = np.random.default_rng(seed)
    tensors, dense = (
        {"model.layers.5.mlp.gate.weight": ("F32", np.ones((num_experts, hidden), np.float32))},
        [],
    )
    names = (
        {"gate": "w1", "up": "w3", "down": "w2"}
        if naming == "mixtral"
        else {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    )
    block = "block_sparse_moe" if naming == "mixtral" else "mlp"
    for e in range(num_experts):
        weights = {}
        for role, shape in (
            ("gate", (inter, hidden)),
            ("up", (inter, hidden)),
            ("down", (hidden, inter)),
        ):
            name = f"model.layers.5.{block}.experts.{e}.{names[role]}.weight"
            if fmt == "TERNARY":
                weights[role], packed, scales = ternary_tensor(rng, *shape, block_size)
                tensors[name] = ("U8", packed)
                tensors[name + "_scale"] = ("F32", scales)
            else:
                weights[role], stored = exact(rng, shape, fmt)
                tensors[name] = (fmt, stored)
        dense.append(weights)
    metadata = (
        {"quantization": "ruvllm-ternary", "ternary_block_size": str(block_size)}
        if fmt == "TERNARY"
        else None
    )
    save(path, tensors, metadata)
    return dense


@pytest.mark.parametrize("fmt", ["F32", "F16", "BF16", "TERNARY"])
@pytest.mark.parametrize("naming", ["mlp", "mixtral"])
def test_expert_matvec_matches_numpy_on_per_expert_checkpoints(tmp_path, fmt, naming):
    dense = write_swiglu(tmp_path / "model.safetensors", fmt, naming=naming)
    x = np.random.default_rng(9).standard_normal((5, 8)).astype(np.float32)
    with ShardStore(tmp_path) as store:
        assert store.layers == (5,) and store.num_experts(5) == 3
        spec = store.layer_spec(5)
        assert (spec.layout, spec.format, spec.hidden_size, spec.intermediate_size) == (
            SWIGLU,
            fmt,
            8,
            12,
        )
        for e in range(3):
            weights = store.expert_weights(5, e)
            expected = swiglu_reference(x, dense[e]["gate"], dense[e]["up"], dense[e]["down"])
            np.testing.assert_allclose(expert_matvec(weights, x), expected, rtol=1e-5, atol=1e-6)
            for role in ("gate", "up", "down"):
                np.testing.assert_array_equal(weights[role].to_float32(), dense[e][role])
        del weights


def test_views_are_zero_copy_read_only_and_ranges_hold_their_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    write_swiglu(path, "BF16")
    raw = path.read_bytes()  # numpy cannot load BF16, so the views are checked against bytes
    with ShardStore(tmp_path) as store:
        weights = store.expert_weights(5, 1)
        ranges = store.expert_ranges(5, 1)
        # per-expert tensors of one expert are adjacent in a safetensors file: one merged range
        assert len(ranges) == 1 and ranges[0].path == str(path)
        assert store.expert_bytes(5, 1) == 3 * 8 * 12 * 2
        chunk = raw[ranges[0].offset : ranges[0].end]
        for role in ("gate", "up", "down"):
            view = weights[role].data
            assert view.dtype == np.uint16 and not view.flags.writeable and not view.flags.owndata
            assert view.tobytes() in chunk
        with pytest.raises(ValueError):
            weights["gate"].data[0, 0] = 1
        assert store.layer_bytes(5) == 3 * store.expert_bytes(
            5, 1
        )  # the router is not a shard byte
        del weights, view


def test_f32_views_equal_the_safetensors_library_load(tmp_path):
    path = tmp_path / "model.safetensors"
    write_swiglu(path, "F32", num_experts=2)
    loaded = safetensors.numpy.load_file(str(path))
    with ShardStore(path) as store:  # a single file works as well as its directory
        for e in range(2):
            weights = store.expert_weights(5, e)
            np.testing.assert_array_equal(
                weights["up"].data, loaded[f"model.layers.5.mlp.experts.{e}.up_proj.weight"]
            )
        del weights


@pytest.mark.parametrize("fmt", ["F32", "BF16", "TERNARY"])
def test_expert_matvec_matches_transformers_gpt_oss_formula(tmp_path, fmt):
    rng = np.random.default_rng(3)
    experts, hidden, inter, block_size = 4, 8, 6, 12
    tensors, dense = {}, {"gate_up": [], "down": []}
    for _ in range(experts):
        for role, shape in (("gate_up", (hidden, 2 * inter)), ("down", (inter, hidden))):
            if fmt == "TERNARY":
                values, packed, scales = ternary_tensor(rng, *shape, block_size)
                dense[role].append((values, packed, scales))
            else:
                values, stored = exact(rng, shape, fmt)
                dense[role].append((values, stored, None))
    base = "model.layers.0.mlp.experts"
    for role in ("gate_up", "down"):
        stacked = np.stack([d[1] for d in dense[role]])
        tensors[f"{base}.{role}_proj"] = ("U8" if fmt == "TERNARY" else fmt, stacked)
        if fmt == "TERNARY":
            tensors[f"{base}.{role}_proj_scale"] = ("F32", np.stack([d[2] for d in dense[role]]))
    gate_up_bias = rng.standard_normal((experts, 2 * inter)).astype(np.float32)
    down_bias = rng.standard_normal((experts, hidden)).astype(np.float32)
    tensors[f"{base}.gate_up_proj_bias"] = ("F32", gate_up_bias)
    tensors[f"{base}.down_proj_bias"] = ("F32", down_bias)
    tensors["model.layers.0.mlp.router.weight"] = ("F32", np.zeros((experts, hidden), np.float32))
    metadata = (
        {"quantization": "ruvllm-ternary", "ternary_block_size": str(block_size)}
        if fmt == "TERNARY"
        else None
    )
    save(tmp_path / "model.safetensors", tensors, metadata)
    x = 3 * rng.standard_normal((6, hidden)).astype(np.float32)  # large enough to hit the clamps
    with ShardStore(tmp_path) as store:
        spec = store.layer_spec(0)
        assert (spec.layout, spec.num_experts, spec.hidden_size, spec.intermediate_size) == (
            GPT_OSS,
            experts,
            hidden,
            inter,
        )
        for e in range(experts):
            expected = gpt_oss_reference(
                x, dense["gate_up"][e][0], gate_up_bias[e], dense["down"][e][0], down_bias[e]
            )
            got = expert_matvec(store.expert_weights(0, e), x)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
            # expert e is slice e of each stacked tensor: 4 ranges (2 weights, 2 biases) unless
            # ternary, whose scales add two more
            assert len(store.expert_ranges(0, e)) == (6 if fmt == "TERNARY" else 4)


def test_stacked_ranges_are_slice_e_of_the_leading_axis(tmp_path):
    rng = np.random.default_rng(4)
    gate_up = rng.standard_normal((3, 4, 8)).astype(np.float32)
    down = rng.standard_normal((3, 4, 4)).astype(np.float32)
    path = tmp_path / "model.safetensors"
    save(
        path,
        {
            "model.layers.2.mlp.experts.gate_up_proj": ("F32", gate_up),
            "model.layers.2.mlp.experts.down_proj": ("F32", down),
        },
    )
    raw = path.read_bytes()
    with ShardStore(tmp_path) as store:
        for e in range(3):
            chunks = [raw[r.offset : r.end] for r in store.expert_ranges(2, e)]
            assert sorted(chunks) == sorted([gate_up[e].tobytes(), down[e].tobytes()])


def test_mxfp4_stacked_tensors_give_ranges_only(tmp_path):
    experts, hidden, inter = 2, 64, 32
    base = "model.layers.0.mlp.experts"
    u8 = lambda *shape: np.zeros(shape, np.uint8)  # noqa: E731
    save(
        tmp_path / "model.safetensors",
        {
            f"{base}.gate_up_proj_blocks": ("U8", u8(experts, 2 * inter, hidden // 32, 16)),
            f"{base}.gate_up_proj_scales": ("U8", u8(experts, 2 * inter, hidden // 32)),
            f"{base}.down_proj_blocks": ("U8", u8(experts, hidden, inter // 32, 16)),
            f"{base}.down_proj_scales": ("U8", u8(experts, hidden, inter // 32)),
        },
    )
    with ShardStore(tmp_path) as store:
        spec = store.layer_spec(0)
        assert (spec.format, spec.hidden_size, spec.intermediate_size) == ("MXFP4", hidden, inter)
        per_expert = 2 * inter * (hidden // 32) * 17 + hidden * (inter // 32) * 17
        assert store.expert_bytes(0, 1) == per_expert
        with pytest.raises(ValueError, match="byte ranges only"):
            store.expert_weights(0, 1)


def test_index_json_decides_files_and_layers_span_them(tmp_path):
    config = SynthConfig(MODEL_SHAPES["qwen1.5-moe"].scaled(64), num_layers=3, dtype="f16")
    written = write_checkpoint(config, tmp_path)
    assert len(written.files) == 3 and (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "stray.safetensors").write_bytes(b"not read: the index does not list it")
    with ShardStore(tmp_path) as store:
        assert store.layers == (0, 1, 2) and len(store.files) == 3
        for layer in store.layers:
            assert {r.path for r in store.layer_ranges(layer)} == {
                str(tmp_path / f"model-{layer + 1:05d}-of-00003.safetensors")
            }


def test_bf16_helpers_round_to_nearest_even():
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf], dtype=np.float32)
    # 1 + 2^-8 is halfway between two bfloat16 values: ties go to the even mantissa (1.0)
    assert bf16_to_float32(float32_to_bf16(values)).tolist() == [1.0, 1.0, 1.015625, -2.5, np.inf]
    assert np.isnan(bf16_to_float32(float32_to_bf16(np.array([np.nan], np.float32))))[0]


# -- synthetic checkpoints -----------------------------------------------------------------------
_REAL_TENSORS = {  # name -> shape, from each family's config.json (scale 1)
    "gpt-oss-20b": (
        0,
        {
            "model.layers.0.mlp.experts.gate_up_proj": (32, 2880, 5760),
            "model.layers.0.mlp.experts.gate_up_proj_bias": (32, 5760),
            "model.layers.0.mlp.experts.down_proj": (32, 2880, 2880),
            "model.layers.0.mlp.router.weight": (32, 2880),
        },
    ),
    "mixtral-8x7b": (
        0,
        {
            "model.layers.0.block_sparse_moe.experts.7.w1.weight": (14336, 4096),
            "model.layers.0.block_sparse_moe.experts.7.w2.weight": (4096, 14336),
            "model.layers.0.block_sparse_moe.gate.weight": (8, 4096),
        },
    ),
    "deepseek-v2-lite": (
        1,
        {
            "model.layers.1.mlp.experts.63.gate_proj.weight": (1408, 2048),
            "model.layers.1.mlp.experts.63.down_proj.weight": (2048, 1408),
            "model.layers.1.mlp.shared_experts.up_proj.weight": (2816, 2048),
            "model.layers.1.mlp.gate.weight": (64, 2048),
        },
    ),
    "qwen1.5-moe": (
        0,
        {
            "model.layers.0.mlp.experts.59.up_proj.weight": (1408, 2048),
            "model.layers.0.mlp.shared_expert.down_proj.weight": (2048, 5632),
            "model.layers.0.mlp.shared_expert_gate.weight": (1, 2048),
        },
    ),
}


@pytest.mark.parametrize("family", sorted(_REAL_TENSORS))
def test_planned_tensors_have_the_real_names_and_shapes(family):
    layer, expected = _REAL_TENSORS[family]
    planned = {
        t.name: t.shape for t in planned_tensors(SynthConfig(MODEL_SHAPES[family], 2), layer)
    }
    for name, shape in expected.items():
        assert planned[name] == shape
    experts = MODEL_SHAPES[family].num_experts
    stacked = family == "gpt-oss-20b"  # gate_up_proj, down_proj and their biases
    assert sum(".experts." in n for n in planned) == (4 if stacked else 3 * experts)


def test_deepseek_layer_zero_is_dense():
    planned = {
        t.name: t.shape
        for t in planned_tensors(SynthConfig(MODEL_SHAPES["deepseek-v2-lite"], 2), 0)
    }
    assert planned == {
        "model.layers.0.mlp.gate_proj.weight": (10944, 2048),
        "model.layers.0.mlp.up_proj.weight": (10944, 2048),
        "model.layers.0.mlp.down_proj.weight": (2048, 10944),
    }


@pytest.mark.parametrize("family", sorted(MODEL_SHAPES))
@pytest.mark.parametrize("dtype", ["bf16", "ternary"])
def test_synth_checkpoints_open_with_their_family_layout(tmp_path, family, dtype):
    shape = MODEL_SHAPES[family].scaled(64)
    config = SynthConfig(shape, num_layers=2, dtype=dtype, block_size=32, layers_per_file=2)
    written = write_checkpoint(config, tmp_path)
    assert [p.name for p in written.files] == ["model.safetensors"]
    with safetensors.safe_open(str(written.files[0]), "numpy") as f:
        names = set(f.keys())
    assert names == {t.name for layer in range(2) for t in planned_tensors(config, layer)}
    with ShardStore(tmp_path) as store:
        assert store.layers == ((1,) if family == "deepseek-v2-lite" else (0, 1))
        layer = store.layers[0]
        spec = store.layer_spec(layer)
        assert (spec.num_experts, spec.hidden_size, spec.intermediate_size) == (
            shape.num_experts,
            shape.hidden_size,
            shape.intermediate_size,
        )
        assert spec.layout == (GPT_OSS if family == "gpt-oss-20b" else SWIGLU)
        hidden, inter = shape.hidden_size, shape.intermediate_size
        if dtype == "bf16":
            expert_bytes = 3 * hidden * inter * 2 + (
                2 * (2 * inter + hidden) if family == "gpt-oss-20b" else 0
            )
        else:  # the seed's footprint of each projection, plus float16 biases for gpt-oss
            expert_bytes = (
                expert_memory_footprint(hidden, 2 * inter, 32)
                + expert_memory_footprint(inter, hidden, 32)
                + 2 * (2 * inter + hidden)
                if family == "gpt-oss-20b"
                else 3 * expert_memory_footprint(inter, hidden, 32)
            )
        assert store.expert_bytes(layer, shape.num_experts - 1) == expert_bytes
        x = np.random.default_rng(0).standard_normal((3, hidden)).astype(np.float32)
        out = expert_matvec(store.expert_weights(layer, 0), x)
        assert out.shape == (3, hidden) and np.isfinite(out).all() and np.abs(out).max() > 0


def test_synth_ternary_is_the_quantized_float_weights(tmp_path):
    """A ternary checkpoint's expert equals the quantizer applied to the same seed's f32 weights."""
    shape = MODEL_SHAPES["mixtral-8x7b"].scaled(128)
    write_checkpoint(SynthConfig(shape, 1, "f32", seed=5), tmp_path / "f32")
    write_checkpoint(SynthConfig(shape, 1, "ternary", block_size=64, seed=5), tmp_path / "t")
    with ShardStore(tmp_path / "f32") as floats, ShardStore(tmp_path / "t") as packed:
        for role in ("gate", "up", "down"):
            w = floats.expert_weights(0, 2)[role].data
            codes, scales = ternary.quantize_ternary(w, 64)
            view = packed.expert_weights(0, 2)[role]
            np.testing.assert_array_equal(view.data.reshape(-1), codes)
            np.testing.assert_array_equal(view.scales, scales)


def test_synth_is_deterministic_per_seed(tmp_path):
    shape = MODEL_SHAPES["gpt-oss-20b"].scaled(90)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_checkpoint(SynthConfig(shape, 1, "bf16", seed=seed), tmp_path / name)

    def parts(name):  # parsed header and data: safetensors orders __metadata__ keys at random
        raw = (tmp_path / name / "model.safetensors").read_bytes()
        length = int.from_bytes(raw[:8], "little")
        return json.loads(raw[8 : 8 + length]), raw[8 + length :]

    assert parts("a") == parts("b")
    assert parts("a")[0] == parts("c")[0] and parts("a")[1] != parts("c")[1]


def test_synth_rejects_bad_configs():
    with pytest.raises(ValueError, match="num_layers"):  # deepseek's layer 0 is dense
        SynthConfig(MODEL_SHAPES["deepseek-v2-lite"], 1)
    with pytest.raises(ValueError, match="dtype"):
        SynthConfig(MODEL_SHAPES["mixtral-8x7b"], 1, dtype="int4")
    custom = MODEL_SHAPES["mixtral-8x7b"].__class__("custom", "mlp", 1, 2, 6, 8)
    with pytest.raises(ValueError, match="hidden_size: .*multiple of 4"):
        SynthConfig(custom, 1, dtype="ternary")


# -- command line --------------------------------------------------------------------------------
def test_cli_synth_and_info(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert (
        shards_cli.main(
            [
                "shards",
                "synth",
                "--shape",
                "custom",
                "--num-experts",
                "4",
                "--hidden-size",
                "16",
                "--intermediate-size",
                "24",
                "--naming",
                "mixtral",
                "--layers",
                "2",
                "--dtype",
                "f16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "2 layers x 4 experts, hidden 16, intermediate 24" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"]["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
        == "model-00002-of-00002.safetensors"
    )
    assert shards_cli.main(["shards", "info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[2].split()[:6] == ["0", "4", "swiglu", "F16", "16", "24"]


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert shards_cli.main(["shards", "synth", "--shape", "custom", "--out", str(tmp_path)]) == 2
    assert "--shape custom needs --num-experts" in capsys.readouterr().err
    assert (
        shards_cli.main(
            [
                "shards",
                "synth",
                "--shape",
                "mixtral-8x7b",
                "--hidden-size",
                "8",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert shards_cli.main(["shards", "info", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_cli_help_lists_the_shapes(capsys):
    with pytest.raises(SystemExit):
        shards_cli.main(["shards", "synth", "--help"])
    text = capsys.readouterr().out
    for family in MODEL_SHAPES:
        assert family in text
    assert "--scale" in text and "ternary" in text


def test_the_shards_package_never_imports_ray():
    """Static: no module of moeray/shards imports ray (the shard store is mechanism-free)."""
    import ast
    from pathlib import Path

    import moeray.shards.store

    for source in Path(moeray.shards.store.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "ray" or n.startswith("ray.") for n in names), source

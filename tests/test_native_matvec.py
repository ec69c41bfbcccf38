"""The native consumer kernel (``_core.expert_matvec``) and its twin agree with the numpy reference
``moeray.shards.kernels.expert_matvec``; both reject bad input with the same errors.

Parity runs on tiny synthetic checkpoints of both layouts in every format (sizes that are not
multiples of 8, ternary blocks that span rows), for T in {1, 3, 17}; every float16 and bfloat16
bit pattern and every ternary byte go through the kernel once.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeray.shards import GPT_OSS, SWIGLU, ShardStore, expert_matvec, expert_matvec_native
from moeray.shards.store import ExpertWeights, WeightView
from moeray.shards.synth import ModelShape, SynthConfig, write_checkpoint

pytestmark = pytest.mark.pure

FORMATS = {"f32": "F32", "f16": "F16", "bf16": "BF16", "ternary": "TERNARY"}
NAMINGS = {SWIGLU: "mlp", GPT_OSS: "stacked"}
HIDDEN, INTER, BLOCK_SIZE = 20, 12, 36  # a row is 20 or 12 (or 24) weights: blocks span rows


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(layout, dtype) -> path of a one-layer, two-expert synthetic checkpoint."""
    root = tmp_path_factory.mktemp("matvec")
    paths = {}
    for layout, naming in NAMINGS.items():
        shape = ModelShape(f"tiny-{naming}", naming, 1, 2, HIDDEN, INTER)
        for dtype in FORMATS:
            config = SynthConfig(shape, num_layers=1, dtype=dtype, block_size=BLOCK_SIZE, seed=3)
            paths[layout, dtype] = write_checkpoint(
                config, root / f"{naming}-{dtype}", progress=False
            ).path
    return paths


def tokens(num_tokens: int, seed: int = 0) -> np.ndarray:
    # standard deviation 8: gpt-oss gates and ups pass the clamps at +-7 now and then
    return 8 * np.random.default_rng(seed).standard_normal((num_tokens, HIDDEN), dtype=np.float32)


@pytest.mark.parametrize("num_tokens", [1, 3, 17])
@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("layout", list(NAMINGS))
def test_matches_numpy_reference_on_synthetic_checkpoints(
    core, checkpoints, layout, dtype, num_tokens
):
    x = tokens(num_tokens, seed=num_tokens)
    with ShardStore(checkpoints[layout, dtype]) as store:
        spec = store.layer_spec(0)
        assert (spec.layout, spec.format) == (layout, FORMATS[dtype])
        for expert in range(2):
            weights = store.expert_weights(0, expert)
            want = expert_matvec(weights, x)
            got = expert_matvec_native(weights, x, core=core)
            assert got.dtype == np.float32 and got.shape == (num_tokens, HIDDEN)
            assert np.abs(want).max() > 0.1  # not a comparison of zeros
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            if layout == GPT_OSS and num_tokens == 17:  # the clamps were exercised
                gate_up = x @ weights["gate_up"].to_float32() + weights["gate_up_bias"].to_float32()
                assert (gate_up[:, 0::2] > 7).any() and (np.abs(gate_up[:, 1::2]) > 7).any()
        del weights


def test_backend_fast_path_takes_what_the_reference_takes(checkpoints):
    """No core given: moeray.native.backend; x may be float64 or non-contiguous, as for the
    reference; T = 0 gives an empty result."""
    x = tokens(6).astype(np.float64)[::2]
    with ShardStore(checkpoints[GPT_OSS, "bf16"]) as store:
        weights = store.expert_weights(0, 1)
        np.testing.assert_allclose(
            expert_matvec_native(weights, x), expert_matvec(weights, x), rtol=1e-5, atol=1e-5
        )
        empty = expert_matvec_native(weights, np.zeros((0, HIDDEN), np.float32))
        assert empty.shape == (0, HIDDEN) and empty.dtype == np.float32
        with pytest.raises(ValueError, match=r"x: expected shape \[T, 20\], got \[3, 4\]"):
            expert_matvec_native(weights, np.zeros((3, 4), np.float32))
        del weights


# -- every stored bit pattern --------------------------------------------------------------------
def probe(view: WeightView, hidden: int) -> ExpertWeights:
    """gpt-oss, intermediate 1: gate_up 0 and bias (1, 0) make the activation a constant c, so
    the output is c * down [1, hidden], one weight of ``view`` per column."""
    views = {
        "gate_up": WeightView("gate_up", "F32", (hidden, 2), np.zeros((hidden, 2), np.float32)),
        "gate_up_bias": WeightView("gate_up_bias", "F32", (2,), np.array([1, 0], np.float32)),
        "down": view,
    }
    return ExpertWeights(0, 0, GPT_OSS, hidden, 1, views)


@pytest.mark.parametrize("fmt", ["F16", "BF16"])
def test_every_16_bit_pattern_widens_like_numpy(core, fmt):
    """Normals, subnormals, zeros of both signs, infinities and NaNs."""
    bits = np.arange(2**16, dtype=np.uint16)
    data = bits.view(np.float16) if fmt == "F16" else bits
    view = WeightView("down", fmt, (1, 2**16), data.reshape(1, -1))
    weights = probe(view, 2**16)
    x = np.zeros((1, 2**16), np.float32)
    with np.errstate(invalid="ignore"):  # the NaN and infinite weights
        got = expert_matvec_native(weights, x, core=core)[0]
        want = expert_matvec(weights, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)  # NaN == NaN here
    widened = view.to_float32()[0]
    assert np.array_equal(np.isnan(got), np.isnan(widened))
    assert np.array_equal(np.isinf(got), np.isinf(widened))
    smallest_normal = np.finfo(np.float16 if fmt == "F16" else np.float32).tiny
    tiny = (widened != 0) & (np.abs(widened) < smallest_normal)  # the subnormals, both signs
    assert tiny.sum() == 2 * (1023 if fmt == "F16" else 127)
    assert (got[tiny] != 0).all() and (np.sign(got[tiny]) == np.sign(widened[tiny])).all()


def test_every_ternary_byte_with_blocks_inside_bytes(core):
    """Bytes 0..255 (the reserved code 11 reads as 0), blocks of 3 weights with distinct scales."""
    packed = np.arange(256, dtype=np.uint8).reshape(1, 256)
    cols, block_size = 1024, 3
    scales = (1.0 + np.arange(-(-cols // block_size), dtype=np.float32)) / 64
    view = WeightView("down", "TERNARY", (1, cols), packed, scales, block_size)
    weights = probe(view, cols)
    x = np.zeros((1, cols), np.float32)
    got = expert_matvec_native(weights, x, core=core)[0]
    np.testing.assert_allclose(got, expert_matvec(weights, x)[0], rtol=1e-6, atol=0)
    codes = (np.arange(256)[:, None] >> np.array([0, 2, 4, 6])) & 3
    values = np.array([-1, 0, 1, 0])[codes.reshape(-1)] * np.repeat(scales, block_size)[:cols]
    activation = got[values != 0] / values[values != 0]  # the constant c of probe()
    np.testing.assert_allclose(activation, activation[0], rtol=1e-6)
    assert (got[values == 0] == 0).all() and activation[0] > 0.5


# -- bad input ----------------------------------------------------------------------------------
H, I = 8, 4  # noqa: E741 (the model's own symbols)


def valid_swiglu():
    rng = np.random.default_rng(1)
    return {
        "gate": ("F32", rng.standard_normal((I, H), dtype=np.float32), None, 0),
        "up": ("F32", rng.standard_normal((I, H), dtype=np.float32), None, 0),
        "down": ("F32", rng.standard_normal((H, I), dtype=np.float32), None, 0),
    }


def ternary_gate(num_scales=None, block_size=5, scale_dtype=np.float32):
    blocks = -(-I * H // block_size) if num_scales is None else num_scales
    return ("TERNARY", np.zeros((I, H // 4), np.uint8), np.ones(blocks, scale_dtype), block_size)


def with_role(role, value):
    tensors = valid_swiglu()
    tensors[role] = value
    return tensors


def without(role):
    tensors = valid_swiglu()
    del tensors[role]
    return tensors


X = np.ones((3, H), np.float32)
GATE = valid_swiglu()["gate"][1]
GPT_OSS_BASE = {
    "gate_up": ("F32", np.zeros((H, 2 * I), np.float32), None, 0),
    "down": ("F32", np.zeros((I, H), np.float32), None, 0),
}


def case(error, message, layout=SWIGLU, hidden=H, inter=I, tensors=None, x=X):
    """(arguments of expert_matvec, error type, message regex): valid but for what is given."""
    tensors = valid_swiglu() if tensors is None else tensors
    return (layout, hidden, inter, tensors, x), error, message


BAD = {
    "layout type": case(TypeError, r"layout: expected 'swiglu' or 'gpt-oss', got int", layout=3),
    "layout value": case(ValueError, r"layout: .* got 'relu'", layout="relu"),
    "hidden bool": case(TypeError, r"hidden_size: expected an int, got bool", hidden=True),
    "hidden zero": case(
        ValueError, r"hidden_size: expected an int in \[1, 2\*\*31\), got 0", hidden=0
    ),
    "inter huge": case(
        ValueError, r"intermediate_size: .* got 1180591620717411303424", inter=2**70
    ),
    "x list": case(
        TypeError, r"x: expected a numpy float32 array \[T, hidden\], got list", x=[[1.0] * H]
    ),
    "x float64": case(TypeError, r"x: expected dtype float32, got float64", x=X.astype(np.float64)),
    "x shape": case(
        ValueError, r"x: expected shape \[T, 8\], got \[3, 9\]", x=np.ones((3, H + 1), np.float32)
    ),
    "x 1-d": case(ValueError, r"x: expected shape \[T, 8\], got \[8\]", x=np.ones(H, np.float32)),
    "x strided": case(
        ValueError, r"x: expected a C-contiguous array", x=np.ones((3, 2 * H), np.float32)[:, ::2]
    ),
    "x fortran": case(
        ValueError,
        r"x: expected a C-contiguous array",
        x=np.asfortranarray(np.ones((3, H), np.float32)),
    ),
    "tensors list": case(
        TypeError, r"tensors: expected a dict .* got list", tensors=list(valid_swiglu().values())
    ),
    "unknown role": case(
        ValueError,
        r"tensors: unexpected role 'gate_proj' for layout 'swiglu' "
        r"\(expected gate, up, down\)",
        tensors=with_role("gate_proj", valid_swiglu()["gate"]),
    ),
    "gpt-oss role in swiglu": case(
        ValueError,
        r"unexpected role 'down_bias'",
        tensors=with_role("down_bias", ("F32", np.zeros(H, np.float32), None, 0)),
    ),
    "missing role": case(
        ValueError,
        r"tensors: no 'up' for layout 'swiglu' "
        r"\(it needs gate, up, down\)",
        tensors=without("up"),
    ),
    "missing gpt-oss down": case(
        ValueError,
        r"tensors: no 'down' for layout 'gpt-oss' "
        r"\(it needs gate_up, down\)",
        layout=GPT_OSS,
        tensors={"gate_up": GPT_OSS_BASE["gate_up"]},
    ),
    "value list": case(
        TypeError,
        r"tensors\['gate'\]: expected a tuple \(format, data, scales, "
        r"block_size\), got list",
        tensors=with_role("gate", ["F32", GATE, None, 0]),
    ),
    "value short": case(
        ValueError,
        r"tensors\['gate'\]: expected 4 items .* got 3",
        tensors=with_role("gate", ("F32", GATE, None)),
    ),
    "format bytes": case(
        TypeError,
        r"tensors\['gate'\]: format: expected a str, got bytes",
        tensors=with_role("gate", (b"F32", GATE, None, 0)),
    ),
    "format unknown": case(
        ValueError,
        r"format: expected one of F32, F16, BF16, TERNARY, got 'I8'",
        tensors=with_role("gate", ("I8", GATE, None, 0)),
    ),
    "ternary bias": case(
        ValueError,
        r"tensors\['down_bias'\]: format: expected one of F32, F16, "
        r"BF16, got 'TERNARY'",
        layout=GPT_OSS,
        tensors={
            **GPT_OSS_BASE,
            "down_bias": ("TERNARY", np.zeros(2, np.uint8), np.ones(1, np.float32), 8),
        },
    ),
    "wrong dtype": case(
        TypeError,
        r"tensors\['gate'\]: data: expected dtype uint16 for BF16, "
        r"got float32",
        tensors=with_role("gate", ("BF16", GATE, None, 0)),
    ),
    "big-endian": case(
        TypeError,
        r"data: expected dtype float32 for F32, got >f4",
        tensors=with_role("gate", ("F32", GATE.astype(">f4"), None, 0)),
    ),
    "wrong shape": case(
        ValueError,
        r"tensors\['gate'\]: data: expected shape \[4, 8\] for F32, "
        r"got \[8, 4\]",
        tensors=with_role("gate", ("F32", np.ascontiguousarray(GATE.T), None, 0)),
    ),
    "data not array": case(
        TypeError,
        r"data: expected a numpy float32 array, got list",
        tensors=with_role("gate", ("F32", GATE.tolist(), None, 0)),
    ),
    "non-contiguous": case(
        ValueError,
        r"tensors\['gate'\]: data: expected a C-contiguous array",
        tensors=with_role("gate", ("F32", np.ones((H, I), np.float32).T, None, 0)),
    ),
    "float with scales": case(
        ValueError,
        r"scales: expected None for F32 \(only TERNARY has "
        r"scales\), got ndarray",
        tensors=with_role("gate", ("F32", GATE, np.ones(1, np.float32), 0)),
    ),
    "float with blocks": case(
        ValueError,
        r"block_size: expected 0 for F32 \(only TERNARY has "
        r"blocks\), got 16",
        tensors=with_role("gate", ("F32", GATE, None, 16)),
    ),
    "short scales": case(
        ValueError,
        r"tensors\['gate'\]: scales: expected shape \[7\] "
        r"\(ceil\(4 \* 8 / 5\)\), got \[6\]",
        tensors=with_role("gate", ternary_gate(num_scales=6)),
    ),
    "scales float64": case(
        TypeError,
        r"scales: expected dtype float32, got float64",
        tensors=with_role("gate", ternary_gate(scale_dtype=np.float64)),
    ),
    "scales missing": case(
        TypeError,
        r"scales: expected a numpy float32 array, got NoneType",
        tensors=with_role("gate", ternary_gate()[:2] + (None, 5)),
    ),
    "block zero": case(
        ValueError,
        r"block_size: expected an int in \[1, 2\*\*31\) for TERNARY, "
        r"got 0",
        tensors=with_role("gate", ternary_gate()[:3] + (0,)),
    ),
    "block float": case(
        TypeError,
        r"tensors\['gate'\]: block_size: expected an int, got float",
        tensors=with_role("gate", ternary_gate()[:3] + (5.0,)),
    ),
    "ternary unpacked": case(
        ValueError,
        r"data: expected shape \[4, 2\] for TERNARY, got \[4, 8\]",
        tensors=with_role(
            "gate", ("TERNARY", np.zeros((I, H), np.uint8), np.ones(7, np.float32), 5)
        ),
    ),
    "ternary cols": case(
        ValueError,
        r"cols must be a multiple of 4, got 6",
        hidden=6,
        x=np.ones((1, 6), np.float32),
        tensors={"gate": ("TERNARY", np.zeros((I, 1), np.uint8), np.ones(5, np.float32), 5)},
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_a_clean_error(core, case):
    args, error, message = BAD[case]
    with pytest.raises(error, match=message):
        core.expert_matvec(*args)


def test_native_and_twin_raise_the_same_errors(core_pair):
    for case, (args, error, _) in BAD.items():
        messages = []
        for mod in core_pair:
            with pytest.raises(error) as raised:
                mod.expert_matvec(*args)
            messages.append(str(raised.value))
        assert messages[0] == messages[1], case


def test_valid_arguments_of_the_bad_input_table_work(core):
    """The table's base case is valid, so each failure above is due to its one change."""
    tensors = valid_swiglu()
    want = expert_matvec(
        ExpertWeights(
            0,
            0,
            SWIGLU,
            H,
            I,
            {
                role: WeightView(role, fmt, data.shape, data)
                for role, (fmt, data, _, _) in tensors.items()
            },
        ),
        X,
    )
    np.testing.assert_allclose(
        core.expert_matvec(SWIGLU, H, I, tensors, X), want, rtol=1e-5, atol=1e-6
    )
    gated = with_role("gate", ternary_gate())
    assert core.expert_matvec(SWIGLU, H, I, gated, X).shape == (3, H)

"""ruvllm's packed ternary format: golden cases from ruvllm's own tests, and the quantizer and
packer against straightforward per-element transcriptions of ruvllm's rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeray.policy import expert_memory_footprint
from moeray.shards import ternary

pytestmark = pytest.mark.pure


def _pack_loop(values) -> bytes:
    """ruvllm's pack_ternary, one element at a time."""
    packed = bytearray((len(values) + 3) // 4)
    for i, v in enumerate(values):
        code = 0b00 if v < 0 else 0b01 if v == 0 else 0b10
        packed[i // 4] |= code << (2 * (i % 4))
    return bytes(packed)


def _absmean_loop(flat, block_size):
    """ruvllm's quantize_tensor: per block gamma = mean|w| + 1e-8, round half away from zero."""
    codes, scales = [], []
    for start in range(0, len(flat), block_size):
        block = [float(w) for w in flat[start : start + block_size]]
        gamma = sum(abs(w) for w in block) / len(block) + 1e-8
        scales.append(gamma)
        for w in block:
            z = max(-1.0, min(1.0, w / gamma))
            codes.append(int(math.copysign(math.floor(abs(z) + 0.5), z)))
    return codes, scales


def test_pack_matches_ruvllm_golden_byte():
    # ruvllm test_pack_ternary_single_byte: [-1, 0, 1, -1] -> 0b00_10_01_00
    assert ternary.pack_ternary(np.array([-1, 0, 1, -1])).tolist() == [0b00_10_01_00]


def test_pack_and_unpack_round_trip_with_a_partial_byte():
    values = np.random.default_rng(1).integers(-1, 2, size=23)
    packed = ternary.pack_ternary(values)
    assert packed.tobytes() == _pack_loop(values.tolist())
    assert ternary.unpack_ternary(packed, 23).tolist() == values.tolist()


def test_pack_clamps_and_reserved_code_reads_zero():
    assert ternary.unpack_ternary(ternary.pack_ternary(np.array([-5, 0, 2, 3])), 4).tolist() == [
        -1,
        0,
        1,
        1,
    ]
    assert ternary.unpack_ternary(np.array([0b11_11_11_11], dtype=np.uint8), 4).tolist() == [0] * 4


def test_quantize_ruvllm_golden_block():
    # ruvllm test_absmean_ternary_simple
    packed, scales = ternary.quantize_ternary(np.array([0.5, -0.5, 0.0, 1.0, -1.0, 0.25]), 256)
    assert ternary.unpack_ternary(packed, 3).tolist() == [1, -1, 0]
    assert scales[0] == pytest.approx(3.25 / 6, rel=1e-6)


def test_quantize_rounds_halves_away_from_zero():
    # gamma = (7 + 1) / 4 = 2, so 1 / gamma is exactly 0.5: Rust's round gives 1, not numpy's 0
    packed, _ = ternary.quantize_ternary(np.array([7.0, 1.0, 0.0, 0.0, -7.0, -1.0, 0.0, 0.0]), 4)
    assert ternary.unpack_ternary(packed, 8).tolist() == [1, 1, 0, 0, -1, -1, 0, 0]


def test_quantize_matches_per_element_transcription_with_partial_last_block():
    weights = np.random.default_rng(2).standard_normal((5, 12)).astype(np.float32)
    packed, scales = ternary.quantize_ternary(weights, block_size=7)  # 60 = 8 * 7 + 4
    codes, expected_scales = _absmean_loop(weights.reshape(-1), 7)
    assert ternary.unpack_ternary(packed, 60).tolist() == codes
    np.testing.assert_allclose(scales, expected_scales, rtol=1e-6)


def test_all_zero_block_has_epsilon_scale_and_zero_codes():
    packed, scales = ternary.quantize_ternary(np.zeros(256), 256)
    assert ternary.unpack_ternary(packed, 256).tolist() == [0] * 256
    assert 0 < scales[0] < 1e-7


def test_dequantize_is_code_times_block_scale():
    codes = np.array([1, -1, 0, 1, 1, -1, 0], dtype=np.int8)
    scales = np.array([0.5, 2.0], dtype=np.float32)
    out = ternary.dequantize_ternary(ternary.pack_ternary(codes), scales, (7,), block_size=4)
    assert out.tolist() == [0.5, -0.5, 0.0, 0.5, 2.0, -2.0, 0.0]
    with pytest.raises(ValueError, match="scales: expected 2"):
        ternary.dequantize_ternary(ternary.pack_ternary(codes), scales[:1], (7,), block_size=4)


@pytest.mark.parametrize("rows, cols, block_size", [(256, 256, 256), (1, 4, 256), (12, 20, 7)])
def test_footprint_matches_the_seed_formula(rows, cols, block_size):
    packed, scales = ternary.quantize_ternary(np.ones((rows, cols)), block_size)
    assert packed.nbytes + scales.nbytes == expert_memory_footprint(rows, cols, block_size)


def test_quantize_rejects_empty_and_non_finite():
    with pytest.raises(ValueError, match="at least one"):
        ternary.quantize_ternary(np.zeros(0))
    with pytest.raises(ValueError, match="finite"):
        ternary.quantize_ternary(np.array([1.0, np.nan]))

// One MoE expert's FFN over the T tokens routed to it, reading the weights where they lie (a
// memory mapping): no float32 copy of a weight matrix is made. The numpy twin is
// moeray/native/_reference/matvec.py; moeray/native/src/bindings.cpp validates every argument.
//
// Weight-stationary: each weight row is read once, decoded into one float32 row (cols floats,
// L1-sized), and used by all T tokens, so a call reads each weight byte once whatever T is.
// Accumulation is float32. Loads go through memcpy: a tensor of a safetensors file need not be
// aligned to its element size.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace moeray {

enum class WeightFormat { kF32, kF16, kBf16, kTernary };

// A weight matrix [rows, cols] as stored, row-major (a bias is one row). TERNARY: 4 codes a
// byte in flat order, least significant pair first, and float32 scales, one per block_size
// weights of the flat order (moeray/shards/ternary.py). The binding checks the sizes.
struct WeightMatrix {
  WeightFormat format;
  const uint8_t* data;
  const uint8_t* scales;  // TERNARY only
  int64_t block_size;     // TERNARY only
  int64_t rows;
  int64_t cols;
};

inline float load_f32(const uint8_t* p, int64_t i) {
  float v;
  std::memcpy(&v, p + 4 * i, sizeof v);
  return v;
}

inline uint16_t load_u16(const uint8_t* p, int64_t i) {
  uint16_t v;
  std::memcpy(&v, p + 2 * i, sizeof v);
  return v;
}

inline float bits_to_float(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// bfloat16 is the upper half of a float32: widening is exact.
inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE half -> float, exact for every input: normals rebias the exponent (15 -> 127),
// subnormals are mantissa * 2**-24 (a normal float), inf and NaN keep their payload.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // 0 or a subnormal half
  return sign ? -magnitude : magnitude;
}

// Codes 00 = -1, 01 = 0, 10 = +1; 11 is reserved and reads as 0, as in ruvllm.
constexpr float kTernaryValue[4] = {-1.0f, 0.0f, 1.0f, 0.0f};

// out[c] = W[row, c] as float32, c in [0, cols).
inline void decode_row(const WeightMatrix& w, int64_t row, float* out) {
  const int64_t cols = w.cols;
  switch (w.format) {
    case WeightFormat::kF32:
      std::memcpy(out, w.data + 4 * row * cols, 4 * cols);
      return;
    case WeightFormat::kF16:
      for (int64_t c = 0; c < cols; ++c) out[c] = half_to_float(load_u16(w.data, row * cols + c));
      return;
    case WeightFormat::kBf16:
      for (int64_t c = 0; c < cols; ++c) out[c] = bf16_to_float(load_u16(w.data, row * cols + c));
      return;
    case WeightFormat::kTernary: {
      // A block may start or end inside the row: walk the row one block's run at a time.
      const int64_t first = row * cols;  // flat index of W[row, 0]
      for (int64_t c = 0; c < cols;) {
        const int64_t block = (first + c) / w.block_size;
        const int64_t end = std::min(cols, (block + 1) * w.block_size - first);
        const float scale = load_f32(w.scales, block);
        for (; c < end; ++c) {
          const int64_t i = first + c;
          out[c] = kTernaryValue[(w.data[i >> 2] >> (2 * (i & 3))) & 3] * scale;
        }
      }
      return;
    }
  }
}

// Eight partial sums: without -ffast-math this is what lets the compiler vectorize the sum.
inline float dot(const float* a, const float* b, int64_t n) {
  float partial[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) partial[k] += a[i + k] * b[i + k];
  float sum = 0.0f;
  for (int k = 0; k < 8; ++k) sum += partial[k];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y [T, rows] = x [T, cols] @ W.T, for W [rows, cols] stored [out, in] (per-expert families).
inline void matmul_out_in(const WeightMatrix& w, const float* x, int64_t num_tokens, float* y) {
  std::vector<float> row(w.cols);
  for (int64_t r = 0; r < w.rows; ++r) {
    decode_row(w, r, row.data());
    for (int64_t t = 0; t < num_tokens; ++t)
      y[t * w.rows + r] = dot(row.data(), x + t * w.cols, w.cols);
  }
}

// y [T, cols] += x [T, rows] @ W, for W [rows, cols] stored [in, out] (gpt-oss). Four rows per
// pass over y, added in row order: the same sums as one row at a time, a quarter of the traffic.
inline void matmul_in_out(const WeightMatrix& w, const float* x, int64_t num_tokens, float* y) {
  const int64_t cols = w.cols;
  std::vector<float> rows(4 * cols);
  const float *r0 = rows.data(), *r1 = r0 + cols, *r2 = r1 + cols, *r3 = r2 + cols;
  int64_t r = 0;
  for (; r + 4 <= w.rows; r += 4) {
    for (int64_t k = 0; k < 4; ++k) decode_row(w, r + k, rows.data() + k * cols);
    for (int64_t t = 0; t < num_tokens; ++t) {
      const float* a = x + t * w.rows + r;
      float* out = y + t * cols;
      for (int64_t c = 0; c < cols; ++c)
        out[c] = out[c] + a[0] * r0[c] + a[1] * r1[c] + a[2] * r2[c] + a[3] * r3[c];
    }
  }
  for (; r < w.rows; ++r) {
    decode_row(w, r, rows.data());
    for (int64_t t = 0; t < num_tokens; ++t) {
      const float a = x[t * w.rows + r];
      float* out = y + t * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] += a * r0[c];
    }
  }
}

// y [T, n] += bias [n], a one-row matrix.
inline void add_bias(const WeightMatrix& bias, int64_t num_tokens, float* y) {
  std::vector<float> row(bias.cols);
  decode_row(bias, 0, row.data());
  for (int64_t t = 0; t < num_tokens; ++t)
    for (int64_t c = 0; c < bias.cols; ++c) y[t * bias.cols + c] += row[c];
}

// sigmoid as the reference writes it: 0.5 (1 + tanh(z / 2)), no overflow for large |z|.
inline float sigmoid(float z) { return 0.5f * (1.0f + std::tanh(0.5f * z)); }

// SWIGLU: out [T, hidden] = down(silu(gate x) * up x); gate, up [I, hidden], down [hidden, I].
inline void swiglu_expert(const WeightMatrix& gate, const WeightMatrix& up,
                          const WeightMatrix& down, const float* x, int64_t num_tokens,
                          float* out) {
  const int64_t inter = gate.rows;
  std::vector<float> g(num_tokens * inter), u(num_tokens * inter);
  matmul_out_in(gate, x, num_tokens, g.data());
  matmul_out_in(up, x, num_tokens, u.data());
  for (int64_t i = 0; i < num_tokens * inter; ++i) g[i] = g[i] * sigmoid(g[i]) * u[i];
  matmul_out_in(down, g.data(), num_tokens, out);
}

constexpr float kGptOssAlpha = 1.702f;
constexpr float kGptOssLimit = 7.0f;

// GPT_OSS (transformers' GptOssExperts): gate_up [hidden, 2I] with gate j in column 2j and up j
// in column 2j + 1, down [I, hidden], biases optional (nullptr). out [T, hidden], zeroed.
inline void gpt_oss_expert(const WeightMatrix& gate_up, const WeightMatrix& down,
                           const WeightMatrix* gate_up_bias, const WeightMatrix* down_bias,
                           const float* x, int64_t num_tokens, float* out) {
  const int64_t inter = down.rows;
  std::vector<float> gu(num_tokens * 2 * inter, 0.0f), act(num_tokens * inter);
  matmul_in_out(gate_up, x, num_tokens, gu.data());
  if (gate_up_bias != nullptr) add_bias(*gate_up_bias, num_tokens, gu.data());
  for (int64_t i = 0; i < num_tokens * inter; ++i) {
    // std::min / std::max return their first argument for NaN, as np.minimum and np.clip do
    const float g = std::min(gu[2 * i], kGptOssLimit);
    const float u = std::min(std::max(gu[2 * i + 1], -kGptOssLimit), kGptOssLimit);
    act[i] = (u + 1.0f) * (g * sigmoid(kGptOssAlpha * g));
  }
  matmul_in_out(down, act.data(), num_tokens, out);
  if (down_bias != nullptr) add_bias(*down_bias, num_tokens, out);
}

}  // namespace moeray

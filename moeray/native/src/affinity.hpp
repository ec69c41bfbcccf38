// EMA affinity per expert (the seed's moe/affinity.rs semantics, in double precision).
//
// An update decays every score (s = s * decay), then boosts each activated one
// (s = min(s + boost, max_score), once per occurrence).
//
// Lazy decay (the usual parameters: decay in [2^-16, 1], |boost| <= 2^512, max_score in
// [0, 2^512] or +inf): a token costs O(top_k), not O(n). The scores are kept scaled, s = v * scale,
// with one running scale = decay^t since the last normalisation; a token multiplies the scale by
// decay and adds boost / scale (clamped at max_score / scale) to its experts' stored values; a read
// is min(v * scale, max_score) (the clamp keeps reads <= max_score, as the seed's boosts do: the
// products round). When the scale falls below 2^-64 every stored value is replaced by its read
// and the scale by 1 (so max_score / scale and boost / scale stay finite). The rounding differs
// from the eager form by a few ulps (tests/test_affinity_lazy.py bounds it); the twin does the
// same operations in the same order, so native and twin agree bit for bit.
//
// Other parameters (decay 0, huge boosts, NaN) take the eager form, which every path below
// computes with the twin's IEEE operations in the same order (all but which NaN comes out where
// two NaNs meet: tests/test_affinity_batch.py):
// - update_row: one token; a sweep of n multiplies the compiler vectorises, then the boosts.
// - update_rows (a batch of T tokens): on CPUs with AVX-512, two tokens per pass over the
//   scores, held in registers between them (update_rows_avx512). The per-token sweep is bound
//   by its stores (2 KB per token at 256 experts); this one stores half as often.
//   Elsewhere, the per-token sweep.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOERAY_AFFINITY_AVX512 1
#endif

namespace moeray {

namespace affinity_detail {

// Decays n scores; nothing aliases `s` (__restrict), so the compiler vectorises the loop.
inline void decay(double* __restrict s, int64_t n, double decay) {
  for (int64_t i = 0; i < n; ++i) s[i] = s[i] * decay;
}

// One token's boosts on scores s (n tracked experts; ids >= n are ignored, as in the seed).
inline void boost(double* s, int32_t n, const int32_t* ids, int64_t count, double boost,
                  double max_score) {
  for (int64_t j = 0; j < count; ++j) {
    const int32_t e = ids[j];
    if (e < n) s[e] = std::min(s[e] + boost, max_score);
  }
}

#ifdef MOERAY_AFFINITY_AVX512

inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return yes;
}

// Scores p[8 I, 8 I + 8): decay, boost the lanes set in byte I of `*word`, decay.
// Operand order as the twin's Python (`s * decay`, `s + boost`): where two NaNs meet, x86 keeps
// the first operand's, Python's float ops the second's.
template <size_t I>
__attribute__((target("avx512f,avx512dq,avx512bw"))) inline void decay_boost_decay_8(
    double* p, const uint64_t* word, __m512d dv, __m512d bv, __m512d mv) {
  // kmovb from memory: one load, where shifting a mask register costs a mask-unit operation.
  const __mmask8 lanes = _load_mask8(reinterpret_cast<__mmask8*>(const_cast<uint64_t*>(word)) + I);
  __m512d r = _mm512_mul_pd(dv, _mm512_loadu_pd(p + 8 * I));
  r = _mm512_mask_add_pd(r, lanes, bv, r);
  r = _mm512_mask_min_pd(r, lanes, mv, r);
  _mm512_storeu_pd(p + 8 * I, _mm512_mul_pd(dv, r));
}

template <size_t... I>
__attribute__((target("avx512f,avx512dq,avx512bw"))) inline void decay_boost_decay(
    double* p, const uint64_t* word, __m512d dv, __m512d bv, __m512d mv,
    std::index_sequence<I...>) {
  (decay_boost_decay_8<I>(p, word, dv, bv, mv), ...);
}

// update_rows on AVX-512: two tokens a, b per pass over the scores. Each 8 scores are loaded,
// decayed for a, boosted on the lanes of a's activated ids (a masked add, then a masked min:
// vminpd(max, x) returns x unless max < x, which is std::min(x, max), NaN included), decayed
// for b and stored; b's few boosts follow in scalar code. One store per 8 scores per two tokens.
// a's lane masks are a bitmap of 64-bit words (one bit per expert), written a word at a time and
// read a byte at a time: a load inside an earlier store is forwarded, one wider than the store
// that wrote it would wait for that store to commit. A token `a` that names an expert
// twice (a bit cannot say "twice") goes alone through the sweep. `counts` are counted here.
// Scores travel through a copy padded to a multiple of 64 (pad lanes are never boosted).
__attribute__((target("avx512f,avx512dq,avx512bw"))) inline void update_rows_avx512(
    double* scores, uint64_t* counts, int32_t n, const int32_t* ids, int64_t rows, int64_t k,
    double decay_factor, double boost_value, double max_score) {
  const int64_t words = (static_cast<int64_t>(n) + 63) / 64;
  std::vector<double> padded(words * 64, 0.0);
  std::copy(scores, scores + n, padded.begin());
  double* s = padded.data();
  std::vector<uint64_t> bitmap(words, 0);
  uint64_t* bits = bitmap.data();
  const __m512d dv = _mm512_set1_pd(decay_factor), bv = _mm512_set1_pd(boost_value),
                mv = _mm512_set1_pd(max_score);
  auto boost_and_count = [&](const int32_t* row) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = row[j];
      if (e < n) {
        s[e] = std::min(s[e] + boost_value, max_score);
        ++counts[e];
      }
    }
  };
  int64_t t = 0;
  while (t + 1 < rows) {
    const int32_t* a = ids + t * k;
    bool once = true;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = a[j];
      if (e >= n) continue;
      const uint64_t bit = uint64_t{1} << (e & 63);
      once &= (bits[e >> 6] & bit) == 0;
      bits[e >> 6] |= bit;
      ++counts[e];
    }
    if (!once) {  // counted already; the sweep, then the boosts, one token
      std::fill(bits, bits + words, uint64_t{0});
      decay(s, words * 64, decay_factor);
      boost(s, n, a, k, boost_value, max_score);
      t += 1;
      continue;
    }
    for (int64_t w = 0; w < words; ++w)
      decay_boost_decay(s + 64 * w, bits + w, dv, bv, mv, std::make_index_sequence<8>());
    for (int64_t j = 0; j < k; ++j)
      if (a[j] < n) bits[a[j] >> 6] = 0;
    boost_and_count(a + k);
    t += 2;
  }
  for (; t < rows; ++t) {
    decay(s, words * 64, decay_factor);
    boost_and_count(ids + t * k);
  }
  std::copy(s, s + n, scores);
}

#endif  // MOERAY_AFFINITY_AVX512

}  // namespace affinity_detail

class Affinity {
 public:
  Affinity(int32_t num_experts, double decay, double boost, double max_score)
      : n_(num_experts), decay_(decay), boost_(boost), max_score_(max_score),
        lazy_(lazy_applies(decay, boost, max_score)), scores_(num_experts, 0.0),
        counts_(num_experts, 0) {}

  // Whether the lazy form (see the top of this file) keeps every stored value finite.
  static bool lazy_applies(double decay, double boost, double max_score) {
    constexpr double big = 0x1p512;
    return decay >= 0x1p-16 && decay <= 1.0 && std::fabs(boost) <= big && max_score >= 0.0 &&
           (max_score <= big || max_score == std::numeric_limits<double>::infinity());
  }

  int32_t num_experts() const { return n_; }
  bool lazy() const { return lazy_; }

  // One update: decay every score, then boost each activated id in [0, n) (others are ignored,
  // as in the seed). Callers have rejected negative ids.
  void update_row(const int32_t* ids, int64_t count) {
    if (lazy_) return lazy_row(ids, count);
    affinity_detail::decay(scores_.data(), n_, decay_);
    affinity_detail::boost(scores_.data(), n_, ids, count, boost_, max_score_);
    for (int64_t j = 0; j < count; ++j)
      if (ids[j] < n_) ++counts_[ids[j]];
  }

  // `rows` updates of `k` ids each (int32 [rows, k], row-major), as many update_row calls.
  void update_rows(const int32_t* ids, int64_t rows, int64_t k) {
    if (lazy_) {
      for (int64_t t = 0; t < rows; ++t) lazy_row(ids + t * k, k);
      return;
    }
#ifdef MOERAY_AFFINITY_AVX512
    if (rows >= 16 && affinity_detail::has_avx512()) {  // shorter batches: the copy dominates
      affinity_detail::update_rows_avx512(scores_.data(), counts_.data(), n_, ids, rows, k,
                                          decay_, boost_, max_score_);
      return;
    }
#endif
    for (int64_t t = 0; t < rows; ++t) update_row(ids + t * k, k);
  }

  double score(int64_t e) const { return (e >= 0 && e < n_) ? read(static_cast<int32_t>(e)) : 0.0; }
  uint64_t activation_count(int64_t e) const { return (e >= 0 && e < n_) ? counts_[e] : 0; }
  // The scores as read (a copy).
  std::vector<double> scores() const {
    std::vector<double> out(n_);
    for (int32_t e = 0; e < n_; ++e) out[e] = read(e);
    return out;
  }
  const std::vector<uint64_t>& counts() const { return counts_; }

  // Ranking key of the seed: non-finite scores rank below every finite one.
  double key(int32_t e) const {
    const double s = read(e);
    return std::isfinite(s) ? s : -std::numeric_limits<double>::infinity();
  }
  // True when expert a ranks before b: higher key first, then lower id.
  bool ranks_before(int32_t a, int32_t b) const {
    const double ka = key(a), kb = key(b);
    return ka > kb || (ka == kb && a < b);
  }

  // Highest affinity first, by one pass of partial selection: each expert is compared with the
  // current k-th best and only the few that beat it are inserted into a sorted buffer.
  std::vector<int32_t> top_k_by_affinity(int64_t k) const {
    const int64_t m = std::min<int64_t>(k, n_);
    std::vector<int32_t> top;
    top.reserve(m + 1);
    if (m == 0) return top;
    std::vector<double> keys(n_);
    for (int32_t e = 0; e < n_; ++e) keys[e] = key(e);
    if (m > 32) {  // insertion into a long buffer would cost O(n k): sort a heap instead
      std::vector<int32_t> idx(n_);
      for (int32_t e = 0; e < n_; ++e) idx[e] = e;
      std::partial_sort(idx.begin(), idx.begin() + m, idx.end(), [&keys](int32_t a, int32_t b) {
        return keys[a] > keys[b] || (keys[a] == keys[b] && a < b);
      });
      idx.resize(m);
      return idx;
    }
    for (int32_t e = 0; e < n_; ++e) {
      // Ids arrive in increasing order, so equal keys never displace an earlier expert.
      if (static_cast<int64_t>(top.size()) == m && !(keys[e] > keys[top.back()])) continue;
      size_t i = top.size();
      top.push_back(e);
      while (i > 0 && keys[e] > keys[top[i - 1]]) {
        top[i] = top[i - 1];
        --i;
      }
      top[i] = e;
      if (static_cast<int64_t>(top.size()) > m) top.pop_back();
    }
    return top;
  }

  std::vector<int32_t> top_k_by_frequency(int64_t k) const {
    std::vector<int32_t> idx(n_);
    for (int32_t e = 0; e < n_; ++e) idx[e] = e;
    const int64_t m = std::min<int64_t>(k, n_);
    std::partial_sort(idx.begin(), idx.begin() + m, idx.end(), [this](int32_t a, int32_t b) {
      return counts_[a] > counts_[b] || (counts_[a] == counts_[b] && a < b);
    });
    idx.resize(m);
    return idx;
  }

  double frequency_percentile(int64_t e) const {
    const uint64_t c = activation_count(e);
    int64_t lower = 0, equal = 0;
    for (uint64_t x : counts_) {
      lower += x < c;
      equal += x == c;
    }
    return (static_cast<double>(lower) + 0.5 * static_cast<double>(equal)) / static_cast<double>(n_);
  }

  // Restores a state saved with scores() and counts() (a layer actor restarting from the
  // coordinator's copy). Sizes are checked by the caller.
  void load_state(const double* scores, const int64_t* counts) {
    std::copy(scores, scores + n_, scores_.begin());
    scale_ = 1.0;
    for (int32_t e = 0; e < n_; ++e) counts_[e] = static_cast<uint64_t>(counts[e]);
  }

  void reset() {
    std::fill(scores_.begin(), scores_.end(), 0.0);
    scale_ = 1.0;
    std::fill(counts_.begin(), counts_.end(), 0);
  }

  // Guards state while a batch runs without the GIL. Lock order: cache before affinity.
  std::mutex mutex;

 private:
  // Expert e's score: the stored value itself, or in the lazy form its scaled read.
  double read(int32_t e) const {
    return lazy_ ? std::min(scores_[e] * scale_, max_score_) : scores_[e];
  }

  // One token in the lazy form: O(count), plus O(n) once every log(2^-64) / log(decay) tokens.
  void lazy_row(const int32_t* ids, int64_t count) {
    double scale = scale_ * decay_;
    if (scale < 0x1p-64) {  // fold the scale into the stored values before 1 / scale grows big
      for (int32_t e = 0; e < n_; ++e) scores_[e] = read(e);
      scale = decay_;
    }
    scale_ = scale;
    const double inverse = 1.0 / scale;
    const double boost = boost_ * inverse, max_score = max_score_ * inverse;
    double* s = scores_.data();
    for (int64_t j = 0; j < count; ++j) {
      const int32_t e = ids[j];
      if (e < n_) {
        s[e] = std::min(s[e] + boost, max_score);
        ++counts_[e];
      }
    }
  }

  int32_t n_;
  double decay_, boost_, max_score_;
  bool lazy_;
  double scale_ = 1.0;  // the lazy form's running decay^t; 1 in the eager form
  std::vector<double> scores_;  // the lazy form's stored values, or the scores
  std::vector<uint64_t> counts_;
};

}  // namespace moeray

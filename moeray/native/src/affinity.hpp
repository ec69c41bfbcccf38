// EMA affinity per expert (the seed's moe/affinity.rs semantics, in double precision).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

namespace moeray {

class Affinity {
 public:
  Affinity(int32_t num_experts, double decay, double boost, double max_score)
      : n_(num_experts), decay_(decay), boost_(boost), max_score_(max_score),
        scores_(num_experts, 0.0), counts_(num_experts, 0) {}

  int32_t num_experts() const { return n_; }

  // One update: decay every score, then boost each activated id in [0, n) (others are ignored,
  // as in the seed). Callers have rejected negative ids.
  void update_row(const int32_t* ids, int64_t count) {
    for (double& s : scores_) s = s * decay_;
    for (int64_t j = 0; j < count; ++j) {
      const int32_t e = ids[j];
      if (e < n_) {
        scores_[e] = std::min(scores_[e] + boost_, max_score_);
        ++counts_[e];
      }
    }
  }

  double score(int64_t e) const { return (e >= 0 && e < n_) ? scores_[e] : 0.0; }
  uint64_t activation_count(int64_t e) const { return (e >= 0 && e < n_) ? counts_[e] : 0; }
  const std::vector<double>& scores() const { return scores_; }
  const std::vector<uint64_t>& counts() const { return counts_; }

  // Ranking key of the seed: non-finite scores rank below every finite one.
  double key(int32_t e) const {
    const double s = scores_[e];
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
    for (int32_t e = 0; e < n_; ++e) counts_[e] = static_cast<uint64_t>(counts[e]);
  }

  void reset() {
    std::fill(scores_.begin(), scores_.end(), 0.0);
    std::fill(counts_.begin(), counts_.end(), 0);
  }

  // Guards state while a batch runs without the GIL. Lock order: cache before affinity.
  std::mutex mutex;

 private:
  int32_t n_;
  double decay_, boost_, max_score_;
  std::vector<double> scores_;
  std::vector<uint64_t> counts_;
};

}  // namespace moeray

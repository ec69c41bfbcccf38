// Routing-wide kernels: stable counting sort by expert, and the Belady offline optimum.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace moeray {

// Groups T x top_k assignments by expert, keeping token order inside each expert: a stable
// counting sort. offsets: [num_experts + 1]; token_indices, out_weights: [T * top_k].
// The counting pass also validates (ids in range, weights finite) so the data is read twice,
// not four times; on bad input it returns false before writing any output.
inline bool schedule(const int32_t* ids, const float* weights, int64_t num_tokens, int64_t top_k,
                     int32_t num_experts, int64_t* offsets, int32_t* token_indices,
                     float* out_weights) {
  const int64_t total = num_tokens * top_k;
  std::vector<int64_t> cursor(static_cast<size_t>(num_experts) + 1, 0);
  bool ok = true;
  for (int64_t i = 0; i < total; ++i) {
    const uint32_t e = static_cast<uint32_t>(ids[i]);
    const bool in_range = e < static_cast<uint32_t>(num_experts);
    ok &= in_range & std::isfinite(weights[i]);
    ++cursor[in_range ? e + 1 : 0];
  }
  if (!ok) return false;
  for (int32_t e = 0; e < num_experts; ++e) cursor[e + 1] += cursor[e];
  for (int32_t e = 0; e <= num_experts; ++e) offsets[e] = cursor[e];
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t i = t * top_k + j;
      const int64_t p = cursor[ids[i]]++;
      token_indices[p] = static_cast<int32_t>(t);
      out_weights[p] = weights[i];
    }
  }
  return true;
}

// Hits of demand caching with perfect knowledge of the future, over one layer's accesses.
// A token's experts are served together; a miss on a full hot set evicts the hot expert outside
// the current token whose next use is farthest (ties: lowest id); when every hot expert serves
// the current token, the miss bypasses the hot set.
inline int64_t belady_hits(const int32_t* ids, int64_t num_tokens, int64_t top_k,
                           int32_t num_experts, int32_t capacity) {
  const int64_t never = num_tokens;
  std::vector<int64_t> next_use(num_tokens * top_k);
  std::vector<int64_t> last_seen(num_experts, never);
  for (int64_t t = num_tokens - 1; t >= 0; --t) {
    const int32_t* row = ids + t * top_k;
    for (int64_t j = 0; j < top_k; ++j) next_use[t * top_k + j] = last_seen[row[j]];
    for (int64_t j = 0; j < top_k; ++j) last_seen[row[j]] = t;
  }
  std::vector<int64_t> hot_next(num_experts, -1);  // -1: not hot
  std::vector<int64_t> in_token(num_experts, -1);  // token index that last used the expert
  std::vector<int32_t> hot;                         // hot experts, unordered
  std::vector<int32_t> slot(num_experts, -1);       // position of an expert in `hot`
  hot.reserve(capacity);
  int64_t hits = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int32_t* row = ids + t * top_k;
    for (int64_t j = 0; j < top_k; ++j) in_token[row[j]] = t;
    for (int64_t j = 0; j < top_k; ++j) {
      const int32_t e = row[j];
      if (hot_next[e] >= 0) {
        ++hits;
        hot_next[e] = next_use[t * top_k + j];
        continue;
      }
      if (static_cast<int32_t>(hot.size()) >= capacity) {
        int32_t victim = -1;
        for (int32_t h : hot) {
          if (in_token[h] == t) continue;
          if (victim < 0 || hot_next[h] > hot_next[victim] ||
              (hot_next[h] == hot_next[victim] && h < victim))
            victim = h;
        }
        if (victim < 0) continue;  // bypass
        const int32_t s = slot[victim];
        hot[s] = hot.back();
        slot[hot[s]] = s;
        hot.pop_back();
        hot_next[victim] = -1;
      }
      slot[e] = static_cast<int32_t>(hot.size());
      hot.push_back(e);
      hot_next[e] = next_use[t * top_k + j];
    }
  }
  return hits;
}

}  // namespace moeray

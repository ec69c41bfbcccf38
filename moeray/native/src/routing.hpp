// Routing-wide kernels: stable counting sort by expert, and Belady's offline optimum.
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

// Hits of Belady's MIN over one layer's accesses in row-major order: on a miss with a full hot
// set, evict the hot expert whose next access is farthest in the future (never accessed again:
// the lowest such id). This is the optimum of the demand-caching model that access() follows
// (every miss admits), so no online policy replayed on the same stream can beat it.
inline int64_t belady_hits(const int32_t* ids, int64_t num_tokens, int64_t top_k,
                           int32_t num_experts, int32_t capacity) {
  const int64_t total = num_tokens * top_k, never = total;
  std::vector<int64_t> next_use(total);
  std::vector<int64_t> last_seen(num_experts, never);
  for (int64_t i = total - 1; i >= 0; --i) {
    next_use[i] = last_seen[ids[i]];
    last_seen[ids[i]] = i;
  }
  std::vector<int64_t> hot_next(num_experts, -1);  // position of the next access; -1: not hot
  std::vector<int32_t> hot;                         // hot experts, unordered
  std::vector<int32_t> slot(num_experts, -1);       // position of an expert in `hot`
  hot.reserve(capacity);
  int64_t hits = 0;
  for (int64_t i = 0; i < total; ++i) {
    const int32_t e = ids[i];
    if (hot_next[e] < 0) {
      if (static_cast<int32_t>(hot.size()) >= capacity) {
        int32_t victim = hot[0];
        for (int32_t h : hot)
          if (hot_next[h] > hot_next[victim] || (hot_next[h] == hot_next[victim] && h < victim))
            victim = h;
        const int32_t s = slot[victim];
        hot[s] = hot.back();
        slot[hot[s]] = s;
        hot.pop_back();
        hot_next[victim] = -1;
      }
      slot[e] = static_cast<int32_t>(hot.size());
      hot.push_back(e);
    } else {
      ++hits;
    }
    hot_next[e] = next_use[i];
  }
  return hits;
}

// LRU stack distances of every layer's accesses, added to a histogram (moeray/policy/split.py,
// CapacitySplit): ids [tokens, layers, top_k]; last [layers, experts], the access counter of
// each expert's last use (-1: never), updated. Accesses run token by token, slot by slot, the
// counter of access (t, j) being counter + t * top_k + j for every layer. An access whose
// expert was used before adds scales[t] to histogram [layers, experts] at its stack distance:
// the number of distinct experts of the layer used since that expert's last use. The adds run
// in that order, so the sums are those of a loop over accesses. The caller checks every id is
// in [0, experts).
inline void stack_histogram(const int64_t* ids, int64_t tokens, int64_t layers, int64_t top_k,
                            int64_t experts, int64_t* last, int64_t counter,
                            const double* scales, double* histogram) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < top_k; ++j) {
      for (int64_t l = 0; l < layers; ++l) {
        int64_t* row = last + l * experts;
        const int64_t e = ids[(t * layers + l) * top_k + j];
        const int64_t seen = row[e];
        if (seen >= 0) {
          int64_t distance = 0;
          for (int64_t x = 0; x < experts; ++x) distance += row[x] > seen;
          histogram[l * experts + distance] += scales[t];
        }
        row[e] = counter + t * top_k + j;
      }
    }
  }
}

}  // namespace moeray

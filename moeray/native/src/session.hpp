// The engine session's plans (moeray/engine/session.py, EngineSession.route) without Python per
// call; the twin is _reference/session.py.
//
// A plan compares a layer's hot set before and after the layer is served with the experts its
// batch used: load = (used | after) & ~before, evict = (before | used) & ~after, both as
// ascending ids. Hot sets are kept as one byte per expert (0 or 1) (PredictiveCaches' bool rows
// are), compared 8 experts per 64-bit word.
//
// - DemandSession serves a demand policy's layer exactly as DemandCaches.serve does (the seed
//   ExpertCache of expert_cache.hpp and the Affinity of affinity.hpp, the same calls in the same
//   order) and keeps a byte copy of each layer's hot set, changed as the cache changes: before
//   each miss it asks the cache for the victim it is about to evict (suggest_eviction, or the
//   affinity blend's), which is what the access then evicts. Only the batch's experts and those
//   victims can change, so the plan is read from them alone (a scan of every expert costs more
//   than the serving at decode: its branches follow the data). A prefetch by affinity evicts
//   victims it does not report: with one, the layer's copy is read again from the cache and the
//   plan comes from every expert's before and after.
// - HotPlan plans the predictive policy's layers from PredictiveCaches' hot rows (bool [L, E],
//   written by the predict kernel): a copy of row `layer` taken before the layer is served,
//   and of row layer + 1 for the next layer's prefetch.
// Ids were checked by the caller (bindings_session.cpp): nothing here reads out of bounds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "affinity.hpp"
#include "expert_cache.hpp"

namespace moeray {

namespace session_detail {

inline uint64_t word(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// 8 bytes of 0 or 1 as 8 bits, bit i for byte i: each byte's bit lands on bit 56 + i of the
// product, and no two partial products meet (so nothing carries).
inline uint64_t bits8(uint64_t w) { return (w * 0x0102040810204080ULL) >> 56; }

// Appends e0 + i for each set bit i of w to out.
inline int64_t emit(uint64_t w, int64_t e0, int64_t* out, int64_t n) {
  for (; w; w &= w - 1) out[n++] = e0 + __builtin_ctzll(w);
  return n;
}

}  // namespace session_detail

// Rows of E bytes (0 or 1): load = ids with (used | after) & ~before, evict = ids with
// (before | used) & ~after, ascending (used null: none). Returns the counts through n_load,
// n_evict. Up to 64 experts at a time gathered into bit masks without a branch (a byte-by-byte
// scan's branches would follow the data), then the set bits' ids.
inline void plan_rows(const uint8_t* before, const uint8_t* after, const uint8_t* used,
                      int64_t experts, int64_t* load, int64_t& n_load, int64_t* evict,
                      int64_t& n_evict) {
  using session_detail::bits8;
  using session_detail::emit;
  using session_detail::word;
  int64_t nl = 0, ne = 0, e = 0;
  while (e + 8 <= experts) {  // up to 64 experts, 8 at a time, then their ids
    const int64_t e0 = e;
    uint64_t in = 0, out = 0;
    for (int c = 0; c < 8 && e + 8 <= experts; ++c, e += 8) {
      const uint64_t b = word(before + e), a = word(after + e), u = used ? word(used + e) : 0;
      in |= bits8((u | a) & ~b) << (8 * c);
      out |= bits8((b | u) & ~a) << (8 * c);
    }
    nl = emit(in, e0, load, nl);
    ne = emit(out, e0, evict, ne);
  }
  for (; e < experts; ++e) {
    const bool b = before[e], a = after[e], u = used && used[e];
    if ((u || a) && !b) load[nl++] = e;
    if ((b || u) && !a) evict[ne++] = e;
  }
  n_load = nl;
  n_evict = ne;
}

// Every layer of a demand policy: caches[l] and affinities[l] (not owned; the session is their
// only user while it lives), blended: evict by suggest_eviction_with_affinity(weight) and
// update the affinity row by row (affinity-lru), else by the cache's own policy and update the
// affinity once after the batch.
class DemandSession {
 public:
  DemandSession(std::vector<ExpertCache*> caches, std::vector<Affinity*> affinities, bool blended,
                double weight)
      : caches_(std::move(caches)), affinities_(std::move(affinities)), blended_(blended),
        weight_(weight), experts_(caches_.empty() ? 0 : caches_[0]->num_experts()),
        hot_(caches_.size() * experts_, 0), before_(experts_ + 8, 0), used_(experts_ + 8, 0),
        mark_(experts_, 0) {
    for (size_t l = 0; l < caches_.size(); ++l) read_hot(static_cast<int64_t>(l));
  }

  int64_t layers() const { return static_cast<int64_t>(caches_.size()); }
  int64_t experts() const { return experts_; }
  ExpertCache& cache(int64_t l) { return *caches_[l]; }
  Affinity& affinity(int64_t l) { return *affinities_[l]; }
  // Layer l's hot set as bytes (E of them).
  const uint8_t* hot(int64_t l) const { return hot_.data() + l * experts_; }

  // Serves layer l's batch, ids int32 [tokens, k] in [0, E), then prefetches `budget` experts by
  // affinity (DemandCaches.serve); writes the plan into load and evict (E entries each) and
  // their counts; returns the number of experts prefetched.
  int64_t route(int64_t l, const int32_t* ids, int64_t tokens, int64_t k, int64_t budget,
                int64_t* load, int64_t& n_load, int64_t* evict, int64_t& n_evict) {
    ExpertCache& c = *caches_[l];
    Affinity& a = *affinities_[l];
    uint8_t* now = hot_.data() + l * experts_;
    uint8_t* mark = mark_.data();
    if (budget > 0) std::memcpy(before_.data(), now, experts_);
    touched_.clear();
    for (int64_t t = 0; t < tokens; ++t) {
      const int32_t* row = ids + t * k;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = row[j];
        touch(e, now[e], kUsed);
        if (!now[e]) {  // a miss: the victim the access evicts, if the hot set is full
          int32_t victim = ExpertCache::kNone;
          if (blended_) {
            victim = c.suggest_eviction_with_affinity(a, weight_);
            if (victim != ExpertCache::kNone) c.evict(victim);  // access_blended's order
          } else {
            victim = c.suggest_eviction();
          }
          if (victim != ExpertCache::kNone) {
            touch(victim, 1, 0);
            now[victim] = 0;
          }
          now[e] = 1;
        }
        c.access(e);
      }
      if (blended_) a.update_row(row, k);
    }
    if (!blended_) a.update_rows(ids, tokens, k);
    int64_t prefetched = 0;
    if (budget > 0) {
      prefetched = static_cast<int64_t>(c.prefetch_by_affinity(a, budget).size());
      read_hot(l);
      std::fill(used_.begin(), used_.end(), 0);
      for (int32_t e : touched_) used_[e] = (mark[e] & kUsed) ? 1 : 0;
      plan_rows(before_.data(), now, used_.data(), experts_, load, n_load, evict, n_evict);
    } else {
      int64_t nl = 0, ne = 0;
      for (int32_t e : touched_) {  // branch-free: whether an expert is in is the data's
        const int64_t m = mark[e], b = (m & kBefore) != 0, u = (m & kUsed) != 0, after = now[e];
        load[nl] = e;
        nl += (u | after) & (b ^ 1);
        evict[ne] = e;
        ne += (b | u) & (after ^ 1);
      }
      sort_ids(load, nl);
      sort_ids(evict, ne);
      n_load = nl;
      n_evict = ne;
    }
    for (int32_t e : touched_) mark[e] = 0;
    return prefetched;
  }

 private:
  static constexpr uint8_t kTouched = 1, kBefore = 2, kUsed = 4;

  // Notes e as touched by this call: its status before the call (`hot` now, at its first touch:
  // nothing changed it earlier in the call) and whether the batch used it.
  void touch(int32_t e, uint8_t hot, uint8_t used) {
    uint8_t& m = mark_[e];
    if (!m) {
      m = kTouched | (hot ? kBefore : 0);
      touched_.push_back(e);
    }
    m |= used;
  }

  static void sort_ids(int64_t* v, int64_t n) {
    if (n > 32) return std::sort(v, v + n);
    for (int64_t i = 1; i < n; ++i) {  // a decode step's few ids: an insertion sort
      const int64_t x = v[i];
      int64_t j = i;
      for (; j > 0 && v[j - 1] > x; --j) v[j] = v[j - 1];
      v[j] = x;
    }
  }

  void read_hot(int64_t l) {
    uint8_t* row = hot_.data() + l * experts_;
    for (int32_t e = 0; e < experts_; ++e) row[e] = caches_[l]->is_hot(e) ? 1 : 0;
  }

  std::vector<ExpertCache*> caches_;
  std::vector<Affinity*> affinities_;
  bool blended_;
  double weight_;
  int32_t experts_;
  std::vector<uint8_t> hot_, before_, used_, mark_;
  std::vector<int32_t> touched_;
};

// Plans of the predictive policy's layers from its hot rows (bool [L, E], PredictiveCaches'
// `_hot`, not owned): `before(l)` copies rows l and l + 1 before layer l is served; `plan(l)`
// after it: layer l's load and evict from the batch's ids, and layer l + 1's prefetch (rows
// hot now and not before) and prefetch_evict (the reverse); then it keeps row l + 1 as the
// next layer's `before` (nothing changes a hot row between two layers of a batch).
class HotPlan {
 public:
  HotPlan(const bool* hot, int64_t layers, int64_t experts)
      : hot_(reinterpret_cast<const uint8_t*>(hot)), layers_(layers), experts_(experts),
        before_(2 * experts, 0), used_(experts + 8, 0) {}

  int64_t layers() const { return layers_; }
  int64_t experts() const { return experts_; }
  // The layer whose rows `before` holds (-1: none).
  int64_t ready() const { return ready_; }

  void before(int64_t l) {
    const int64_t rows = l + 1 < layers_ ? 2 : 1;
    std::memcpy(before_.data(), hot_ + l * experts_, rows * experts_);
    ready_ = l;
  }

  // Layer l's plan once served (before(l) taken), ids int64 [tokens, k] in [0, E); out:
  // load, evict, prefetch, prefetch_evict (E entries each), counts into n[0..3].
  template <class Id>
  void plan(int64_t l, const Id* ids, int64_t count, int64_t* load, int64_t* evict,
            int64_t* prefetch, int64_t* prefetch_evict, int64_t* n) {
    uint8_t* used = used_.data();
    for (int64_t i = 0; i < count; ++i) used[ids[i]] = 1;
    const uint8_t* row = hot_ + l * experts_;
    plan_rows(before_.data(), row, used, experts_, load, n[0], evict, n[1]);
    for (int64_t i = 0; i < count; ++i) used[ids[i]] = 0;
    n[2] = n[3] = 0;
    ready_ = -1;
    if (l + 1 < layers_) {
      plan_rows(before_.data() + experts_, row + experts_, nullptr, experts_, prefetch, n[2],
                prefetch_evict, n[3]);
      before(l + 1);
    }
  }

 private:
  const uint8_t* hot_;
  int64_t layers_, experts_, ready_ = -1;
  std::vector<uint8_t> before_, used_;
};

}  // namespace moeray

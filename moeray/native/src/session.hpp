// The engine session's plans (moeray/engine/session.py, EngineSession.route) without Python per
// call; the twin is _reference/session.py.
//
// A plan compares a layer's hot set before and after the layer is served with the experts its
// batch used: load = (used | after) & ~before, evict = (before | used) & ~after, both as
// ascending ids.
//
// - DemandSession serves a demand policy's layer exactly as DemandCaches.serve does (the seed
//   ExpertCache of expert_cache.hpp and the Affinity of affinity.hpp, the same calls in the same
//   order) and keeps a bit-set copy of each layer's hot set, changed as the cache changes: the
//   cache reports each access's victim (access_run's victims, a row of the batch at once), or,
//   blended, the session asks for the affinity blend's victim and evicts it before the access.
//   A prefetch by affinity evicts victims it does not report: after one, the layer's copy is
//   read again from the cache.
// - HotPlan plans the predictive policy's layers from PredictiveCaches' hot rows (bool [L, E],
//   written by the predict kernel): a copy of row `layer` taken before the layer is served,
//   and of row layer + 1 for the next layer's prefetch, compared 8 experts (bytes) a word.
// Ids were checked by the caller (bindings_session.cpp): nothing here reads out of bounds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "affinity.hpp"
#include "expert_cache.hpp"

namespace moeray {

// The entries of each plan buffer (load, evict, prefetch, prefetch_evict) at `experts` experts:
// every expert once, and the 2 that session_detail::emit may write past the last id.
inline int64_t plan_entries(int64_t experts) { return experts + 2; }

namespace session_detail {

inline uint64_t word(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// 8 bytes of 0 or 1 as 8 bits, bit i for byte i: each byte's bit lands on bit 56 + i of the
// product, and no two partial products meet (so nothing carries).
inline uint64_t bits8(uint64_t w) { return (w * 0x0102040810204080ULL) >> 56; }

// Appends e0 + i for each set bit i of w to out (which has room for 2 more entries than it
// receives, plan_entries). A plan's words hold a few ids each, in numbers that follow the
// routing: the first two are written whether there or not (a loop would mispredict its exit
// about once a word), and only a word with more loops.
inline int64_t emit(uint64_t w, int64_t e0, int64_t* out, int64_t n) {
  constexpr uint64_t kTop = uint64_t{1} << 63;  // ctz of 0 is undefined: of kTop, harmless
  for (int i = 0; i < 2; ++i) {
    out[n] = e0 + __builtin_ctzll(w | kTop);
    n += w != 0;
    w &= w - 1;
  }
  for (; w; w &= w - 1) out[n++] = e0 + __builtin_ctzll(w);
  return n;
}

}  // namespace session_detail

// Rows of E bytes (0 or 1): load = ids with (used | after) & ~before, evict = ids with
// (before | used) & ~after, ascending (used null: none), each buffer plan_entries(E) long.
// Returns the counts through n_load, n_evict. Up to 64 experts at a time gathered into bit masks
// without a branch (a byte-by-byte scan's branches would follow the data), then the set bits'
// ids.
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
// affinity once after the batch. Each layer's hot set is kept as a bit set (64 experts a word),
// so a plan is a few word operations and its ids come out ascending.
class DemandSession {
 public:
  DemandSession(std::vector<ExpertCache*> caches, std::vector<Affinity*> affinities, bool blended,
                double weight)
      : caches_(std::move(caches)), affinities_(std::move(affinities)), blended_(blended),
        weight_(weight), experts_(caches_.empty() ? 0 : caches_[0]->num_experts()),
        words_((experts_ + 63) / 64), hot_(caches_.size() * words_, 0), before_(words_, 0),
        used_(words_, 0) {
    for (size_t l = 0; l < caches_.size(); ++l) read_hot(static_cast<int64_t>(l));
  }

  int64_t layers() const { return static_cast<int64_t>(caches_.size()); }
  int64_t experts() const { return experts_; }
  ExpertCache& cache(int64_t l) { return *caches_[l]; }
  Affinity& affinity(int64_t l) { return *affinities_[l]; }
  bool is_hot(int64_t l, int32_t e) const { return test(hot_.data() + l * words_, e); }

  // Serves layer l's batch, ids int32 [tokens, k] in [0, E), then prefetches `budget` experts by
  // affinity (DemandCaches.serve); writes the plan into load and evict (plan_entries(E) each) and
  // their counts; returns the number of experts prefetched.
  int64_t route(int64_t l, const int32_t* ids, int64_t tokens, int64_t k, int64_t budget,
                int64_t* load, int64_t& n_load, int64_t* evict, int64_t& n_evict) {
    ExpertCache& c = *caches_[l];
    Affinity& a = *affinities_[l];
    uint64_t* now = hot_.data() + l * words_;
    uint64_t* used = used_.data();
    std::copy(now, now + words_, before_.data());
    if (!blended_ && k > scratch_) {
      scratch_ = k;
      hits_.reset(new bool[k]);
      victims_.assign(k, ExpertCache::kNone);
    }
    for (int64_t t = 0; t < tokens; ++t) {
      const int32_t* row = ids + t * k;
      if (!blended_) {  // the cache's own victims: a row at once, each access's victim reported
        int32_t* victims = victims_.data();
        c.access_run(row, k, hits_.get(), victims);
        for (int64_t j = 0; j < k; ++j) {
          set(used, row[j]);
          if (victims[j] != ExpertCache::kNone) clear(now, victims[j]);
          set(now, row[j]);
        }
        continue;
      }
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = row[j];
        set(used, e);
        if (!test(now, e)) {  // a miss: the victim the access evicts, if the hot set is full
          const int32_t victim = c.suggest_eviction_with_affinity(a, weight_);
          if (victim != ExpertCache::kNone) {
            c.evict(victim);  // access_blended's order
            clear(now, victim);
          }
          set(now, e);
        }
        c.access(e);
      }
      a.update_row(row, k);
    }
    if (!blended_) a.update_rows(ids, tokens, k);
    int64_t prefetched = 0;
    if (budget > 0) {
      prefetched = static_cast<int64_t>(c.prefetch_by_affinity(a, budget).size());
      read_hot(l);
    }
    int64_t nl = 0, ne = 0;
    const uint64_t* before = before_.data();
    for (int64_t w = 0; w < words_; ++w) {
      const uint64_t b = before[w], u = used[w], after = now[w];
      nl = session_detail::emit((u | after) & ~b, 64 * w, load, nl);
      ne = session_detail::emit((b | u) & ~after, 64 * w, evict, ne);
      used[w] = 0;
    }
    n_load = nl;
    n_evict = ne;
    return prefetched;
  }

 private:
  static bool test(const uint64_t* bits, int32_t e) { return (bits[e >> 6] >> (e & 63)) & 1; }
  static void set(uint64_t* bits, int32_t e) { bits[e >> 6] |= uint64_t{1} << (e & 63); }
  static void clear(uint64_t* bits, int32_t e) { bits[e >> 6] &= ~(uint64_t{1} << (e & 63)); }

  void read_hot(int64_t l) {
    uint64_t* row = hot_.data() + l * words_;
    std::fill(row, row + words_, 0);
    for (int32_t e = 0; e < experts_; ++e)
      if (caches_[l]->is_hot(e)) set(row, e);
  }

  std::vector<ExpertCache*> caches_;
  std::vector<Affinity*> affinities_;
  bool blended_;
  double weight_;
  int32_t experts_;
  int64_t words_;
  std::vector<uint64_t> hot_, before_, used_;
  // the cache's own victims of a row (not blended): k entries, grown to the widest row seen
  int64_t scratch_ = 0;
  std::unique_ptr<bool[]> hits_;
  std::vector<int32_t> victims_;
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
  // load, evict, prefetch, prefetch_evict (plan_entries(E) each), counts into n[0..3].
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

// Expert hot-set cache of one layer: the seed's semantics with O(1) membership and victim choice.
//
// Two intrusive lists over expert ids keep the hot set ordered:
// - the recency list (oldest touch first) gives the LRU victim in O(1);
// - frequency buckets (ascending count, each bucket oldest touch first) give the LFU victim and
//   the min/max count that Adaptive needs in O(1). A hit moves an expert to the next bucket in
//   O(1); an admission finds its bucket by a walk over at most `hot_count` buckets.
// A touch is a hit or an admission; ties in LFU go to the least recently touched expert.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "affinity.hpp"

namespace moeray {

enum Policy : int32_t { kLru = 0, kLfu = 1, kAdaptive = 2 };

struct CacheStats {
  uint64_t hits = 0, misses = 0, evictions = 0, prefetch_hits = 0;
};

class ExpertCache {
 public:
  ExpertCache(int32_t num_experts, int32_t max_hot, double prefetch_threshold, Policy policy)
      : n_(num_experts), cap_(max_hot), threshold_(prefetch_threshold), policy_(policy),
        freq_(num_experts, 0), timestamp_(num_experts, 0), hot_(num_experts, 0),
        prefetched_(num_experts, 0), rprev_(num_experts, kNone), rnext_(num_experts, kNone),
        fprev_(num_experts, kNone), fnext_(num_experts, kNone), bucket_of_(num_experts, kNone),
        bfreq_(max_hot + 1, 0), bhead_(max_hot + 1, kNone), btail_(max_hot + 1, kNone),
        bprev_(max_hot + 1, kNone), bnext_(max_hot + 1, kNone) {
    for (int32_t b = max_hot; b >= 0; --b) bfree_.push_back(b);
  }

  int32_t num_experts() const { return n_; }
  int32_t max_hot() const { return cap_; }
  int32_t hot_count() const { return count_; }
  bool is_hot(int32_t e) const { return hot_[e] != 0; }
  const CacheStats& stats() const { return stats_; }
  void reset_stats() { stats_ = CacheStats{}; }

  bool should_prefetch(int32_t e, double router_weight) const {
    return router_weight > threshold_ && !hot_[e];
  }

  // The seed's access(): a hit refreshes recency and counts; a miss admits, evicting when full.
  bool access(int32_t e) {
    bool hit;
    access_run(&e, 1, &hit);
    return hit;
  }

  // access() over ids[0:n] in order, hits into out: the batch path. victims (if given): the
  // expert each access evicted, or kNone.
  void access_run(const int32_t* ids, int64_t n, bool* out, int32_t* victims = nullptr) {
    if (policy_ == kLru) return access_run_lru(ids, n, out, victims);
    for (int64_t i = 0; i < n; ++i) {
      const int32_t e = ids[i];
      ++counter_;
      ++freq_[e];
      int32_t victim = kNone;
      if (hot_[e]) {
        touch_hit(e);
        out[i] = true;
      } else {
        ++stats_.misses;
        if (count_ >= cap_) victim = base_victim();  // what admit evicts
        admit(e);
        out[i] = false;
      }
      if (victims) victims[i] = victim;
    }
  }

  // access() with an affinity-blended victim on a miss when full (w < 1e-6 is the base policy).
  bool access_blended(int32_t e, const Affinity& affinity, double weight) {
    if (!hot_[e] && count_ >= cap_) evict(blended_victim(affinity, weight));
    return access(e);
  }

  int32_t suggest_eviction() const { return count_ < cap_ ? kNone : base_victim(); }

  int32_t suggest_eviction_with_affinity(const Affinity& affinity, double weight) const {
    return count_ < cap_ ? kNone : blended_victim(affinity, weight);
  }

  void evict(int32_t e) {
    if (!hot_[e]) return;
    unlink_recency(e);
    if (tracks_frequency()) unlink_bucket(e);
    hot_[e] = 0;
    prefetched_[e] = 0;  // an unused prefetch is gone with its expert
    --count_;
    ++stats_.evictions;
  }

  void admit(int32_t e) {
    if (hot_[e]) return;
    if (count_ >= cap_) evict(base_victim());
    timestamp_[e] = counter_;
    hot_[e] = 1;
    ++count_;
    append_recency(e);
    if (tracks_frequency()) insert_bucket(e);
  }

  void prefetch_admit(int32_t e) {
    if (hot_[e]) return;  // nothing was fetched, so a later hit is not a prefetch hit
    prefetched_[e] = 1;
    admit(e);
  }

  // Hot experts, oldest touch first.
  std::vector<int32_t> hot_experts() const {
    std::vector<int32_t> out;
    out.reserve(count_);
    for (int32_t e = rhead_; e != kNone; e = rnext_[e]) out.push_back(e);
    return out;
  }

  // The seed's prefetch_by_affinity, without its full sort. The seed walks every expert in
  // affinity order and admits the first `budget` that are not hot when reached. Those are the
  // best non-hot experts at the start, merged with victims evicted on the way that rank after
  // the expert being admitted (the walk reaches them later); `pending` holds exactly that.
  std::vector<int32_t> prefetch_by_affinity(const Affinity& affinity, int64_t budget) {
    std::vector<int32_t> out;
    if (budget <= 0) return out;
    std::vector<int32_t> pending;  // sorted, best first; at most budget + evictions long
    for (int32_t e = 0; e < n_; ++e) {
      if (hot_[e]) continue;
      if (static_cast<int64_t>(pending.size()) == budget &&
          !affinity.ranks_before(e, pending.back()))
        continue;
      insert_ranked(pending, e, affinity);
      if (static_cast<int64_t>(pending.size()) > budget) pending.pop_back();
    }
    size_t next = 0;
    while (static_cast<int64_t>(out.size()) < budget && next < pending.size()) {
      const int32_t c = pending[next++];
      if (count_ >= cap_) {
        const int32_t victim = blended_victim(affinity, 0.5);
        evict(victim);
        if (affinity.ranks_before(c, victim)) insert_ranked(pending, victim, affinity, next);
      }
      prefetch_admit(c);
      out.push_back(c);
    }
    return out;
  }

  // Guards state while a batch runs without the GIL. Lock order: cache before affinity.
  std::mutex mutex;

  static constexpr int32_t kNone = -1;

 private:
  // LRU's loop keeps the list ends, counters and stats in locals: stores into the int32 and
  // uint64 arrays could alias the members, which would put a reload on every step of the chain.
  // Access counts are skipped: only LFU and Adaptive read them.
  void access_run_lru(const int32_t* ids, int64_t n, bool* out, int32_t* victims) {
    int32_t* prev = rprev_.data();
    int32_t* next = rnext_.data();
    uint8_t* hot = hot_.data();
    uint8_t* prefetched = prefetched_.data();
    uint64_t* timestamp = timestamp_.data();
    int32_t head = rhead_, tail = rtail_, count = count_;
    uint64_t counter = counter_, hits = 0, misses = 0, evictions = 0, prefetch_hits = 0;
    auto unlink = [&](int32_t e) {
      const int32_t p = prev[e], q = next[e];
      if (p != kNone) next[p] = q; else head = q;
      if (q != kNone) prev[q] = p; else tail = p;
    };
    auto append = [&](int32_t e) {
      prev[e] = tail;
      next[e] = kNone;
      if (tail != kNone) next[tail] = e; else head = e;
      tail = e;
    };
    for (int64_t i = 0; i < n; ++i) {
      const int32_t e = ids[i];
      ++counter;
      timestamp[e] = counter;
      if (hot[e]) {
        ++hits;
        if (prefetched[e]) {
          ++prefetch_hits;
          prefetched[e] = 0;
        }
        if (e != tail) {
          unlink(e);
          append(e);
        }
        out[i] = true;
        if (victims) victims[i] = kNone;
        continue;
      }
      ++misses;
      int32_t victim = kNone;
      if (count >= cap_) {
        victim = head;
        unlink(victim);
        hot[victim] = 0;
        prefetched[victim] = 0;
        --count;
        ++evictions;
      }
      hot[e] = 1;
      ++count;
      append(e);
      out[i] = false;
      if (victims) victims[i] = victim;
    }
    rhead_ = head;
    rtail_ = tail;
    count_ = count;
    counter_ = counter;
    stats_.hits += hits;
    stats_.misses += misses;
    stats_.evictions += evictions;
    stats_.prefetch_hits += prefetch_hits;
  }

  bool tracks_frequency() const { return policy_ != kLru; }

  void touch_hit(int32_t e) {
    timestamp_[e] = counter_;
    if (e != rtail_) {
      unlink_recency(e);
      append_recency(e);
    }
    if (tracks_frequency()) bump_bucket(e);
    ++stats_.hits;
    if (prefetched_[e]) {
      ++stats_.prefetch_hits;
      prefetched_[e] = 0;
    }
  }

  int32_t lfu_victim() const { return bhead_[blo_]; }

  bool adaptive_uses_lfu() const {
    const uint64_t lo = bfreq_[blo_], hi = bfreq_[bhi_];
    return lo > 0 && hi >= 3 * lo;
  }

  int32_t base_victim() const {
    switch (policy_) {
      case kLfu: return lfu_victim();
      case kAdaptive: return adaptive_uses_lfu() ? lfu_victim() : rhead_;
      default: return rhead_;
    }
  }

  // Base eviction score in [0, 1] of a hot expert, given min and span of its policy's value.
  static double normalised(uint64_t value, uint64_t lo, uint64_t span) {
    return span > 0 ? 1.0 - static_cast<double>(value - lo) / static_cast<double>(span) : 0.5;
  }

  int32_t blended_victim(const Affinity& affinity, double weight) const {
    if (weight < 1e-6) return base_victim();
    const bool by_freq = policy_ == kLfu || (policy_ == kAdaptive && adaptive_uses_lfu());
    const std::vector<uint64_t>& value = by_freq ? freq_ : timestamp_;
    uint64_t lo = std::numeric_limits<uint64_t>::max(), hi = 0;
    for (int32_t e = rhead_; e != kNone; e = rnext_[e]) {
      lo = std::min(lo, value[e]);
      hi = std::max(hi, value[e]);
    }
    int32_t best = kNone;
    double best_score = -std::numeric_limits<double>::infinity();
    for (int32_t e = rhead_; e != kNone; e = rnext_[e]) {
      const double combined = (1.0 - weight) * normalised(value[e], lo, hi - lo) +
                              weight * (1.0 - affinity.score(e));
      if (combined > best_score) {
        best = e;
        best_score = combined;
      }
    }
    // Non-finite affinities make every blend NaN: fall back to the base policy.
    return best != kNone ? best : base_victim();
  }

  static void insert_ranked(std::vector<int32_t>& v, int32_t e, const Affinity& affinity,
                            size_t from = 0) {
    size_t i = v.size();
    v.push_back(e);
    while (i > from && affinity.ranks_before(e, v[i - 1])) {
      v[i] = v[i - 1];
      --i;
    }
    v[i] = e;
  }

  // --- recency list ---
  void append_recency(int32_t e) {
    rprev_[e] = rtail_;
    rnext_[e] = kNone;
    if (rtail_ != kNone) rnext_[rtail_] = e; else rhead_ = e;
    rtail_ = e;
  }
  void unlink_recency(int32_t e) {
    const int32_t p = rprev_[e], q = rnext_[e];
    if (p != kNone) rnext_[p] = q; else rhead_ = q;
    if (q != kNone) rprev_[q] = p; else rtail_ = p;
  }

  // --- frequency buckets ---
  int32_t new_bucket(uint64_t f, int32_t before) {  // before == kNone appends at the high end
    const int32_t b = bfree_.back();
    bfree_.pop_back();
    bfreq_[b] = f;
    bhead_[b] = btail_[b] = kNone;
    const int32_t p = before != kNone ? bprev_[before] : bhi_;
    bprev_[b] = p;
    bnext_[b] = before;
    if (p != kNone) bnext_[p] = b; else blo_ = b;
    if (before != kNone) bprev_[before] = b; else bhi_ = b;
    return b;
  }
  void drop_bucket(int32_t b) {
    const int32_t p = bprev_[b], q = bnext_[b];
    if (p != kNone) bnext_[p] = q; else blo_ = q;
    if (q != kNone) bprev_[q] = p; else bhi_ = p;
    bfree_.push_back(b);
  }
  void bucket_append(int32_t b, int32_t e) {
    bucket_of_[e] = b;
    fprev_[e] = btail_[b];
    fnext_[e] = kNone;
    if (btail_[b] != kNone) fnext_[btail_[b]] = e; else bhead_[b] = e;
    btail_[b] = e;
  }
  void unlink_bucket(int32_t e) {
    const int32_t b = bucket_of_[e], p = fprev_[e], q = fnext_[e];
    if (p != kNone) fnext_[p] = q; else bhead_[b] = q;
    if (q != kNone) fprev_[q] = p; else btail_[b] = p;
    if (bhead_[b] == kNone) drop_bucket(b);
  }
  void insert_bucket(int32_t e) {
    const uint64_t f = freq_[e];
    int32_t b;  // the first bucket with count >= f, walking in from the nearer end
    if (blo_ == kNone || f - std::min(f, bfreq_[blo_]) <= bfreq_[bhi_] - std::min(f, bfreq_[bhi_])) {
      b = blo_;
      while (b != kNone && bfreq_[b] < f) b = bnext_[b];
    } else {
      int32_t a = bhi_;
      while (a != kNone && bfreq_[a] >= f) a = bprev_[a];
      b = a == kNone ? blo_ : bnext_[a];
    }
    if (b == kNone || bfreq_[b] != f) b = new_bucket(f, b);
    bucket_append(b, e);
  }
  void bump_bucket(int32_t e) {  // freq_[e] has just grown by one
    const uint64_t f = freq_[e];
    const int32_t b = bucket_of_[e], q = bnext_[b];
    if (bhead_[b] == e && btail_[b] == e && (q == kNone || bfreq_[q] != f)) {
      bfreq_[b] = f;  // alone in its bucket: the bucket moves with it, order unchanged
      return;
    }
    const int32_t target = (q != kNone && bfreq_[q] == f) ? q : new_bucket(f, q);
    unlink_bucket(e);
    bucket_append(target, e);
  }

  int32_t n_, cap_;
  double threshold_;
  Policy policy_;
  std::vector<uint64_t> freq_, timestamp_;
  std::vector<uint8_t> hot_, prefetched_;
  std::vector<int32_t> rprev_, rnext_, fprev_, fnext_, bucket_of_;
  std::vector<uint64_t> bfreq_;
  std::vector<int32_t> bhead_, btail_, bprev_, bnext_, bfree_;
  int32_t rhead_ = kNone, rtail_ = kNone, blo_ = kNone, bhi_ = kNone, count_ = 0;
  uint64_t counter_ = 0;
  CacheStats stats_;
};

}  // namespace moeray

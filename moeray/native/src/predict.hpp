// One token of the `moeray` predictive policy (moeray/policy/predict.py, PredictiveCaches) for a
// token without hints, over that class's state arrays; the twin is _reference/predict.py.
//
// The numpy step handles all layers at once; a layer's decisions depend only on its own rows of
// the state (and the routing of the layer before), so this kernel runs the layers one after
// the other, each from prediction to learning, and reaches the same state. A layer's work has
// two phases: `ahead` (predictions and prefetches, decidable once the layer before is routed)
// and `serve` (the routing of the layer: guesses counted, accesses, learning); a step, a window
// of tokens (run_window) and a batch served layer by layer (serve_layer) run the same phases in
// different orders that reach the same state. Every floating expression keeps numpy's
// operands and order (numpy sums over a non-last axis one term after the other; the einsum of
// `hot_value` adds its products in expert order; no quotient or mean divides per expert: each
// multiplies by one reciprocal, as the twin does), so native and numpy agree bit for bit
// (built with -ffp-contract=off). The arrays were checked when the kernel was built and the
// token's ids at each step (bindings.cpp): nothing here reads out of bounds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <limits>
#include <mutex>
#include <vector>

// The kernel's entry points (step, run_window, serve_layer) with every call inlined into them
// (flatten), compiled for AVX2 and for any x86-64, the loader picking one by the CPU (function
// multiversioning, ELF only; GCC, whose clones of member functions the build uses): its loops
// over experts then run four doubles wide. The same IEEE operations in the same order (no FMA:
// -ffp-contract=off), so the same bits either way. -DMOERAY_KERNEL_ENTRY= builds one version.
#ifndef MOERAY_KERNEL_ENTRY
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    defined(__has_attribute)
#if __has_attribute(target_clones) && __has_attribute(flatten)
#define MOERAY_KERNEL_ENTRY __attribute__((target_clones("avx2", "default"), flatten))
#endif
#endif
#endif
#ifndef MOERAY_KERNEL_ENTRY
#define MOERAY_KERNEL_ENTRY
#endif

namespace moeray {

// PredictConfig's fields, prefetch_budget resolved (None -> top_k).
struct PredictParams {
  int64_t prefetch_budget;
  double cross_weight, previous_weight, affinity_weight;
  double prefetch_margin, prefetch_threshold;
  double keep_previous_weight, keep_affinity_weight;
  double victim_next_weight, victim_affinity_weight;
  double pair_prior, affinity_decay;
};

// Views of PredictiveCaches' arrays (C-contiguous, L layers, E experts, k = top_k). bool
// [L, E]: hot, pending, resplit_out (null: no re-split yet); int64 [L]: hot_count, capacity and
// the counters; double: touch [L, E], cross [L, E, E], cross_n [L, E], pair [L, B, E], pair_n
// [L, B] (B = 0: no pair tables), prev [L, E, E], prev_n [L, E], affinity [L, E];
// predictor_* int64 [P, L], P >= 4 (rows 0..3: cross-layer, previous-token, affinity,
// combined).
struct PredictState {
  int64_t layers, experts, top_k, buckets;
  bool *hot, *pending, *resplit_out;
  int64_t* hot_count;
  const int64_t* capacity;
  double *touch, *cross, *cross_n, *pair, *pair_n, *prev, *prev_n, *affinity;
  int64_t *hits, *stalls, *prefetches, *prefetch_hits, *wasted_prefetches, *evictions,
      *resplit_transfers;
  int64_t *predictor_hits, *predictor_guesses, *predictor_uses;
};

// The token: ids int64 [L, k]; last_ids the previous token's (null: none in this sequence);
// clock the token's clock (already advanced); scale the cross-layer tables' scale before this
// token, next_scale and next_prev_scale the scales its events add (> 1e200: rescale after).
struct PredictToken {
  const int64_t* ids;
  const int64_t* last_ids;
  int64_t clock;
  double scale, next_scale, next_prev_scale;
};

namespace predict_detail {

constexpr double kTiny = 1e-300;  // numpy's np.maximum(den, 1e-300)
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr uint64_t kHash = 2654435761u;

// True when row[i] appears earlier in row: numpy's fancy `+=` adds once per distinct index.
inline bool seen_before(const int64_t* row, int64_t i) {
  return std::find(row, row + i, row[i]) != row + i;
}

// The twin's `reciprocal`: a table's quotients P(e' | e) are table[l, e, e'] times this of
// counts[l, e], each a multiplication (a division costs several), computed where it is read.
inline double reciprocal(double count) { return 1.0 / std::max(count, kTiny); }

// Row e of a table with the reciprocal of its count: quotient f is t[f] * inv.
struct QuotientRow {
  const double* t;
  double inv;
};

// What a plan event is: an expert loaded on a stall, loaded by a prefetch, or evicted.
enum EventKind : int64_t { kStallLoad = 0, kPrefetchLoad = 1, kEviction = 2 };

// Buffers of one step, reused by its layers: E doubles each, cond k rows of E. guess holds the
// float32 scores of the predictors' guesses from a layer's `ahead` until its `serve` counts
// them against the routing (guessed: which predictors had one). events (null: not recorded)
// receives (token, layer, expert, kind) rows.
struct Scratch {
  explicit Scratch(int64_t experts, int64_t top_k)
      : p(experts), scores(experts), value(experts), keep(experts), tie(experts),
        cond(top_k * experts), guess(kGuesses * experts), flags(experts) {}
  static constexpr int kGuesses = 4;
  std::vector<double> p, scores, value, keep, tie, cond;
  std::vector<float> guess;
  std::vector<int64_t> buckets, hot_list, hot_ids;
  std::vector<char> flags;
  bool guessed[kGuesses] = {false, false, false, false};
  int32_t positive[kGuesses] = {0, 0, 0, 0};  // each guess's positive scores
  std::vector<int64_t>* events = nullptr;
  int64_t token = 0;
};

class Layer {
 public:
  Layer(const PredictState& s, const PredictParams& c, const PredictToken& t, int64_t l,
        Scratch& w)
      : s_(s), c_(c), t_(t), w_(w), l_(l), E_(s.experts), k_(s.top_k),
        ids_(t.ids + l * s.top_k), src_(l > 0 ? t.ids + (l - 1) * s.top_k : nullptr),
        last_(t.last_ids ? t.last_ids + l * s.top_k : nullptr) {}

  // Predictions and prefetches: what is decidable once the layer before is routed (reads this
  // token's ids of layer l - 1 and the previous token's of layer l, never ids of layer l). The
  // predictors' guesses wait in the scratch for `serve`.
  void ahead() {
    predict(w_.p, w_.scores, w_.cond);
    prefetch(w_.p, w_.value, w_.flags);
  }

  // Asks the CPU to bring the table rows `ahead` reads into its L2, before it needs them: the
  // cross-layer and pair rows of the layer before's experts, the previous-token rows of the
  // token before's. A hint only: nothing changes.
  void prefetch_rows() const {
    auto lines = [&](const double* row) {
      for (int64_t f = 0; f < E_; f += 8) __builtin_prefetch(row + f, 0, 1);  // 64 B a line
    };
    if (src_) {
      for (int64_t j = 0; j < k_; ++j) lines(table(s_.cross, src_[j]));
      for (int64_t a = 0; a < k_ && s_.buckets; ++a)
        for (int64_t b = a + 1; b < k_; ++b)
          lines(s_.pair + (l_ * s_.buckets + pair_index(src_[a], src_[b])) * E_);
    }
    if (last_)
      for (int64_t j = 0; j < k_; ++j) lines(table(s_.prev, last_[j]));
  }

  // The routing of layer l: the guesses of `ahead` counted, accesses and learning.
  void serve() {
    for (int index = 0; index < Scratch::kGuesses; ++index) {
      if (!w_.guessed[index]) continue;
      count_guess(index);
      w_.guessed[index] = false;
    }
    access(w_.keep, w_.flags);
    learn();
  }

  void run() {
    ahead();
    serve();
  }

 private:
  void note(int64_t e, EventKind kind) const {
    if (w_.events) w_.events->insert(w_.events->end(), {w_.token, l_, e, kind});
  }

  const double* row(const double* a) const { return a + l_ * E_; }
  double* row(double* a) const { return a + l_ * E_; }
  const double* table(const double* a, int64_t e) const { return a + (l_ * E_ + e) * E_; }
  double* table(double* a, int64_t e) const { return a + (l_ * E_ + e) * E_; }

  QuotientRow prev_row(int64_t e) const {
    return {table(s_.prev, e), reciprocal(row(s_.prev_n)[e])};
  }
  QuotientRow cross_row(int64_t e) const {
    return {table(s_.cross, e), reciprocal(row(s_.cross_n)[e])};
  }

  // Bucket of the pair (a, b) of experts: the triangular index, hashed when the table holds
  // fewer buckets than pairs (the twin's `pair_index`).
  int64_t pair_index(int64_t a, int64_t b) const {
    const int64_t lo = std::min(a, b), hi = std::max(a, b);
    int64_t index = lo * E_ - lo * (lo - 1) / 2 + (hi - lo);
    if (s_.buckets < E_ * (E_ + 1) / 2)
      index = static_cast<int64_t>(static_cast<uint64_t>(index) * kHash) % s_.buckets;
    return index;
  }

  // `table_scores` of the previous-token table, one layer: (sum over j of prev[src_j] *
  // reciprocal(prev_n[src_j])) * (1 / k).
  void table_scores(const int64_t* src, double* out) const {
    std::fill(out, out + E_, 0.0);  // 0 + x is x: numpy's sum starts from the first term
    for (int64_t j = 0; j < k_; ++j) {
      const QuotientRow q = prev_row(src[j]);
      for (int64_t f = 0; f < E_; ++f) out[f] += q.t[f] * q.inv;
    }
    const double inv = 1.0 / static_cast<double>(k_);
    for (int64_t f = 0; f < E_; ++f) out[f] *= inv;
  }

  // `cross_scores` of one layer l >= 1 from the routing of layer l - 1; cond: k rows of E in
  // scratch, for the source experts' quotients (each pair reads two of them).
  void cross_scores(double* out, std::vector<double>& cond) const {
    for (int64_t j = 0; j < k_; ++j) {
      const QuotientRow q = cross_row(src_[j]);
      double* c = cond.data() + j * E_;
      for (int64_t f = 0; f < E_; ++f) c[f] = q.t[f] * q.inv;
    }
    std::fill(out, out + E_, 0.0);
    if (s_.buckets == 0) {  // mean over the k source experts
      for (int64_t j = 0; j < k_; ++j)
        for (int64_t f = 0; f < E_; ++f) out[f] += cond[j * E_ + f];
      const double inv = 1.0 / static_cast<double>(k_);
      for (int64_t f = 0; f < E_; ++f) out[f] *= inv;
      return;
    }
    // mean over the pairs (a < b, numpy's triu_indices order), each backed off to its experts
    const double prior = c_.pair_prior * t_.scale;
    int64_t pairs = 0;
    for (int64_t a = 0; a < k_; ++a) {
      for (int64_t b = a + 1; b < k_; ++b, ++pairs) {
        const int64_t bucket = pair_index(src_[a], src_[b]);
        const double* num = s_.pair + (l_ * s_.buckets + bucket) * E_;
        const double inv = reciprocal(s_.pair_n[l_ * s_.buckets + bucket] + prior);
        const double *ca = cond.data() + a * E_, *cb = cond.data() + b * E_;
        for (int64_t f = 0; f < E_; ++f) out[f] += (num[f] + prior * (0.5 * (ca[f] + cb[f]))) * inv;
      }
    }
    const double inv = 1.0 / static_cast<double>(pairs);
    for (int64_t f = 0; f < E_; ++f) out[f] *= inv;
  }

  // Keeps predictor `index`'s guess for this layer (its float32 scores) until `serve`.
  void guess(int index, const double* scores) const {
    float* v = w_.guess.data() + index * E_;
    int32_t positive = 0;  // int32: the loop vectorizes
    for (int64_t e = 0; e < E_; ++e) {
      v[e] = static_cast<float>(scores[e]);
      positive += v[e] > 0.0f;
    }
    w_.positive[index] = positive;
    w_.guessed[index] = true;
  }

  // Counts predictor `index`'s guess for this layer: the k highest float32 scores (ties to the
  // lower expert id), those > 0 guessed, those the token uses hit (the twin's `flush`). Without
  // sorting: a used expert with a positive score is in the guess when fewer than k experts
  // rank ahead of it, and the guess holds min(k, positive scores) experts.
  void count_guess(int64_t index) const {
    const float* v = w_.guess.data() + index * E_;
    const int32_t E = static_cast<int32_t>(E_);  // int32 counts: the compare loops vectorize
    int64_t hits = 0;
    for (int64_t j = 0; j < k_; ++j) {
      const int32_t u = static_cast<int32_t>(ids_[j]);
      const float vu = v[u];
      if (seen_before(ids_, j) || !(vu > 0.0f)) continue;
      // higher scores, and equal ones of lower ids (one loop over every expert, of a fixed
      // length: it vectorizes without a remainder per id)
      int32_t ahead = 0;
      for (int32_t e = 0; e < E; ++e) ahead += (v[e] > vu) | ((v[e] == vu) & (e < u));
      hits += ahead < k_;
    }
    const int64_t at = index * s_.layers + l_;
    s_.predictor_hits[at] += hits;
    s_.predictor_guesses[at] += std::min<int64_t>(w_.positive[index], k_);
    s_.predictor_uses[at] += k_;
  }

  // The blend p of the three predictors (the twin's `predict`).
  void predict(std::vector<double>& p, std::vector<double>& scratch, std::vector<double>& cond) {
    double weight = 0.0;
    std::fill(p.begin(), p.end(), 0.0);
    const double* aff = row(s_.affinity);
    if (c_.affinity_weight > 0) {
      for (int64_t f = 0; f < E_; ++f) p[f] += c_.affinity_weight * aff[f];
      weight += c_.affinity_weight;
    }
    guess(2, aff);
    if (last_) {
      table_scores(last_, scratch.data());
      guess(1, scratch.data());
      if (c_.previous_weight > 0) {
        for (int64_t f = 0; f < E_; ++f) p[f] += c_.previous_weight * scratch[f];
        weight += c_.previous_weight;
      }
    }
    if (l_ > 0) {
      cross_scores(scratch.data(), cond);
      guess(0, scratch.data());
      if (c_.cross_weight > 0) {
        for (int64_t f = 0; f < E_; ++f) p[f] += c_.cross_weight * scratch[f];
        weight += c_.cross_weight;
      }
    }
    const double inv = reciprocal(weight);
    for (int64_t f = 0; f < E_; ++f) p[f] *= inv;
    guess(3, p.data());
  }

  // `hot_value` of expert f from this token's p and next, its einsum("le,lef->lf", p,
  // prev * reciprocal(prev_n)) term.
  double hot_value(const std::vector<double>& p, int64_t f, double next) const {
    double value = p[f];
    if (c_.victim_next_weight != 0.0)
      value = value + c_.victim_next_weight / static_cast<double>(k_) * next;
    if (c_.victim_affinity_weight != 0.0) value = value + c_.victim_affinity_weight * row(s_.affinity)[f];
    return value;
  }

  // The einsum term of expert f, the products added in expert order as numpy's einsum does.
  double next_use(const std::vector<double>& p, int64_t f) const {
    double next = 0.0;
    if (c_.victim_next_weight != 0.0)
      for (int64_t e = 0; e < E_; ++e) {
        if (p[e] == 0.0) continue;
        const QuotientRow q = prev_row(e);
        next += p[e] * (q.t[f] * q.inv);
      }
    return next;
  }

  // hot_value of the hot experts `list` into value (have: set where computed); the same sums
  // as next_use, a table row at a time over them (a zero p[e] adds +0: skipped).
  void hot_values(const std::vector<double>& p, const std::vector<int64_t>& list,
                  std::vector<double>& value, std::vector<char>& have) const {
    const size_t n = list.size();
    std::vector<double>& next = w_.keep;  // free until the accesses
    std::fill(next.begin(), next.begin() + n, 0.0);
    if (c_.victim_next_weight != 0.0) {
      for (int64_t e = 0; e < E_; ++e) {
        if (p[e] == 0.0) continue;
        const QuotientRow q = prev_row(e);
        for (size_t i = 0; i < n; ++i) next[i] += p[e] * (q.t[list[i]] * q.inv);
      }
    }
    for (size_t i = 0; i < n; ++i) {
      value[list[i]] = hot_value(p, list[i], next[i]);
      have[list[i]] = 1;
    }
  }

  // The twin's `evict` of one hot expert.
  void evict(int64_t e) {
    bool* hot = s_.hot + l_ * E_;
    bool* pending = s_.pending + l_ * E_;
    s_.wasted_prefetches[l_] += pending[e];
    note(e, kEviction);
    hot[e] = false;
    pending[e] = false;
    --s_.hot_count[l_];
    ++s_.evictions[l_];
  }

  // The twin's `_count_reloads` of one load.
  void count_reload(int64_t e) {
    if (s_.resplit_out == nullptr || !s_.resplit_out[l_ * E_ + e]) return;
    ++s_.resplit_transfers[l_];
    s_.resplit_out[l_ * E_ + e] = false;
  }

  // Up to prefetch_budget prefetches: the likeliest cold expert against the least valuable hot
  // one. The hot values are computed when a full layer first needs them (p and the tables stay
  // fixed through this token's prefetches), a prefetched expert's when it is next needed.
  void prefetch(const std::vector<double>& p, std::vector<double>& value,
                std::vector<char>& have_value) {
    bool* hot = s_.hot + l_ * E_;
    double* touch = row(s_.touch);
    const double clock = static_cast<double>(t_.clock);
    std::fill(have_value.begin(), have_value.end(), 0);
    bool valued = false;
    // the hot experts in ascending id (the scans' tie-break order), kept through the rounds:
    // only they are compared against a candidate
    std::vector<int64_t>& list = w_.hot_ids;
    list.resize(E_);
    size_t n = 0;
    int64_t cand = -1;  // the likeliest cold expert (the first in ids among equals)
    for (int64_t e = 0; e < E_; ++e) {
      if (hot[e])
        list[n++] = e;
      else if (cand < 0 || p[e] > p[cand])
        cand = e;
    }
    list.resize(n);
    // numpy's tie-break 1e-9 * touch / clock of the hot experts (only a prefetch changes a touch)
    double* tie = w_.tie.data();
    for (int64_t e : list) tie[e] = 1e-9 * touch[e] / clock;
    for (int64_t round = 0; round < c_.prefetch_budget; ++round) {
      if (round > 0) {
        cand = -1;
        for (int64_t e = 0; e < E_; ++e)
          if (!hot[e] && (cand < 0 || p[e] > p[cand])) cand = e;
      }
      // every expert hot (numpy's candidate scores -inf), or the candidate under the threshold
      if (cand < 0 || !(p[cand] > c_.prefetch_threshold)) return;
      const bool full = s_.hot_count[l_] >= s_.capacity[l_];
      double bar = c_.prefetch_margin;
      int64_t victim = 0;
      if (full) {
        // A hot value is at least its p (what it adds is >= 0): when the candidate cannot beat
        // even the smallest p + tie-break, it cannot beat the victim either, and the values
        // are not needed.
        double floor = kInf;
        for (int64_t e : list) floor = std::min(floor, p[e] + tie[e]);
        if (!(p[cand] > floor + c_.prefetch_margin)) return;
        if (!valued) {
          hot_values(p, list, value, have_value);
          valued = true;
        }
        double best = kInf;
        for (int64_t e : list) {
          if (!have_value[e]) {  // prefetched this token
            value[e] = hot_value(p, e, next_use(p, e));
            have_value[e] = 1;
          }
          const double score = value[e] + tie[e];
          if (score < best) {
            best = score;
            victim = e;
          }
        }
        bar = best + c_.prefetch_margin;
      }
      if (!(p[cand] > bar)) return;
      if (full) {
        evict(victim);
        list.erase(std::find(list.begin(), list.end(), victim));
      }
      list.insert(std::lower_bound(list.begin(), list.end(), cand), cand);
      count_reload(cand);
      note(cand, kPrefetchLoad);
      hot[cand] = true;
      s_.pending[l_ * E_ + cand] = true;
      touch[cand] = clock;
      tie[cand] = 1e-9 * touch[cand] / clock;
      ++s_.hot_count[l_];
      ++s_.prefetches[l_];
    }
  }

  // The token's experts in routing order; a miss on a full layer evicts the unused hot expert
  // of lowest `keep_scores` (computed at the first such miss: the candidates' touches do not
  // change before, only used experts are touched).
  void access(std::vector<double>& keep, std::vector<char>& used) {
    bool* hot = s_.hot + l_ * E_;
    bool* pending = s_.pending + l_ * E_;
    double* touch = row(s_.touch);
    std::fill(used.begin(), used.end(), 0);
    bool have_keep = false;
    std::vector<int64_t>& list = w_.hot_ids;
    for (int64_t j = 0; j < k_; ++j) {
      const int64_t e = ids_[j];
      const bool hit = hot[e];
      s_.hits[l_] += hit;
      s_.prefetch_hits[l_] += pending[e];
      pending[e] = false;
      if (!hit) {
        ++s_.stalls[l_];
        if (s_.hot_count[l_] >= s_.capacity[l_]) {
          if (!have_keep) {  // the victims' candidates: hot now (a miss admitted later is used)
            list.clear();
            for (int64_t f = 0; f < E_; ++f)
              if (hot[f]) list.push_back(f);
            keep_scores(list, keep);
            have_keep = true;
          }
          int64_t victim = -1;
          double best = kInf;
          for (int64_t f : list) {
            if (hot[f] && !used[f] && (victim < 0 || keep[f] < best)) {
              best = keep[f];
              victim = f;
            }
          }
          // capacity below top_k: every hot expert served this token already, and the one it
          // used first leaves (a full layer holds at least one, so the loop finds it)
          for (int64_t i = 0; victim < 0 && i < j; ++i)
            if (hot[ids_[i]]) victim = ids_[i];
          evict(victim);
        }
        count_reload(e);
        note(e, kStallLoad);
        hot[e] = true;
        ++s_.hot_count[l_];
      }
      used[e] = 1;
      touch[e] = static_cast<double>(t_.clock);
    }
  }

  // The twin's `keep_scores` of this layer.
  // The twin's `keep_scores` of this layer at the experts `list` (each the same sums and
  // products as at every expert: table_scores' column f does not depend on the others).
  void keep_scores(const std::vector<int64_t>& list, std::vector<double>& keep) const {
    const double* aff = row(s_.affinity);
    const double* touch = row(s_.touch);
    const double clock = static_cast<double>(std::max<int64_t>(t_.clock, 1));
    const double inv = 1.0 / static_cast<double>(k_);
    for (int64_t f : list) keep[f] = 0.0;
    for (int64_t j = 0; j < k_; ++j) {
      const QuotientRow q = prev_row(ids_[j]);
      for (int64_t f : list) keep[f] += q.t[f] * q.inv;
    }
    for (int64_t f : list)
      keep[f] = (c_.keep_previous_weight * (keep[f] * inv) + c_.keep_affinity_weight * aff[f]) -
                1e-9 * (1.0 - touch[f] / clock);
  }

  // Adds `inc` to table[l, a, b] for each distinct (a in src, b in ids), and to counts[l, a]
  // for each distinct a: numpy's fancy `+=` adds once per distinct index; used: this token's
  // distinct ids.
  void learn_table(double* tab, double* counts, const int64_t* src, double inc,
                   const std::vector<int64_t>& used) {
    for (int64_t i = 0; i < k_; ++i) {
      if (seen_before(src, i)) continue;
      double* t = table(tab, src[i]);
      for (int64_t e : used) t[e] += inc;
      row(counts)[src[i]] += inc;
    }
  }

  void learn() {
    std::vector<int64_t>& used = w_.hot_list;  // this token's distinct ids (free after access)
    used.clear();
    for (int64_t j = 0; j < k_; ++j)
      if (!seen_before(ids_, j)) used.push_back(ids_[j]);
    if (l_ > 0) {
      learn_table(s_.cross, s_.cross_n, src_, t_.next_scale, used);
      if (s_.buckets) {
        std::vector<int64_t>& buckets = w_.buckets;
        buckets.clear();
        for (int64_t a = 0; a < k_; ++a)
          for (int64_t b = a + 1; b < k_; ++b) buckets.push_back(pair_index(src_[a], src_[b]));
        for (size_t i = 0; i < buckets.size(); ++i) {
          if (seen_before(buckets.data(), static_cast<int64_t>(i))) continue;  // hashed pairs collide
          double* num = s_.pair + (l_ * s_.buckets + buckets[i]) * E_;
          for (int64_t e : used) num[e] += t_.next_scale;
          s_.pair_n[l_ * s_.buckets + buckets[i]] += t_.next_scale;
        }
      }
    }
    if (last_) learn_table(s_.prev, s_.prev_n, last_, t_.next_prev_scale, used);
    if (t_.next_scale > 1e200) {  // the lazy decay's rescale, this layer's rows
      divide(s_.cross + l_ * E_ * E_, E_ * E_, t_.next_scale);
      divide(row(s_.cross_n), E_, t_.next_scale);
      divide(s_.pair + l_ * s_.buckets * E_, s_.buckets * E_, t_.next_scale);
      divide(s_.pair_n + l_ * s_.buckets, s_.buckets, t_.next_scale);
    }
    if (t_.next_prev_scale > 1e200) {
      divide(s_.prev + l_ * E_ * E_, E_ * E_, t_.next_prev_scale);
      divide(row(s_.prev_n), E_, t_.next_prev_scale);
    }
    double* aff = row(s_.affinity);
    for (int64_t f = 0; f < E_; ++f) aff[f] *= c_.affinity_decay;
    const double boost = 1.0 - c_.affinity_decay;
    for (int64_t e : used) aff[e] += boost;
  }

  static void divide(double* a, int64_t n, double by) {
    for (int64_t i = 0; i < n; ++i) a[i] /= by;
  }

  const PredictState& s_;
  const PredictParams& c_;
  const PredictToken& t_;
  Scratch& w_;
  const int64_t l_, E_, k_;
  const int64_t *ids_, *src_, *last_;
};

}  // namespace predict_detail

// A batch of tokens served layer by layer (PredictiveCaches.open_batch): each token's clock and
// scales fixed when it opens, as consecutive steps would set them; its ids filled one layer at
// a time. last_ids: the token before the batch ([L, k]; empty: none).
struct PredictBatch {
  int64_t tokens = 0;
  std::vector<int64_t> ids, last_ids, clock;
  std::vector<char> new_sequence;
  std::vector<double> scale, next_scale, next_prev_scale;
};

// The lazy-decay state of PredictiveCaches (its _clock, _scale, _prev_scale), advanced per
// token exactly as its `step` advances it: the token's clock and its scale before, the scales
// its events add after (a scale past 1e200 restarts at 1: the token's learning divides the
// tables by it).
struct PredictClock {
  int64_t clock;
  double scale, prev_scale;
  double transition_decay, previous_decay;

  // Token t of the window or batch: sets its clock and scales.
  void advance(PredictToken& t) {
    t.clock = ++clock;
    t.scale = scale;
    scale /= transition_decay;
    prev_scale /= previous_decay;
    t.next_scale = scale;
    t.next_prev_scale = prev_scale;
    if (scale > 1e200) scale = 1.0;
    if (prev_scale > 1e200) prev_scale = 1.0;
  }
};

// The kernel of one PredictiveCaches: its state and parameters, checked once by the binding,
// and the scratch buffers its steps reuse (it caches nothing of the state, so anything may
// write the arrays between calls). One token without hints per step: predictions,
// prefetches, accesses and learning of every layer, the state updated in place exactly as the
// twin (moeray/native/_reference/predict.py) does. Calls on one kernel run one at a time (the
// binding holds `mutex`).
//
// A layer's work touches only its own rows of the state, and reads the routing of the layer
// before (this token) and of the token before (this layer); so a batch may run layer-major
// (every token of layer l, then of l + 1) and reach the state of the token-major steps: the
// tokens' clocks and scales are fixed when the batch opens. Layer l's predictions and
// prefetches for the batch's first token (`ahead`) run as soon as layer l - 1 is served.
class PredictKernel {
 public:
  PredictKernel(const PredictState& s, const PredictParams& c)
      : s_(s), c_(c), scratch_(s.experts, s.top_k) {}

  MOERAY_KERNEL_ENTRY void step(const PredictToken& t) {
    scratch_.events = nullptr;
    for (int64_t l = 0; l < s_.layers; ++l) predict_detail::Layer(s_, c_, t, l, scratch_).run();
  }

  // A whole window: ids int64 [T, L, k]; new_sequence [T] (null: none starts a sequence);
  // last_ids the token's before the window (null: none). Advances `clock` as T steps would.
  // Layers below first_layer are context only: their routing feeds the cross-layer predictor
  // of first_layer, nothing of theirs runs or changes (a layer actor's shadow layer).
  // Layer-major (every token of a layer, then the next layer): one layer's tables stay in the
  // CPU's caches for the whole window, where token-major steps would walk every layer's.
  MOERAY_KERNEL_ENTRY void run_window(const int64_t* ids, int64_t tokens, const bool* new_sequence,
                  const int64_t* last_ids, PredictClock& clock, int64_t first_layer = 0) {
    scratch_.events = nullptr;
    const int64_t stride = s_.layers * s_.top_k;
    window_.resize(tokens);
    for (int64_t i = 0; i < tokens; ++i) {
      PredictToken& t = window_[i];
      t = PredictToken{};
      t.ids = ids + i * stride;
      const int64_t* before = i ? ids + (i - 1) * stride : last_ids;
      t.last_ids = new_sequence && new_sequence[i] ? nullptr : before;
      clock.advance(t);
    }
    for (int64_t l = first_layer; l < s_.layers; ++l)
      for (const PredictToken& t : window_)
        predict_detail::Layer(s_, c_, t, l, scratch_).run();
    window_.clear();  // its tokens point into the caller's ids
  }

  // Opens a batch of `tokens` tokens (new_sequence [tokens]; last_ids [L, k] the token's before
  // it, null: none), each token's clock and scales taken from `clock` as consecutive steps
  // would; record: keep the plan events of its layers for take_events.
  void open_batch(int64_t tokens, const bool* new_sequence, const int64_t* last_ids,
                  PredictClock& clock, bool record) {
    const int64_t stride = s_.layers * s_.top_k;
    batch_.tokens = tokens;
    batch_.ids.assign(tokens * stride, 0);
    if (last_ids)
      batch_.last_ids.assign(last_ids, last_ids + stride);
    else
      batch_.last_ids.clear();
    batch_.new_sequence.assign(new_sequence, new_sequence + tokens);
    batch_.clock.resize(tokens);
    batch_.scale.resize(tokens);
    batch_.next_scale.resize(tokens);
    batch_.next_prev_scale.resize(tokens);
    for (int64_t b = 0; b < tokens; ++b) {
      PredictToken t{};
      clock.advance(t);
      batch_.clock[b] = t.clock;
      batch_.scale[b] = t.scale;
      batch_.next_scale[b] = t.next_scale;
      batch_.next_prev_scale[b] = t.next_prev_scale;
    }
    batch_open_ = true;
    next_layer_ = 0;
    ahead_token_ = -1;
    record_ = record;
    events_.clear();
  }

  // Layer l of every token of the batch, its ids (int64 [B, k]) already in the batch; then
  // layer l + 1's `ahead` for the first token. The binding checked that l is next_layer().
  MOERAY_KERNEL_ENTRY void serve_layer(int64_t l) {
    scratch_.events = record_ ? &events_ : nullptr;
    if (l + 1 < s_.layers && batch_.tokens > 0 && large_tables())  // for the next layer's ahead
      predict_detail::Layer(s_, c_, token(0), l + 1, scratch_).prefetch_rows();
    for (int64_t b = 0; b < batch_.tokens; ++b) {
      const PredictToken t = token(b);
      scratch_.token = b;
      predict_detail::Layer layer(s_, c_, t, l, scratch_);
      if (!(ahead_token_ == 0 && b == 0)) layer.ahead();
      layer.serve();
    }
    ahead_token_ = -1;
    next_layer_ = l + 1;
    if (l + 1 < s_.layers && batch_.tokens > 0) {
      scratch_.token = 0;
      const PredictToken t = token(0);
      predict_detail::Layer(s_, c_, t, l + 1, scratch_).ahead();
      ahead_token_ = 0;
    }
    scratch_.events = nullptr;
  }

  // Closes the batch; returns its last token's ids [L, k] (the next one's previous token).
  const int64_t* close_batch() {
    batch_open_ = false;
    return batch_.ids.data() + (batch_.tokens - 1) * s_.layers * s_.top_k;
  }

  // Ends the batch without its layers from next_layer() on (an engine whose forward failed):
  // the layers served keep what they did; the others never saw the batch's tokens.
  void abort_batch() {
    batch_open_ = false;
    events_.clear();
    ahead_token_ = -1;
    // the next layer's ahead left its guesses to be counted by a serve that never comes
    std::fill(std::begin(scratch_.guessed), std::end(scratch_.guessed), false);
  }

  bool batch_open() const { return batch_open_; }
  int64_t next_layer() const { return next_layer_; }
  const PredictBatch& batch() const { return batch_; }
  int64_t* batch_ids() { return batch_.ids.data(); }
  std::vector<int64_t>& events() { return events_; }
  const PredictState& state() const { return s_; }

  std::mutex mutex;

 private:
  // Whether a layer's tables (cross-layer, previous-token and pair: 8 E (2 E + B) bytes) are
  // larger than a core's L2 (1 MiB and more on x86-64 servers), so that the rows a layer's
  // `ahead` reads come from memory unless asked for early (bench_session at 256 experts, 3.8
  // MB a layer: 1.12-1.28x with prefetch_rows; at gpt-oss-20b's 32, 151 KB a layer: no gain).
  bool large_tables() const {
    return 8 * s_.experts * (2 * s_.experts + s_.buckets) > (int64_t{1} << 20);
  }

  // Token b of the batch: its ids, and the previous token's unless b starts a sequence.
  PredictToken token(int64_t b) const {
    const int64_t stride = s_.layers * s_.top_k;
    PredictToken t{};
    t.ids = batch_.ids.data() + b * stride;
    if (!batch_.new_sequence[b])
      t.last_ids = b ? t.ids - stride : (batch_.last_ids.empty() ? nullptr : batch_.last_ids.data());
    t.clock = batch_.clock[b];
    t.scale = batch_.scale[b];
    t.next_scale = batch_.next_scale[b];
    t.next_prev_scale = batch_.next_prev_scale[b];
    return t;
  }

  const PredictState s_;
  const PredictParams c_;
  predict_detail::Scratch scratch_;
  PredictBatch batch_;
  std::vector<PredictToken> window_;  // run_window's tokens, their clocks and scales set
  std::vector<int64_t> events_;
  bool batch_open_ = false, record_ = false;
  int64_t next_layer_ = 0, ahead_token_ = -1;
};

}  // namespace moeray

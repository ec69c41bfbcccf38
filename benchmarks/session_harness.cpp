// The engine session's plan core timed in C++, without Python per call (bench_session.py builds
// and runs it): per layer call at decode, the layer served and planned exactly as
// EngineSession.route does it (lru: session.hpp's DemandSession over the seed ExpertCache and
// Affinity; moeray: predict.hpp's PredictKernel open_batch / serve_layer / close_batch with
// session.hpp's HotPlan around each serve_layer, the binding's copy of the ids included).
//
// usage: session_harness POLICY IDS_FILE TOKENS LAYERS EXPERTS TOP_K CAPACITY WARM REPEATS
//          [lru:     DECAY BOOST MAX_SCORE]
//          [moeray:  DECAY BOOST MAX_SCORE BUCKETS PREDICTORS PREFETCH_BUDGET TRANSITION_DECAY
//                    PREVIOUS_DECAY and the 11 PredictParams weights in PredictParams' order]
//          [window:  as moeray]
// POLICY window times the predict kernel's window step instead (run_window, what a layer
// actor runs: bench_policy.py --core-baseline): WARM tokens in one window, then the rest in
// windows of 4,096 tokens (16 steps of 256), ns per layer and token; its totals are the
// stalls, evictions and prefetches of every token (no plans, no affinity: DECAY BOOST
// MAX_SCORE are read and unused).
// (DECAY BOOST MAX_SCORE: the session's affinity per layer, which moeray's batch feeds at its
// last layer.)
// IDS_FILE: int64 [TOKENS, LAYERS, TOP_K], raw. Tokens 0..WARM-1 warm the state; the rest are
// timed, REPEATS times from a fresh state. Prints one JSON object: ns per layer call of each
// repeat (this thread's CPU time, so the machine's other processes count little), and the
// plan's totals (loads, evictions, prefetches) of the last repeat, which the benchmark compares
// with EngineSession's on the same stream; for moeray, the HotPlan calls' share per call (by
// the steady clock read around them, ~25 ns a read included), from one more run of the last
// repeat's tokens with those clock reads (the timed runs have none: they cost ~90 ns a call).
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "affinity.hpp"
#include "expert_cache.hpp"
#include "predict.hpp"
#include "session.hpp"

namespace {

using Clock = std::chrono::steady_clock;

// This thread's CPU time, ns: what the calls cost, not the time others' processes held the CPU.
double cpu_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

struct Totals {
  int64_t loads = 0, evictions = 0, prefetches = 0;
  double plan_ns = 0.0;  // moeray: the HotPlan calls per layer call (the instrumented run)
};

// session.hpp's plan_entries: E + 2 written out, so that this file also builds against the
// headers of a revision before it (--core-baseline).
int64_t plan_entries(int64_t E) { return E + 2; }

std::vector<int64_t> read_ids(const char* path, int64_t n) {
  std::vector<int64_t> ids(n);
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(ids.data(), sizeof(int64_t), n, f) != static_cast<size_t>(n)) {
    std::fprintf(stderr, "cannot read %lld ids from %s\n", static_cast<long long>(n), path);
    std::exit(2);
  }
  std::fclose(f);
  return ids;
}

// One repeat of lru: returns ns per timed layer call.
double run_lru(const std::vector<int64_t>& ids64, int64_t T, int64_t L, int64_t E, int64_t k,
               int64_t cap, int64_t warm, double decay, double boost, double max_score,
               Totals& totals) {
  std::vector<int32_t> ids(ids64.begin(), ids64.end());
  std::vector<std::unique_ptr<moeray::ExpertCache>> caches;  // a mutex each: not movable
  std::vector<std::unique_ptr<moeray::Affinity>> affinities;
  std::vector<moeray::ExpertCache*> cs;
  std::vector<moeray::Affinity*> as;
  for (int64_t l = 0; l < L; ++l) {
    caches.push_back(std::make_unique<moeray::ExpertCache>(static_cast<int32_t>(E),
                                                           static_cast<int32_t>(cap), 0.1,
                                                           moeray::kLru));
    affinities.push_back(
        std::make_unique<moeray::Affinity>(static_cast<int32_t>(E), decay, boost, max_score));
    cs.push_back(caches.back().get());
    as.push_back(affinities.back().get());
  }
  moeray::DemandSession session(cs, as, false, 0.8);
  std::vector<int64_t> load(plan_entries(E)), evict(plan_entries(E));
  totals = Totals{};
  double start = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    if (t == warm) start = cpu_ns();
    for (int64_t l = 0; l < L; ++l) {
      int64_t nl, ne;
      session.route(l, ids.data() + (t * L + l) * k, 1, k, 0, load.data(), nl, evict.data(), ne);
      if (t >= warm) {
        totals.loads += nl;
        totals.evictions += ne;
      }
    }
  }
  return (cpu_ns() - start) / static_cast<double>((T - warm) * L);
}

// PredictiveCaches' state arrays, zeroed as its constructor makes them.
struct PredictArrays {
  std::vector<char> hot, pending;
  std::vector<int64_t> hot_count, capacity, counters, predictors;
  std::vector<double> touch, cross, cross_n, pair, pair_n, prev, prev_n, affinity;

  PredictArrays(int64_t L, int64_t E, int64_t B, int64_t P, int64_t cap)
      : hot(L * E, 0), pending(L * E, 0), hot_count(L, 0), capacity(L, cap), counters(7 * L, 0),
        predictors(3 * P * L, 0), touch(L * E, 0.0), cross(L * E * E, 0.0), cross_n(L * E, 0.0),
        pair(L * B * E, 0.0), pair_n(L * B, 0.0), prev(L * E * E, 0.0), prev_n(L * E, 0.0),
        affinity(L * E, 0.0) {}

  moeray::PredictState state(int64_t L, int64_t E, int64_t k, int64_t B, int64_t P) {
    moeray::PredictState s{};
    s.layers = L;
    s.experts = E;
    s.top_k = k;
    s.buckets = B;
    s.hot = reinterpret_cast<bool*>(hot.data());
    s.pending = reinterpret_cast<bool*>(pending.data());
    s.resplit_out = nullptr;
    s.hot_count = hot_count.data();
    s.capacity = capacity.data();
    s.touch = touch.data();
    s.cross = cross.data();
    s.cross_n = cross_n.data();
    s.pair = pair.data();
    s.pair_n = pair_n.data();
    s.prev = prev.data();
    s.prev_n = prev_n.data();
    s.affinity = affinity.data();
    int64_t* c = counters.data();
    s.hits = c;
    s.stalls = c + L;
    s.prefetches = c + 2 * L;
    s.prefetch_hits = c + 3 * L;
    s.wasted_prefetches = c + 4 * L;
    s.evictions = c + 5 * L;
    s.resplit_transfers = c + 6 * L;
    s.predictor_hits = predictors.data();
    s.predictor_guesses = predictors.data() + P * L;
    s.predictor_uses = predictors.data() + 2 * P * L;
    return s;
  }
};

double run_moeray(const std::vector<int64_t>& ids, int64_t T, int64_t L, int64_t E, int64_t k,
                  int64_t cap, int64_t warm, int64_t B, int64_t P,
                  const moeray::PredictParams& params, double transition_decay,
                  double previous_decay, double decay, double boost, double max_score,
                  bool time_plan, Totals& totals) {
  std::vector<std::unique_ptr<moeray::Affinity>> affinities;
  for (int64_t l = 0; l < L; ++l)
    affinities.push_back(
        std::make_unique<moeray::Affinity>(static_cast<int32_t>(E), decay, boost, max_score));
  std::vector<int32_t> ids32(ids.begin(), ids.end());
  PredictArrays arrays(L, E, B, P, cap);
  moeray::PredictKernel kernel(arrays.state(L, E, k, B, P), params);
  moeray::HotPlan plan(reinterpret_cast<const bool*>(arrays.hot.data()), L, E);
  moeray::PredictClock clock{0, 1.0, 1.0, transition_decay, previous_decay};
  double plan_ns = 0.0;  // clock reads around the plan calls (tens of ns against the kernel's us)
  const int64_t stride = plan_entries(E);
  std::vector<int64_t> out(4 * stride), last(L * k);
  bool has_last = false;
  const bool start_flag = false;
  totals = Totals{};
  double start = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    if (t == warm) start = cpu_ns();
    kernel.open_batch(1, &start_flag, has_last ? last.data() : nullptr, clock, false);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t* row = ids.data() + (t * L + l) * k;
      Clock::time_point t0, t1, t2;
      if (time_plan) t0 = Clock::now();
      if (l == 0) plan.before(0);
      if (time_plan) t1 = Clock::now();
      std::copy(row, row + k, kernel.batch_ids() + l * k);  // the binding's copy
      kernel.serve_layer(l);
      if (time_plan) t2 = Clock::now();
      int64_t n[4];
      plan.plan(l, row, k, out.data(), out.data() + stride, out.data() + 2 * stride,
                out.data() + 3 * stride, n);
      if (t >= warm) {
        if (time_plan)
          plan_ns += std::chrono::duration<double, std::nano>((t1 - t0) + (Clock::now() - t2)).count();
        totals.loads += n[0];
        totals.evictions += n[1];
        totals.prefetches += n[2];
      }
    }
    const int64_t* tail = kernel.close_batch();
    for (int64_t l = 0; l < L; ++l)  // the session's close: its affinity EMA of each layer
      affinities[l]->update_rows(ids32.data() + (t * L + l) * k, 1, k);
    std::copy(tail, tail + L * k, last.data());  // the next token's previous token
    has_last = true;
  }
  const double ns = cpu_ns() - start;
  totals.plan_ns = plan_ns / static_cast<double>((T - warm) * L);
  return ns / static_cast<double>((T - warm) * L);
}

// One repeat of the window step: returns ns per timed layer and token.
double run_window(const std::vector<int64_t>& ids, int64_t T, int64_t L, int64_t E, int64_t k,
                  int64_t cap, int64_t warm, int64_t B, int64_t P,
                  const moeray::PredictParams& params, double transition_decay,
                  double previous_decay, Totals& totals) {
  PredictArrays arrays(L, E, B, P, cap);
  moeray::PredictKernel kernel(arrays.state(L, E, k, B, P), params);
  moeray::PredictClock clock{0, 1.0, 1.0, transition_decay, previous_decay};
  const int64_t stride = L * k, window = 4096;
  kernel.run_window(ids.data(), warm, nullptr, nullptr, clock);
  const double start = cpu_ns();
  for (int64_t t = warm; t < T; t += window)
    kernel.run_window(ids.data() + t * stride, std::min(window, T - t), nullptr,
                      t ? ids.data() + (t - 1) * stride : nullptr, clock);
  const double ns = cpu_ns() - start;
  const int64_t* c = arrays.counters.data();  // hits, stalls, prefetches, .., evictions, ..
  totals = Totals{};
  for (int64_t l = 0; l < L; ++l) {
    totals.loads += c[L + l];
    totals.prefetches += c[2 * L + l];
    totals.evictions += c[5 * L + l];
  }
  return ns / static_cast<double>(std::max<int64_t>(T - warm, 1) * L);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 10) {
    std::fprintf(stderr, "usage: see the top of session_harness.cpp\n");
    return 2;
  }
  const std::string policy = argv[1];
  const int64_t T = std::atoll(argv[3]), L = std::atoll(argv[4]), E = std::atoll(argv[5]),
                k = std::atoll(argv[6]), cap = std::atoll(argv[7]), warm = std::atoll(argv[8]),
                repeats = std::atoll(argv[9]);
  const std::vector<int64_t> ids = read_ids(argv[2], T * L * k);
  std::vector<double> ns;
  Totals totals;
  if (policy == "lru" && argc == 13) {
    const double decay = std::atof(argv[10]), boost = std::atof(argv[11]),
                 max_score = std::atof(argv[12]);
    for (int64_t r = 0; r < repeats; ++r)
      ns.push_back(run_lru(ids, T, L, E, k, cap, warm, decay, boost, max_score, totals));
  } else if ((policy == "moeray" || policy == "window") && argc == 29) {
    const double decay = std::atof(argv[10]), boost = std::atof(argv[11]),
                 max_score = std::atof(argv[12]);
    const int64_t B = std::atoll(argv[13]), P = std::atoll(argv[14]);
    moeray::PredictParams c{};
    c.prefetch_budget = std::atoll(argv[15]);
    const double transition_decay = std::atof(argv[16]), previous_decay = std::atof(argv[17]);
    double* w[] = {&c.cross_weight,         &c.previous_weight,      &c.affinity_weight,
                   &c.prefetch_margin,      &c.prefetch_threshold,   &c.keep_previous_weight,
                   &c.keep_affinity_weight, &c.victim_next_weight,   &c.victim_affinity_weight,
                   &c.pair_prior,           &c.affinity_decay};
    for (int i = 0; i < 11; ++i) *w[i] = std::atof(argv[18 + i]);
    for (int64_t r = 0; r < repeats; ++r)
      ns.push_back(policy == "window"
                       ? run_window(ids, T, L, E, k, cap, warm, B, P, c, transition_decay,
                                    previous_decay, totals)
                       : run_moeray(ids, T, L, E, k, cap, warm, B, P, c, transition_decay,
                                    previous_decay, decay, boost, max_score, false, totals));
    if (policy == "moeray")  // the plan's share, in one more run with clock reads
      run_moeray(ids, T, L, E, k, cap, warm, B, P, c, transition_decay, previous_decay, decay,
                 boost, max_score, true, totals);
  } else {
    std::fprintf(stderr, "bad arguments for policy %s (%d given)\n", policy.c_str(), argc);
    return 2;
  }
  std::printf("{\"ns_per_call\": [");
  for (size_t i = 0; i < ns.size(); ++i) std::printf("%s%.2f", i ? ", " : "", ns[i]);
  std::printf("], \"loads\": %lld, \"evictions\": %lld, \"prefetches\": %lld, "
              "\"plan_ns_per_call\": %.2f}\n",
              static_cast<long long>(totals.loads), static_cast<long long>(totals.evictions),
              static_cast<long long>(totals.prefetches), totals.plan_ns);
  return 0;
}

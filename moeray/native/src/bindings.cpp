// pybind11 bindings of moeray's native core. Every argument is checked here, at the boundary,
// with the same exception types and messages as the pure-Python twin (_reference.py); batch
// loops run with the GIL released and the object's mutex held (released before the GIL returns).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "affinity.hpp"
#include "expert_cache.hpp"
#include "prefetch.hpp"
#include "routing.hpp"

namespace py = pybind11;
using moeray::Affinity;
using moeray::ExpertCache;
using moeray::Prefetcher;

namespace {

using Lock = std::lock_guard<std::mutex>;

// num_experts is a count: a bool is a mistake here, though pybind11's int caster takes it.
int32_t check_num_experts(const py::handle& obj) {
  if (PyBool_Check(obj.ptr()) || !PyIndex_Check(obj.ptr()))
    throw py::type_error("num_experts: expected an int, got " +
                         std::string(py::str(obj.get_type().attr("__name__"))));
  const int64_t n = py::cast<int64_t>(py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr())));
  if (n < 1 || n > INT32_MAX)
    throw py::value_error("num_experts: expected an int in [1, 2**31), got " + std::to_string(n));
  return static_cast<int32_t>(n);
}

// int32 [T, top_k], C-contiguous, ids in [0, num_experts): the batch contract.
// check_range=false leaves the id range to a kernel that validates while it counts.
py::array_t<int32_t> check_ids(const py::handle& obj, int32_t num_experts,
                               const char* name = "expert_ids", bool check_range = true) {
  const std::string arg(name);
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(arg + ": expected a numpy int32 array, got " +
                         std::string(py::str(obj.get_type().attr("__name__"))));
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!py::isinstance<py::array_t<int32_t>>(arr))
    throw py::type_error(arg + ": expected dtype int32, got " + std::string(py::str(arr.dtype())));
  if (arr.ndim() != 2)
    throw py::value_error(arg + ": expected shape [T, top_k], got " +
                          std::string(py::str(arr.attr("shape"))));
  if (!(arr.flags() & py::array::c_style))
    throw py::value_error(arg + ": expected a C-contiguous array");
  auto ids = py::reinterpret_borrow<py::array_t<int32_t>>(arr);
  if (!check_range) return ids;
  const int32_t* p = ids.data();
  const int64_t total = ids.size();
  int32_t bad = 0;
  bool ok = true;
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < total; ++i) {
      if (p[i] < 0 || p[i] >= num_experts) {
        bad = p[i];
        ok = false;
        break;
      }
    }
  }
  if (!ok)
    throw py::value_error(arg + ": every id must be in [0, " + std::to_string(num_experts) +
                          "), got " + std::to_string(bad));
  return ids;
}

int32_t check_id(const ExpertCache& cache, int64_t e) {
  if (e < 0 || e >= cache.num_experts())
    throw py::value_error("expert_id: expected an id in [0, " +
                          std::to_string(cache.num_experts()) + "), got " + std::to_string(e));
  return static_cast<int32_t>(e);
}

void check_finite(double x, const char* name) {
  if (!std::isfinite(x))
    throw py::value_error(std::string(name) + ": expected a finite float, got " +
                          std::string(py::str(py::float_(x))));
}

void check_affinity(const ExpertCache& cache, const Affinity& affinity) {
  if (affinity.num_experts() != cache.num_experts())
    throw py::value_error("affinity: tracks " + std::to_string(affinity.num_experts()) +
                          " experts, the cache " + std::to_string(cache.num_experts()));
}

void check_k(int64_t k, const char* name) {
  if (k < 0)
    throw py::value_error(std::string(name) + ": expected " + name + " >= 0, got " +
                          std::to_string(k));
}

py::object optional_id(int32_t e) {
  return e == ExpertCache::kNone ? py::object(py::none()) : py::object(py::int_(e));
}

py::tuple schedule(const py::handle& expert_ids, const py::handle& weights,
                   const py::handle& num_experts) {
  const int32_t n = check_num_experts(num_experts);
  auto ids = check_ids(expert_ids, n, "expert_ids", /*check_range=*/false);
  if (!py::isinstance<py::array>(weights))
    throw py::type_error("weights: expected a numpy float32 array, got " +
                         std::string(py::str(weights.get_type().attr("__name__"))));
  auto warr = py::reinterpret_borrow<py::array>(weights);
  if (!py::isinstance<py::array_t<float>>(warr))
    throw py::type_error("weights: expected dtype float32, got " +
                         std::string(py::str(warr.dtype())));
  if (warr.ndim() != 2 || warr.shape(0) != ids.shape(0) || warr.shape(1) != ids.shape(1))
    throw py::value_error("weights: expected shape " + std::string(py::str(ids.attr("shape"))) +
                          " like expert_ids, got " + std::string(py::str(warr.attr("shape"))));
  if (!(warr.flags() & py::array::c_style))
    throw py::value_error("weights: expected a C-contiguous array");
  auto w = py::reinterpret_borrow<py::array_t<float>>(warr);
  const int64_t num_tokens = ids.shape(0), top_k = ids.shape(1), total = ids.size();
  if (num_tokens > INT32_MAX)
    throw py::value_error("expert_ids: at most 2**31 - 1 tokens per call");
  py::array_t<int64_t> offsets(n + 1);
  py::array_t<int32_t> token_indices(total);
  py::array_t<float> out_weights(total);
  const int32_t* pi = ids.data();
  const float* pw = w.data();
  int64_t* po = offsets.mutable_data();
  int32_t* pt = token_indices.mutable_data();
  float* pv = out_weights.mutable_data();
  bool ok;
  {
    py::gil_scoped_release release;
    ok = moeray::schedule(pi, pw, num_tokens, top_k, n, po, pt, pv);
  }
  if (!ok) {
    check_ids(ids, n);  // names the first bad id, if that is what failed
    throw py::value_error("weights: every weight must be finite (no NaN or inf)");
  }
  return py::make_tuple(offsets, token_indices, out_weights);
}

int64_t belady_hits(const py::handle& expert_ids, const py::handle& num_experts,
                    int64_t capacity) {
  const int32_t n = check_num_experts(num_experts);
  if (capacity < 1 || capacity > n)
    throw py::value_error("capacity: expected an int in [1, " + std::to_string(n) + "], got " +
                          std::to_string(capacity));
  auto ids = check_ids(expert_ids, n);
  const int32_t* p = ids.data();
  const int64_t num_tokens = ids.shape(0), top_k = ids.shape(1);
  py::gil_scoped_release release;
  return moeray::belady_hits(p, num_tokens, top_k, n, static_cast<int32_t>(capacity));
}

int64_t check_expert(const Prefetcher& p, int64_t e) {
  if (e < 0 || e >= p.num_experts())
    throw py::value_error("expert_id: expected an id in [0, " + std::to_string(p.num_experts()) +
                          "), got " + std::to_string(e));
  return e;
}

// (file, offset, length) triples, each inside its file: nothing is ever read out of bounds.
std::vector<moeray::ByteRange> check_ranges(const Prefetcher& p,
                                            const std::vector<std::tuple<int64_t, int64_t, int64_t>>& ranges) {
  std::vector<moeray::ByteRange> out;
  out.reserve(ranges.size());
  for (const auto& [file, offset, length] : ranges) {
    if (file < 0 || file >= p.num_files())
      throw py::value_error("ranges: file index " + std::to_string(file) + " not in [0, " +
                            std::to_string(p.num_files()) + ")");
    const int64_t size = p.file_size(static_cast<int32_t>(file));
    if (offset < 0 || length < 0 || offset > size || length > size - offset)
      throw py::value_error("ranges: bytes [" + std::to_string(offset) + ", +" +
                            std::to_string(length) + ") run past file " + std::to_string(file) +
                            " of " + std::to_string(size) + " bytes");
    out.push_back({static_cast<int32_t>(file), offset, length});
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "moeray's native core (C++17): expert cache, affinity, scheduling, Belady.";
  m.attr("LRU") = static_cast<int>(moeray::kLru);
  m.attr("LFU") = static_cast<int>(moeray::kLfu);
  m.attr("ADAPTIVE") = static_cast<int>(moeray::kAdaptive);

  py::class_<Affinity>(m, "AffinityCore")
      .def(py::init([](const py::handle& num_experts, double decay, double boost, double max_score) {
             return new Affinity(check_num_experts(num_experts), decay, boost, max_score);
           }),
           py::arg("num_experts"), py::arg("decay"), py::arg("activation_boost"),
           py::arg("max_score"))
      .def("num_experts", &Affinity::num_experts)
      .def("update",
           [](Affinity& a, const std::vector<int64_t>& activated) {
             std::vector<int32_t> ids;
             ids.reserve(activated.size());
             for (int64_t e : activated) {
               if (e < 0)
                 throw py::value_error("activated: expert ids must be >= 0, got " +
                                       std::to_string(e));
               ids.push_back(static_cast<int32_t>(std::min<int64_t>(e, INT32_MAX)));
             }
             Lock lock(a.mutex);
             a.update_row(ids.data(), static_cast<int64_t>(ids.size()));
           },
           py::arg("activated"))
      .def("update_batch",
           [](Affinity& a, const py::handle& expert_ids) {
             auto ids = check_ids(expert_ids, a.num_experts());
             const int32_t* p = ids.data();
             const int64_t rows = ids.shape(0), k = ids.shape(1);
             py::gil_scoped_release release;
             Lock lock(a.mutex);
             for (int64_t t = 0; t < rows; ++t) a.update_row(p + t * k, k);
           },
           py::arg("expert_ids"))
      .def("score", [](const Affinity& a, int64_t e) { return a.score(e); }, py::arg("expert_id"))
      .def("scores",
           [](const Affinity& a) {
             return py::array_t<double>(a.num_experts(), a.scores().data());
           })
      .def("activation_count", [](const Affinity& a, int64_t e) { return a.activation_count(e); },
           py::arg("expert_id"))
      .def("activation_counts",
           [](const Affinity& a) {
             py::array_t<int64_t> out(a.num_experts());
             int64_t* p = out.mutable_data();
             for (int32_t e = 0; e < a.num_experts(); ++e) p[e] = static_cast<int64_t>(a.counts()[e]);
             return out;
           })
      .def("top_k_by_affinity",
           [](const Affinity& a, int64_t k) {
             check_k(k, "k");
             return a.top_k_by_affinity(k);
           },
           py::arg("k"))
      .def("top_k_by_frequency",
           [](const Affinity& a, int64_t k) {
             check_k(k, "k");
             return a.top_k_by_frequency(k);
           },
           py::arg("k"))
      .def("least_affinity",
           [](const Affinity& a, const std::vector<int64_t>& candidates) -> py::object {
             if (candidates.empty()) return py::none();
             int64_t best = candidates[0];
             auto key = [&a](int64_t e) {
               const double s = a.score(e);
               return std::isfinite(s) ? s : -std::numeric_limits<double>::infinity();
             };
             for (int64_t e : candidates)
               if (key(e) < key(best) || (key(e) == key(best) && e < best)) best = e;
             return py::int_(best);
           },
           py::arg("candidates"))
      .def("frequency_percentile", &Affinity::frequency_percentile, py::arg("expert_id"))
      .def("load_state",
           [](Affinity& a, const py::handle& scores, const py::handle& counts) {
             const int64_t n = a.num_experts();
             auto as_vector = [n](const py::handle& obj, bool is_double, const char* name) {
               if (!py::isinstance<py::array>(obj))
                 throw py::type_error(std::string(name) + ": expected a numpy array");
               auto arr = py::reinterpret_borrow<py::array>(obj);
               const py::dtype dtype =
                   is_double ? py::dtype::of<double>() : py::dtype::of<int64_t>();
               if (is_double ? !py::isinstance<py::array_t<double>>(arr)
                             : !py::isinstance<py::array_t<int64_t>>(arr))
                 throw py::type_error(std::string(name) + ": expected dtype " +
                                      std::string(py::str(dtype)) + ", got " +
                                      std::string(py::str(arr.dtype())));
               if (arr.ndim() != 1 || arr.shape(0) != n || !(arr.flags() & py::array::c_style))
                 throw py::value_error(std::string(name) + ": expected a C-contiguous array of " +
                                       std::to_string(n) + " values");
               return arr;
             };
             auto s = as_vector(scores, true, "scores");
             auto c = as_vector(counts, false, "activation_counts");
             const int64_t* pc = static_cast<const int64_t*>(c.data());
             for (int64_t e = 0; e < n; ++e)
               if (pc[e] < 0) throw py::value_error("activation_counts: counts must be >= 0");
             Lock lock(a.mutex);
             a.load_state(static_cast<const double*>(s.data()), pc);
           },
           py::arg("scores"), py::arg("activation_counts"))
      .def("reset", [](Affinity& a) {
        Lock lock(a.mutex);
        a.reset();
      });

  py::class_<ExpertCache>(m, "ExpertCacheCore")
      .def(py::init([](const py::handle& num_experts, int64_t max_hot, double threshold,
                            int64_t policy) {
             const int32_t n = check_num_experts(num_experts);
             if (max_hot < 1 || max_hot > n)
               throw py::value_error("max_hot_experts: expected an int in [1, " +
                                     std::to_string(n) + "], got " + std::to_string(max_hot));
             check_finite(threshold, "prefetch_threshold");
             if (policy < 0 || policy > 2)
               throw py::value_error(
                   "eviction_policy: expected 0 (LRU), 1 (LFU) or 2 (ADAPTIVE), got " +
                   std::to_string(policy));
             return new ExpertCache(n, static_cast<int32_t>(max_hot), threshold,
                                    static_cast<moeray::Policy>(policy));
           }),
           py::arg("num_experts"), py::arg("max_hot"), py::arg("prefetch_threshold"),
           py::arg("policy"))
      .def("num_experts", &ExpertCache::num_experts)
      .def("access",
           [](ExpertCache& c, int64_t e) {
             const int32_t id = check_id(c, e);
             Lock lock(c.mutex);
             return c.access(id);
           },
           py::arg("expert_id"))
      .def("should_prefetch",
           [](ExpertCache& c, int64_t e, double w) {
             const int32_t id = check_id(c, e);
             check_finite(w, "router_weight");
             Lock lock(c.mutex);
             return c.should_prefetch(id, w);
           },
           py::arg("expert_id"), py::arg("router_weight"))
      .def("suggest_eviction",
           [](ExpertCache& c) {
             Lock lock(c.mutex);
             return optional_id(c.suggest_eviction());
           })
      .def("evict",
           [](ExpertCache& c, int64_t e) {
             const int32_t id = check_id(c, e);
             Lock lock(c.mutex);
             c.evict(id);
           },
           py::arg("expert_id"))
      .def("admit",
           [](ExpertCache& c, int64_t e) {
             const int32_t id = check_id(c, e);
             Lock lock(c.mutex);
             c.admit(id);
           },
           py::arg("expert_id"))
      .def("prefetch_admit",
           [](ExpertCache& c, int64_t e) {
             const int32_t id = check_id(c, e);
             Lock lock(c.mutex);
             c.prefetch_admit(id);
           },
           py::arg("expert_id"))
      .def("is_hot",
           [](ExpertCache& c, int64_t e) {
             const int32_t id = check_id(c, e);
             Lock lock(c.mutex);
             return c.is_hot(id);
           },
           py::arg("expert_id"))
      .def("stats",
           [](ExpertCache& c) {
             Lock lock(c.mutex);
             const auto& s = c.stats();
             return py::make_tuple(s.hits, s.misses, s.evictions, s.prefetch_hits);
           })
      .def("reset_stats",
           [](ExpertCache& c) {
             Lock lock(c.mutex);
             c.reset_stats();
           })
      .def("hot_count", &ExpertCache::hot_count)
      .def("max_hot", &ExpertCache::max_hot)
      .def("hot_experts",
           [](ExpertCache& c) {
             Lock lock(c.mutex);
             return c.hot_experts();
           })
      .def("suggest_eviction_with_affinity",
           [](ExpertCache& c, Affinity& a, double w) {
             check_affinity(c, a);
             check_finite(w, "affinity_weight");
             Lock lock(c.mutex);
             Lock lock_a(a.mutex);
             return optional_id(c.suggest_eviction_with_affinity(a, std::clamp(w, 0.0, 1.0)));
           },
           py::arg("affinity"), py::arg("affinity_weight"))
      .def("prefetch_by_affinity",
           [](ExpertCache& c, Affinity& a, int64_t budget) {
             check_affinity(c, a);
             check_k(budget, "budget");
             Lock lock(c.mutex);
             Lock lock_a(a.mutex);
             return c.prefetch_by_affinity(a, budget);
           },
           py::arg("affinity"), py::arg("budget"))
      .def("access_batch",
           [](ExpertCache& c, const py::handle& expert_ids, Affinity* a, double w) {
             auto ids = check_ids(expert_ids, c.num_experts());
             if (a != nullptr) {
               check_affinity(c, *a);
               check_finite(w, "affinity_weight");
             }
             const double weight = std::clamp(w, 0.0, 1.0);
             const int64_t rows = ids.shape(0), k = ids.shape(1);
             py::array_t<bool> hits({rows, k});
             const int32_t* p = ids.data();
             bool* out = hits.mutable_data();
             {
               py::gil_scoped_release release;
               Lock lock(c.mutex);
               if (a == nullptr) {
                 c.access_run(p, rows * k, out);
               } else {
                 Lock lock_a(a->mutex);
                 for (int64_t t = 0; t < rows; ++t) {
                   for (int64_t j = 0; j < k; ++j)
                     out[t * k + j] = c.access_blended(p[t * k + j], *a, weight);
                   a->update_row(p + t * k, k);
                 }
               }
             }
             return hits;
           },
           py::arg("expert_ids"), py::arg("affinity") = nullptr, py::arg("affinity_weight") = 0.0);

  py::class_<Prefetcher>(m, "PrefetcherCore")
      .def(py::init([](const std::vector<std::string>& paths, const py::handle& num_experts) {
             const int32_t n = check_num_experts(num_experts);
             try {
               return new Prefetcher(paths, n);
             } catch (const std::runtime_error& exc) {
               throw py::value_error(std::string("paths: ") + exc.what());
             }
           }),
           py::arg("paths"), py::arg("num_experts"))
      .def("num_experts", &Prefetcher::num_experts)
      .def("set_ranges",
           [](Prefetcher& p, int64_t e,
              const std::vector<std::tuple<int64_t, int64_t, int64_t>>& ranges) {
             p.set_ranges(check_expert(p, e), check_ranges(p, ranges));
           },
           py::arg("expert_id"), py::arg("ranges"))
      .def("expert_bytes", [](const Prefetcher& p, int64_t e) { return p.expert_bytes(check_expert(p, e)); },
           py::arg("expert_id"))
      .def("prefetch", [](Prefetcher& p, int64_t e) { p.prefetch(check_expert(p, e)); },
           py::arg("expert_id"))
      .def("ready", [](const Prefetcher& p, int64_t e) { return p.ready(check_expert(p, e)); },
           py::arg("expert_id"))
      .def("wait",
           [](Prefetcher& p, int64_t e) {
             check_expert(p, e);
             py::gil_scoped_release release;
             return p.wait(e);
           },
           py::arg("expert_id"))
      .def("release",
           [](Prefetcher& p, int64_t e) {
             check_expert(p, e);
             py::gil_scoped_release release;
             p.release(e);
           },
           py::arg("expert_id"))
      .def("resident_bytes",
           [](const Prefetcher& p, int64_t e) {
             check_expert(p, e);
             py::gil_scoped_release release;
             return p.resident_bytes(e);
           },
           py::arg("expert_id"))
      .def("read_ahead",
           [](const Prefetcher& p, int64_t e, int64_t bytes) {
             check_expert(p, e);
             if (bytes < 0) throw py::value_error("bytes: expected an int >= 0, got " + std::to_string(bytes));
             p.read_ahead(e, bytes);
           },
           py::arg("expert_id"), py::arg("bytes"))
      .def("stats", [](const Prefetcher& p) {
        const auto s = p.stats();
        py::dict d;
        d["bytes_populated"] = s.bytes_populated;
        d["bytes_released"] = s.bytes_released;
        d["prefetches_completed"] = s.prefetches_completed;
        d["in_time"] = s.in_time;
        d["late"] = s.late;
        d["queue_wait_s"] = static_cast<double>(s.queue_wait_ns) * 1e-9;
        return d;
      });

  m.def("schedule", &schedule, py::arg("expert_ids"), py::arg("weights"), py::arg("num_experts"));
  m.def("belady_hits", &belady_hits, py::arg("expert_ids"), py::arg("num_experts"),
        py::arg("capacity"));
}

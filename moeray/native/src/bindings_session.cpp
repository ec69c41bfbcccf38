// pybind11 bindings of session.hpp: the engine session's plan cores (_DemandSession, _HotPlan)
// and its affinity update at a batch's close (_LayerAffinities), bound by bind_session, which
// bindings.cpp's module calls. Arguments are checked here with the twin's messages
// (_reference/session.py). A demand route's work runs with the GIL released and the session's,
// then the layer's cache and affinity mutexes held (session, cache, affinity: bindings.cpp locks
// cache before affinity too); so does the affinity update (its own, then each affinity's). A
// HotPlan call keeps the GIL: it reads numpy rows that Python code writes, and its work (tens of
// ns) costs less than a release.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "session.hpp"

namespace py = pybind11;

namespace {

using Lock = std::lock_guard<std::mutex>;
using H = const py::handle&;

std::string type_name(H obj) {
  return std::string(py::str(py::type::handle_of(obj).attr("__name__")));
}

// ids: an int32 or int64 numpy array [tokens, k], tokens >= 1, every id in [0, experts): the
// one check of a route call, before anything changes. Returns it C-contiguous (a copy if not).
py::array check_route_ids(H obj, int64_t experts) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error("ids: expected a numpy int32 or int64 array, got " + type_name(obj));
  auto arr = py::reinterpret_borrow<py::array>(obj);
  // The descriptor's type number first (numpy's own int32 and int64, native order); any other
  // descriptor through numpy's equivalence test.
  static const int num32 = py::dtype::of<int32_t>().num(), num64 = py::dtype::of<int64_t>().num();
  const py::dtype dtype = arr.dtype();
  const bool native = dtype.byteorder() == '=';
  bool i32 = native && dtype.num() == num32;
  const bool i64 = (native && dtype.num() == num64) ||
                   (!i32 && !(i32 = py::isinstance<py::array_t<int32_t>>(arr)) &&
                    py::isinstance<py::array_t<int64_t>>(arr));
  if (!i32 && !i64)
    throw py::type_error("ids: expected dtype int32 or int64, got " +
                         std::string(py::str(arr.dtype())));
  if (arr.ndim() != 2 || arr.shape(0) < 1 || arr.shape(1) < 1)
    throw py::value_error("ids: expected shape [tokens, top_k], got " +
                          std::string(py::str(arr.attr("shape"))));
  if (!(arr.flags() & py::array::c_style))  // a slice of an engine's routing: read a copy
    arr = py::array::ensure(arr, py::array::c_style);
  const int64_t n = arr.size();
  bool bad = false;
  int64_t first = 0;
  // One pass the compiler vectorises (a negative id wraps to a large unsigned one).
  if (i32) {
    const auto* p = static_cast<const int32_t*>(arr.data());
    uint32_t out = 0;
    for (int64_t i = 0; i < n; ++i) out |= static_cast<uint32_t>(p[i]) >= uint64_t(experts);
    if (out)
      for (int64_t i = 0; i < n && !bad; ++i)
        if (static_cast<uint32_t>(p[i]) >= uint64_t(experts)) bad = true, first = p[i];
  } else {
    const auto* p = static_cast<const int64_t*>(arr.data());
    uint64_t out = 0;
    for (int64_t i = 0; i < n; ++i) out |= static_cast<uint64_t>(p[i]) >= uint64_t(experts);
    if (out)
      for (int64_t i = 0; i < n && !bad; ++i)
        if (static_cast<uint64_t>(p[i]) >= uint64_t(experts)) bad = true, first = p[i];
  }
  if (bad)
    throw py::value_error("ids: expected ids in [0, " + std::to_string(experts) + "), got " +
                          std::to_string(first));
  return arr;
}

// Checked ids (check_route_ids: int32 or int64, in [0, experts)) as int32, which the caches and
// affinities read: in place, or narrowed into `scratch`. Safe without the GIL.
const int32_t* as_int32(const py::array& ids, std::vector<int32_t>& scratch) {
  if (ids.itemsize() == 4) return static_cast<const int32_t*>(ids.data());
  const auto* q = static_cast<const int64_t*>(ids.data());
  scratch.assign(q, q + ids.size());  // in [0, experts): checked
  return scratch.data();
}

int64_t check_layer(int64_t layer, int64_t layers) {
  if (layer < 0 || layer >= layers)
    throw py::value_error("layer: expected an int in [0, " + std::to_string(layers) + "), got " +
                          std::to_string(layer));
  return layer;
}

// The plan's ids as a numpy array of its own (the core's buffers are rewritten by the next
// call); none: `empty`, one read-only array shared by every empty answer.
py::array ids_array(const int64_t* data, int64_t n, const py::array& empty) {
  if (n == 0) return empty;
  // numpy's own constructor: array_t's (shape and stride containers, a dtype lookup) costs
  // about as much again at a decode step's few ids
  auto& api = py::detail::npy_api::get();
  const Py_intptr_t dims[1] = {static_cast<Py_intptr_t>(n)};
  PyObject* out = api.PyArray_NewFromDescr_(
      api.PyArray_Type_, api.PyArray_DescrFromType_(py::detail::npy_api::NPY_INT64_), 1, dims,
      nullptr, nullptr, 0, nullptr);  // the descriptor's reference is stolen
  if (out == nullptr) throw py::error_already_set();
  auto arr = py::reinterpret_steal<py::array>(out);
  std::memcpy(arr.mutable_data(), data, static_cast<size_t>(n) * sizeof(int64_t));
  return arr;
}

py::array empty_ids() {
  py::array_t<int64_t> out(0);
  out.attr("setflags")(py::arg("write") = false);
  return out;
}

struct DemandSessionHandle {
  std::vector<py::object> keep;  // the caches and affinities the core points into
  moeray::DemandSession core;
  std::vector<int64_t> load, evict;  // the core's preallocated plan buffers
  std::vector<int32_t> ids32;  // int64 ids narrowed for the cache and affinity calls
  py::array empty = empty_ids();
  std::mutex mutex;  // the core's scratch and ids32: one route at a time

  DemandSessionHandle(std::vector<py::object> objects, std::vector<moeray::ExpertCache*> caches,
                      std::vector<moeray::Affinity*> affinities, bool blended, double weight)
      : keep(std::move(objects)), core(std::move(caches), std::move(affinities), blended, weight),
        load(moeray::plan_entries(core.experts())), evict(moeray::plan_entries(core.experts())) {}
};

DemandSessionHandle* make_demand_session(const py::list& caches, const py::list& affinities,
                                         bool blended, double affinity_weight) {
  if (caches.empty()) throw py::value_error("caches: expected one ExpertCacheCore per layer");
  if (affinities.size() != caches.size())
    throw py::value_error("affinities: expected one per layer (" + std::to_string(caches.size()) +
                          "), got " + std::to_string(affinities.size()));
  if (!std::isfinite(affinity_weight))
    throw py::value_error("affinity_weight: expected a finite float");
  std::vector<py::object> keep;
  std::vector<moeray::ExpertCache*> cs;
  std::vector<moeray::Affinity*> as;
  for (size_t l = 0; l < caches.size(); ++l) {
    py::object c = caches[l], a = affinities[l];
    if (!py::isinstance<moeray::ExpertCache>(c))
      throw py::type_error("caches: expected ExpertCacheCore objects, got " + type_name(c));
    if (!py::isinstance<moeray::Affinity>(a))
      throw py::type_error("affinities: expected AffinityCore objects, got " + type_name(a));
    cs.push_back(&c.cast<moeray::ExpertCache&>());
    as.push_back(&a.cast<moeray::Affinity&>());
    if (cs.back()->num_experts() != cs[0]->num_experts() ||
        as.back()->num_experts() != cs[0]->num_experts())
      throw py::value_error("caches: every cache and affinity must track the same experts");
    keep.push_back(c);
    keep.push_back(a);
  }
  return new DemandSessionHandle(std::move(keep), std::move(cs), std::move(as), blended,
                                 std::clamp(affinity_weight, 0.0, 1.0));
}

py::tuple demand_route(DemandSessionHandle& self, int64_t layer, H ids_obj, int64_t budget) {
  moeray::DemandSession& core = self.core;
  check_layer(layer, core.layers());
  if (budget < 0) throw py::value_error("budget: expected an int >= 0, got " + std::to_string(budget));
  const py::array ids = check_route_ids(ids_obj, core.experts());
  const int64_t tokens = ids.shape(0), k = ids.shape(1);
  int64_t n_load = 0, n_evict = 0, prefetched = 0;
  {
    py::gil_scoped_release release;
    Lock lock_s(self.mutex);
    const int32_t* p = as_int32(ids, self.ids32);
    Lock lock(core.cache(layer).mutex);
    Lock lock_a(core.affinity(layer).mutex);
    prefetched = core.route(layer, p, tokens, k, budget, self.load.data(), n_load,
                            self.evict.data(), n_evict);
  }
  return py::make_tuple(ids_array(self.load.data(), n_load, self.empty),
                        ids_array(self.evict.data(), n_evict, self.empty), prefetched);
}

struct HotPlanHandle {
  py::array hot_array;  // PredictiveCaches' hot rows, read in place
  moeray::HotPlan core;
  std::vector<int64_t> out;  // load, evict, prefetch, prefetch_evict: plan_entries(E) each
  py::array empty = empty_ids();

  HotPlanHandle(py::array hot, int64_t layers, int64_t experts)
      : hot_array(std::move(hot)),
        core(static_cast<const bool*>(hot_array.data()), layers, experts),
        out(4 * moeray::plan_entries(experts)) {}
};

HotPlanHandle* make_hot_plan(H hot_obj) {
  if (!py::isinstance<py::array>(hot_obj))
    throw py::type_error("hot: expected a numpy bool array, got " + type_name(hot_obj));
  auto hot = py::reinterpret_borrow<py::array>(hot_obj);
  if (!py::isinstance<py::array_t<bool>>(hot))
    throw py::type_error("hot: expected dtype bool, got " + std::string(py::str(hot.dtype())));
  if (hot.ndim() != 2 || hot.shape(0) < 1 || hot.shape(1) < 1)
    throw py::value_error("hot: expected shape [layers, experts], got " +
                          std::string(py::str(hot.attr("shape"))));
  if (!(hot.flags() & py::array::c_style))
    throw py::value_error("hot: expected a C-contiguous array");
  return new HotPlanHandle(hot, hot.shape(0), hot.shape(1));
}

void hot_plan_before(HotPlanHandle& self, int64_t layer) {
  self.core.before(check_layer(layer, self.core.layers()));
}

py::tuple hot_plan_plan(HotPlanHandle& self, int64_t layer, H ids_obj) {
  moeray::HotPlan& core = self.core;
  check_layer(layer, core.layers());
  if (core.ready() != layer)
    throw py::value_error("layer: the hot rows before layer " + std::to_string(layer) +
                          " were not taken (before(layer) first)");
  const py::array ids = check_route_ids(ids_obj, core.experts());
  const int64_t E = moeray::plan_entries(core.experts());  // one buffer's stride
  int64_t n[4];
  int64_t* o = self.out.data();
  if (ids.itemsize() == 4)
    core.plan(layer, static_cast<const int32_t*>(ids.data()), ids.size(), o, o + E, o + 2 * E,
              o + 3 * E, n);
  else
    core.plan(layer, static_cast<const int64_t*>(ids.data()), ids.size(), o, o + E, o + 2 * E,
              o + 3 * E, n);
  const py::array& none = self.empty;
  return py::make_tuple(ids_array(o, n[0], none), ids_array(o + E, n[1], none),
                        ids_array(o + 2 * E, n[2], none), ids_array(o + 3 * E, n[3], none));
}

// Every layer's affinity of an engine session, updated with a batch's routing in one call (an
// update_batch call per layer from Python cost about 1 us each, and stacking the layers' ids
// for it as much again).
struct LayerAffinitiesHandle {
  std::vector<py::object> keep;  // the affinities the pointers point into
  std::vector<moeray::Affinity*> affinities;
  std::vector<int32_t> ids32;  // one layer's ids narrowed for update_rows
  std::mutex mutex;            // ids32: one update at a time
};

LayerAffinitiesHandle* make_layer_affinities(const py::list& affinities) {
  if (affinities.empty()) throw py::value_error("affinities: expected one AffinityCore per layer");
  std::vector<py::object> keep;
  std::vector<moeray::Affinity*> as;
  for (py::handle a : affinities) {
    if (!py::isinstance<moeray::Affinity>(a))
      throw py::type_error("affinities: expected AffinityCore objects, got " + type_name(a));
    as.push_back(&a.cast<moeray::Affinity&>());
    if (as.back()->num_experts() != as[0]->num_experts())
      throw py::value_error("affinities: every layer's must track the same experts");
    keep.push_back(py::reinterpret_borrow<py::object>(a));
  }
  return new LayerAffinitiesHandle{std::move(keep), std::move(as), {}, {}};
}

// rows: one array per layer, int32 or int64 [tokens, top_k], ids in [0, experts), all checked
// before any affinity changes; then each layer's update_batch, in layer order.
void layer_affinities_update(LayerAffinitiesHandle& self, H rows_obj) {
  if (!py::isinstance<py::list>(rows_obj))
    throw py::type_error("rows: expected a list of arrays, one per layer, got " +
                         type_name(rows_obj));
  const auto rows = py::reinterpret_borrow<py::list>(rows_obj);
  const size_t L = self.affinities.size();
  if (rows.size() != L)
    throw py::value_error("rows: expected one array per layer (" + std::to_string(L) + "), got " +
                          std::to_string(rows.size()));
  const int64_t experts = self.affinities[0]->num_experts();
  std::vector<py::array> checked;
  checked.reserve(L);
  for (py::handle r : rows) checked.push_back(check_route_ids(r, experts));
  py::gil_scoped_release release;
  Lock lock_s(self.mutex);
  for (size_t l = 0; l < L; ++l) {
    const py::array& ids = checked[l];
    const int32_t* p = as_int32(ids, self.ids32);
    moeray::Affinity& a = *self.affinities[l];
    Lock lock(a.mutex);
    a.update_rows(p, ids.shape(0), ids.shape(1));
  }
}

}  // namespace

void bind_session(py::module_& m) {
  py::class_<DemandSessionHandle>(
      m, "_DemandSession",
      "A demand policy's layers for the engine session (session.hpp's DemandSession over the "
      "given caches and affinities, which it alone uses from then on; the twin: "
      "moeray.native._reference.session).")
      .def(py::init(&make_demand_session), py::arg("caches"), py::arg("affinities"),
           py::arg("blended"), py::arg("affinity_weight"))
      .def("num_layers", [](DemandSessionHandle& s) { return s.core.layers(); })
      .def("num_experts", [](DemandSessionHandle& s) { return s.core.experts(); })
      .def("check",
           [](DemandSessionHandle& s, H ids) { check_route_ids(ids, s.core.experts()); },
           py::arg("ids"), "Raises what route would for these ids; changes nothing.")
      .def("route", &demand_route, py::arg("layer"), py::arg("ids"), py::arg("budget"),
           "Serves layer `layer`'s batch (ids int32 or int64 [tokens, top_k]) as "
           "DemandCaches.serve does, then prefetches `budget` experts by affinity; returns its "
           "plan (load, evict: int64 ids, ascending) and the number prefetched.");

  py::class_<LayerAffinitiesHandle>(
      m, "_LayerAffinities",
      "Every layer's AffinityCore of an engine session (the twin: "
      "moeray.native._reference.session).")
      .def(py::init(&make_layer_affinities), py::arg("affinities"))
      .def("update", &layer_affinities_update, py::arg("rows"),
           "A batch's routing, one array per layer (int32 or int64 [tokens, top_k]): each "
           "layer's update_batch, all checked first.");

  py::class_<HotPlanHandle>(
      m, "_HotPlan",
      "Plans from a predictive policy's hot rows (bool [layers, experts], read in place; the "
      "twin: moeray.native._reference.session).")
      .def(py::init(&make_hot_plan), py::arg("hot"))
      .def("check", [](HotPlanHandle& s, H ids) { check_route_ids(ids, s.core.experts()); },
           py::arg("ids"), "Raises what plan would for these ids; changes nothing.")
      .def("before", &hot_plan_before, py::arg("layer"),
           "Copies rows layer and layer + 1 of the hot rows (before layer `layer` is served).")
      .def("plan", &hot_plan_plan, py::arg("layer"), py::arg("ids"),
           "Once layer `layer` is served (ids: its batch's): its plan (load, evict, prefetch, "
           "prefetch_evict: int64 ids, ascending); keeps row layer + 1 as the next layer's "
           "before.");
}

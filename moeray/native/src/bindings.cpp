// pybind11 bindings of moeray's native core. Every argument is checked here, at the boundary,
// with the same exception types and messages as the pure-Python twin (_reference/); batch
// loops run with the GIL released and the object's mutex held (released before the GIL returns).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "affinity.hpp"
#include "expert_cache.hpp"
#include "matvec.hpp"
#include "placement.hpp"
#include "predict.hpp"
#include "prefetch.hpp"
#include "routing.hpp"

#ifndef MOERAY_VERSION  // set by CMakeLists.txt from pyproject.toml
#define MOERAY_VERSION "0+unknown"
#endif

namespace py = pybind11;
void bind_session(py::module_& m);  // bindings_session.cpp
using moeray::Affinity;
using moeray::ExpertCache;
using moeray::Prefetcher;

namespace {

using Lock = std::lock_guard<std::mutex>;

std::string type_name(const py::handle& obj) {
  return std::string(py::str(py::type::handle_of(obj).attr("__name__")));
}

// An int in [lo, hi], `expected` saying so in words. A bool is a mistake here, though
// pybind11's int caster takes it; an int too large for int64 is out of range, not an error.
int64_t check_int(const py::handle& obj, const std::string& name, int64_t lo, int64_t hi,
                  const std::string& expected) {
  if (PyBool_Check(obj.ptr()) || !PyIndex_Check(obj.ptr()))
    throw py::type_error(name + ": expected an int, got " + type_name(obj));
  const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0 || value < lo || value > hi)
    throw py::value_error(name + ": expected " + expected + ", got " + std::string(py::str(index)));
  return value;
}

int32_t check_num_experts(const py::handle& obj) {
  return static_cast<int32_t>(check_int(obj, "num_experts", 1, INT32_MAX, "an int in [1, 2**31)"));
}

// int32 [T, top_k], C-contiguous, ids in [0, num_experts): the batch contract.
// check_range=false leaves the id range to a kernel that validates while it counts.
py::array_t<int32_t> check_ids(const py::handle& obj, int32_t num_experts,
                               const char* name = "expert_ids", bool check_range = true) {
  const std::string arg(name);
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(arg + ": expected a numpy int32 array, got " + type_name(obj));
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
    // A branch-free pass the compiler vectorises (negative ids wrap to large unsigned ones);
    // the first bad id is looked for only when there is one.
    uint32_t out_of_range = 0;
    const uint32_t n = static_cast<uint32_t>(num_experts);
    for (int64_t i = 0; i < total; ++i) out_of_range |= static_cast<uint32_t>(p[i]) >= n;
    if (out_of_range != 0) {
      ok = false;
      for (int64_t i = 0; i < total; ++i) {
        if (static_cast<uint32_t>(p[i]) >= n) {
          bad = p[i];
          break;
        }
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
    throw py::type_error("weights: expected a numpy float32 array, got " + type_name(weights));
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

// -- expert_matvec: every argument checked here, so the kernel (matvec.hpp) reads in bounds --

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t d = 0; d < shape.size(); ++d) text += (d ? ", " : "") + std::to_string(shape[d]);
  return text + "]";
}

std::vector<int64_t> shape_of(const py::array& arr) {
  return std::vector<int64_t>(arr.shape(), arr.shape() + arr.ndim());
}

// A numpy array of `dtype` and `shape`, C-contiguous; `label` names it in errors, `note`
// follows the expected dtype and shape (" for BF16"), `shape_note` the shape only.
py::array check_array(const py::handle& obj, const std::string& label, const std::string& dtype,
                      const std::vector<int64_t>& shape, const std::string& note,
                      const std::string& shape_note = "") {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(label + ": expected a numpy " + dtype + " array, got " + type_name(obj));
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().equal(py::dtype(dtype)))
    throw py::type_error(label + ": expected dtype " + dtype + note + ", got " +
                         std::string(py::str(arr.dtype())));
  if (shape_of(arr) != shape)
    throw py::value_error(label + ": expected shape " + shape_text(shape) + note + shape_note +
                          ", got " +
                          shape_text(shape_of(arr)));
  if (!(arr.flags() & py::array::c_style))
    throw py::value_error(label + ": expected a C-contiguous array");
  return arr;
}

struct Role {
  const char* name;
  bool required;
  bool bias;  // a vector [cols]; float formats only
  int64_t rows, cols;
};

// The roles of a layout with their logical shapes (matvec.hpp's WeightMatrix rows and cols).
std::vector<Role> layout_roles(bool swiglu, int64_t hidden, int64_t inter) {
  if (swiglu)
    return {{"gate", true, false, inter, hidden}, {"up", true, false, inter, hidden},
            {"down", true, false, hidden, inter}};
  return {{"gate_up", true, false, hidden, 2 * inter}, {"down", true, false, inter, hidden},
          {"gate_up_bias", false, true, 1, 2 * inter}, {"down_bias", false, true, 1, hidden}};
}

// One (format, data, scales, block_size) tuple, checked against its role; `keep` holds the
// arrays alive while the kernel reads them without the GIL.
moeray::WeightMatrix check_weight(const py::handle& value, const Role& role,
                                  std::vector<py::array>& keep) {
  const std::string where = std::string("tensors['") + role.name + "']";
  if (!py::isinstance<py::tuple>(value))
    throw py::type_error(where + ": expected a tuple (format, data, scales, block_size), got " +
                         type_name(value));
  auto items = py::reinterpret_borrow<py::tuple>(value);
  if (items.size() != 4)
    throw py::value_error(where + ": expected 4 items (format, data, scales, block_size), got " +
                          std::to_string(items.size()));
  const py::object format_obj = items[0], data = items[1], scales = items[2], block = items[3];
  if (!PyUnicode_Check(format_obj.ptr()))
    throw py::type_error(where + ": format: expected a str, got " + type_name(format_obj));
  const std::string format = py::cast<std::string>(format_obj);
  static const std::pair<const char*, moeray::WeightFormat> kFormats[] = {
      {"F32", moeray::WeightFormat::kF32}, {"F16", moeray::WeightFormat::kF16},
      {"BF16", moeray::WeightFormat::kBf16}, {"TERNARY", moeray::WeightFormat::kTernary}};
  const size_t allowed = role.bias ? 3 : 4;  // a bias is never ternary
  size_t f = 0;
  while (f < allowed && format != kFormats[f].first) ++f;
  if (f == allowed)
    throw py::value_error(where + ": format: expected one of " +
                          (role.bias ? "F32, F16, BF16" : "F32, F16, BF16, TERNARY") + ", got " +
                          std::string(py::repr(format_obj)));
  const bool ternary = kFormats[f].second == moeray::WeightFormat::kTernary;
  const int64_t block_size =
      ternary ? check_int(block, where + ": block_size", 1, INT32_MAX,
                          "an int in [1, 2**31) for TERNARY")
              : check_int(block, where + ": block_size", 0, 0,
                          "0 for " + format + " (only TERNARY has blocks)");
  moeray::WeightMatrix w{kFormats[f].second, nullptr, nullptr, block_size, role.rows, role.cols};
  std::vector<int64_t> shape = role.bias ? std::vector<int64_t>{role.cols}
                                         : std::vector<int64_t>{role.rows, role.cols};
  static const char* kDtypes[] = {"float32", "float16", "uint16", "uint8"};
  if (ternary) {
    if (role.cols % 4 != 0)
      throw py::value_error(where + ": TERNARY packs 4 weights a byte along each row: cols must "
                            "be a multiple of 4, got " + std::to_string(role.cols));
    shape[1] = role.cols / 4;
  }
  keep.push_back(check_array(data, where + ": data", kDtypes[f], shape, " for " + format));
  w.data = static_cast<const uint8_t*>(keep.back().data());
  if (!ternary) {
    if (!scales.is_none())
      throw py::value_error(where + ": scales: expected None for " + format +
                            " (only TERNARY has scales), got " + type_name(scales));
    return w;
  }
  const int64_t blocks = (role.rows * role.cols + block_size - 1) / block_size;
  keep.push_back(check_array(scales, where + ": scales", "float32", {blocks}, "",
                             " (ceil(" + std::to_string(role.rows) + " * " +
                                 std::to_string(role.cols) + " / " + std::to_string(block_size) +
                                 "))"));
  w.scales = static_cast<const uint8_t*>(keep.back().data());
  return w;
}

py::array_t<float> expert_matvec(const py::handle& layout, const py::handle& hidden_size,
                                 const py::handle& intermediate_size, const py::handle& tensors,
                                 const py::handle& x) {
  if (!PyUnicode_Check(layout.ptr()))
    throw py::type_error("layout: expected 'swiglu' or 'gpt-oss', got " + type_name(layout));
  const std::string layout_name = py::cast<std::string>(layout);
  if (layout_name != "swiglu" && layout_name != "gpt-oss")
    throw py::value_error("layout: expected 'swiglu' or 'gpt-oss', got " +
                          std::string(py::repr(layout)));
  const bool swiglu = layout_name == "swiglu";
  const std::string size_range = "an int in [1, 2**31)";
  const int64_t hidden = check_int(hidden_size, "hidden_size", 1, INT32_MAX, size_range);
  const int64_t inter = check_int(intermediate_size, "intermediate_size", 1, INT32_MAX, size_range);

  if (!py::isinstance<py::array>(x))
    throw py::type_error("x: expected a numpy float32 array [T, hidden], got " + type_name(x));
  auto xa = py::reinterpret_borrow<py::array>(x);
  if (!xa.dtype().equal(py::dtype("float32")))
    throw py::type_error("x: expected dtype float32, got " + std::string(py::str(xa.dtype())));
  if (xa.ndim() != 2 || xa.shape(1) != hidden)
    throw py::value_error("x: expected shape [T, " + std::to_string(hidden) + "], got " +
                          shape_text(shape_of(xa)));
  if (!(xa.flags() & py::array::c_style))
    throw py::value_error("x: expected a C-contiguous array");
  const int64_t num_tokens = xa.shape(0);

  if (!py::isinstance<py::dict>(tensors))
    throw py::type_error("tensors: expected a dict of role -> (format, data, scales, "
                         "block_size), got " + type_name(tensors));
  auto by_role = py::reinterpret_borrow<py::dict>(tensors);
  const std::vector<Role> roles = layout_roles(swiglu, hidden, inter);
  std::string names;
  for (const Role& role : roles) names += (names.empty() ? "" : ", ") + std::string(role.name);
  for (const auto& item : by_role) {
    const bool known = PyUnicode_Check(item.first.ptr()) &&
                       std::any_of(roles.begin(), roles.end(), [&](const Role& role) {
                         return py::cast<std::string>(item.first) == role.name;
                       });
    if (!known)
      throw py::value_error("tensors: unexpected role " + std::string(py::repr(item.first)) +
                            " for layout '" + layout_name + "' (expected " + names + ")");
  }
  std::string required;
  for (const Role& role : roles)
    if (role.required) required += (required.empty() ? "" : ", ") + std::string(role.name);
  std::vector<py::array> keep;
  std::vector<moeray::WeightMatrix> weights;
  std::vector<bool> present;
  for (const Role& role : roles) {
    present.push_back(by_role.contains(role.name));
    if (!present.back()) {
      if (role.required)
        throw py::value_error(std::string("tensors: no '") + role.name + "' for layout '" +
                              layout_name + "' (it needs " + required + ")");
      weights.push_back({});
      continue;
    }
    const py::object value = by_role[role.name];
    weights.push_back(check_weight(value, role, keep));
  }

  py::array_t<float> out({num_tokens, hidden});
  if (num_tokens == 0) return out;
  const auto* x_bytes = static_cast<const uint8_t*>(xa.data());
  float* y = out.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<float> tokens(num_tokens * hidden);  // aligned: x may sit anywhere in a buffer
    std::memcpy(tokens.data(), x_bytes, tokens.size() * sizeof(float));
    if (swiglu) {
      moeray::swiglu_expert(weights[0], weights[1], weights[2], tokens.data(), num_tokens, y);
    } else {
      std::fill(y, y + num_tokens * hidden, 0.0f);
      moeray::gpt_oss_expert(weights[0], weights[1], present[2] ? &weights[2] : nullptr,
                             present[3] ? &weights[3] : nullptr, tokens.data(), num_tokens, y);
    }
  }
  return out;
}

// -- _PredictKernel: PredictiveCaches' state, checked once when the kernel is built, so that its
// steps (predict.hpp) read and write in bounds; a step checks only its token. The Python caller
// (moeray/policy/predict.py) passes its own arrays, so a failure here is a bug there; the
// messages name the argument and what was expected (as the twin's, _reference/predict.py).

const char* dtype_name(bool) { return "bool"; }
const char* dtype_name(int64_t) { return "int64"; }
const char* dtype_name(double) { return "float64"; }

// A C-contiguous numpy array of T and `shape`, writeable unless `read_only`, kept alive in `keep`
// (the kernel holds pointers into it and runs without the GIL).
template <typename T>
T* state_array(const py::handle& obj, const char* name, std::initializer_list<int64_t> shape,
               std::vector<py::array>& keep, bool read_only = false) {
  py::array arr = check_array(obj, name, dtype_name(T{}), std::vector<int64_t>(shape), "");
  if (!read_only && !arr.writeable())
    throw py::value_error(std::string(name) + ": expected a writeable array");
  keep.push_back(arr);
  return static_cast<T*>(const_cast<void*>(arr.data()));  // written only if writeable
}

// A 2-D numpy array whose shape is read from it (its dtype and layout checked afterwards).
std::vector<int64_t> shape_2d(const py::handle& obj, const std::string& label,
                              const std::string& dtype, const std::string& expected) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(label + ": expected a numpy " + dtype + " array, got " + type_name(obj));
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (arr.ndim() != 2)
    throw py::value_error(label + ": expected shape " + expected + ", got " +
                          shape_text(shape_of(arr)));
  return shape_of(arr);
}

// ids int64 [L, k], C-contiguous, each in [0, E).
const int64_t* check_token_ids(const py::handle& obj, const char* name, int64_t L, int64_t k,
                               int64_t E, std::vector<py::array>& keep) {
  const py::array arr = py::isinstance<py::array_t<int64_t>>(obj)
                            ? py::reinterpret_borrow<py::array>(obj)
                            : check_array(obj, name, "int64", {L, k}, "");
  if (arr.ndim() != 2 || arr.shape(0) != L || arr.shape(1) != k ||
      !(arr.flags() & py::array::c_style))
    check_array(obj, name, "int64", {L, k}, "");
  const auto* ids = static_cast<const int64_t*>(arr.data());
  for (int64_t i = 0; i < L * k; ++i)
    if (ids[i] < 0 || ids[i] >= E)
      throw py::value_error(std::string(name) + ": every id must be in [0, " + std::to_string(E) +
                            "), got " + std::to_string(ids[i]));
  keep.push_back(arr);
  return ids;
}

double config_float(const py::handle& obj, const std::string& name, double lo, double hi,
                    bool open, const char* expected) {
  if (PyBool_Check(obj.ptr()) || !(PyFloat_Check(obj.ptr()) || PyLong_Check(obj.ptr())))
    throw py::type_error(name + ": expected a float, got " + type_name(obj));
  const double x = py::cast<double>(obj);
  const bool inside = open ? (x > lo && x < hi) : (x >= lo && x <= hi);
  if (!std::isfinite(x) || !inside)
    throw py::value_error(name + ": expected " + expected + ", got " +
                          std::string(py::str(py::float_(x))));
  return x;
}

double check_scale(double x, const char* name) {
  if (!std::isfinite(x) || !(x > 0.0))
    throw py::value_error(std::string(name) + ": expected a finite float > 0, got " +
                          std::string(py::str(py::float_(x))));
  return x;
}

// The kernel and the arrays it points into, alive as long as it is.
class PredictKernelHandle {
 public:
  PredictKernelHandle(const moeray::PredictState& s, const moeray::PredictParams& c,
                      std::vector<py::array> arrays)
      : kernel(s, c), arrays_(std::move(arrays)) {}
  moeray::PredictKernel kernel;

 private:
  std::vector<py::array> arrays_;
};

using H = const py::handle&;

PredictKernelHandle* make_predict_kernel(
    H hot, H hot_count, H pending, H touch, H capacity, H resplit_out, H cross, H cross_n, H pair,
    H pair_n, H prev, H prev_n, H affinity, H hits, H stalls, H prefetches, H prefetch_hits,
    H wasted_prefetches, H evictions, H resplit_transfers, H predictor_hits, H predictor_guesses,
    H predictor_uses, H top_k, H prefetch_budget, H cross_weight, H previous_weight,
    H affinity_weight, H prefetch_margin, H prefetch_threshold, H keep_previous_weight,
    H keep_affinity_weight, H victim_next_weight, H victim_affinity_weight, H pair_prior,
    H affinity_decay) {
  const auto hot_shape = shape_2d(hot, "hot", "bool", "[num_layers, num_experts]");
  const int64_t L = hot_shape[0], E = hot_shape[1];
  if (L < 1 || E < 1 || E > INT32_MAX)
    throw py::value_error("hot: expected shape [num_layers, num_experts], each >= 1, got " +
                          shape_text(hot_shape));
  // the hashed pair index (triangular index * 2654435761) must not overflow int64
  if (E * (E + 1) / 2 > INT64_MAX / 2654435761LL)
    throw py::value_error("hot: at most 83,000 experts, got " + std::to_string(E));
  const int64_t k = check_int(top_k, "top_k", 1, E, "an int in [1, " + std::to_string(E) + "]");
  if (!py::isinstance<py::array>(pair))
    throw py::type_error("pair: expected a numpy float64 array, got " + type_name(pair));
  const auto pair_shape = shape_of(py::reinterpret_borrow<py::array>(pair));
  if (pair_shape.size() != 3)
    throw py::value_error("pair: expected shape [" + std::to_string(L) + ", buckets, " +
                          std::to_string(E) + "], got " + shape_text(pair_shape));
  const int64_t B = pair_shape[1];
  if (B > E * (E + 1) / 2 || (B > 0 && k < 2))
    throw py::value_error("pair: expected 0 buckets with top_k 1, else at most " +
                          std::to_string(E * (E + 1) / 2) + ", got " + std::to_string(B));
  const int64_t P =
      shape_2d(predictor_hits, "predictor_hits", "int64", "[predictors, num_layers]")[0];
  if (P < 4)
    throw py::value_error("predictor_hits: expected at least 4 predictors, got " +
                          std::to_string(P));

  std::vector<py::array> keep;
  moeray::PredictState s{};
  s.layers = L;
  s.experts = E;
  s.top_k = k;
  s.buckets = B;
  s.hot = state_array<bool>(hot, "hot", {L, E}, keep);
  s.hot_count = state_array<int64_t>(hot_count, "hot_count", {L}, keep);
  s.pending = state_array<bool>(pending, "pending", {L, E}, keep);
  s.touch = state_array<double>(touch, "touch", {L, E}, keep);
  s.capacity = state_array<int64_t>(capacity, "capacity", {L}, keep, /*read_only=*/true);
  s.resplit_out =
      resplit_out.is_none() ? nullptr : state_array<bool>(resplit_out, "resplit_out", {L, E}, keep);
  s.cross = state_array<double>(cross, "cross", {L, E, E}, keep);
  s.cross_n = state_array<double>(cross_n, "cross_n", {L, E}, keep);
  s.pair = state_array<double>(pair, "pair", {L, B, E}, keep);
  s.pair_n = state_array<double>(pair_n, "pair_n", {L, B}, keep);
  s.prev = state_array<double>(prev, "prev", {L, E, E}, keep);
  s.prev_n = state_array<double>(prev_n, "prev_n", {L, E}, keep);
  s.affinity = state_array<double>(affinity, "affinity", {L, E}, keep);
  s.hits = state_array<int64_t>(hits, "hits", {L}, keep);
  s.stalls = state_array<int64_t>(stalls, "stalls", {L}, keep);
  s.prefetches = state_array<int64_t>(prefetches, "prefetches", {L}, keep);
  s.prefetch_hits = state_array<int64_t>(prefetch_hits, "prefetch_hits", {L}, keep);
  s.wasted_prefetches = state_array<int64_t>(wasted_prefetches, "wasted_prefetches", {L}, keep);
  s.evictions = state_array<int64_t>(evictions, "evictions", {L}, keep);
  s.resplit_transfers = state_array<int64_t>(resplit_transfers, "resplit_transfers", {L}, keep);
  s.predictor_hits = state_array<int64_t>(predictor_hits, "predictor_hits", {P, L}, keep);
  s.predictor_guesses = state_array<int64_t>(predictor_guesses, "predictor_guesses", {P, L}, keep);
  s.predictor_uses = state_array<int64_t>(predictor_uses, "predictor_uses", {P, L}, keep);

  moeray::PredictParams c{};
  c.prefetch_budget = check_int(prefetch_budget, "prefetch_budget", 0, INT64_MAX, "an int >= 0");
  const double big = std::numeric_limits<double>::max();
  auto weight = [big](H obj, const char* name) {
    return config_float(obj, name, 0.0, big, false, "a float >= 0");
  };
  auto unit = [](H obj, const char* name) {
    return config_float(obj, name, 0.0, 1.0, false, "a float in [0, 1]");
  };
  c.cross_weight = weight(cross_weight, "cross_weight");
  c.previous_weight = weight(previous_weight, "previous_weight");
  c.affinity_weight = weight(affinity_weight, "affinity_weight");
  c.prefetch_margin = unit(prefetch_margin, "prefetch_margin");
  c.prefetch_threshold = unit(prefetch_threshold, "prefetch_threshold");
  c.keep_previous_weight = weight(keep_previous_weight, "keep_previous_weight");
  c.keep_affinity_weight = weight(keep_affinity_weight, "keep_affinity_weight");
  c.victim_next_weight = weight(victim_next_weight, "victim_next_weight");
  c.victim_affinity_weight = weight(victim_affinity_weight, "victim_affinity_weight");
  c.pair_prior = weight(pair_prior, "pair_prior");
  c.affinity_decay =
      config_float(affinity_decay, "affinity_decay", 0.0, 1.0, true, "a float in (0, 1)");
  return new PredictKernelHandle(s, c, std::move(keep));
}

// The token before a step, batch or window: None (none in this sequence) or int64 [L, k] in range,
// kept alive in `keep`.
const int64_t* check_last_ids(H last_ids_obj, const moeray::PredictState& s,
                              std::vector<py::array>& keep) {
  if (last_ids_obj.is_none()) return nullptr;
  return check_token_ids(last_ids_obj, "last_ids", s.layers, s.top_k, s.experts, keep);
}

void predict_kernel_step(PredictKernelHandle& self, H ids_obj, H last_ids_obj, H clock_obj,
                         double scale, double next_scale, double next_prev_scale) {
  const moeray::PredictState& s = self.kernel.state();
  std::vector<py::array> keep;  // the token's arrays, alive while the kernel reads them
  moeray::PredictToken t{};
  t.ids = check_token_ids(ids_obj, "ids", s.layers, s.top_k, s.experts, keep);
  t.last_ids = check_last_ids(last_ids_obj, s, keep);
  t.clock = check_int(clock_obj, "clock", 1, INT64_MAX, "an int >= 1");
  t.scale = check_scale(scale, "scale");
  t.next_scale = check_scale(next_scale, "next_scale");
  t.next_prev_scale = check_scale(next_prev_scale, "next_prev_scale");
  py::gil_scoped_release release;
  Lock lock(self.kernel.mutex);
  self.kernel.step(t);
}

// A 1-D numpy array of `dtype`, C-contiguous, of `n` entries (n < 0: its own length).
py::array check_vector(const py::handle& obj, const char* name, const char* dtype, int64_t n) {
  if (n < 0 && py::isinstance<py::array>(obj)) {
    const auto shape = shape_of(py::reinterpret_borrow<py::array>(obj));
    n = shape.size() == 1 ? shape[0] : 0;
  }
  return check_array(obj, name, dtype, {n}, "");
}

// The lazy-decay state passed in (PredictiveCaches' clock and scales, its config's decays).
moeray::PredictClock check_clock(H clock_obj, int64_t tokens, double scale, double prev_scale,
                                 double transition_decay, double previous_decay) {
  moeray::PredictClock clock{};
  clock.clock = check_int(clock_obj, "clock", 0, INT64_MAX - tokens, "an int >= 0");
  clock.scale = check_scale(scale, "scale");
  clock.prev_scale = check_scale(prev_scale, "prev_scale");
  if (!(transition_decay > 0.0 && transition_decay < 1.0))
    throw py::value_error("transition_decay: expected a float in (0, 1)");
  if (!(previous_decay > 0.0 && previous_decay < 1.0))
    throw py::value_error("previous_decay: expected a float in (0, 1)");
  clock.transition_decay = transition_decay;
  clock.previous_decay = previous_decay;
  return clock;
}

py::tuple predict_kernel_open_batch(PredictKernelHandle& self, H last_ids_obj,
                                    H new_sequence_obj, H clock_obj, double scale,
                                    double prev_scale, double transition_decay,
                                    double previous_decay, bool record) {
  moeray::PredictKernel& kernel = self.kernel;
  const moeray::PredictState& s = kernel.state();
  const py::array starts = check_vector(new_sequence_obj, "new_sequence", "bool", -1);
  const int64_t B = starts.shape(0);
  if (B < 1) throw py::value_error("new_sequence: expected at least one token, got 0");
  std::vector<py::array> keep;
  const int64_t* last = check_last_ids(last_ids_obj, s, keep);
  moeray::PredictClock clock =
      check_clock(clock_obj, B, scale, prev_scale, transition_decay, previous_decay);
  Lock lock(kernel.mutex);  // no wait: the kernel's calls release it before the GIL
  if (kernel.batch_open()) throw py::value_error("open_batch: a batch is open (close_batch first)");
  kernel.open_batch(B, static_cast<const bool*>(starts.data()), last, clock, record);
  return py::make_tuple(clock.clock, clock.scale, clock.prev_scale);
}

// Why layer `layer` cannot be served now ("" when it can); under the kernel's mutex.
std::string batch_layer_error(const moeray::PredictKernel& kernel, int64_t layer) {
  const int64_t L = kernel.state().layers, next = kernel.next_layer();
  if (!kernel.batch_open()) return "layer: no batch is open (open_batch first)";
  if (layer == next) return "";
  if (next >= L)
    return "layer: every layer of the batch is served, got " + std::to_string(layer) +
           " (close_batch next)";
  return "layer: expected " + std::to_string(next) + " (layers in order 0.." +
         std::to_string(L - 1) + " per batch), got " + std::to_string(layer);
}

void predict_kernel_serve_layer(PredictKernelHandle& self, int64_t layer, H ids_obj) {
  moeray::PredictKernel& kernel = self.kernel;
  const moeray::PredictState& s = kernel.state();
  int64_t B;
  {
    Lock lock(kernel.mutex);  // no wait: the kernel's calls release it before the GIL
    const std::string error = batch_layer_error(kernel, layer);
    if (!error.empty()) throw py::value_error(error);
    B = kernel.batch().tokens;
  }
  std::vector<py::array> keep;
  const int64_t k = s.top_k;
  const int64_t* ids = check_token_ids(ids_obj, "ids", B, k, s.experts, keep);
  std::string error;
  {
    py::gil_scoped_release release;
    Lock lock(kernel.mutex);
    error = batch_layer_error(kernel, layer);  // unchanged unless another thread served it
    if (error.empty() && kernel.batch().tokens == B) {
      int64_t* batch_ids = kernel.batch_ids();
      for (int64_t b = 0; b < B; ++b)
        std::copy(ids + b * k, ids + (b + 1) * k, batch_ids + (b * s.layers + layer) * k);
      kernel.serve_layer(layer);
    }
  }
  if (!error.empty()) throw py::value_error(error);
}

py::array_t<int64_t> predict_kernel_close_batch(PredictKernelHandle& self) {
  moeray::PredictKernel& kernel = self.kernel;
  const moeray::PredictState& s = kernel.state();
  Lock lock(kernel.mutex);
  if (!kernel.batch_open()) throw py::value_error("close_batch: no batch is open");
  if (kernel.next_layer() < s.layers)
    throw py::value_error("close_batch: layers " + std::to_string(kernel.next_layer()) + ".." +
                          std::to_string(s.layers - 1) + " of the batch not served");
  const int64_t* last = kernel.close_batch();
  py::array_t<int64_t> out({static_cast<py::ssize_t>(s.layers), static_cast<py::ssize_t>(s.top_k)});
  std::copy(last, last + s.layers * s.top_k, out.mutable_data());
  return out;
}

void predict_kernel_abort_batch(PredictKernelHandle& self) {
  Lock lock(self.kernel.mutex);
  if (!self.kernel.batch_open()) throw py::value_error("abort_batch: no batch is open");
  self.kernel.abort_batch();
}

py::array_t<int64_t> predict_kernel_take_events(PredictKernelHandle& self) {
  Lock lock(self.kernel.mutex);
  std::vector<int64_t>& events = self.kernel.events();
  const auto n = static_cast<py::ssize_t>(events.size() / 4);
  py::array_t<int64_t> out({n, static_cast<py::ssize_t>(4)});
  std::copy(events.begin(), events.end(), out.mutable_data());
  events.clear();
  return out;
}

py::tuple predict_kernel_run_window(PredictKernelHandle& self, H ids_obj, H new_sequence_obj,
                                    H last_ids_obj, H clock_obj, double scale, double prev_scale,
                                    double transition_decay, double previous_decay,
                                    H first_layer_obj) {
  moeray::PredictKernel& kernel = self.kernel;
  const moeray::PredictState& s = kernel.state();
  // ids [T, L, k]: T is the array's own
  std::vector<int64_t> want{0, s.layers, s.top_k};
  if (py::isinstance<py::array>(ids_obj)) {
    const auto got = shape_of(py::reinterpret_borrow<py::array>(ids_obj));
    if (got.size() == 3) want[0] = got[0];
  }
  const py::array ids_arr = check_array(ids_obj, "ids", "int64", want, "");
  const int64_t T = want[0];
  const auto* ids = static_cast<const int64_t*>(ids_arr.data());
  for (int64_t i = 0; i < T * s.layers * s.top_k; ++i)
    if (ids[i] < 0 || ids[i] >= s.experts)
      throw py::value_error("ids: every id must be in [0, " + std::to_string(s.experts) +
                            "), got " + std::to_string(ids[i]));
  const bool has_starts = !new_sequence_obj.is_none();
  py::array starts;  // a default py::array is an empty array, not a null handle
  if (has_starts) starts = check_vector(new_sequence_obj, "new_sequence", "bool", T);
  std::vector<py::array> keep;
  const int64_t* last = check_last_ids(last_ids_obj, s, keep);
  moeray::PredictClock clock =
      check_clock(clock_obj, T, scale, prev_scale, transition_decay, previous_decay);
  const int64_t first_layer = check_int(first_layer_obj, "first_layer", 0, s.layers - 1,
                                        "an int in [0, " + std::to_string(s.layers - 1) + "]");
  const bool* st = has_starts ? static_cast<const bool*>(starts.data()) : nullptr;
  bool open = false;
  {
    py::gil_scoped_release release;
    Lock lock(kernel.mutex);
    open = kernel.batch_open();
    if (!open) kernel.run_window(ids, T, st, last, clock, first_layer);
  }
  if (open) throw py::value_error("run_window: a batch is open (close_batch first)");
  return py::make_tuple(clock.clock, clock.scale, clock.prev_scale);
}

}  // namespace

// -- _stack_histogram: CapacitySplit's access counters, histogram and one chunk of routing,
// checked here so the kernel (routing.hpp) indexes in bounds.

// check_array, and writeable: an array the kernel updates in place.
py::array check_writeable(const py::handle& obj, const std::string& label,
                          const std::string& dtype, const std::vector<int64_t>& shape) {
  py::array arr = check_array(obj, label, dtype, shape, "");
  if (!arr.writeable()) throw py::value_error(label + ": expected a writeable array");
  return arr;
}

void stack_histogram(const py::handle& last_obj, const py::handle& histogram_obj,
                     const py::handle& ids_obj, int64_t counter, const py::handle& scales_obj) {
  const auto dims = shape_2d(last_obj, "last", "int64", "[layers, experts]");
  const int64_t L = dims[0], E = dims[1];
  if (L < 1 || E < 1)
    throw py::value_error("last: expected shape [layers, experts], each >= 1, got " +
                          shape_text(dims));
  py::array last = check_writeable(last_obj, "last", "int64", {L, E});
  py::array histogram = check_writeable(histogram_obj, "histogram", "float64", {L, E});
  // ids [tokens, L, top_k]: tokens and top_k (>= 1) are the array's own
  std::vector<int64_t> want{0, L, 1};
  if (py::isinstance<py::array>(ids_obj)) {
    const auto got = shape_of(py::reinterpret_borrow<py::array>(ids_obj));
    if (got.size() == 3) want = {got[0], L, std::max<int64_t>(got[2], 1)};
  }
  py::array ids = check_array(ids_obj, "ids", "int64", want, "");
  const int64_t T = want[0], k = want[2];
  py::array scales = check_array(scales_obj, "scales", "float64", {T}, "");
  const auto* p = static_cast<const int64_t*>(ids.data());
  for (int64_t i = 0; i < T * L * k; ++i)
    if (p[i] < 0 || p[i] >= E)
      throw py::value_error("ids: every id must be in [0, " + std::to_string(E) + "), got " +
                            std::to_string(p[i]));
  if (counter < 0 || counter > INT64_MAX - T * k)
    throw py::value_error("counter: expected an int in [0, 2**63 - tokens * top_k), got " +
                          std::to_string(counter));
  auto* row = static_cast<int64_t*>(last.mutable_data());
  auto* hist = static_cast<double*>(histogram.mutable_data());
  const auto* scale = static_cast<const double*>(scales.data());
  py::gil_scoped_release release;
  moeray::stack_histogram(p, T, L, k, E, row, counter, scale, hist);
}

// -- placement kernels (placement.hpp): the twin's checks (_reference/placement.py), in its
// order and with its messages; the kernels then run with the GIL released.

namespace {

// A 2-d numpy array [layers, n] of T, C-contiguous, finite and >= 0: the twin's _check_matrix.
template <typename T>
py::array check_loads(const py::handle& obj, const std::string& name, const std::string& dtype) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name + ": expected a numpy " + dtype + " array, got " + type_name(obj));
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (arr.ndim() != 2)
    throw py::value_error(name + ": expected a 2-d array [layers, n], got " +
                          shape_text(shape_of(arr)));
  check_array(obj, name, dtype, shape_of(arr), "");
  const T* p = static_cast<const T*>(arr.data());
  const int64_t size = arr.size();
  bool finite = true, negative = false;
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < size; ++i) {
      finite &= std::isfinite(p[i]);
      negative |= p[i] < 0;
    }
  }
  if (!finite) throw py::value_error(name + ": every load must be finite (no NaN or inf)");
  if (negative)
    throw py::value_error(name + ": every load must be >= 0, got " +
                          std::string(py::str(arr.attr("min")())));
  return arr;
}

// The twin's as_float: anything with __float__ but a str or bytes.
double as_float(const py::handle& obj, const std::string& name) {
  if (PyUnicode_Check(obj.ptr()) || PyBytes_Check(obj.ptr()) || !py::hasattr(obj, "__float__"))
    throw py::type_error(name + ": expected a float, got " + type_name(obj));
  const auto value = py::reinterpret_steal<py::object>(PyNumber_Float(obj.ptr()));
  if (!value) throw py::error_already_set();
  return PyFloat_AsDouble(value.ptr());
}

// The length of a 1-d array as the twin reads it (shape[0]; 0 for a 0-d array), for the check
// of its shape; 0 for anything else, which check_array refuses by its type.
int64_t leading_dim(const py::handle& obj) {
  if (!py::isinstance<py::array>(obj)) return 0;
  auto arr = py::reinterpret_borrow<py::array>(obj);
  return arr.ndim() ? arr.shape(0) : 0;
}

// The twin's _check_slots: one layer's slots, int32 [S] on num_gpus GPUs, every expert of
// [0, num_experts) in at least one.
std::pair<py::array, int64_t> check_layer_slots(const py::handle& obj, const py::handle& num_gpus,
                                                int64_t num_experts) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error("slots: expected a numpy int32 array, got " + type_name(obj));
  py::array slots = check_array(obj, "slots", "int32", {leading_dim(obj)}, " [slots]");
  const int64_t gpus = check_int(num_gpus, "num_gpus", 1, INT32_MAX, "an int >= 1");
  const int64_t n = slots.shape(0);
  if (n == 0 || n % gpus != 0)
    throw py::value_error("num_gpus: " + std::to_string(n) + " slots do not divide over " +
                          std::to_string(gpus) + " GPUs");
  const auto* p = static_cast<const int32_t*>(slots.data());
  const auto [lo, hi] = std::minmax_element(p, p + n);
  if (*lo < -1 || *hi >= num_experts)
    throw py::value_error("slots: every slot must hold an expert in [0, " +
                          std::to_string(num_experts) + ") or be empty (-1)");
  bool every = num_experts <= n;  // more experts than slots: one has none
  if (every) {
    std::vector<char> held(num_experts, 0);
    for (int64_t s = 0; s < n; ++s)
      if (p[s] >= 0) held[p[s]] = 1;
    every = std::all_of(held.begin(), held.end(), [](char h) { return h != 0; });
  }
  if (!every) throw py::value_error("slots: every expert must hold at least one slot");
  return {slots, gpus};
}

py::tuple replicate(const py::handle& weight_obj, const py::handle& num_slots_obj) {
  py::array weight = check_loads<float>(weight_obj, "weight", "float32");
  const int64_t rows = weight.shape(0), n = weight.shape(1);
  if (rows && !n)
    throw py::value_error("weight: expected at least one expert per layer, got " +
                          shape_text(shape_of(weight)));
  const int64_t lo = std::max<int64_t>(n, 1);
  const int64_t num_slots = check_int(num_slots_obj, "num_slots", lo, INT32_MAX,
                                      "an int in [" + std::to_string(lo) + ", 2**31)");
  py::array_t<int32_t> phy({rows, num_slots}), rank({rows, num_slots}), counts({rows, n});
  const auto* w = static_cast<const float*>(weight.data());
  int32_t* pp = phy.mutable_data();
  int32_t* pr = rank.mutable_data();
  int32_t* pc = counts.mutable_data();
  {
    py::gil_scoped_release release;
    moeray::Replicator replicator;
    for (int64_t x = 0; x < rows; ++x)
      replicator.run(w + x * n, n, num_slots, pp + x * num_slots, pr + x * num_slots, pc + x * n);
  }
  return py::make_tuple(phy, rank, counts);
}

py::tuple pack(const py::handle& weight_obj, const py::handle& num_packs_obj,
               const py::handle& labels_obj) {
  py::array weight = check_loads<float>(weight_obj, "weight", "float32");
  const int64_t rows = weight.shape(0), n = weight.shape(1);
  const int64_t num_packs = check_int(num_packs_obj, "num_packs", 1, INT32_MAX, "an int >= 1");
  if (n % num_packs != 0)
    throw py::value_error("num_packs: " + std::to_string(n) + " items do not divide over " +
                          std::to_string(num_packs) + " packs");
  const int32_t* labels = nullptr;
  py::array labels_arr;
  if (!labels_obj.is_none()) {
    labels_arr = check_array(labels_obj, "labels", "int32", {rows, n}, " like weight");
    labels = static_cast<const int32_t*>(labels_arr.data());
  }
  py::array_t<int32_t> pack_out({rows, n}), rank({rows, n});
  const auto* w = static_cast<const float*>(weight.data());
  int32_t* pp = pack_out.mutable_data();
  int32_t* pr = rank.mutable_data();
  {
    py::gil_scoped_release release;
    if (n / num_packs <= 1) {  // one item per pack: item i is pack i, as the published method has it
      for (int64_t x = 0; x < rows; ++x) {
        for (int64_t i = 0; i < n; ++i) {
          pp[x * n + i] = static_cast<int32_t>(i);
          pr[x * n + i] = 0;
        }
      }
    } else {
      moeray::Packer packer;
      for (int64_t x = 0; x < rows; ++x)
        packer.run(w + x * n, labels ? labels + x * n : nullptr, n, num_packs, pp + x * n,
                   pr + x * n);
    }
  }
  return py::make_tuple(pack_out, rank);
}

py::array_t<int32_t> improve(const py::handle& slots_obj, const py::handle& load_obj,
                             const py::handle& num_gpus_obj, const py::handle& gpus_per_node_obj,
                             const py::handle& budget_obj, const py::handle& candidates_obj,
                             const py::handle& min_gain_obj, const py::handle& node_cost_obj) {
  if (!py::isinstance<py::array>(slots_obj))
    throw py::type_error("slots: expected a numpy int32 array, got " + type_name(slots_obj));
  py::array load = check_loads<double>(load_obj, "load", "float64");
  const int64_t rows = load.shape(0), num_experts = load.shape(1);
  const auto slots_arr = py::reinterpret_borrow<py::array>(slots_obj);
  const int64_t width = slots_arr.ndim() ? slots_arr.shape(slots_arr.ndim() - 1) : 0;
  py::array slots = check_array(slots_obj, "slots", "int32", {rows, width}, " [layers, slots]");
  if (!slots.writeable()) throw py::value_error("slots: expected a writeable array");
  const int64_t num_slots = width;
  const int64_t num_gpus = check_int(num_gpus_obj, "num_gpus", 1, INT32_MAX, "an int >= 1");
  if (num_slots % num_gpus != 0)
    throw py::value_error("num_gpus: " + std::to_string(num_slots) + " slots do not divide over " +
                          std::to_string(num_gpus) + " GPUs");
  const int64_t gpus_per_node =
      check_int(gpus_per_node_obj, "gpus_per_node", 1, INT32_MAX, "an int >= 1");
  if (num_gpus % gpus_per_node != 0)
    throw py::value_error("gpus_per_node: " + std::to_string(num_gpus) +
                          " GPUs do not divide into nodes of it");
  const int64_t budget = check_int(budget_obj, "budget", 0, INT32_MAX, "an int >= 0");
  const int64_t candidates = check_int(candidates_obj, "candidates", 1, INT32_MAX, "an int >= 1");
  const double min_gain = as_float(min_gain_obj, "min_gain");
  const double node_cost = as_float(node_cost_obj, "node_cost");
  if (!(min_gain >= 0 && node_cost >= 1))
    throw py::value_error("min_gain must be >= 0 and node_cost >= 1");
  auto* row = static_cast<int32_t*>(slots.mutable_data());
  const int64_t total = rows * num_slots;
  if (total > 0) {
    const auto [lo, hi] = std::minmax_element(row, row + total);
    if (*lo < -1 || *hi >= num_experts)
      throw py::value_error("slots: every slot must hold an expert in [0, " +
                            std::to_string(num_experts) + ") or be empty (-1)");
  }
  py::array_t<int32_t> moved(rows);
  int32_t* out = moved.mutable_data();
  std::fill(out, out + rows, 0);
  if (num_slots == 0) return moved;  // nothing to move
  const auto* mu = static_cast<const double*>(load.data());
  {
    py::gil_scoped_release release;
    moeray::Improver improver(num_slots, num_experts, num_gpus, gpus_per_node, budget, candidates,
                              min_gain, node_cost);
    for (int64_t x = 0; x < rows; ++x)
      out[x] = improver.run(row + x * num_slots, mu + x * num_experts);
  }
  return moved;
}

py::array_t<int64_t> dispatch_allocation(const py::handle& counts_obj, const py::handle& slots_obj,
                                         const py::handle& num_gpus_obj) {
  if (!py::isinstance<py::array>(counts_obj))
    throw py::type_error("counts: expected a numpy int64 array, got " + type_name(counts_obj));
  py::array counts = check_array(counts_obj, "counts", "int64", {leading_dim(counts_obj)}, "");
  const int64_t num_experts = counts.shape(0);
  const auto* c = static_cast<const int64_t*>(counts.data());
  if (num_experts && *std::min_element(c, c + num_experts) < 0)
    throw py::value_error("counts: every count must be >= 0");
  uint64_t sum = 0;  // each count < 2**63: no wrap before the test stops the sum
  for (int64_t e = 0; e < num_experts && sum <= (uint64_t{1} << 62); ++e)
    sum += static_cast<uint64_t>(c[e]);
  if (sum > (uint64_t{1} << 62))
    throw py::value_error("counts: the counts must sum to at most 2**62");
  auto [slots, num_gpus] = check_layer_slots(slots_obj, num_gpus_obj, num_experts);
  const int64_t num_slots = slots.shape(0);
  py::array_t<int64_t> alloc(num_slots);
  const auto* p = static_cast<const int32_t*>(slots.data());
  int64_t* out = alloc.mutable_data();
  {
    py::gil_scoped_release release;
    moeray::Allocation allocation(p, num_slots, num_gpus, num_experts);
    allocation.run(c, out);
  }
  return alloc;
}

py::tuple dispatch(const py::handle& expert_ids, const py::handle& weights_obj,
                   const py::handle& slots_obj, const py::handle& num_gpus_obj,
                   const py::handle& num_experts_obj, const py::handle& token_nodes_obj,
                   const py::handle& gpus_per_node_obj) {
  const int32_t num_experts = check_num_experts(num_experts_obj);
  auto ids = check_ids(expert_ids, num_experts, "expert_ids", /*check_range=*/false);
  const int64_t num_tokens = ids.shape(0), top_k = ids.shape(1), total = ids.size();
  py::array weights;
  try {
    weights = check_array(weights_obj, "weights", "float32", {num_tokens, top_k}, " like expert_ids");
  } catch (...) {
    check_ids(ids, num_experts);  // an id out of range is named first, as the twin does
    throw;
  }
  const int32_t* pi = ids.data();
  const auto* pw = static_cast<const float*>(weights.data());
  bool ok;
  {
    py::gil_scoped_release release;
    ok = moeray::batch_ok(pi, pw, total, num_experts);
  }
  if (!ok) {
    check_ids(ids, num_experts);  // names the first bad id, if that is what failed
    throw py::value_error("weights: every weight must be finite (no NaN or inf)");
  }
  if (num_tokens > INT32_MAX)
    throw py::value_error("expert_ids: at most 2**31 - 1 tokens per call");
  auto [slots, num_gpus] = check_layer_slots(slots_obj, num_gpus_obj, num_experts);
  const int64_t gpus_per_node =
      check_int(gpus_per_node_obj, "gpus_per_node", 1, INT32_MAX, "an int >= 1");
  if (num_gpus % gpus_per_node != 0)
    throw py::value_error("gpus_per_node: " + std::to_string(num_gpus) +
                          " GPUs do not divide into nodes of it");
  py::array token_nodes;
  const int32_t* pn = nullptr;
  if (!token_nodes_obj.is_none()) {
    token_nodes = check_array(token_nodes_obj, "token_nodes", "int32", {num_tokens}, " [T]");
    pn = static_cast<const int32_t*>(token_nodes.data());
    const int64_t num_nodes = num_gpus / gpus_per_node;
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (pn[t] < 0 || pn[t] >= num_nodes)
        throw py::value_error("token_nodes: every node must be in [0, " +
                              std::to_string(num_nodes) + ")");
    }
  }
  const int64_t num_slots = slots.shape(0);
  py::array_t<int64_t> offsets(num_gpus + 1);
  py::array_t<int32_t> token_indices(total), slot_indices(total);
  py::array_t<float> out_weights(total);
  const auto* ps = static_cast<const int32_t*>(slots.data());
  int64_t* po = offsets.mutable_data();
  int32_t* pt = token_indices.mutable_data();
  int32_t* pz = slot_indices.mutable_data();
  float* pv = out_weights.mutable_data();
  {
    py::gil_scoped_release release;
    moeray::dispatch(pi, pw, num_tokens, top_k, ps, num_slots, num_gpus, num_experts, po, pt, pz,
                     pv, pn, gpus_per_node);
  }
  return py::make_tuple(offsets, token_indices, slot_indices, out_weights);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "moeray's native core (C++17): expert cache, affinity, scheduling, Belady, expert matvec, placement.";
  m.attr("__version__") = MOERAY_VERSION;  // pyproject.toml's, passed by the build
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
             a.update_rows(p, rows, k);
           },
           py::arg("expert_ids"))
      .def("score", [](const Affinity& a, int64_t e) { return a.score(e); }, py::arg("expert_id"))
      .def("scores",
           [](const Affinity& a) {
             const std::vector<double> scores = a.scores();  // the reads of the lazy form
             return py::array_t<double>(a.num_experts(), scores.data());
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
      .def("file_array",
           [](py::object self, int64_t file) {
             const Prefetcher& p = self.cast<const Prefetcher&>();
             if (file < 0 || file >= p.num_files())
               throw py::value_error("file: expected an index in [0, " +
                                     std::to_string(p.num_files()) + "), got " + std::to_string(file));
             const int64_t n = p.file_size(static_cast<int32_t>(file));
             if (n == 0) return py::array_t<uint8_t>(0);
             // a read-only view of this prefetcher's own mapping, keeping the prefetcher alive
             py::array_t<uint8_t> out({n}, {int64_t{1}},
                                      reinterpret_cast<const uint8_t*>(p.data(static_cast<int32_t>(file))),
                                      self);
             out.attr("setflags")(py::arg("write") = false);
             return out;
           },
           py::arg("file"))
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

  py::class_<PredictKernelHandle>(m, "_PredictKernel",
                                  "The moeray policy's kernel over the state arrays of one "
                                  "moeray.policy.predict.PredictiveCaches, checked once (the "
                                  "twin: moeray.native._reference.predict).")
      .def(py::init(&make_predict_kernel), py::arg("hot"), py::arg("hot_count"),
           py::arg("pending"), py::arg("touch"), py::arg("capacity"), py::arg("resplit_out"),
           py::arg("cross"), py::arg("cross_n"), py::arg("pair"), py::arg("pair_n"),
           py::arg("prev"), py::arg("prev_n"), py::arg("affinity"), py::arg("hits"),
           py::arg("stalls"), py::arg("prefetches"), py::arg("prefetch_hits"),
           py::arg("wasted_prefetches"), py::arg("evictions"), py::arg("resplit_transfers"),
           py::arg("predictor_hits"), py::arg("predictor_guesses"), py::arg("predictor_uses"),
           py::arg("top_k"), py::arg("prefetch_budget"), py::arg("cross_weight"),
           py::arg("previous_weight"), py::arg("affinity_weight"), py::arg("prefetch_margin"),
           py::arg("prefetch_threshold"), py::arg("keep_previous_weight"),
           py::arg("keep_affinity_weight"), py::arg("victim_next_weight"),
           py::arg("victim_affinity_weight"), py::arg("pair_prior"), py::arg("affinity_decay"))
      .def("step", &predict_kernel_step, py::arg("ids"), py::arg("last_ids"), py::arg("clock"),
           py::arg("scale"), py::arg("next_scale"), py::arg("next_prev_scale"),
           "One token without hints, the state updated in place.")
      .def("run_window", &predict_kernel_run_window, py::arg("ids"), py::arg("new_sequence"),
           py::arg("last_ids"), py::arg("clock"), py::arg("scale"), py::arg("prev_scale"),
           py::arg("transition_decay"), py::arg("previous_decay"), py::arg("first_layer"),
           "Tokens ids [T, L, top_k] without hints, as T steps, layers below first_layer "
           "routing only; returns (clock, scale, prev_scale) after them.")
      .def("open_batch", &predict_kernel_open_batch, py::arg("last_ids"),
           py::arg("new_sequence"), py::arg("clock"), py::arg("scale"), py::arg("prev_scale"),
           py::arg("transition_decay"), py::arg("previous_decay"), py::arg("record"),
           "Opens a batch of tokens served layer by layer, each token's clock and scales "
           "advanced as steps advance them; returns (clock, scale, prev_scale) after them.")
      .def("serve_layer", &predict_kernel_serve_layer, py::arg("layer"), py::arg("ids"),
           "Layer `layer` (the next in order) of every token of the batch: ids [B, top_k]; then "
           "the next layer's predictions and prefetches for the first token.")
      .def("take_events", &predict_kernel_take_events,
           "The plan events recorded since the last call: int64 [n, 4] rows (token, layer, "
           "expert, kind), kind 0 stall load, 1 prefetch load, 2 eviction.")
      .def("close_batch", &predict_kernel_close_batch,
           "Closes the batch (every layer served); returns its last token's ids [L, top_k].")
      .def("abort_batch", &predict_kernel_abort_batch,
           "Ends the batch without its layers not served yet (they never see its tokens).")
      .def("flush", [](PredictKernelHandle&) {},
           "Nothing to count: each step adds its predictor guesses at once (the twin queues "
           "them).");

  m.def("schedule", &schedule, py::arg("expert_ids"), py::arg("weights"), py::arg("num_experts"));
  m.def("belady_hits", &belady_hits, py::arg("expert_ids"), py::arg("num_experts"),
        py::arg("capacity"));
  m.def("_stack_histogram", &stack_histogram, py::arg("last"), py::arg("histogram"),
        py::arg("ids"), py::arg("counter"), py::arg("scales"),
        "Adds the LRU stack distances of a chunk of routing to a histogram, last and histogram "
        "updated in place (the twin: moeray.native._reference.routing._stack_histogram).");
  m.def("expert_matvec", &expert_matvec, py::arg("layout"), py::arg("hidden_size"),
        py::arg("intermediate_size"), py::arg("tensors"), py::arg("x"),
        "One expert's FFN over T tokens: x float32 [T, hidden] -> float32 [T, hidden], the "
        "weights read in place (the twin: moeray.native._reference.matvec).");
  m.def("_replicate", &replicate, py::arg("weight"), py::arg("num_slots"),
        "EPLB's replication, each layer's extra slots to the expert with the most load per copy "
        "(the twin: moeray.native._reference.placement._replicate).");
  m.def("_pack", &pack, py::arg("weight"), py::arg("num_packs"), py::arg("labels") = py::none(),
        "EPLB's balanced packing, labels spread over the packs "
        "(the twin: moeray.native._reference.placement._pack).");
  m.def("_improve", &improve, py::arg("slots"), py::arg("load"), py::arg("num_gpus"),
        py::arg("gpus_per_node"), py::arg("budget"), py::arg("candidates"), py::arg("min_gain"),
        py::arg("node_cost"),
        "moeray's incremental re-placement, slots rewritten in place "
        "(the twin: moeray.native._reference.placement._improve).");
  m.def("_dispatch_allocation", &dispatch_allocation, py::arg("counts"), py::arg("slots"),
        py::arg("num_gpus"),
        "The tokens each slot serves when a batch with these counts is dispatched "
        "(the twin: moeray.native._reference.placement._dispatch_allocation).");
  m.def("dispatch", &dispatch, py::arg("expert_ids"), py::arg("weights"), py::arg("slots"),
        py::arg("num_gpus"), py::arg("num_experts"), py::arg("token_nodes") = py::none(),
        py::arg("gpus_per_node") = 1,
        "One layer's batch onto the placement's replicas: the per-GPU CSR "
        "(the twin: moeray.native._reference.placement.dispatch).");
  bind_session(m);
}

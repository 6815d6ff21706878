// tqattn._tqattn: the nanobind layer over the C++ API. Arrays cross as DLPack / buffer-protocol
// views (numpy, PyTorch CPU/CUDA, MLX CPU), never copied; each entry point validates its arrays
// once, then calls the library with the GIL released. The friendlier API (framework detection,
// CUDA streams, mlx-vlm interop) lives in python/tqattn/*.py.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "cuda/cuda_backend.h"
#include "tqattn/tqattn.h"

namespace nb = nanobind;
using namespace nb::literals;

#ifdef TQATTN_HAVE_CLI
// tools/tqattn_main.cpp's main, renamed for this module by python/CMakeLists.txt.
int tqattn_cli_main(int argc, char** argv);
#endif

namespace tqattn::python {
namespace {

using InArray = nb::ndarray<nb::ro>;          // any dtype/device/strides; read only
using OutArray = nb::ndarray<>;               // writable
using Exported = nb::ndarray<nb::array_api>;  // buffer protocol + __dlpack__

// ---------------------------------------------------------------------------------------------
// Array conversion and validation.

std::string dtype_string(const nb::dlpack::dtype& t) {
  using nb::dlpack::dtype_code;
  std::ostringstream os;
  switch (static_cast<dtype_code>(t.code)) {
    case dtype_code::Int:
      os << "int";
      break;
    case dtype_code::UInt:
      os << "uint";
      break;
    case dtype_code::Float:
      os << "float";
      break;
    case dtype_code::Bfloat:
      os << "bfloat";
      break;
    case dtype_code::Complex:
      os << "complex";
      break;
    case dtype_code::Bool:
      os << "bool";
      return os.str();
    default:
      os << "dtype_code_" << static_cast<int>(t.code);
      break;
  }
  os << static_cast<int>(t.bits);
  if (t.lanes != 1) os << "x" << t.lanes;
  return os.str();
}

nb::dlpack::dtype to_dlpack(DType dtype) {
  using nb::dlpack::dtype_code;
  switch (dtype) {
    case DType::kFloat32:
      return nb::dtype<float>();
    case DType::kFloat16:
      return {static_cast<uint8_t>(dtype_code::Float), 16, 1};
    case DType::kBFloat16:
      return {static_cast<uint8_t>(dtype_code::Bfloat), 16, 1};
    case DType::kBool:
      return nb::dtype<bool>();
    case DType::kUInt32:
      return nb::dtype<uint32_t>();
    case DType::kInt32:
      return nb::dtype<int32_t>();
  }
  throw_invalid("dtype", "float32, float16, bfloat16, bool, uint32 or int32",
                static_cast<int>(dtype));
}

DType to_dtype(const nb::dlpack::dtype& t, const char* fn, const std::string& what) {
  using nb::dlpack::dtype_code;
  const auto code = static_cast<dtype_code>(t.code);
  if (t.lanes == 1) {
    if (code == dtype_code::Float && t.bits == 32) return DType::kFloat32;
    if (code == dtype_code::Float && t.bits == 16) return DType::kFloat16;
    if (code == dtype_code::Bfloat && t.bits == 16) return DType::kBFloat16;
    if (code == dtype_code::Bool && t.bits == 8) return DType::kBool;
    if (code == dtype_code::UInt && t.bits == 32) return DType::kUInt32;
    if (code == dtype_code::Int && t.bits == 32) return DType::kInt32;
  }
  throw_invalid(fn, what + " of dtype float32, float16, bfloat16, bool, uint32 or int32",
                dtype_string(t));
}

struct Device {
  DeviceType type = DeviceType::kCPU;
  int id = 0;
};

Device to_device(int device_type, int device_id, const char* fn, const std::string& what) {
  if (device_type == nb::device::cpu::value || device_type == nb::device::cuda_host::value ||
      device_type == nb::device::cuda_managed::value)
    return {DeviceType::kCPU, 0};
  if (device_type == nb::device::cuda::value) {
    if (!cuda::built())
      throw_runtime(fn, what,
                    " is a CUDA array, but this build of tqattn has no CUDA backend (reinstall "
                    "on a machine with nvcc: pip install .)");
    static const int devices = cuda::device_count();  // fixed for the process
    if (devices == 0)
      throw_runtime(fn, what, " is a CUDA array, but no CUDA device is visible to tqattn");
    return {DeviceType::kCUDA, device_id};
  }
  throw_invalid(fn, what + " on the CPU or a CUDA device",
                detail::concat("DLPack device type ", device_type));
}

template <typename Array>
std::vector<int64_t> shape_of(const Array& a) {
  std::vector<int64_t> shape(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) shape[i] = static_cast<int64_t>(a.shape(i));
  return shape;
}

template <typename Array>
std::string strides_string(const Array& a) {
  std::vector<int64_t> strides(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) strides[i] = a.stride(i);
  return "strides " + shape_string(strides) + " for shape " + shape_string(shape_of(a));
}

// Row-major contiguity (extent-1 axes may carry any stride, as frameworks leave them).
template <typename Array>
void check_contiguous(const Array& a, const char* fn, const std::string& what) {
  int64_t expected = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expected)
      throw_invalid(fn,
                    what +
                        " contiguous in row-major order (copy it first, e.g. "
                        "np.ascontiguousarray / tensor.contiguous())",
                    strides_string(a));
    expected *= static_cast<int64_t>(a.shape(i));
  }
}

template <typename Array>
TensorView to_view(const Array& a, const char* fn, const std::string& what) {
  check_contiguous(a, fn, what);
  TensorView v;
  v.data = const_cast<void*>(static_cast<const void*>(a.data()));
  v.dtype = to_dtype(a.dtype(), fn, what);
  v.shape = shape_of(a);
  const Device d = to_device(a.device_type(), a.device_id(), fn, what);
  v.device = d.type;
  v.device_id = d.id;
  return v;
}

// Exports memory that `owner` keeps alive as an array (buffer protocol + DLPack).
Exported export_array(void* data, DType dtype, const std::vector<int64_t>& shape,
                      const std::vector<int64_t>& strides, DeviceType device, int device_id,
                      nb::handle owner) {
  std::vector<size_t> extents(shape.begin(), shape.end());
  const int device_type =
      device == DeviceType::kCUDA ? nb::device::cuda::value : nb::device::cpu::value;
  return Exported(data, extents.size(), extents.data(), owner, strides.data(), to_dlpack(dtype),
                  device_type, device_id);
}

std::vector<int64_t> row_major_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

template <typename T>
nb::capsule owning_capsule(T* ptr) {
  return nb::capsule(ptr, [](void* p) noexcept { delete static_cast<T*>(p); });
}

// A fresh CPU array owned by Python.
template <typename T>
nb::ndarray<nb::numpy, T> new_numpy(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t e : shape) n *= e;
  auto* buffer = new std::vector<T>(static_cast<size_t>(n));
  nb::capsule owner = owning_capsule(buffer);
  std::vector<size_t> extents(shape.begin(), shape.end());
  return nb::ndarray<nb::numpy, T>(buffer->data(), extents.size(), extents.data(), owner);
}

template <typename T>
std::vector<T> to_vector(
    const std::optional<nb::ndarray<const T, nb::c_contig, nb::device::cpu>>& a) {
  if (!a) return {};
  const T* p = a->data();
  return std::vector<T>(p, p + a->size());
}

QuantMode parse_mode(const std::string& mode, const char* fn) {
  if (mode == "mse") return QuantMode::kMse;
  if (mode == "prod") return QuantMode::kProd;
  throw_invalid(fn, "mode \"mse\" or \"prod\"", "\"" + mode + "\"");
}

const char* mode_name(QuantMode mode) { return mode == QuantMode::kProd ? "prod" : "mse"; }

// Codecs and quantizers cross to Python inside these holders, never as shared_ptr parameters:
// nanobind's shared_ptr caster would hand C++ a pointer that owns a Python reference, and C++
// objects (caches, capsules of quantized planes) that outlive the interpreter's view of them
// would then pin Python objects.
struct CodecRef {
  std::shared_ptr<const Codec> ptr;
};
struct QuantizerRef {
  std::shared_ptr<const TensorQuantizer> ptr;
};

// ---------------------------------------------------------------------------------------------
// Quantized states built from Python arrays (or from a cache), with what keeps their memory alive.

struct States {
  QuantizedStates view;
  std::vector<InArray> arrays;         // imported arrays: each holds its source alive
  std::vector<nb::object> keep_alive;  // e.g. the cache whose storage the view reads
};

// Per part: (indices, norms, residual_norms, qjl_signs), the last two None for MSE.
using PartArrays = std::tuple<InArray, InArray, std::optional<InArray>, std::optional<InArray>>;

struct PlaneSpec {
  const char* name;
  DType dtype;
  int64_t width;  // trailing extent; 0 = the plane has no trailing axis (norms)
};

// Validates one plane [B, H, T(, W)] that may be a token-range view of a [B, H, Tcap(, W)]
// buffer, and returns Tcap (or -1 when B = H = 1 leaves it undetermined).
int64_t check_plane(const InArray& a, const PlaneSpec& spec, int64_t batch, int64_t heads,
                    int64_t tokens, const Device& device, const char* fn, const std::string& part) {
  const std::string what = part + spec.name;
  const size_t rank = spec.width > 0 ? 4 : 3;
  std::vector<int64_t> expected = {batch, heads, tokens};
  if (spec.width > 0) expected.push_back(spec.width);
  if (a.ndim() != rank || shape_of(a) != expected)
    throw_invalid(fn, what + " of shape " + shape_string(expected), shape_string(shape_of(a)));
  const DType dtype = to_dtype(a.dtype(), fn, what);
  if (dtype != spec.dtype)
    throw_invalid(fn, what + " of dtype " + dtype_name(spec.dtype), dtype_name(dtype));
  const Device d = to_device(a.device_type(), a.device_id(), fn, what);
  if (d.type != device.type || d.id != device.id)
    throw_invalid(fn, what + " on the same device as the other planes",
                  detail::concat(device_name(d.type), ":", d.id));
  const int64_t row = spec.width > 0 ? spec.width : 1;
  const bool ok_inner = spec.width <= 1 || a.stride(3) == 1;
  const bool ok_token = tokens <= 1 || a.stride(2) == row;
  int64_t capacity = -1;
  bool ok_outer = true;
  if (heads > 1) {
    if (a.stride(1) % row != 0 || a.stride(1) / row < tokens) ok_outer = false;
    capacity = a.stride(1) / row;
    if (batch > 1 && a.stride(0) != heads * capacity * row) ok_outer = false;
  } else if (batch > 1) {
    if (a.stride(0) % row != 0 || a.stride(0) / row < tokens) ok_outer = false;
    capacity = a.stride(0) / row;
  }
  if (!ok_inner || !ok_token || !ok_outer)
    throw_invalid(fn,
                  what + " row-major, or a token-range view of a row-major [B, H, capacity" +
                      (spec.width > 0 ? ", W]" : "]") + " buffer",
                  strides_string(a));
  return capacity;
}

std::shared_ptr<States> make_states(const std::shared_ptr<const TensorQuantizer>& quantizer,
                                    const std::vector<PartArrays>& parts,
                                    std::optional<std::vector<int64_t>> lengths) {
  const char* fn = "States";
  const auto& qparts = quantizer->parts();
  if (parts.size() != qparts.size())
    throw_invalid(fn, detail::concat(qparts.size(), " part(s) of planes for this quantizer"),
                  parts.size());
  auto states = std::make_shared<States>();
  QuantizedStates& view = states->view;
  view.quantizer = quantizer;
  const InArray& first_norms = std::get<1>(parts[0]);
  if (first_norms.ndim() != 3)
    throw_invalid(fn, "norms of shape [B, H, T]", shape_string(shape_of(first_norms)));
  view.batch = static_cast<int64_t>(first_norms.shape(0));
  view.heads = static_cast<int64_t>(first_norms.shape(1));
  const int64_t tokens = static_cast<int64_t>(first_norms.shape(2));
  const Device device = to_device(first_norms.device_type(), first_norms.device_id(), fn, "norms");
  view.device = device.type;
  view.device_id = device.id;
  int64_t capacity = -1;
  auto merge_capacity = [&](int64_t c, const std::string& what) {
    if (c < 0) return;
    if (capacity >= 0 && c != capacity)
      throw_invalid(
          fn, detail::concat(what, " with the token capacity of the other planes (", capacity, ")"),
          c);
    capacity = c;
  };
  for (size_t p = 0; p < parts.size(); ++p) {
    const Codec& codec = *qparts[p].codec;
    const bool prod = codec.mode() == QuantMode::kProd;
    const std::string label = parts.size() > 1 ? detail::concat("part ", p, " ") : std::string();
    const auto& [indices, norms, residual_norms, qjl_signs] = parts[p];
    PackedPlanes planes;
    merge_capacity(check_plane(indices, {"indices", DType::kUInt32, codec.index_words()},
                               view.batch, view.heads, tokens, device, fn, label),
                   label + "indices");
    planes.indices = static_cast<uint32_t*>(const_cast<void*>(indices.data()));
    merge_capacity(check_plane(norms, {"norms", DType::kFloat16, 0}, view.batch, view.heads, tokens,
                               device, fn, label),
                   label + "norms");
    planes.norms = static_cast<uint16_t*>(const_cast<void*>(norms.data()));
    states->arrays.push_back(indices);
    states->arrays.push_back(norms);
    if (prod != residual_norms.has_value() || prod != qjl_signs.has_value())
      throw_invalid(fn,
                    label + (prod ? "residual_norms and qjl_signs for a prod codec"
                                  : "no residual_norms or qjl_signs for an mse codec"),
                    detail::concat(residual_norms ? "residual_norms " : "",
                                   qjl_signs ? "qjl_signs" : "", prod ? "missing" : ""));
    if (prod) {
      merge_capacity(check_plane(*residual_norms, {"residual_norms", DType::kFloat16, 0},
                                 view.batch, view.heads, tokens, device, fn, label),
                     label + "residual_norms");
      merge_capacity(check_plane(*qjl_signs, {"qjl_signs", DType::kUInt32, sign_words(codec.dim())},
                                 view.batch, view.heads, tokens, device, fn, label),
                     label + "qjl_signs");
      planes.residual_norms = static_cast<uint16_t*>(const_cast<void*>(residual_norms->data()));
      planes.qjl_signs = static_cast<uint32_t*>(const_cast<void*>(qjl_signs->data()));
      states->arrays.push_back(*residual_norms);
      states->arrays.push_back(*qjl_signs);
    }
    // Later parts' leading shapes must match the first's.
    if (static_cast<int64_t>(norms.shape(0)) != view.batch ||
        static_cast<int64_t>(norms.shape(1)) != view.heads)
      throw_invalid(fn, "every part with the same [B, H]", shape_string(shape_of(norms)));
    view.parts.push_back(planes);
  }
  view.capacity = capacity >= 0 ? capacity : tokens;
  if (lengths) {
    if (static_cast<int64_t>(lengths->size()) != view.batch)
      throw_invalid(fn, detail::concat(view.batch, " lengths (one per sequence)"), lengths->size());
    for (int64_t len : *lengths)
      if (len < 0 || len > tokens)
        throw_invalid(fn, detail::concat("lengths in [0, ", tokens, "]"), len);
    view.lengths = *lengths;
  } else {
    view.lengths.assign(static_cast<size_t>(view.batch), tokens);
  }
  return states;
}

// Flat variant for Codec.dequantize: planes [..., W] of any leading shape, contiguous, read as
// B = H = 1 and T = the product of the leading extents.
std::shared_ptr<States> make_flat_states(const CodecRef& codec, const PartArrays& part) {
  const char* fn = "Codec.dequantize";
  auto quantizer = std::make_shared<const TensorQuantizer>(TensorQuantizer::uniform(codec.ptr));
  const auto& [indices, norms, residual_norms, qjl_signs] = part;
  const std::vector<int64_t> lead = shape_of(norms);
  int64_t n = 1;
  for (int64_t e : lead) n *= e;
  auto flat = [&](const InArray& a, const char* name, int64_t width) {
    check_contiguous(a, fn, name);
    std::vector<int64_t> expected = lead;
    if (width > 0) expected.push_back(width);
    if (shape_of(a) != expected)
      throw_invalid(fn, std::string(name) + " of shape " + shape_string(expected),
                    shape_string(shape_of(a)));
    std::vector<size_t> shape = {1, 1, static_cast<size_t>(n)};
    if (width > 0) shape.push_back(static_cast<size_t>(width));
    return InArray(a.data(), shape.size(), shape.data(), nb::handle(), nullptr, a.dtype(),
                   a.device_type(), a.device_id());
  };
  const Codec& c = *quantizer->parts()[0].codec;
  PartArrays reshaped{
      flat(indices, "indices", c.index_words()), flat(norms, "norms", 0),
      residual_norms ? std::optional<InArray>(flat(*residual_norms, "residual_norms", 0))
                     : std::nullopt,
      qjl_signs ? std::optional<InArray>(flat(*qjl_signs, "qjl_signs", sign_words(c.dim())))
                : std::nullopt};
  auto states = make_states(quantizer, {reshaped}, std::nullopt);
  // The reshaped views do not own their memory: keep the caller's arrays.
  states->arrays.push_back(indices);
  states->arrays.push_back(norms);
  if (residual_norms) states->arrays.push_back(*residual_norms);
  if (qjl_signs) states->arrays.push_back(*qjl_signs);
  return states;
}

// Exports the planes of `view` ([B, H, lengths-max] of capacity `view.capacity`) as arrays kept
// alive by `owner`. `lead` replaces [B, H, T] when given (flat codec results).
nb::list export_planes(const QuantizedStates& view, int64_t tokens, nb::handle owner,
                       const std::optional<std::vector<int64_t>>& lead = std::nullopt) {
  nb::list out;
  const int64_t cap = view.capacity;
  for (size_t p = 0; p < view.parts.size(); ++p) {
    const Codec& codec = *view.quantizer->parts()[p].codec;
    const PackedPlanes& planes = view.parts[p];
    auto plane = [&](void* data, DType dtype, int64_t width) -> nb::object {
      if (!data) return nb::none();
      std::vector<int64_t> shape, strides;
      if (lead) {
        shape = *lead;
        if (width > 0) shape.push_back(width);
        strides = row_major_strides(shape);
      } else {
        const int64_t row = width > 0 ? width : 1;
        shape = {view.batch, view.heads, tokens};
        strides = {view.heads * cap * row, cap * row, row};
        if (width > 0) {
          shape.push_back(width);
          strides.push_back(1);
        }
      }
      return nb::cast(
          export_array(data, dtype, shape, strides, view.device, view.device_id, owner));
    };
    out.append(nb::make_tuple(plane(planes.indices, DType::kUInt32, codec.index_words()),
                              plane(planes.norms, DType::kFloat16, 0),
                              plane(planes.residual_norms, DType::kFloat16, 0),
                              plane(planes.qjl_signs, DType::kUInt32, sign_words(codec.dim()))));
  }
  return out;
}

// Quantizes x [B, H, T, D] (or, flat, [..., D]) into freshly owned planes.
nb::list quantize(const QuantizerRef& quantizer, const InArray& x, bool flat, int num_threads) {
  const char* fn = "quantize";
  TensorView view = to_view(x, fn, "x");
  std::optional<std::vector<int64_t>> lead;
  if (flat) {
    if (view.rank() < 1) throw_invalid(fn, "x of shape [..., D]", shape_string(view.shape));
    lead = std::vector<int64_t>(view.shape.begin(), view.shape.end() - 1);
    int64_t n = 1;
    for (int64_t e : *lead) n *= e;
    view.shape = {1, 1, n, view.shape.back()};
  }
  std::unique_ptr<QuantizedTensor> tensor;
  {
    nb::gil_scoped_release release;
    tensor = std::make_unique<QuantizedTensor>(quantize_tensor(quantizer.ptr, view, num_threads));
  }
  const int64_t tokens = view.rank() == 4 ? view.shape[2] : 0;
  const QuantizedStates states = tensor->view(
      std::vector<int64_t>(static_cast<size_t>(view.rank() == 4 ? view.shape[0] : 0), tokens));
  nb::capsule owner = owning_capsule(tensor.release());
  return export_planes(states, tokens, owner, lead);
}

void dequantize(const States& states, OutArray out, int num_threads) {
  TensorView view = to_view(out, "dequantize_states", "out");
  nb::gil_scoped_release release;
  dequantize_states(states.view, view, num_threads);
}

// ---------------------------------------------------------------------------------------------
// Attention.

AttentionOptions make_options(std::optional<float> scale, bool causal, int64_t causal_offset,
                              int64_t window, const std::optional<InArray>& mask,
                              const std::optional<InArray>& sinks, float softcap, int num_threads,
                              uintptr_t stream) {
  const char* fn = "scaled_dot_product_attention";
  AttentionOptions options;
  options.scale = scale;
  options.causal = causal;
  options.causal_offset = causal_offset;
  options.window = window;
  if (mask) options.mask = to_view(*mask, fn, "mask");
  if (sinks) options.sinks = to_view(*sinks, fn, "sinks");
  options.softcap = softcap;
  options.num_threads = num_threads;
  options.stream = reinterpret_cast<void*>(stream);
  return options;
}

void attention(const InArray& queries, const States& keys, const States& values, OutArray out,
               std::optional<float> scale, bool causal, int64_t causal_offset, int64_t window,
               std::optional<InArray> mask, std::optional<InArray> sinks, float softcap,
               int num_threads, uintptr_t stream, std::optional<OutArray> lse) {
  const char* fn = "scaled_dot_product_attention";
  const TensorView q = to_view(queries, fn, "queries");
  const TensorView o = to_view(out, fn, "out");
  std::optional<TensorView> l;
  if (lse) l = to_view(*lse, fn, "lse");
  const AttentionOptions options =
      make_options(scale, causal, causal_offset, window, mask, sinks, softcap, num_threads, stream);
  nb::gil_scoped_release release;
  scaled_dot_product_attention(q, keys.view, values.view, o, options, l ? &*l : nullptr);
}

void dense(const InArray& queries, const InArray& keys, const InArray& values, OutArray out,
           std::optional<float> scale, bool causal, int64_t causal_offset, int64_t window,
           std::optional<InArray> mask, std::optional<InArray> sinks, float softcap,
           int num_threads, uintptr_t stream, std::optional<OutArray> lse) {
  const char* fn = "dense_attention";
  const TensorView q = to_view(queries, fn, "queries");
  const TensorView k = to_view(keys, fn, "keys");
  const TensorView v = to_view(values, fn, "values");
  const TensorView o = to_view(out, fn, "out");
  std::optional<TensorView> l;
  if (lse) l = to_view(*lse, fn, "lse");
  const AttentionOptions options =
      make_options(scale, causal, causal_offset, window, mask, sinks, softcap, num_threads, stream);
  nb::gil_scoped_release release;
  dense_attention(q, k, v, o, options, l ? &*l : nullptr);
}

std::string unsupported_reason(const InArray& queries, const States& keys, const States& values,
                               std::optional<float> scale, bool causal, int64_t causal_offset,
                               int64_t window, std::optional<InArray> mask,
                               std::optional<InArray> sinks, float softcap) {
  const char* fn = "attention_unsupported_reason";
  const TensorView q = to_view(queries, fn, "queries");
  const AttentionOptions options =
      make_options(scale, causal, causal_offset, window, mask, sinks, softcap, 0, 0);
  return attention_unsupported_reason(q, keys.view, values.view, options);
}

// ---------------------------------------------------------------------------------------------
// Codecs.

using FloatArg = std::optional<nb::ndarray<const float, nb::c_contig, nb::device::cpu>>;

CodecRef make_codec(int dim, int bits, const std::string& mode, uint64_t seed, bool dense_rotation,
                    bool norm_correction, const FloatArg& signs, const FloatArg& matrix,
                    const FloatArg& centroids, const FloatArg& qjl_matrix) {
  CodecConfig config;
  config.dim = dim;
  config.bits = bits;
  config.mode = parse_mode(mode, "Codec");
  config.seed = seed;
  config.dense_rotation = dense_rotation;
  config.norm_correction = norm_correction;
  config.signs = to_vector(signs);
  config.matrix = to_vector(matrix);
  config.centroids = to_vector(centroids);
  config.qjl_matrix = to_vector(qjl_matrix);
  return {std::make_shared<const Codec>(config)};
}

template <typename T>
nb::ndarray<nb::numpy, T> numpy_copy(const std::vector<T>& values,
                                     const std::vector<int64_t>& shape) {
  auto out = new_numpy<T>(shape);
  std::copy(values.begin(), values.end(), out.data());
  return out;
}

// ---------------------------------------------------------------------------------------------
// KV cache.

struct PyKVCache {
  std::unique_ptr<KVCache> cache;
};

KVCacheConfig make_cache_config(int64_t batch, int64_t kv_heads, int64_t head_dim, double key_bits,
                                double value_bits, const std::string& key_mode, uint64_t seed,
                                bool norm_correction, bool dense_rotation, int64_t step,
                                int64_t max_capacity, const std::string& device, int device_id,
                                int num_threads, bool check_finite) {
  KVCacheConfig config;
  config.batch = batch;
  config.kv_heads = kv_heads;
  config.head_dim = head_dim;
  config.key_bits = key_bits;
  config.value_bits = value_bits;
  config.key_mode = parse_mode(key_mode, "KVCache");
  config.seed = seed;
  config.norm_correction = norm_correction;
  config.dense_rotation = dense_rotation;
  config.step = step;
  config.max_capacity = max_capacity;
  if (device == "cpu") {
    config.device = DeviceType::kCPU;
  } else if (device == "cuda") {
    if (!cuda::built())
      throw_runtime("KVCache",
                    "device \"cuda\" asked, but this build of tqattn has no CUDA backend");
    config.device = DeviceType::kCUDA;
  } else {
    throw_invalid("KVCache", "device \"cpu\" or \"cuda\"", "\"" + device + "\"");
  }
  config.device_id = device_id;
  config.num_threads = num_threads;
  config.check_finite = check_finite;
  return config;
}

std::shared_ptr<States> cache_states(nb::handle self, const QuantizedStates& view) {
  auto states = std::make_shared<States>();
  states->view = view;
  states->keep_alive.push_back(nb::borrow(self));
  return states;
}

// ---------------------------------------------------------------------------------------------
// Packing.

nb::ndarray<nb::numpy, uint32_t> pack(
    nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu> indices, int bits) {
  const char* fn = "pack";
  if (bits < kMinBits || bits > kMaxBits)
    throw_invalid(fn, detail::concat("bits in [", kMinBits, ", ", kMaxBits, "]"), bits);
  if (indices.ndim() < 1) throw_invalid(fn, "indices of shape [..., dim]", "a scalar");
  std::vector<int64_t> shape = shape_of(indices);
  const int64_t dim = shape.back();
  if (dim < 1) throw_invalid(fn, "dim >= 1", dim);
  const uint8_t* src = indices.data();
  const size_t total = indices.size();
  const uint32_t limit = 1u << bits;
  for (size_t i = 0; i < total; ++i)
    if (src[i] >= limit)
      throw_invalid(fn, detail::concat("indices < 2^bits = ", limit), static_cast<int>(src[i]));
  const int64_t words = packed_words(dim, bits);
  const int64_t rows = dim > 0 ? static_cast<int64_t>(total) / dim : 0;
  shape.back() = words;
  auto out = new_numpy<uint32_t>(shape);
  uint32_t* dst = out.data();
  {
    nb::gil_scoped_release release;
    for (int64_t r = 0; r < rows; ++r) pack_indices(src + r * dim, dim, bits, dst + r * words);
  }
  return out;
}

nb::ndarray<nb::numpy, uint8_t> unpack(
    nb::ndarray<const uint32_t, nb::c_contig, nb::device::cpu> words, int64_t dim, int bits) {
  const char* fn = "unpack";
  if (bits < kMinBits || bits > kMaxBits)
    throw_invalid(fn, detail::concat("bits in [", kMinBits, ", ", kMaxBits, "]"), bits);
  if (dim < 1) throw_invalid(fn, "dim >= 1", dim);
  if (words.ndim() < 1) throw_invalid(fn, "words of shape [..., words]", "a scalar");
  std::vector<int64_t> shape = shape_of(words);
  const int64_t n_words = packed_words(dim, bits);
  if (shape.back() != n_words)
    throw_invalid(fn,
                  detail::concat(n_words, " words per vector for dim ", dim, " at ", bits, " bits"),
                  shape.back());
  const int64_t rows = n_words > 0 ? static_cast<int64_t>(words.size()) / n_words : 0;
  shape.back() = dim;
  auto out = new_numpy<uint8_t>(shape);
  const uint32_t* src = words.data();
  uint8_t* dst = out.data();
  {
    nb::gil_scoped_release release;
    for (int64_t r = 0; r < rows; ++r) unpack_indices(src + r * n_words, dim, bits, dst + r * dim);
  }
  return out;
}

}  // namespace
}  // namespace tqattn::python

NB_MODULE(_tqattn, m) {
  using namespace tqattn;
  using namespace tqattn::python;
  m.doc() = "Low-level bindings of the tqattn C++ library; use the `tqattn` package instead.";

  // The library's two error kinds map onto Python's; C++ messages pass through unchanged.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const tqattn::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const tqattn::RuntimeError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("version", &tqattn::version);
  m.def("cuda_built", &cuda::built, "Whether this build carries the CUDA backend.");
  m.def("cuda_device_count", &cuda::device_count);

  m.attr("MIN_BITS") = kMinBits;
  m.attr("MAX_BITS") = kMaxBits;
  m.attr("MIN_PROD_BITS") = kMinProdBits;
  m.attr("MIN_DIM") = kMinDim;
  m.attr("MAX_DIM") = kMaxDim;

  m.def("packed_words", [](int64_t dim, int bits) { return packed_words(dim, bits); });
  m.def("sign_words", [](int64_t dim) { return sign_words(dim); });
  m.def("pack", &pack, "indices"_a, "bits"_a);
  m.def("unpack", &unpack, "words"_a, "dim"_a, "bits"_a);

  m.def(
      "codebook",
      [](int dim, int bits) {
        auto book = Codebook::lloyd_max(dim, bits);
        return numpy_copy(book->centroids(), {book->size()});
      },
      "dim"_a, "bits"_a);
  m.def(
      "codebook_distortion",
      [](int dim, int bits) { return Codebook::lloyd_max(dim, bits)->distortion(); }, "dim"_a,
      "bits"_a);
  nb::class_<CodecRef>(m, "Codec")
      .def_prop_ro("dim", [](const CodecRef& c) { return c.ptr->dim(); })
      .def_prop_ro("bits", [](const CodecRef& c) { return c.ptr->bits(); })
      .def_prop_ro("mode", [](const CodecRef& c) { return std::string(mode_name(c.ptr->mode())); })
      .def_prop_ro("index_bits", [](const CodecRef& c) { return c.ptr->index_bits(); })
      .def_prop_ro("index_words", [](const CodecRef& c) { return c.ptr->index_words(); })
      .def_prop_ro("sign_words", [](const CodecRef& c) { return sign_words(c.ptr->dim()); })
      .def_prop_ro("norm_correction", [](const CodecRef& c) { return c.ptr->norm_correction(); })
      .def_prop_ro("qjl_scale", [](const CodecRef& c) { return c.ptr->qjl_scale(); })
      .def_prop_ro("distortion", [](const CodecRef& c) { return c.ptr->codebook().distortion(); })
      // Properties return fresh numpy copies (nb::object: not tied to the codec's lifetime).
      .def_prop_ro("centroids",
                   [](const CodecRef& c) -> nb::object {
                     const Codebook& book = c.ptr->codebook();
                     return nb::cast(numpy_copy(book.centroids(), {book.size()}));
                   })
      .def_prop_ro("boundaries",
                   [](const CodecRef& c) -> nb::object {
                     const auto& b = c.ptr->codebook().boundaries();
                     return nb::cast(numpy_copy(b, {static_cast<int64_t>(b.size())}));
                   })
      .def_prop_ro("rotation",
                   [](const CodecRef& c) {
                     return std::string(c.ptr->rotation().kind() == RotationKind::kHadamard
                                            ? "hadamard"
                                            : "dense");
                   })
      .def_prop_ro("signs",
                   [](const CodecRef& c) -> nb::object {
                     const Rotation& r = c.ptr->rotation();
                     if (r.kind() != RotationKind::kHadamard) return nb::none();
                     return nb::cast(numpy_copy(r.signs(), {r.dim()}));
                   })
      .def_prop_ro("matrix",
                   [](const CodecRef& c) -> nb::object {
                     const int64_t d = c.ptr->dim();
                     return nb::cast(numpy_copy(c.ptr->rotation().to_matrix(), {d, d}));
                   })
      .def_prop_ro("qjl_matrix", [](const CodecRef& c) -> nb::object {
        if (c.ptr->mode() != QuantMode::kProd) return nb::none();
        const int64_t d = c.ptr->dim();
        return nb::cast(numpy_copy(c.ptr->qjl_matrix(), {d, d}));
      });
  // The single-vector C++ API (Codec::quantize / dequantize, scalar), next to the batched
  // quantize_tensor path the package uses: tests check that both agree.
  m.def(
      "codec_quantize_scalar",
      [](const CodecRef& c, nb::ndarray<const float, nb::c_contig, nb::device::cpu> x) {
        const Codec& codec = *c.ptr;
        if (x.ndim() != 2 || static_cast<int64_t>(x.shape(1)) != codec.dim())
          throw_invalid("Codec.quantize", detail::concat("x of shape [n, ", codec.dim(), "]"),
                        shape_string(shape_of(x)));
        const int64_t n = static_cast<int64_t>(x.shape(0));
        const bool prod = codec.mode() == QuantMode::kProd;
        auto indices = new_numpy<uint32_t>({n, codec.index_words()});
        auto norms = new_numpy<uint16_t>({n});
        auto residual = new_numpy<uint16_t>({prod ? n : 0});
        auto signs = new_numpy<uint32_t>({prod ? n : 0, sign_words(codec.dim())});
        PackedPlanes planes{indices.data(), norms.data(), prod ? residual.data() : nullptr,
                            prod ? signs.data() : nullptr};
        codec.quantize(x.data(), n, planes);
        return nb::make_tuple(indices, norms, residual, signs);
      },
      "codec"_a, "x"_a);
  m.def("make_codec", &make_codec, "dim"_a, "bits"_a, "mode"_a, "seed"_a, "dense_rotation"_a,
        "norm_correction"_a, "signs"_a.none(), "matrix"_a.none(), "centroids"_a.none(),
        "qjl_matrix"_a.none());

  nb::class_<QuantizerRef>(m, "TensorQuantizer")
      .def_prop_ro("dim", [](const QuantizerRef& q) { return q.ptr->dim(); })
      .def_prop_ro("is_split", [](const QuantizerRef& q) { return q.ptr->is_split(); })
      .def_prop_ro("bits_per_coordinate",
                   [](const QuantizerRef& q) { return q.ptr->bits_per_coordinate(); })
      .def_prop_ro("bytes_per_vector",
                   [](const QuantizerRef& q) { return q.ptr->bytes_per_vector(); })
      .def_prop_ro("parts", [](const QuantizerRef& q) {
        nb::list out;
        for (const auto& part : q.ptr->parts()) {
          std::vector<int32_t> channels(part.channels.begin(), part.channels.end());
          out.append(nb::make_tuple(numpy_copy(channels, {static_cast<int64_t>(channels.size())}),
                                    CodecRef{part.codec}));
        }
        return out;
      });
  m.def("uniform_quantizer", [](const CodecRef& codec) {
    return QuantizerRef{
        std::make_shared<const TensorQuantizer>(TensorQuantizer::uniform(codec.ptr))};
  });
  m.def(
      "split_quantizer",
      [](int dim, std::vector<int> high_channels, const CodecRef& high, const CodecRef& low) {
        return QuantizerRef{std::make_shared<const TensorQuantizer>(
            TensorQuantizer::split(dim, std::move(high_channels), high.ptr, low.ptr))};
      },
      "dim"_a, "high_channels"_a, "high"_a, "low"_a);
  m.def(
      "calibrate_split",
      [](int dim, double bits, const std::string& mode, uint64_t seed, bool dense_rotation,
         bool norm_correction, nb::ndarray<const float, nb::c_contig, nb::device::cpu> sample) {
        CodecConfig base;
        base.dim = dim;
        base.mode = parse_mode(mode, "TensorQuantizer.calibrate_split");
        base.seed = seed;
        base.dense_rotation = dense_rotation;
        base.norm_correction = norm_correction;
        if (sample.ndim() < 1 || static_cast<int64_t>(sample.shape(sample.ndim() - 1)) != dim)
          throw_invalid("TensorQuantizer.calibrate_split",
                        detail::concat("a sample of shape [..., ", dim, "]"),
                        shape_string(shape_of(sample)));
        const int64_t rows = dim > 0 ? static_cast<int64_t>(sample.size()) / dim : 0;
        return QuantizerRef{std::make_shared<const TensorQuantizer>(
            TensorQuantizer::calibrate_split(dim, bits, base, sample.data(), rows))};
      },
      "dim"_a, "bits"_a, "mode"_a, "seed"_a, "dense_rotation"_a, "norm_correction"_a, "sample"_a);

  nb::class_<States>(m, "States")
      .def_prop_ro("batch", [](const States& s) { return s.view.batch; })
      .def_prop_ro("heads", [](const States& s) { return s.view.heads; })
      .def_prop_ro("capacity", [](const States& s) { return s.view.capacity; })
      .def_prop_ro("dim", [](const States& s) { return s.view.dim(); })
      .def_prop_ro("lengths", [](const States& s) { return s.view.lengths; })
      .def_prop_ro("max_length", [](const States& s) { return s.view.max_length(); })
      .def_prop_ro("nbytes", [](const States& s) { return s.view.nbytes(); })
      .def_prop_ro("device",
                   [](const States& s) { return std::string(device_name(s.view.device)); })
      .def_prop_ro("device_id", [](const States& s) { return s.view.device_id; })
      .def_prop_ro("quantizer", [](const States& s) { return QuantizerRef{s.view.quantizer}; })
      // Addresses the library reads, per part (indices, norms, residual_norms, qjl_signs; 0 if
      // absent): lets tests prove that caller arrays are read in place.
      .def_prop_ro("data_pointers", [](const States& s) {
        nb::list out;
        for (const PackedPlanes& p : s.view.parts)
          out.append(nb::make_tuple(reinterpret_cast<uintptr_t>(p.indices),
                                    reinterpret_cast<uintptr_t>(p.norms),
                                    reinterpret_cast<uintptr_t>(p.residual_norms),
                                    reinterpret_cast<uintptr_t>(p.qjl_signs)));
        return out;
      });
  m.def(
      "make_states",
      [](const QuantizerRef& q, const std::vector<PartArrays>& parts,
         std::optional<std::vector<int64_t>> lengths) {
        return make_states(q.ptr, parts, std::move(lengths));
      },
      "quantizer"_a, "parts"_a, "lengths"_a.none());
  m.def("make_flat_states", &make_flat_states, "codec"_a, "part"_a);
  m.def("quantize", &quantize, "quantizer"_a, "x"_a, "flat"_a, "num_threads"_a);
  m.def("dequantize", &dequantize, "states"_a, "out"_a, "num_threads"_a);
  m.def("export_states", [](nb::handle states) {
    // Views of the states' memory, which the States object keeps alive.
    const States& s = nb::cast<const States&>(states);
    return export_planes(s.view, s.view.max_length(), states);
  });

  m.def("attention", &attention, "queries"_a, "keys"_a, "values"_a, "out"_a, "scale"_a.none(),
        "causal"_a, "causal_offset"_a, "window"_a, "mask"_a.none(), "sinks"_a.none(), "softcap"_a,
        "num_threads"_a, "stream"_a, "lse"_a.none());
  m.def("dense_attention", &dense, "queries"_a, "keys"_a, "values"_a, "out"_a, "scale"_a.none(),
        "causal"_a, "causal_offset"_a, "window"_a, "mask"_a.none(), "sinks"_a.none(), "softcap"_a,
        "num_threads"_a, "stream"_a, "lse"_a.none());
  m.def("attention_unsupported_reason", &unsupported_reason, "queries"_a, "keys"_a, "values"_a,
        "scale"_a.none(), "causal"_a, "causal_offset"_a, "window"_a, "mask"_a.none(),
        "sinks"_a.none(), "softcap"_a);

  nb::class_<PyKVCache>(m, "KVCache")
      .def(
          "__init__",
          [](PyKVCache* self, int64_t batch, int64_t kv_heads, int64_t head_dim, double key_bits,
             double value_bits, const std::string& key_mode, uint64_t seed, bool norm_correction,
             bool dense_rotation, int64_t step, int64_t max_capacity, const std::string& device,
             int device_id, int num_threads, bool check_finite, const QuantizerRef* keys,
             const QuantizerRef* values) {
            const KVCacheConfig config = make_cache_config(
                batch, kv_heads, head_dim, key_bits, value_bits, key_mode, seed, norm_correction,
                dense_rotation, step, max_capacity, device, device_id, num_threads, check_finite);
            if (static_cast<bool>(keys) != static_cast<bool>(values))
              throw_invalid("KVCache", "both quantizers or neither",
                            keys ? "keys only" : "values only");
            new (self) PyKVCache{keys ? std::make_unique<KVCache>(config, keys->ptr, values->ptr)
                                      : std::make_unique<KVCache>(config)};
          },
          "batch"_a, "kv_heads"_a, "head_dim"_a, "key_bits"_a, "value_bits"_a, "key_mode"_a,
          "seed"_a, "norm_correction"_a, "dense_rotation"_a, "step"_a, "max_capacity"_a, "device"_a,
          "device_id"_a, "num_threads"_a, "check_finite"_a, "keys"_a.none(), "values"_a.none())
      .def(
          "append",
          [](PyKVCache& self, const InArray& keys, const InArray& values, uintptr_t stream) {
            const TensorView k = to_view(keys, "KVCache.append", "keys");
            const TensorView v = to_view(values, "KVCache.append", "values");
            nb::gil_scoped_release release;
            self.cache->append(k, v, reinterpret_cast<void*>(stream));
          },
          "keys"_a, "values"_a, "stream"_a)
      .def(
          "append_sequence",
          [](PyKVCache& self, int64_t b, const InArray& keys, const InArray& values,
             uintptr_t stream) {
            const TensorView k = to_view(keys, "KVCache.append_sequence", "keys");
            const TensorView v = to_view(values, "KVCache.append_sequence", "values");
            nb::gil_scoped_release release;
            self.cache->append_sequence(b, k, v, reinterpret_cast<void*>(stream));
          },
          "b"_a, "keys"_a, "values"_a, "stream"_a)
      .def(
          "trim", [](PyKVCache& self, int64_t n) { return self.cache->trim(n); }, "n"_a)
      .def("reset", [](PyKVCache& self) { self.cache->reset(); })
      .def_prop_ro("lengths", [](const PyKVCache& self) { return self.cache->lengths(); })
      .def_prop_ro("capacity", [](const PyKVCache& self) { return self.cache->capacity(); })
      .def_prop_ro("nbytes", [](const PyKVCache& self) { return self.cache->nbytes(); })
      .def_prop_ro("allocated_bytes",
                   [](const PyKVCache& self) { return self.cache->allocated_bytes(); })
      .def("keys",
           [](nb::handle self) {
             PyKVCache& c = nb::cast<PyKVCache&>(self);
             return cache_states(self, c.cache->keys());
           })
      .def("values", [](nb::handle self) {
        PyKVCache& c = nb::cast<PyKVCache&>(self);
        return cache_states(self, c.cache->values());
      });

#ifdef TQATTN_HAVE_CLI
  m.def(
      "run_cli",
      [](std::vector<std::string> argv) {
        std::vector<char*> args;
        for (auto& a : argv) args.push_back(a.data());
        args.push_back(nullptr);
        int rc = 0;
        {
          nb::gil_scoped_release release;
          rc = tqattn_cli_main(static_cast<int>(argv.size()), args.data());
          std::fflush(stdout);
          std::fflush(stderr);
        }
        return rc;
      },
      "argv"_a, "Runs the `tqattn` command (argv[0] is the program name); returns its status.");
#endif
}

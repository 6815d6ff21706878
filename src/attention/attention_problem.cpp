#include "attention/attention_problem.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "tqattn/error.h"
#include "tqattn/half.h"

namespace tqattn::attention {
namespace {

using detail::concat;

bool is_float_dtype(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

std::string where(const TensorView& t) { return concat(device_name(t.device), ":", t.device_id); }

void check_same_device(const char* fn, const char* what, const TensorView& queries,
                       DeviceType device, int device_id) {
  if (device != queries.device || (device == DeviceType::kCUDA && device_id != queries.device_id))
    throw_invalid(fn, concat(what, " on the queries' device ", where(queries)),
                  concat(device_name(device), ":", device_id));
}

void check_queries(const char* fn, const TensorView& queries) {
  if (queries.rank() != 4)
    throw_invalid(fn, "queries of rank 4 [B, Hq, L, D]", shape_string(queries.shape));
  if (!is_float_dtype(queries.dtype))
    throw_invalid(fn, "queries of dtype float32, float16 or bfloat16", dtype_name(queries.dtype));
  for (int64_t extent : queries.shape)
    if (extent < 1)
      throw_invalid(fn, "queries with every extent >= 1", shape_string(queries.shape));
  if (queries.data == nullptr) throw_invalid(fn, "queries with data", "a null pointer");
}

void check_out(const char* fn, const TensorView& queries, const TensorView& out) {
  if (out.shape != queries.shape)
    throw_invalid(fn, concat("out of the queries' shape ", shape_string(queries.shape)),
                  shape_string(out.shape));
  if (out.dtype != queries.dtype)
    throw_invalid(fn, concat("out of the queries' dtype ", dtype_name(queries.dtype)),
                  dtype_name(out.dtype));
  check_same_device(fn, "out", queries, out.device, out.device_id);
  if (out.data == nullptr) throw_invalid(fn, "out with data", "a null pointer");
}

void check_lse(const char* fn, const TensorView& queries, const TensorView* lse) {
  if (lse == nullptr) return;
  const std::vector<int64_t> want = {queries.shape[0], queries.shape[1], queries.shape[2]};
  if (lse->shape != want)
    throw_invalid(fn, concat("lse of shape ", shape_string(want)), shape_string(lse->shape));
  if (lse->dtype != DType::kFloat32)
    throw_invalid(fn, "lse of dtype float32", dtype_name(lse->dtype));
  check_same_device(fn, "lse", queries, lse->device, lse->device_id);
  if (lse->data == nullptr) throw_invalid(fn, "lse with data", "a null pointer");
}

void check_finite_data(const char* fn, const char* what, const TensorView& t, bool allow_neg_inf) {
  if (t.device != DeviceType::kCPU) return;
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const float v = load_float(t.data, t.dtype, i);
    if (std::isnan(v) || (std::isinf(v) && (v > 0 || !allow_neg_inf)))
      throw_invalid(fn,
                    concat(what, allow_neg_inf ? " without NaN or +inf" : " without NaN or inf"),
                    concat(v, " at flat index ", i));
  }
}

// Options shared by the quantized and dense calls; S is the longest sequence.
void resolve_options(const char* fn, const TensorView& queries, const AttentionOptions& options,
                     int64_t max_len, bool check_data, Problem& p) {
  const int64_t B = queries.shape[0], Hq = queries.shape[1], L = queries.shape[2];
  if (options.scale.has_value() && !std::isfinite(*options.scale))
    throw_invalid(fn, "a finite scale", *options.scale);
  p.scale = options.scale.value_or(static_cast<float>(1.0 / std::sqrt(double(p.head_dim))));
  if (!(options.softcap >= 0.0f) || !std::isfinite(options.softcap))
    throw_invalid(fn, "softcap >= 0 and finite (0 = off)", options.softcap);
  p.softcap = options.softcap;
  if (options.window < 0) throw_invalid(fn, "window >= 0 (0 = no window)", options.window);
  p.window = options.window;
  if (options.num_threads < 0)
    throw_invalid(fn, "num_threads >= 0 (0 = all hardware threads)", options.num_threads);
  p.causal = options.causal;
  p.max_len = max_len;

  // Positions of query 0: needed by causal and by the window.
  p.positions.assign(static_cast<size_t>(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    if (options.causal_offset >= 0) {
      p.positions[b] = options.causal_offset;
    } else {
      p.positions[b] = p.lengths[b] - L;
      if ((p.causal || p.window > 0) && p.positions[b] < 0)
        throw_invalid(fn,
                      concat("L <= the sequence length with causal or window masking and no "
                             "causal_offset (L = ",
                             L, ")"),
                      concat("length ", p.lengths[b], " for sequence ", b));
    }
  }

  if (options.mask.has_value()) {
    const TensorView& m = *options.mask;
    if (m.dtype != DType::kBool && !is_float_dtype(m.dtype))
      throw_invalid(fn, "a mask of dtype bool, float32, float16 or bfloat16", dtype_name(m.dtype));
    check_same_device(fn, "the mask", queries, m.device, m.device_id);
    const std::vector<int64_t> target = {B, Hq, L, max_len};
    const std::string expected =
        concat("a mask broadcastable to [B, Hq, L, S] = ", shape_string(target));
    if (m.rank() > 4) throw_invalid(fn, expected, shape_string(m.shape));
    int64_t strides[4] = {0, 0, 0, 0};
    int64_t stride = 1;
    for (int64_t i = m.rank() - 1, axis = 3; i >= 0; --i, --axis) {
      const int64_t extent = m.shape[i];
      if (extent != 1 && extent != target[axis]) throw_invalid(fn, expected, shape_string(m.shape));
      strides[axis] = extent == 1 ? 0 : stride;
      stride *= extent;
    }
    if (m.data == nullptr) throw_invalid(fn, "a mask with data", "a null pointer");
    if (check_data && m.dtype != DType::kBool) check_finite_data(fn, "an additive mask", m, true);
    p.mask.data = m.data;
    p.mask.dtype = m.dtype;
    p.mask.stride_b = strides[0];
    p.mask.stride_h = strides[1];
    p.mask.stride_l = strides[2];
    p.mask.stride_s = strides[3];
  }

  if (options.sinks.has_value()) {
    const TensorView& s = *options.sinks;
    if (s.dtype != DType::kFloat32)
      throw_invalid(fn, "sinks of dtype float32", dtype_name(s.dtype));
    if (s.shape != std::vector<int64_t>{Hq})
      throw_invalid(fn, concat("sinks of shape [Hq] = [", Hq, "]"), shape_string(s.shape));
    check_same_device(fn, "sinks", queries, s.device, s.device_id);
    if (s.data == nullptr) throw_invalid(fn, "sinks with data", "a null pointer");
    if (check_data) check_finite_data(fn, "sinks", s, true);
    p.sinks = s.as<const float>();
  }
  p.num_threads = options.num_threads;
}

void check_states(const char* fn, const char* what, const TensorView& queries,
                  const QuantizedStates& s, bool is_values) {
  const int64_t B = queries.shape[0], D = queries.shape[3];
  if (!s.quantizer) throw_invalid(fn, concat(what, " with a quantizer"), "null");
  const auto& parts = s.quantizer->parts();
  if (s.parts.size() != parts.size())
    throw_invalid(fn,
                  concat(what, " with one set of planes per quantizer part (", parts.size(), ")"),
                  s.parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    const Codec& codec = *parts[i].codec;
    const PackedPlanes& planes = s.parts[i];
    if (is_values && codec.mode() != QuantMode::kMse)
      throw_invalid(fn, concat(what, " quantized with mode mse (Prod is for keys)"), "mode prod");
    if (planes.indices == nullptr || planes.norms == nullptr)
      throw_invalid(fn, concat(what, " with index and norm planes"), "a null plane");
    if (codec.mode() == QuantMode::kProd &&
        (planes.residual_norms == nullptr || planes.qjl_signs == nullptr))
      throw_invalid(fn, concat(what, " (mode prod) with residual-norm and QJL-sign planes"),
                    "a null plane");
  }
  if (s.dim() != D) throw_invalid(fn, concat(what, " of head dim D = ", D), s.dim());
  if (s.batch != B) throw_invalid(fn, concat(what, " of the queries' batch ", B), s.batch);
  if (s.heads < 1) throw_invalid(fn, concat(what, " with at least one head"), s.heads);
  if (static_cast<int64_t>(s.lengths.size()) != s.batch)
    throw_invalid(fn, concat(what, " with one length per sequence (", s.batch, ")"),
                  s.lengths.size());
  for (int64_t b = 0; b < s.batch; ++b) {
    if (s.lengths[b] < 0 || s.lengths[b] > s.capacity)
      throw_invalid(fn, concat(what, " lengths in [0, capacity = ", s.capacity, "]"),
                    concat(s.lengths[b], " for sequence ", b));
    // Kernels index tokens with 32-bit lanes.
    if (s.lengths[b] > std::numeric_limits<int32_t>::max() - 1024)
      throw_invalid(fn, concat(what, " lengths below 2^31 - 1024"), s.lengths[b]);
  }
  check_same_device(fn, what, queries, s.device, s.device_id);
}

}  // namespace

float load_float(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(data)[i];
    case DType::kFloat16:
      return half_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::kBool:
      return static_cast<const uint8_t*>(data)[i] ? 0.0f : -std::numeric_limits<float>::infinity();
    default:
      break;
  }
  throw_invalid("load_float", "dtype float32, float16, bfloat16 or bool", dtype_name(dtype));
}

void store_float(void* data, DType dtype, int64_t i, float value) {
  switch (dtype) {
    case DType::kFloat32:
      static_cast<float*>(data)[i] = value;
      return;
    case DType::kFloat16:
      static_cast<uint16_t*>(data)[i] = float_to_half(value);
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(data)[i] = float_to_bf16(value);
      return;
    default:
      break;
  }
  throw_invalid("store_float", "dtype float32, float16 or bfloat16", dtype_name(dtype));
}

float MaskInfo::at(int64_t b, int64_t h, int64_t l, int64_t s) const {
  return load_float(data, dtype, b * stride_b + h * stride_h + l * stride_l + s * stride_s);
}

Problem resolve_quantized(const char* fn, const TensorView& queries, const QuantizedStates& keys,
                          const QuantizedStates& values, const TensorView* out,
                          const AttentionOptions& options, const TensorView* lse, bool check_data) {
  check_queries(fn, queries);
  check_states(fn, "keys", queries, keys, false);
  check_states(fn, "values", queries, values, true);
  Problem p;
  p.batch = queries.shape[0];
  p.q_heads = queries.shape[1];
  p.q_len = queries.shape[2];
  p.head_dim = queries.shape[3];
  if (values.heads != keys.heads)
    throw_invalid(fn, concat("values with the keys' head count ", keys.heads), values.heads);
  if (p.q_heads % keys.heads != 0)
    throw_invalid(fn, concat("Hq a multiple of H_kv = ", keys.heads), p.q_heads);
  p.kv_heads = keys.heads;
  p.group = p.q_heads / p.kv_heads;
  if (values.lengths != keys.lengths)
    throw_invalid(fn, "values with the keys' per-sequence lengths",
                  "lengths that differ from the keys'");
  p.lengths = keys.lengths;
  int64_t max_len = 0;
  for (int64_t len : p.lengths) max_len = std::max(max_len, len);
  if (max_len == 0)
    throw_invalid(fn, "non-empty states (at least one sequence with a token)", "all lengths 0");
  if (out != nullptr) check_out(fn, queries, *out);
  check_lse(fn, queries, lse);
  resolve_options(fn, queries, options, max_len, check_data, p);
  if (check_data && queries.device == DeviceType::kCPU)
    check_finite_data(fn, "queries", queries, false);
  return p;
}

Problem resolve_dense(const char* fn, const TensorView& queries, const TensorView& keys,
                      const TensorView& values, const TensorView& out,
                      const AttentionOptions& options, const TensorView* lse) {
  check_queries(fn, queries);
  for (const TensorView* kv : {&keys, &values}) {
    const char* what = kv == &keys ? "keys" : "values";
    if (kv->rank() != 4)
      throw_invalid(fn, concat(what, " of rank 4 [B, H_kv, S, D]"), shape_string(kv->shape));
    if (kv->dtype != DType::kFloat32)
      throw_invalid(fn, concat(what, " of dtype float32"), dtype_name(kv->dtype));
    if (kv->device != DeviceType::kCPU)
      throw_invalid(fn, concat(what, " on the cpu (dense_attention is the CPU baseline)"),
                    device_name(kv->device));
    if (kv->data == nullptr) throw_invalid(fn, concat(what, " with data"), "a null pointer");
  }
  if (queries.device != DeviceType::kCPU)
    throw_invalid(fn, "queries on the cpu (dense_attention is the CPU baseline)",
                  device_name(queries.device));
  if (values.shape != keys.shape)
    throw_invalid(fn, concat("values of the keys' shape ", shape_string(keys.shape)),
                  shape_string(values.shape));
  Problem p;
  p.batch = queries.shape[0];
  p.q_heads = queries.shape[1];
  p.q_len = queries.shape[2];
  p.head_dim = queries.shape[3];
  if (keys.shape[0] != p.batch)
    throw_invalid(fn, concat("keys of the queries' batch ", p.batch), keys.shape[0]);
  if (keys.shape[3] != p.head_dim)
    throw_invalid(fn, concat("keys of head dim D = ", p.head_dim), keys.shape[3]);
  if (keys.shape[1] < 1 || p.q_heads % keys.shape[1] != 0)
    throw_invalid(fn, concat("H_kv >= 1 dividing Hq = ", p.q_heads), keys.shape[1]);
  if (keys.shape[2] < 1) throw_invalid(fn, "non-empty keys (S >= 1)", shape_string(keys.shape));
  p.kv_heads = keys.shape[1];
  p.group = p.q_heads / p.kv_heads;
  p.lengths.assign(static_cast<size_t>(p.batch), keys.shape[2]);
  check_out(fn, queries, out);
  check_lse(fn, queries, lse);
  resolve_options(fn, queries, options, keys.shape[2], true, p);
  check_finite_data(fn, "queries", queries, false);
  return p;
}

}  // namespace tqattn::attention

#include "cache/cache_internal.h"

#include <cmath>
#include <cstring>
#include <sstream>

#include "tqattn/format.h"
#include "tqattn/half.h"

namespace tqattn::cache_detail {
namespace {
thread_local const char* tls_api_name = nullptr;

template <typename Load>
void convert_impl(Load load, int64_t src_offset, int64_t src_stride, int64_t n,
                  const std::vector<int>& channels, int64_t dim, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = src_offset + i * src_stride;
    float* out = dst + i * dim;
    if (channels.empty()) {
      for (int64_t c = 0; c < dim; ++c) out[c] = load(row + c);
    } else {
      for (int64_t c = 0; c < dim; ++c) out[c] = load(row + channels[c]);
    }
  }
}
}  // namespace

ApiScope::ApiScope(const char* fn) : previous_(tls_api_name) { tls_api_name = fn; }
ApiScope::~ApiScope() { tls_api_name = previous_; }
const char* api_name(const char* fallback) { return tls_api_name ? tls_api_name : fallback; }

void check_float_dtype(const char* fn, const char* what, DType dtype) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16) {
    throw_invalid(fn, detail::concat(what, " of dtype float32, float16 or bfloat16"),
                  dtype_name(dtype));
  }
}

void check_device(const char* fn, const char* what, const TensorView& x, DeviceType device,
                  int device_id) {
  if (x.device != device || (device == DeviceType::kCUDA && x.device_id != device_id)) {
    throw_invalid(
        fn,
        detail::concat(what, " on ", device_name(device), device == DeviceType::kCUDA ? ":" : "",
                       device == DeviceType::kCUDA ? std::to_string(device_id) : ""),
        detail::concat(device_name(x.device), x.device == DeviceType::kCUDA ? ":" : "",
                       x.device == DeviceType::kCUDA ? std::to_string(x.device_id) : ""));
  }
}

void check_shape(const char* fn, const char* what, const TensorView& x,
                 const std::vector<int64_t>& shape) {
  bool ok = x.rank() == static_cast<int64_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) {
    ok = x.shape[i] >= 0 && (shape[i] < 0 || x.shape[i] == shape[i]);
  }
  if (ok) return;
  std::ostringstream want;
  want << what << " of shape [";
  for (size_t i = 0; i < shape.size(); ++i) {
    want << (i ? ", " : "");
    if (shape[i] < 0) {
      want << "n >= 0";
    } else {
      want << shape[i];
    }
  }
  want << "] (rank " << shape.size() << ")";
  throw_invalid(fn, want.str(), shape_string(x.shape));
}

void check_bits(const char* fn, const char* what, int bits, QuantMode mode) {
  const int lo = mode == QuantMode::kProd ? kMinProdBits : kMinBits;
  if (bits < lo || bits > kMaxBits) {
    throw_invalid(
        fn,
        detail::concat(what, " in ", lo, "..", kMaxBits, mode == QuantMode::kProd ? " (Prod)" : ""),
        bits);
  }
}

void check_fractional_bits(const char* fn, const char* what, double bits, QuantMode mode) {
  const int lo = mode == QuantMode::kProd ? kMinProdBits : kMinBits;
  if (!std::isfinite(bits) || bits < lo || bits > kMaxBits) {
    throw_invalid(fn,
                  detail::concat(what, " in [", lo, ", ", kMaxBits, "]",
                                 mode == QuantMode::kProd ? " (Prod)" : ""),
                  bits);
  }
}

void convert_rows(const void* src, DType dtype, int64_t src_offset, int64_t src_stride, int64_t n,
                  const std::vector<int>& channels, int64_t dim, float* dst) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(src);
      if (channels.empty()) {
        for (int64_t i = 0; i < n; ++i) {
          std::memcpy(dst + i * dim, p + src_offset + i * src_stride, dim * sizeof(float));
        }
        return;
      }
      convert_impl([p](int64_t k) { return p[k]; }, src_offset, src_stride, n, channels, dim, dst);
      return;
    }
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(src);
      convert_impl([p](int64_t k) { return half_to_float(p[k]); }, src_offset, src_stride, n,
                   channels, dim, dst);
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(src);
      convert_impl([p](int64_t k) { return bf16_to_float(p[k]); }, src_offset, src_stride, n,
                   channels, dim, dst);
      return;
    }
    default:
      throw_invalid("convert_rows", "float32, float16 or bfloat16 input", dtype_name(dtype));
  }
}

[[noreturn]] void throw_non_finite(const char* fn, const char* what, const TensorView& x) {
  const int64_t n = x.numel();
  auto at = [&](int64_t k) -> float {
    switch (x.dtype) {
      case DType::kFloat32:
        return x.as<const float>()[k];
      case DType::kFloat16:
        return half_to_float(x.as<const uint16_t>()[k]);
      default:
        return bf16_to_float(x.as<const uint16_t>()[k]);
    }
  };
  auto index_string = [&](int64_t k) {
    std::vector<int64_t> idx(x.shape.size());
    for (int64_t d = x.rank() - 1; d >= 0; --d) {
      idx[d] = x.shape[d] ? k % x.shape[d] : 0;
      k = x.shape[d] ? k / x.shape[d] : 0;
    }
    return shape_string(idx);
  };
  for (int64_t k = 0; k < n; ++k) {
    const float v = at(k);
    if (!std::isfinite(v)) {
      throw_invalid(fn, detail::concat("finite ", what),
                    detail::concat(v, " at ", index_string(k)));
    }
  }
  // Every element is finite, so some vector's squared norm overflowed float.
  const int64_t dim = x.shape.empty() ? 1 : x.shape.back();
  for (int64_t row = 0; dim > 0 && row < n / dim; ++row) {
    float sum = 0.0f;
    for (int64_t c = 0; c < dim; ++c) sum += at(row * dim + c) * at(row * dim + c);
    if (!std::isfinite(sum)) {
      throw_invalid(fn, detail::concat(what, " vectors with a squared norm below 3.4e38"),
                    detail::concat("an overflowing vector at ", index_string(row * dim)));
    }
  }
  throw_invalid(fn, detail::concat("finite ", what), "a non-finite value");
}

}  // namespace tqattn::cache_detail

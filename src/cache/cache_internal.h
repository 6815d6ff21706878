// Helpers shared by the cache front ends (quantized_tensor.cpp, kv_cache.cpp). Not public.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tqattn/codec.h"
#include "tqattn/error.h"
#include "tqattn/tensor.h"

namespace tqattn::cache_detail {

// The public function whose arguments are being checked, so that errors raised deep inside a
// shared write path name the entry point the caller actually called (e.g. "KVCache.append"
// rather than "QuantizedTensor.write"). Scoped to the calling thread.
class ApiScope {
 public:
  explicit ApiScope(const char* fn);
  ~ApiScope();
  ApiScope(const ApiScope&) = delete;
  ApiScope& operator=(const ApiScope&) = delete;

 private:
  const char* previous_;
};
// The innermost active scope's name, or `fallback` when none is active.
const char* api_name(const char* fallback);

// Throws unless dtype is fp32, fp16 or bf16.
void check_float_dtype(const char* fn, const char* what, DType dtype);
// Throws unless the view lives on (device, device_id).
void check_device(const char* fn, const char* what, const TensorView& x, DeviceType device,
                  int device_id);
// Throws unless x has exactly `shape` (entries < 0 are wildcards, reported as "n").
void check_shape(const char* fn, const char* what, const TensorView& x,
                 const std::vector<int64_t>& shape);
// Throws unless bits is a valid width for mode (1..8; Prod 2..8).
void check_bits(const char* fn, const char* what, int bits, QuantMode mode);
// Throws unless bits (possibly fractional) splits into valid integral widths for mode.
void check_fractional_bits(const char* fn, const char* what, double bits, QuantMode mode);

// Converts n rows of an fp32/fp16/bf16 array (row stride `src_stride` elements, starting at
// element `src_offset`) to fp32, gathering `channels` (empty = the first `dim` channels).
void convert_rows(const void* src, DType dtype, int64_t src_offset, int64_t src_stride, int64_t n,
                  const std::vector<int>& channels, int64_t dim, float* dst);

// Reports the first non-finite element of the CPU array x (any rank, float dtype) as an
// InvalidArgument from fn; if none is found (a finite row whose squared norm overflows float),
// reports that instead. Never returns.
[[noreturn]] void throw_non_finite(const char* fn, const char* what, const TensorView& x);

// Whether a fractional width is integral.
inline bool is_integral(double bits) { return bits == static_cast<double>(static_cast<int>(bits)); }

}  // namespace tqattn::cache_detail

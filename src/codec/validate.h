// Argument checks shared by the codec's public entry points.
#pragma once

#include <cstdint>

#include "tqattn/error.h"
#include "tqattn/format.h"

namespace tqattn::codec {

inline void check_dim(const char* fn, int64_t dim) {
  if (dim < kMinDim || dim > kMaxDim)
    throw_invalid(fn, detail::concat("dim in [", kMinDim, ", ", kMaxDim, "]"), dim);
}

inline void check_bits(const char* fn, int64_t bits, int min_bits) {
  if (bits < min_bits || bits > kMaxBits)
    throw_invalid(fn, detail::concat("bits in [", min_bits, ", ", kMaxBits, "]"), bits);
}

inline bool is_power_of_two(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

}  // namespace tqattn::codec

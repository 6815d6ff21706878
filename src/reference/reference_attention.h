// Dequantize-then-attend in double precision: the reference the fused kernels are tested against.
// Written from the format and the option semantics in include/tqattn/attention.h, sharing no code
// with the fused path (it assumes valid inputs: the public front end validates).
#pragma once

#include <cstdint>
#include <vector>

#include "tqattn/attention.h"
#include "tqattn/cache.h"
#include "tqattn/tensor.h"

namespace tqattn::reference {

struct AttentionResult {
  std::vector<double> out;  // [B, Hq, L, D]
  std::vector<double> lse;  // [B, Hq, L]
};

// Dequantized states [B, H, max_length, D] in double (zero past each sequence's length):
// norm * (Pi^T c[idx] + sqrt(pi/2)/d * gamma * S^T sign) per part, scattered to its channels.
std::vector<double> dequantize(const QuantizedStates& states);

// Attention of queries [B, Hq, L, D] (any float dtype) over double keys/values [B, H_kv, S, D]
// whose sequence b holds lengths[b] valid tokens.
AttentionResult attend(const TensorView& queries, const std::vector<double>& keys,
                       const std::vector<double>& values, int64_t kv_heads, int64_t seq,
                       const std::vector<int64_t>& lengths, const AttentionOptions& options);

AttentionResult attention(const TensorView& queries, const QuantizedStates& keys,
                          const QuantizedStates& values, const AttentionOptions& options);

// Over fp32 keys/values [B, H_kv, S, D] (every sequence of length S).
AttentionResult dense_attention(const TensorView& queries, const TensorView& keys,
                                const TensorView& values, const AttentionOptions& options);

}  // namespace tqattn::reference

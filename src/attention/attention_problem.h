// The attention call after validation: shapes, per-sequence positions and the mask resolved once
// at the public boundary, so that every backend kernel reads plain numbers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "tqattn/attention.h"
#include "tqattn/cache.h"
#include "tqattn/tensor.h"

namespace tqattn::attention {

// An additive or boolean mask broadcast to [B, Hq, L, S]: element strides, 0 on broadcast axes.
struct MaskInfo {
  const void* data = nullptr;  // null: no mask
  DType dtype = DType::kBool;
  int64_t stride_b = 0;
  int64_t stride_h = 0;
  int64_t stride_l = 0;
  int64_t stride_s = 0;

  // Additive value at (b, h, l, s): 0 or -inf for a boolean mask.
  float at(int64_t b, int64_t h, int64_t l, int64_t s) const;
};

struct Problem {
  int64_t batch = 0;
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t group = 0;  // q_heads / kv_heads
  int64_t q_len = 0;
  int64_t head_dim = 0;
  int64_t max_len = 0;             // S
  std::vector<int64_t> lengths;    // per sequence
  std::vector<int64_t> positions;  // absolute position of query 0, per sequence
  bool causal = false;
  int64_t window = 0;
  float scale = 1.0f;
  float softcap = 0.0f;
  MaskInfo mask;
  const float* sinks = nullptr;  // [Hq] or null
  int num_threads = 1;

  // Keys [lo, hi) of sequence b visible to query l from length, causal and window (the mask array
  // can hide more). Empty ranges come out as lo >= hi.
  int64_t visible_lo(int64_t b, int64_t l) const {
    if (window <= 0) return 0;
    return std::max<int64_t>(0, positions[b] + l - window + 1);
  }
  int64_t visible_hi(int64_t b, int64_t l) const {
    if (!causal) return lengths[b];
    return std::min<int64_t>(lengths[b], positions[b] + l + 1);
  }
};

// Validates a fused call and resolves it. fn names the public function in errors; check_data also
// scans queries, the additive mask and sinks for NaN (CPU tensors only).
Problem resolve_quantized(const char* fn, const TensorView& queries, const QuantizedStates& keys,
                          const QuantizedStates& values, const TensorView* out,
                          const AttentionOptions& options, const TensorView* lse, bool check_data);

// The same for dense fp32 keys/values [B, H_kv, S, D].
Problem resolve_dense(const char* fn, const TensorView& queries, const TensorView& keys,
                      const TensorView& values, const TensorView& out,
                      const AttentionOptions& options, const TensorView* lse);

// Reads element i of a fp32/fp16/bf16 tensor as float.
float load_float(const void* data, DType dtype, int64_t i);
// Writes element i of a fp32/fp16/bf16 tensor.
void store_float(void* data, DType dtype, int64_t i, float value);

}  // namespace tqattn::attention

// Scaled-dot-product attention that reads the packed cache directly.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "tqattn/cache.h"
#include "tqattn/tensor.h"

namespace tqattn {

struct AttentionOptions {
  std::optional<float> scale;  // default 1 / sqrt(D)
  // Causal: query i of sequence b sits at absolute position offset_b + i, where offset_b is
  // causal_offset when >= 0, else lengths[b] - L (the L queries are the last L positions).
  // Key j is visible iff j <= position.
  bool causal = false;
  int64_t causal_offset = -1;
  // Sliding window (> 0): key j is visible only if position - j < window. Needs positions, so it
  // uses the causal offsets above whether or not causal is set.
  int64_t window = 0;
  // Boolean (true = attend) or additive (fp32/fp16/bf16) mask broadcastable to [B, Hq, L, S],
  // S = the longest sequence; combined with causal/window.
  std::optional<TensorView> mask;
  // One logit per query head (fp32 [Hq]) that joins each row's softmax denominator and carries no
  // value (gpt-oss attention sinks).
  std::optional<TensorView> sinks;
  // > 0: logits become softcap * tanh(logits / softcap) before masking (Gemma 2).
  float softcap = 0.0f;
  int num_threads = 0;      // CPU; 0 = all hardware threads
  void* stream = nullptr;   // CUDA: a cudaStream_t; null = the default stream
};

// queries [B, Hq, L, D] fp32/fp16/bf16; keys/values states of [B, H_kv, S, D] with Hq % H_kv == 0
// on the queries' device; out [B, Hq, L, D] in the queries' dtype; lse (optional) fp32 [B, Hq, L],
// natural log of each row's softmax denominator after scaling (sinks included). A row with no
// visible key (and no sink) gives zeros and lse = -inf.
void scaled_dot_product_attention(const TensorView& queries, const QuantizedStates& keys,
                                  const QuantizedStates& values, const TensorView& out,
                                  const AttentionOptions& options = {},
                                  const TensorView* lse = nullptr);

// The same operation over unquantized fp32 keys/values [B, H_kv, S, D] (S shared by the batch):
// BLAS sgemm scores and a vectorised softmax. The baseline the fused path is measured against.
void dense_attention(const TensorView& queries, const TensorView& keys, const TensorView& values,
                     const TensorView& out, const AttentionOptions& options = {},
                     const TensorView* lse = nullptr);

// Whether the fused path supports these inputs on their device; empty when it does, else why not.
std::string attention_unsupported_reason(const TensorView& queries, const QuantizedStates& keys,
                                         const QuantizedStates& values,
                                         const AttentionOptions& options);

}  // namespace tqattn

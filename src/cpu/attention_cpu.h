// The CPU attention entry points behind the public front end (inputs already validated).
#pragma once

#include "attention/attention_problem.h"
#include "tqattn/cache.h"
#include "tqattn/tensor.h"

namespace tqattn::cpu {

// Which fused kernel variant runs: the best SIMD target when available, or the scalar twin.
enum class KernelImpl { kAuto, kSimd, kScalar };

void fused_attention(const attention::Problem& problem, const TensorView& queries,
                     const QuantizedStates& keys, const QuantizedStates& values,
                     const TensorView& out, const TensorView* lse,
                     KernelImpl impl = KernelImpl::kAuto);

// Dense fp32 keys/values [B, H_kv, S, D] with OpenBLAS sgemm scores and a vectorised softmax.
void dense_attention(const attention::Problem& problem, const TensorView& queries,
                     const TensorView& keys, const TensorView& values, const TensorView& out,
                     const TensorView* lse);

// How the fused path splits the KV range (exposed for tests): tokens per chunk for a problem.
int64_t fused_chunk_tokens(const attention::Problem& problem);

}  // namespace tqattn::cpu

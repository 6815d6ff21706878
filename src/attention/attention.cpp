// Public attention entry points: validate once, then dispatch on the queries' device.
#include "tqattn/attention.h"

#include "attention/attention_problem.h"
#include "cpu/attention_cpu.h"
#include "cuda/cuda_backend.h"
#include "tqattn/error.h"

namespace tqattn {

void scaled_dot_product_attention(const TensorView& queries, const QuantizedStates& keys,
                                  const QuantizedStates& values, const TensorView& out,
                                  const AttentionOptions& options, const TensorView* lse) {
  const char* fn = "scaled_dot_product_attention";
  const attention::Problem problem =
      attention::resolve_quantized(fn, queries, keys, values, &out, options, lse, true);
  switch (queries.device) {
    case DeviceType::kCPU:
      cpu::fused_attention(problem, queries, keys, values, out, lse);
      return;
    case DeviceType::kCUDA:
      cuda::attention(queries, keys, values, out, options, lse);
      return;
    default:
      break;
  }
  throw_invalid(fn, "queries on device cpu or cuda", static_cast<int>(queries.device));
}

void dense_attention(const TensorView& queries, const TensorView& keys, const TensorView& values,
                     const TensorView& out, const AttentionOptions& options,
                     const TensorView* lse) {
  const char* fn = "dense_attention";
  const attention::Problem problem =
      attention::resolve_dense(fn, queries, keys, values, out, options, lse);
  switch (queries.device) {
    case DeviceType::kCPU:
      cpu::dense_attention(problem, queries, keys, values, out, lse);
      return;
    default:
      break;
  }
  throw_invalid(fn, "tensors on the cpu (the dense baseline is CPU only)",
                device_name(queries.device));
}

std::string attention_unsupported_reason(const TensorView& queries, const QuantizedStates& keys,
                                         const QuantizedStates& values,
                                         const AttentionOptions& options) {
  try {
    attention::resolve_quantized("scaled_dot_product_attention", queries, keys, values, nullptr,
                                 options, nullptr, false);
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  switch (queries.device) {
    case DeviceType::kCPU:
      return {};
    case DeviceType::kCUDA:
      return cuda::unsupported_reason(queries, keys, values, options);
    default:
      break;
  }
  return "queries on an unknown device (supported: cpu, cuda)";
}

}  // namespace tqattn

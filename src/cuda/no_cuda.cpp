// The CUDA backend when the library is built without CUDA: every entry point throws.
#include "cuda/cuda_backend.h"
#include "tqattn/error.h"

namespace tqattn::cuda {
namespace {
[[noreturn]] void not_built(const char* fn) {
  throw_runtime(fn,
                "this build of tqattn has no CUDA backend (configure with -DTQATTN_CUDA=ON "
                "where nvcc is installed)");
}
}  // namespace

bool built() { return false; }
int device_count() { return 0; }
void* device_alloc(size_t, int) { not_built("device_alloc"); }
void device_free(void*, int) noexcept {}
void device_memset_zero(void*, size_t, int) { not_built("device_memset_zero"); }
void copy_bytes(void*, const void*, size_t, int) { not_built("copy_bytes"); }
void synchronize_device(int) { not_built("synchronize_device"); }
bool quantize_write(const TensorQuantizer&, const TensorView&, const std::vector<PackedPlanes>&,
                    int64_t, int64_t, int64_t, const std::vector<int64_t>&, int64_t, void*, bool,
                    bool) {
  not_built("quantize");
}
void dequantize_states(const QuantizedStates&, const TensorView&, void*) {
  not_built("dequantize_states");
}
void attention(const TensorView&, const QuantizedStates&, const QuantizedStates&, const TensorView&,
               const AttentionOptions&, const TensorView*) {
  not_built("scaled_dot_product_attention");
}
std::string unsupported_reason(const TensorView&, const QuantizedStates&, const QuantizedStates&,
                               const AttentionOptions&) {
  return "this build of tqattn has no CUDA backend";
}
void set_decode_splits(int) { not_built("set_decode_splits"); }
int decode_splits() { return 0; }
void set_stream_decode(bool) { not_built("set_stream_decode"); }
bool stream_decode_enabled() { return false; }
void set_wgmma_prefill(bool) { not_built("set_wgmma_prefill"); }
bool wgmma_prefill_enabled() { return false; }
void set_cluster_merge(bool) { not_built("set_cluster_merge"); }
bool cluster_merge_enabled() { return false; }
void set_early_copies(int) { not_built("set_early_copies"); }
int early_copies() { return 0; }
const char* last_attention_kernel() { return ""; }
const char* last_split_merge() { return ""; }
const char* last_stream_decode_variant() { return ""; }
int64_t workspace_bytes(int) { return 0; }
void release_workspaces(int) {}

}  // namespace tqattn::cuda

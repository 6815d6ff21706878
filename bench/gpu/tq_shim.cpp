// A C interface over the library for the PyTorch-driven GPU benchmark (bench_attention.py loads it
// with ctypes). Tensors are raw device pointers owned by PyTorch; calls run on the stream given.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/cuda_backend.h"
#include "tqattn/tqattn.h"

namespace {

thread_local std::string g_error;

struct States {
  std::unique_ptr<tqattn::QuantizedTensor> keys;
  std::unique_ptr<tqattn::QuantizedTensor> values;
  std::vector<int64_t> lengths;
  int64_t batch = 0, heads = 0, dim = 0;
};

std::shared_ptr<const tqattn::TensorQuantizer> make_quantizer(int64_t dim, int bits,
                                                              uint64_t seed) {
  tqattn::CodecConfig cfg;
  cfg.dim = static_cast<int>(dim);
  cfg.bits = bits;
  cfg.seed = seed;
  return std::make_shared<const tqattn::TensorQuantizer>(
      tqattn::TensorQuantizer::uniform(std::make_shared<const tqattn::Codec>(cfg)));
}

tqattn::DType dtype_of(int code) {
  return code == 0   ? tqattn::DType::kFloat32
         : code == 1 ? tqattn::DType::kFloat16
                     : tqattn::DType::kBFloat16;
}

template <class F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}

}  // namespace

extern "C" {

const char* tq_last_error() { return g_error.c_str(); }

// Quantizes fp16 device tensors k, v [B, H, S, D] into new device caches of capacity S (keys use
// seed 0, values seed 1, MSE); `lengths` (B entries) are the valid lengths of the views.
void* tq_states_create(const void* k, const void* v, int64_t B, int64_t H, int64_t S, int64_t D,
                       int key_bits, int value_bits, const int64_t* lengths) {
  auto st = std::make_unique<States>();
  const int rc = guarded([&] {
    using namespace tqattn;
    st->batch = B;
    st->heads = H;
    st->dim = D;
    st->keys = std::make_unique<QuantizedTensor>(make_quantizer(D, key_bits, 0), B, H, S,
                                                 DeviceType::kCUDA, 0);
    st->values = std::make_unique<QuantizedTensor>(make_quantizer(D, value_bits, 1), B, H, S,
                                                   DeviceType::kCUDA, 0);
    const std::vector<int64_t> zero(B, 0);
    st->keys->write(
        TensorView{const_cast<void*>(k), DType::kFloat16, {B, H, S, D}, DeviceType::kCUDA, 0},
        zero);
    st->values->write(
        TensorView{const_cast<void*>(v), DType::kFloat16, {B, H, S, D}, DeviceType::kCUDA, 0},
        zero);
    st->lengths.assign(lengths, lengths + B);
  });
  return rc == 0 ? st.release() : nullptr;
}

// A KVCache (keys seed 0, values seed 1, MSE; unchecked appends, as an engine's decode loop runs
// them) holding fp16 k, v [B, H, S, D] less their last token, for decode steps.
void* tq_cache_create(const void* k, const void* v, int64_t B, int64_t H, int64_t S, int64_t D,
                      int key_bits, int value_bits) {
  std::unique_ptr<tqattn::KVCache> cache;
  const int rc = guarded([&] {
    using namespace tqattn;
    KVCacheConfig cfg;
    cfg.batch = B;
    cfg.kv_heads = H;
    cfg.head_dim = D;
    cfg.key_bits = key_bits;
    cfg.value_bits = value_bits;
    cfg.device = DeviceType::kCUDA;
    cfg.check_finite = false;
    cache = std::make_unique<KVCache>(cfg);
    const std::vector<int64_t> shape = {B, H, S, D};
    cache->append(TensorView{const_cast<void*>(k), DType::kFloat16, shape, DeviceType::kCUDA, 0},
                  TensorView{const_cast<void*>(v), DType::kFloat16, shape, DeviceType::kCUDA, 0});
    cudaDeviceSynchronize();
    cache->trim(1);
  });
  return rc == 0 ? cache.release() : nullptr;
}

void tq_cache_destroy(void* h) { delete static_cast<tqattn::KVCache*>(h); }

// One decode step: appends k1, v1 [B, H, 1, D] (fp16), attends q [B, Hq, 1, D] (fp16) over the
// whole cache into out, then drops the token again (host-side lengths only), so that every step
// of a captured graph appends at the same position.
int tq_cache_step(void* h, const void* k1, const void* v1, const void* q, void* out, int64_t Hq,
                  void* stream) {
  auto* cache = static_cast<tqattn::KVCache*>(h);
  return guarded([&] {
    using namespace tqattn;
    const KVCacheConfig& c = cache->config();
    const std::vector<int64_t> kv_shape = {c.batch, c.kv_heads, 1, c.head_dim};
    const std::vector<int64_t> q_shape = {c.batch, Hq, 1, c.head_dim};
    cache->append(
        TensorView{const_cast<void*>(k1), DType::kFloat16, kv_shape, DeviceType::kCUDA, 0},
        TensorView{const_cast<void*>(v1), DType::kFloat16, kv_shape, DeviceType::kCUDA, 0}, stream);
    AttentionOptions opt;
    opt.stream = stream;
    scaled_dot_product_attention(
        TensorView{const_cast<void*>(q), DType::kFloat16, q_shape, DeviceType::kCUDA, 0},
        cache->keys(), cache->values(),
        TensorView{out, DType::kFloat16, q_shape, DeviceType::kCUDA, 0}, opt);
    cache->trim(1);
  });
}

void tq_states_destroy(void* h) { delete static_cast<States*>(h); }

// Exact bytes of the valid tokens (keys + values): what a fused call must read.
int64_t tq_states_nbytes(void* h) {
  auto* st = static_cast<States*>(h);
  return st->keys->view(st->lengths).nbytes() + st->values->view(st->lengths).nbytes();
}

// out = attention(q, states); q and out [B, Hq, L, D] of dtype code (0 fp32, 1 fp16, 2 bf16).
int tq_attention(void* h, const void* q, void* out, int64_t Hq, int64_t L, int dtype, int causal,
                 void* stream) {
  auto* st = static_cast<States*>(h);
  return guarded([&] {
    using namespace tqattn;
    AttentionOptions opt;
    opt.causal = causal != 0;
    opt.stream = stream;
    const std::vector<int64_t> shape = {st->batch, Hq, L, st->dim};
    scaled_dot_product_attention(
        TensorView{const_cast<void*>(q), dtype_of(dtype), shape, DeviceType::kCUDA, 0},
        st->keys->view(st->lengths), st->values->view(st->lengths),
        TensorView{out, dtype_of(dtype), shape, DeviceType::kCUDA, 0}, opt);
  });
}

// Dequantizes keys and values into fp16 device tensors [B, H, max_len, D] (the baseline's input).
int tq_dequantize(void* h, void* k_out, void* v_out, void* stream) {
  auto* st = static_cast<States*>(h);
  return guarded([&] {
    using namespace tqattn;
    int64_t max_len = 0;
    for (int64_t l : st->lengths) max_len = std::max(max_len, l);
    const std::vector<int64_t> shape = {st->batch, st->heads, max_len, st->dim};
    cuda::dequantize_states(st->keys->view(st->lengths),
                            TensorView{k_out, DType::kFloat16, shape, DeviceType::kCUDA, 0},
                            stream);
    cuda::dequantize_states(st->values->view(st->lengths),
                            TensorView{v_out, DType::kFloat16, shape, DeviceType::kCUDA, 0},
                            stream);
  });
}

int64_t tq_workspace_bytes() { return tqattn::cuda::workspace_bytes(0); }

// A device-to-device cudaMemcpyAsync, for the copy-bandwidth reference.
int tq_memcpy(void* dst, const void* src, int64_t bytes, void* stream) {
  return cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice,
                         static_cast<cudaStream_t>(stream)) == cudaSuccess
             ? 0
             : 1;
}

int tq_set_decode_splits(int n) {
  return guarded([&] { tqattn::cuda::set_decode_splits(n); });
}

// 1: decode through the stream kernel where it applies (default); 0: the generic kernel.
void tq_set_stream_decode(int on) { tqattn::cuda::set_stream_decode(on != 0); }

// 1: prefill through the wgmma kernel where it applies (default); 0: the mma.sync kernel.
void tq_set_wgmma_prefill(int on) { tqattn::cuda::set_wgmma_prefill(on != 0); }

// The stream decode's copies before its dependency wait: 0 none, 1 round 0, 2 every first round.
int tq_set_early_copies(int mode) {
  return guarded([&] { tqattn::cuda::set_early_copies(mode); });
}

// 1: KV splits merge through thread-block clusters where they can (default); 0: the workspace.
void tq_set_cluster_merge(int on) { tqattn::cuda::set_cluster_merge(on != 0); }

}  // extern "C"

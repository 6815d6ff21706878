// Quantized key/value states and the per-layer quantized KV cache.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "tqattn/codec.h"
#include "tqattn/format.h"
#include "tqattn/tensor.h"

namespace tqattn {

// A read view of one quantized tensor [B, H, T, D] (see format.h): per quantizer part one set of
// planes, all with the same capacity. Sequence b holds lengths[b] valid tokens (<= capacity).
struct QuantizedStates {
  std::shared_ptr<const TensorQuantizer> quantizer;
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t capacity = 0;
  std::vector<int64_t> lengths;     // size batch
  std::vector<PackedPlanes> parts;  // size quantizer->parts().size()
  DeviceType device = DeviceType::kCPU;
  int device_id = 0;
  // Tokens at positions below this, in every sequence, were written by work that had completed
  // before the planes' most recent write began (QuantizedTensor::view fills it in; 0 for planes
  // whose writes the library did not make). CUDA decode may copy those tokens while the kernel
  // before it in the stream is still finishing (programmatic dependent launch): that kernel can
  // only be the most recent write or something after it, never a writer of these tokens.
  int64_t settled_tokens = 0;

  int64_t dim() const { return quantizer->dim(); }
  int64_t max_length() const;
  // Exact bytes of the valid tokens across all planes.
  int64_t nbytes() const;
};

// Owns planes for [B, H, capacity] vectors; quantizes fp32/fp16/bf16 input [B, H, n, D] into them.
// Used on its own (quantize a whole tensor once) and as each half of a KVCache.
class QuantizedTensor {
 public:
  QuantizedTensor(std::shared_ptr<const TensorQuantizer> quantizer, int64_t batch, int64_t heads,
                  int64_t capacity, DeviceType device = DeviceType::kCPU, int device_id = 0);
  ~QuantizedTensor();
  QuantizedTensor(QuantizedTensor&&) noexcept;
  QuantizedTensor& operator=(QuantizedTensor&&) noexcept;
  QuantizedTensor(const QuantizedTensor&) = delete;
  QuantizedTensor& operator=(const QuantizedTensor&) = delete;

  // Quantizes x [B, H, n, D] (or [H, n, D] with sequence >= 0) into tokens [start, start + n) of
  // every (or that one) sequence. Caller guarantees start + n <= capacity.
  // CUDA: runs in `stream` order (a cudaStream_t; null = the default stream). check_finite reads
  // the kernel's non-finite flag back and throws InvalidArgument, which waits for the stream;
  // false keeps the call asynchronous, and a non-finite row is then stored with a NaN norm, so
  // attention over its token gives NaN. The CPU always checks.
  void write(const TensorView& x, const std::vector<int64_t>& start, int64_t sequence = -1,
             int num_threads = 0, void* stream = nullptr, bool check_finite = true);
  // Grows capacity to at least new_capacity, keeping the first keep[b] tokens of each sequence.
  // CUDA: allocates, and waits for the whole device before and after copying the kept tokens
  // (growth is geometric in a KVCache, so rare), which orders it against writes on any stream.
  void reserve(int64_t new_capacity, const std::vector<int64_t>& keep);

  QuantizedStates view(const std::vector<int64_t>& lengths) const;
  int64_t capacity() const { return capacity_; }
  int64_t allocated_bytes() const;
  const std::shared_ptr<const TensorQuantizer>& quantizer() const { return quantizer_; }

 private:
  friend class KVCache;
  // write(); beside_previous: the previous work in the stream is the write of another
  // QuantizedTensor (a KVCache's keys before its values), which this one may run beside.
  void write_planes(const TensorView& x, const std::vector<int64_t>& start, int64_t sequence,
                    int num_threads, void* stream, bool check_finite, bool beside_previous);
  struct Storage;
  std::shared_ptr<const TensorQuantizer> quantizer_;
  int64_t batch_;
  int64_t heads_;
  int64_t capacity_;
  DeviceType device_;
  int device_id_;
  // What view() gives as QuantizedStates::settled_tokens: the lowest start of the most recent
  // write, or the capacity after a write that waited for its kernels (check_finite) or a
  // reserve (which waits for the device).
  int64_t settled_ = 0;
  std::unique_ptr<Storage> storage_;
};

// Quantizes a whole tensor [B, H, T, D] (fp32/fp16/bf16, CPU or CUDA) into new states.
QuantizedTensor quantize_tensor(std::shared_ptr<const TensorQuantizer> quantizer,
                                const TensorView& x, int num_threads = 0);
// Dequantizes the valid tokens into out [B, H, max_length, D] fp32 (tokens past a sequence's
// length are zero). For the dequantize-then-attend baseline and for tests.
void dequantize_states(const QuantizedStates& states, const TensorView& out, int num_threads = 0);

struct KVCacheConfig {
  int64_t batch = 1;
  int64_t kv_heads = 1;
  int64_t head_dim = 128;
  double key_bits = 4;  // fractional: split channels (calibrated on the first append)
  double value_bits = 4;
  QuantMode key_mode = QuantMode::kMse;
  uint64_t seed = 0;  // keys use seed, values seed + 1 (as mlx-vlm)
  bool norm_correction = false;
  bool dense_rotation = false;
  int64_t step = 256;         // capacity grows in multiples of step, geometrically
  int64_t max_capacity = -1;  // > 0: fixed; appending past it throws
  DeviceType device = DeviceType::kCPU;
  int device_id = 0;
  int num_threads = 0;  // 0 = all hardware threads
  // CUDA: validate appended rows as the CPU does (throw on NaN / Inf), at the price of one 4-byte
  // read-back that waits for the append's stream. false keeps append asynchronous; a non-finite
  // row is then stored with a NaN norm, so attention over its token gives NaN.
  bool check_finite = true;
  // mlx-vlm's KV width convention: "3.5" is 3-bit keys and 4-bit values.
  static KVCacheConfig from_kv_bits(double bits, int64_t batch, int64_t kv_heads, int64_t head_dim);
};

// One layer's quantized KV cache for a batch of sequences with their own lengths.
class KVCache {
 public:
  explicit KVCache(const KVCacheConfig& config);
  // Supplying quantizers directly (caller's rotations/codebooks, e.g. read from mlx-vlm).
  KVCache(const KVCacheConfig& config, std::shared_ptr<const TensorQuantizer> keys,
          std::shared_ptr<const TensorQuantizer> values);

  // keys/values [B, H_kv, n, D] fp32/fp16/bf16 on the cache's device; every sequence grows by n.
  // CUDA: quantizes in `stream` order (a cudaStream_t; null = the default stream), so attention
  // on the same stream sees the new tokens without a host wait (see check_finite).
  void append(const TensorView& keys, const TensorView& values, void* stream = nullptr);
  // keys/values [H_kv, n, D] appended to sequence b only.
  void append_sequence(int64_t b, const TensorView& keys, const TensorView& values,
                       void* stream = nullptr);
  // Drops the last n tokens of every sequence (clamped at 0); returns the number dropped.
  int64_t trim(int64_t n);
  void reset();

  QuantizedStates keys() const;
  QuantizedStates values() const;
  const std::vector<int64_t>& lengths() const { return lengths_; }
  int64_t capacity() const;
  int64_t nbytes() const;           // exact bytes of the valid tokens, keys + values
  int64_t allocated_bytes() const;  // bytes held, including spare capacity
  const KVCacheConfig& config() const { return config_; }

 private:
  void ensure_capacity(int64_t needed);
  void calibrate(const TensorView& keys, const TensorView& values);
  KVCacheConfig config_;
  std::vector<int64_t> lengths_;
  std::unique_ptr<QuantizedTensor> keys_;
  std::unique_ptr<QuantizedTensor> values_;
};

}  // namespace tqattn

// KVCache: one layer's quantized keys and values for a batch of sequences of their own lengths.
#include <algorithm>
#include <cmath>
#include <limits>

#include "cache/cache_internal.h"
#include "cuda/cuda_backend.h"
#include "tqattn/cache.h"
#include "tqattn/error.h"

namespace tqattn {
namespace {

using cache_detail::ApiScope;

// The largest length a cache may reach; far past any memory, it only keeps sizes from overflowing.
constexpr int64_t kMaxTokens = int64_t{1} << 40;

CodecConfig base_codec_config(const KVCacheConfig& c, int bits, QuantMode mode, uint64_t seed) {
  CodecConfig cc;
  cc.dim = static_cast<int>(c.head_dim);
  cc.bits = bits;
  cc.mode = mode;
  cc.seed = seed;
  cc.dense_rotation = c.dense_rotation;
  cc.norm_correction = c.norm_correction;
  return cc;
}

std::shared_ptr<const TensorQuantizer> uniform_quantizer(const KVCacheConfig& c, double bits,
                                                         QuantMode mode, uint64_t seed) {
  auto codec =
      std::make_shared<const Codec>(base_codec_config(c, static_cast<int>(bits), mode, seed));
  return std::make_shared<const TensorQuantizer>(TensorQuantizer::uniform(std::move(codec)));
}

void validate_config(const char* fn, const KVCacheConfig& c) {
  if (c.batch < 1) throw_invalid(fn, "batch >= 1", c.batch);
  if (c.kv_heads < 1) throw_invalid(fn, "kv_heads >= 1", c.kv_heads);
  if (c.head_dim < kMinDim || c.head_dim > kMaxDim) {
    throw_invalid(fn, detail::concat("head_dim in ", kMinDim, "..", kMaxDim), c.head_dim);
  }
  cache_detail::check_fractional_bits(fn, "key_bits", c.key_bits, c.key_mode);
  cache_detail::check_fractional_bits(fn, "value_bits", c.value_bits, QuantMode::kMse);
  if (c.step < 1) throw_invalid(fn, "step >= 1", c.step);
  if (c.max_capacity < -1)
    throw_invalid(fn, "max_capacity > 0 (fixed) or 0/-1 (growing)", c.max_capacity);
  if (c.max_capacity > kMaxTokens) {
    throw_invalid(fn, detail::concat("max_capacity <= ", kMaxTokens), c.max_capacity);
  }
  if (c.device_id < 0) throw_invalid(fn, "device_id >= 0", c.device_id);
  if (c.num_threads < 0) throw_invalid(fn, "num_threads >= 0 (0 = all cores)", c.num_threads);
  if (c.device == DeviceType::kCUDA && cuda::device_count() == 0) {
    throw_runtime(fn, "a CUDA cache needs a CUDA device; ",
                  cuda::built() ? "none is present" : "this build of tqattn has no CUDA backend");
  }
}

void validate_supplied(const char* fn, const char* what, const KVCacheConfig& c,
                       const std::shared_ptr<const TensorQuantizer>& q) {
  if (!q) throw_invalid(fn, detail::concat("a ", what, " quantizer"), "null");
  if (q->dim() != c.head_dim) {
    throw_invalid(fn, detail::concat(what, " quantizer of dim ", c.head_dim, " (head_dim)"),
                  q->dim());
  }
}

// Converts (a copy of) a CPU or CUDA tensor [.., D] to fp32 rows on the host.
std::vector<float> host_rows(const char* fn, const char* what, const TensorView& x) {
  const int64_t dim = x.shape.back();
  const int64_t rows = dim ? x.numel() / dim : 0;
  std::vector<float> out(static_cast<size_t>(x.numel()));
  const void* src = x.data;
  std::vector<unsigned char> staged;
  if (x.device == DeviceType::kCUDA) {
    staged.resize(static_cast<size_t>(x.nbytes()));
    cuda::copy_bytes(staged.data(), x.data, staged.size(), x.device_id);
    src = staged.data();
  }
  cache_detail::convert_rows(src, x.dtype, 0, dim, rows, {}, dim, out.data());
  for (size_t k = 0; k < out.size(); ++k) {
    if (!std::isfinite(out[k])) {
      TensorView host = x;
      host.data = const_cast<void*>(src);
      host.device = DeviceType::kCPU;
      cache_detail::throw_non_finite(fn, what, host);
    }
  }
  return out;
}

}  // namespace

KVCacheConfig KVCacheConfig::from_kv_bits(double bits, int64_t batch, int64_t kv_heads,
                                          int64_t head_dim) {
  constexpr const char* fn = "KVCacheConfig.from_kv_bits";
  if (!std::isfinite(bits) || bits < kMinBits || bits > kMaxBits) {
    throw_invalid(fn, detail::concat("bits in [", kMinBits, ", ", kMaxBits, "]"), bits);
  }
  KVCacheConfig c;
  c.batch = batch;
  c.kv_heads = kv_heads;
  c.head_dim = head_dim;
  const double lo = std::floor(bits);
  if (bits - lo == 0.5) {
    // mlx-vlm: "3.5" means 3-bit keys and 4-bit values, not a per-tensor split.
    c.key_bits = lo;
    c.value_bits = lo + 1;
  } else {
    // Integral, or another fraction: the same (possibly channel-split) width for both.
    c.key_bits = bits;
    c.value_bits = bits;
  }
  validate_config(fn, c);
  return c;
}

KVCache::KVCache(const KVCacheConfig& config) : config_(config) {
  constexpr const char* fn = "KVCache";
  ApiScope scope(fn);
  validate_config(fn, config_);
  lengths_.assign(static_cast<size_t>(config_.batch), 0);
  const bool keys_integral = cache_detail::is_integral(config_.key_bits);
  const bool values_integral = cache_detail::is_integral(config_.value_bits);
  if (keys_integral && values_integral) {
    auto k = uniform_quantizer(config_, config_.key_bits, config_.key_mode, config_.seed);
    auto v = uniform_quantizer(config_, config_.value_bits, QuantMode::kMse, config_.seed + 1);
    keys_ = std::make_unique<QuantizedTensor>(k, config_.batch, config_.kv_heads, 0, config_.device,
                                              config_.device_id);
    values_ = std::make_unique<QuantizedTensor>(v, config_.batch, config_.kv_heads, 0,
                                                config_.device, config_.device_id);
  }
  // Otherwise the quantizers are calibrated on the first append (calibrate()).
}

KVCache::KVCache(const KVCacheConfig& config, std::shared_ptr<const TensorQuantizer> keys,
                 std::shared_ptr<const TensorQuantizer> values)
    : config_(config) {
  constexpr const char* fn = "KVCache";
  ApiScope scope(fn);
  validate_config(fn, config_);
  validate_supplied(fn, "keys", config_, keys);
  validate_supplied(fn, "values", config_, values);
  lengths_.assign(static_cast<size_t>(config_.batch), 0);
  keys_ = std::make_unique<QuantizedTensor>(std::move(keys), config_.batch, config_.kv_heads, 0,
                                            config_.device, config_.device_id);
  values_ = std::make_unique<QuantizedTensor>(std::move(values), config_.batch, config_.kv_heads, 0,
                                              config_.device, config_.device_id);
}

void KVCache::calibrate(const TensorView& keys, const TensorView& values) {
  // Each tensor: its fractional width is split by the mean |x| of this first append's rows.
  auto make = [&](const TensorView& x, const char* what, double bits, QuantMode mode,
                  uint64_t seed) -> std::shared_ptr<const TensorQuantizer> {
    if (cache_detail::is_integral(bits)) return uniform_quantizer(config_, bits, mode, seed);
    const std::vector<float> sample = host_rows("KVCache.append", what, x);
    const int64_t rows = static_cast<int64_t>(sample.size()) / config_.head_dim;
    return std::make_shared<const TensorQuantizer>(TensorQuantizer::calibrate_split(
        static_cast<int>(config_.head_dim), bits, base_codec_config(config_, 0, mode, seed),
        sample.data(), rows));
  };
  auto k = make(keys, "keys", config_.key_bits, config_.key_mode, config_.seed);
  auto v = make(values, "values", config_.value_bits, QuantMode::kMse, config_.seed + 1);
  keys_ = std::make_unique<QuantizedTensor>(std::move(k), config_.batch, config_.kv_heads, 0,
                                            config_.device, config_.device_id);
  values_ = std::make_unique<QuantizedTensor>(std::move(v), config_.batch, config_.kv_heads, 0,
                                              config_.device, config_.device_id);
}

void KVCache::ensure_capacity(int64_t needed) {
  const int64_t current = capacity();
  if (needed <= current) return;
  int64_t target;
  if (config_.max_capacity > 0) {
    target = config_.max_capacity;  // fixed: allocated once, in full
  } else {
    // Doubling keeps the total bytes copied by all growths below twice the final size.
    target = std::max(needed, 2 * current);
    target = (target + config_.step - 1) / config_.step * config_.step;
  }
  keys_->reserve(target, lengths_);
  values_->reserve(target, lengths_);
}

namespace {

void validate_append_pair(const char* fn, const KVCacheConfig& c, const TensorView& keys,
                          const TensorView& values, int rank) {
  const int64_t b = c.batch, h = c.kv_heads, d = c.head_dim;
  for (const auto& [x, what] : {std::pair<const TensorView&, const char*>{keys, "keys"},
                                std::pair<const TensorView&, const char*>{values, "values"}}) {
    cache_detail::check_float_dtype(fn, what, x.dtype);
    cache_detail::check_device(fn, what, x, c.device, c.device_id);
    if (rank == 4) {
      cache_detail::check_shape(fn, what, x, {b, h, -1, d});
    } else {
      cache_detail::check_shape(fn, what, x, {h, -1, d});
    }
    if (x.numel() > 0 && !x.data) throw_invalid(fn, detail::concat(what, " with data"), "null");
  }
  const int64_t nk = keys.shape[rank - 2], nv = values.shape[rank - 2];
  if (nk != nv) {
    throw_invalid(fn, detail::concat("values with as many tokens as keys (", nk, ")"), nv);
  }
}

}  // namespace

void KVCache::append(const TensorView& keys, const TensorView& values, void* stream) {
  constexpr const char* fn = "KVCache.append";
  ApiScope scope(fn);
  validate_append_pair(fn, config_, keys, values, 4);
  const int64_t n = keys.shape[2];
  if (n == 0) return;
  int64_t longest = 0;
  for (int64_t len : lengths_) longest = std::max(longest, len);
  const int64_t limit = config_.max_capacity > 0 ? config_.max_capacity : kMaxTokens;
  if (n > limit - longest) {
    throw_runtime(fn, "expected at most ", limit - longest, " new tokens (",
                  config_.max_capacity > 0 ? "fixed max_capacity " : "length limit ", limit,
                  ", longest sequence ", longest, "), got ", n);
  }
  if (!keys_) calibrate(keys, values);
  ensure_capacity(longest + n);
  keys_->write(keys, lengths_, -1, config_.num_threads, stream, config_.check_finite);
  // The values' kernel runs beside the keys' (CUDA, unchecked appends): a decode step's two
  // quantize kernels each cost a few microseconds of latency, not of bandwidth.
  values_->write_planes(values, lengths_, -1, config_.num_threads, stream, config_.check_finite,
                        true);
  for (int64_t& len : lengths_) len += n;
}

void KVCache::append_sequence(int64_t b, const TensorView& keys, const TensorView& values,
                              void* stream) {
  constexpr const char* fn = "KVCache.append_sequence";
  ApiScope scope(fn);
  if (b < 0 || b >= config_.batch) {
    throw_invalid(fn, detail::concat("sequence index in 0..", config_.batch - 1), b);
  }
  validate_append_pair(fn, config_, keys, values, 3);
  const int64_t n = keys.shape[1];
  if (n == 0) return;
  const int64_t limit = config_.max_capacity > 0 ? config_.max_capacity : kMaxTokens;
  if (n > limit - lengths_[b]) {
    throw_runtime(fn, "expected at most ", limit - lengths_[b], " new tokens for sequence ", b,
                  " (", config_.max_capacity > 0 ? "fixed max_capacity " : "length limit ", limit,
                  ", length ", lengths_[b], "), got ", n);
  }
  if (!keys_) calibrate(keys, values);
  ensure_capacity(lengths_[b] + n);
  keys_->write(keys, {lengths_[b]}, b, config_.num_threads, stream, config_.check_finite);
  values_->write_planes(values, {lengths_[b]}, b, config_.num_threads, stream, config_.check_finite,
                        true);
  lengths_[b] += n;
}

int64_t KVCache::trim(int64_t n) {
  if (n < 0) throw_invalid("KVCache.trim", "n >= 0 tokens to drop", n);
  int64_t dropped = 0;
  for (int64_t& len : lengths_) {
    const int64_t d = std::min(n, len);
    dropped = std::max(dropped, d);
    len -= d;
  }
  return dropped;
}

void KVCache::reset() {
  // Keeps the allocation and any calibrated split: a reset cache is refilled by the same model.
  std::fill(lengths_.begin(), lengths_.end(), 0);
}

QuantizedStates KVCache::keys() const {
  if (!keys_) {
    throw_runtime("KVCache.keys",
                  "a fractional key width is calibrated on the first append; append first");
  }
  return keys_->view(lengths_);
}

QuantizedStates KVCache::values() const {
  if (!values_) {
    throw_runtime("KVCache.values",
                  "a fractional value width is calibrated on the first append; append first");
  }
  return values_->view(lengths_);
}

int64_t KVCache::capacity() const { return keys_ ? keys_->capacity() : 0; }

int64_t KVCache::nbytes() const {
  if (!keys_) return 0;
  return keys().nbytes() + values().nbytes();
}

int64_t KVCache::allocated_bytes() const {
  if (!keys_) return 0;
  return keys_->allocated_bytes() + values_->allocated_bytes();
}

}  // namespace tqattn

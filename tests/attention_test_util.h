// Helpers shared by the attention tests: quantized key/value states from fresh random data,
// queries in any float dtype, and error measures against the double-precision reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "test_util.h"
#include "tqattn/tqattn.h"

namespace tqattn::testing {

struct QuantSpec {
  double bits = 4;
  QuantMode mode = QuantMode::kMse;
  bool dense_rotation = false;
  uint64_t seed = 1;
};

// A quantizer for dim channels: uniform for an integral width, a calibrated channel split
// (ranked on `sample`, rows of dim floats) for a fractional one.
inline std::shared_ptr<const TensorQuantizer> make_quantizer(int dim, const QuantSpec& spec,
                                                             const std::vector<float>& sample) {
  CodecConfig config;
  config.dim = dim;
  config.mode = spec.mode;
  config.seed = spec.seed;
  config.dense_rotation = spec.dense_rotation;
  if (spec.bits == std::floor(spec.bits)) {
    config.bits = static_cast<int>(spec.bits);
    return std::make_shared<const TensorQuantizer>(
        TensorQuantizer::uniform(std::make_shared<const Codec>(config)));
  }
  return std::make_shared<const TensorQuantizer>(TensorQuantizer::calibrate_split(
      dim, spec.bits, config, sample.data(), static_cast<int64_t>(sample.size()) / dim));
}

// Keys with a few larger channels (as real keys have), so that channel splits are meaningful.
inline std::vector<float> random_keys(int64_t n, int dim, uint64_t seed) {
  std::vector<float> x = random_normal(n * dim, seed);
  for (int64_t i = 0; i < n; ++i)
    for (int c = 0; c < dim; c += 7) x[i * dim + c] *= 4.0f;
  return x;
}

// A tensor in one of the float dtypes, holding data rounded to that dtype.
struct Tensor {
  std::vector<uint8_t> bytes;
  TensorView view;
  Tensor(const std::vector<float>& values, std::vector<int64_t> shape, DType dtype) {
    bytes.resize(values.size() * dtype_size(dtype));
    for (size_t i = 0; i < values.size(); ++i) {
      if (dtype == DType::kFloat32)
        reinterpret_cast<float*>(bytes.data())[i] = values[i];
      else if (dtype == DType::kFloat16)
        reinterpret_cast<uint16_t*>(bytes.data())[i] = float_to_half(values[i]);
      else
        reinterpret_cast<uint16_t*>(bytes.data())[i] = float_to_bf16(values[i]);
    }
    view = TensorView{bytes.data(), dtype, std::move(shape), DeviceType::kCPU, 0};
  }
  Tensor(int64_t n, std::vector<int64_t> shape, DType dtype, float fill)
      : Tensor(std::vector<float>(static_cast<size_t>(n), fill), std::move(shape), dtype) {}
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  std::vector<float> floats() const {
    std::vector<float> out(static_cast<size_t>(view.numel()));
    for (size_t i = 0; i < out.size(); ++i) {
      if (view.dtype == DType::kFloat32)
        out[i] = reinterpret_cast<const float*>(bytes.data())[i];
      else if (view.dtype == DType::kFloat16)
        out[i] = half_to_float(reinterpret_cast<const uint16_t*>(bytes.data())[i]);
      else
        out[i] = bf16_to_float(reinterpret_cast<const uint16_t*>(bytes.data())[i]);
    }
    return out;
  }
};

// Quantized keys and values [B, H_kv, capacity, D] of fresh random data.
struct KVStates {
  std::vector<float> keys, values;  // the unquantized data
  std::unique_ptr<QuantizedTensor> qk, qv;
  QuantizedStates k, v;

  KVStates(int64_t batch, int64_t heads, int64_t capacity, int dim,
           const std::vector<int64_t>& lengths, const QuantSpec& key_spec,
           const QuantSpec& value_spec, uint64_t seed) {
    const int64_t n = batch * heads * capacity;
    keys = random_keys(n, dim, seed);
    values = random_normal(n * dim, seed + 1000);
    auto kq = make_quantizer(dim, key_spec, keys);
    auto vq = make_quantizer(dim, value_spec, values);
    qk = std::make_unique<QuantizedTensor>(
        quantize_tensor(kq, cpu_view(keys.data(), {batch, heads, capacity, dim})));
    qv = std::make_unique<QuantizedTensor>(
        quantize_tensor(vq, cpu_view(values.data(), {batch, heads, capacity, dim})));
    k = qk->view(lengths);
    v = qv->view(lengths);
  }
};

inline double max_abs_diff_finite(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isinf(want[i]) && got[i] == want[i]) continue;
    worst = std::max(worst, std::abs(double(got[i]) - want[i]));
  }
  return worst;
}

}  // namespace tqattn::testing

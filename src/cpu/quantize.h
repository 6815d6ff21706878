// The batched CPU quantizer behind QuantizedTensor::write: many rows of one codec at a time,
// vectorised with Highway (runtime dispatch over the targets this CPU has). Codec::quantize is its
// scalar twin; see quantize_hwy.cpp for how closely the two agree.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "tqattn/codec.h"
#include "tqattn/format.h"
#include "tqattn/tensor.h"

namespace tqattn::cpu {

// One codec's tables laid out for the vector kernels (built once per cache, reused every append).
class PreparedCodec {
 public:
  explicit PreparedCodec(std::shared_ptr<const Codec> codec);

  const Codec& codec() const { return *codec_; }
  // Whether quantize() runs the vector kernel (Highway built and the dimension supported); when
  // false it calls Codec::quantize.
  bool vectorised() const { return vectorised_; }

  // Quantizes n rows x[i * dim, (i + 1) * dim) into slot slots[i] (or slot i when slots is null)
  // of each plane of `out`. Returns false when some row's squared norm is not finite (NaN/Inf
  // input or float overflow); that row's slots then hold unspecified values and the caller
  // reports the error. Scattered slots let one call take rows of many heads (decode appends one
  // token per head), so the vector lanes stay full.
  bool quantize(const float* x, int64_t n, const PackedPlanes& out,
                const int64_t* slots = nullptr) const;

  // Codec::dequantize (bit-identical): n rows from slots 0..n-1 of `in` into x [n][dim].
  void dequantize(const PackedPlanes& in, int64_t n, float* x) const;

  // Sizes, for the kernels (public so the per-target code can read them).
  struct Tables {
    int dim = 0;
    int index_bits = 0;
    int64_t index_words = 0;
    int64_t sign_words = 0;
    bool prod = false;
    bool hadamard = false;
    bool norm_correction = false;
    float inv_sqrt_dim = 0.0f;    // Rotation::forward's scale, computed the same way
    std::vector<float> signs;     // Hadamard sign vector
    std::vector<float> rotation;  // dense: M, row-major
    std::vector<float> qjl;       // Prod: S, row-major
    // The boundaries as a complete binary search tree, one table per level (quantize_hwy.cpp).
    std::vector<float> levels;
    std::vector<int64_t> level_offsets;
    std::vector<float> centroids;  // 2^index_bits, then 0 padding to 256
  };
  const Tables& tables() const { return tables_; }

 private:
  std::shared_ptr<const Codec> codec_;
  bool vectorised_ = false;
  Tables tables_;
};

// Scalar reference for the same contract (Codec::quantize plus the finiteness check).
bool quantize_rows_scalar(const Codec& codec, const float* x, int64_t n, const PackedPlanes& out,
                          const int64_t* slots = nullptr);

// count fp32 / fp16 / bf16 values to fp32 (vectorised; exact, as half_to_float / bf16_to_float).
void convert_to_float(const void* src, DType dtype, int64_t count, float* dst);

// The Highway target the vector kernel dispatches to on this CPU ("AVX3", "AVX2", ...), or
// "scalar" when built without Highway.
const char* quantize_target_name();

}  // namespace tqattn::cpu

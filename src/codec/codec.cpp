#include "tqattn/codec.h"

#include <cmath>
#include <utility>
#include <vector>

#include "codec/splitmix.h"
#include "codec/validate.h"
#include "tqattn/error.h"
#include "tqattn/half.h"

namespace tqattn {
namespace {

Rotation make_rotation(const CodecConfig& config) {
  if (!config.signs.empty() && !config.matrix.empty())
    throw_invalid("Codec", "at most one of signs and matrix", "both");
  if (!config.signs.empty()) {
    if (static_cast<int64_t>(config.signs.size()) != config.dim)
      throw_invalid("Codec", detail::concat(config.dim, " signs"), config.signs.size());
    return Rotation::hadamard_from_signs(config.signs);
  }
  if (!config.matrix.empty()) return Rotation::dense_from_matrix(config.dim, config.matrix);
  if (config.dense_rotation) return Rotation::dense(config.dim, config.seed);
  return Rotation::default_for(config.dim, config.seed);
}

std::vector<float> make_qjl_matrix(const CodecConfig& config) {
  const int64_t entries = int64_t{config.dim} * config.dim;
  if (!config.qjl_matrix.empty()) {
    if (static_cast<int64_t>(config.qjl_matrix.size()) != entries)
      throw_invalid("Codec", detail::concat("qjl_matrix of ", entries, " entries"),
                    config.qjl_matrix.size());
    for (float v : config.qjl_matrix)
      if (!std::isfinite(v)) throw_invalid("Codec", "a finite qjl_matrix", v);
    return config.qjl_matrix;
  }
  std::vector<float> s(static_cast<size_t>(entries));
  codec::SplitMix64 rng(config.seed ^ codec::kQjlStream);
  rng.gaussians(s.data(), entries);
  return s;
}

}  // namespace

Codec::Codec(const CodecConfig& config)
    : dim_(config.dim),
      bits_(config.bits),
      mode_(config.mode),
      norm_correction_(config.norm_correction),
      rotation_((codec::check_dim("Codec", config.dim),
                 codec::check_bits("Codec", config.bits,
                                   config.mode == QuantMode::kProd ? kMinProdBits : kMinBits),
                 make_rotation(config))) {
  if (mode_ != QuantMode::kMse && mode_ != QuantMode::kProd)
    throw_invalid("Codec", "mode mse or prod", static_cast<int>(mode_));
  if (mode_ == QuantMode::kProd && norm_correction_)
    throw_invalid("Codec", "norm_correction only with mode mse (it would bias Prod's inner products)",
                  "mode prod with norm_correction");
  codebook_ = config.centroids.empty()
                  ? Codebook::lloyd_max(dim_, index_bits())
                  : Codebook::from_centroids(dim_, index_bits(), config.centroids);
  if (mode_ == QuantMode::kProd) qjl_matrix_ = make_qjl_matrix(config);
}

float Codec::qjl_scale() const {
  return static_cast<float>(std::sqrt(M_PI / 2.0) / dim_);
}

void Codec::quantize(const float* x, int64_t n, const PackedPlanes& out) const {
  const int64_t words = index_words();
  const int64_t signs = sign_words(dim_);
  const std::vector<float>& centroids = codebook_->centroids();
  std::vector<float> y(dim_), residual(dim_), projected(dim_);
  std::vector<uint8_t> idx(dim_);
  for (int64_t v = 0; v < n; ++v) {
    const float* xv = x + v * dim_;
    float sumsq = 0.0f;
    for (int j = 0; j < dim_; ++j) sumsq += xv[j] * xv[j];
    const float norm = std::sqrt(sumsq);
    const float inv = norm > 0.0f ? 1.0f / norm : 0.0f;
    for (int j = 0; j < dim_; ++j) y[j] = xv[j] * inv;
    rotation_.forward(y.data(), y.data());
    float code_sumsq = 0.0f;
    for (int j = 0; j < dim_; ++j) {
      idx[j] = static_cast<uint8_t>(codebook_->nearest(y[j]));
      code_sumsq += centroids[idx[j]] * centroids[idx[j]];
    }
    pack_indices(idx.data(), dim_, index_bits(), out.indices + v * words);
    float stored = norm;
    if (norm_correction_ && code_sumsq > 0.0f) stored = norm / std::sqrt(code_sumsq);
    out.norms[v] = float_to_half(stored);
    if (mode_ != QuantMode::kProd) continue;
    // Residual of the unit vector, back in the original space where S was drawn.
    for (int j = 0; j < dim_; ++j) residual[j] = inv > 0.0f ? y[j] - centroids[idx[j]] : 0.0f;
    float gamma_sq = 0.0f;
    for (int j = 0; j < dim_; ++j) gamma_sq += residual[j] * residual[j];
    rotation_.inverse(residual.data(), residual.data());
    uint32_t* sign_out = out.qjl_signs + v * signs;
    for (int64_t w = 0; w < signs; ++w) sign_out[w] = 0;
    for (int i = 0; i < dim_; ++i) {
      const float* row = qjl_matrix_.data() + static_cast<size_t>(i) * dim_;
      float acc = 0.0f;
      for (int j = 0; j < dim_; ++j) acc += row[j] * residual[j];
      if (acc >= 0.0f) sign_out[i >> 5] |= 1u << (i & 31);
    }
    out.residual_norms[v] = float_to_half(std::sqrt(gamma_sq));
  }
}

void Codec::dequantize(const PackedPlanes& in, int64_t n, float* x) const {
  const int64_t words = index_words();
  const int64_t signs = sign_words(dim_);
  const std::vector<float>& centroids = codebook_->centroids();
  std::vector<float> y(dim_), qjl(dim_);
  const float qjl_constant = qjl_scale();
  for (int64_t v = 0; v < n; ++v) {
    const uint32_t* words_v = in.indices + v * words;
    for (int j = 0; j < dim_; ++j) y[j] = centroids[unpack_index(words_v, j, index_bits())];
    float* xv = x + v * dim_;
    rotation_.inverse(y.data(), xv);
    const float norm = half_to_float(in.norms[v]);
    if (mode_ == QuantMode::kProd) {
      const uint32_t* sign_v = in.qjl_signs + v * signs;
      const float gamma = half_to_float(in.residual_norms[v]) * qjl_constant;
      for (int j = 0; j < dim_; ++j) qjl[j] = 0.0f;
      for (int i = 0; i < dim_; ++i) {
        const float s = ((sign_v[i >> 5] >> (i & 31)) & 1u) ? gamma : -gamma;
        const float* row = qjl_matrix_.data() + static_cast<size_t>(i) * dim_;
        for (int j = 0; j < dim_; ++j) qjl[j] += s * row[j];
      }
      for (int j = 0; j < dim_; ++j) xv[j] += qjl[j];
    }
    for (int j = 0; j < dim_; ++j) xv[j] *= norm;
  }
}

}  // namespace tqattn

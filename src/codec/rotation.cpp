#include <cmath>
#include <utility>
#include <vector>

#include "codec/splitmix.h"
#include "codec/validate.h"
#include "tqattn/codec.h"
#include "tqattn/error.h"

namespace tqattn {
namespace {

// Householder QR of a row-major n x n matrix a (in place); returns Q with each column j multiplied
// by sign(R_jj), which makes Q Haar-distributed when a is Gaussian (Mezzadri 2007).
std::vector<double> haar_from_gaussian(std::vector<double> a, int n) {
  std::vector<double> q(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) q[static_cast<size_t>(i) * n + i] = 1.0;
  std::vector<double> v(n);
  std::vector<double> r_diag(n);
  for (int k = 0; k < n; ++k) {
    double norm = 0.0;
    for (int i = k; i < n; ++i) norm += a[static_cast<size_t>(i) * n + k] * a[static_cast<size_t>(i) * n + k];
    norm = std::sqrt(norm);
    const double akk = a[static_cast<size_t>(k) * n + k];
    const double alpha = akk >= 0 ? -norm : norm;  // R_kk = alpha
    r_diag[k] = alpha;
    for (int i = 0; i < n; ++i) v[i] = 0.0;
    for (int i = k; i < n; ++i) v[i] = a[static_cast<size_t>(i) * n + k];
    v[k] -= alpha;
    double vnorm2 = 0.0;
    for (int i = k; i < n; ++i) vnorm2 += v[i] * v[i];
    if (vnorm2 == 0.0) continue;
    // A <- (I - 2 v v^T / |v|^2) A on columns k..n-1.
    for (int j = k; j < n; ++j) {
      double dot = 0.0;
      for (int i = k; i < n; ++i) dot += v[i] * a[static_cast<size_t>(i) * n + j];
      const double f = 2.0 * dot / vnorm2;
      for (int i = k; i < n; ++i) a[static_cast<size_t>(i) * n + j] -= f * v[i];
    }
    // Q <- Q (I - 2 v v^T / |v|^2).
    for (int i = 0; i < n; ++i) {
      double dot = 0.0;
      for (int j = k; j < n; ++j) dot += q[static_cast<size_t>(i) * n + j] * v[j];
      const double f = 2.0 * dot / vnorm2;
      for (int j = k; j < n; ++j) q[static_cast<size_t>(i) * n + j] -= f * v[j];
    }
  }
  for (int j = 0; j < n; ++j) {
    if (r_diag[j] < 0)
      for (int i = 0; i < n; ++i) q[static_cast<size_t>(i) * n + j] = -q[static_cast<size_t>(i) * n + j];
  }
  return q;
}

void check_orthogonal(const char* fn, const std::vector<float>& m, int n) {
  for (int i = 0; i < n; ++i) {
    for (int j = i; j < n; ++j) {
      double dot = 0.0;
      for (int k = 0; k < n; ++k)
        dot += static_cast<double>(m[static_cast<size_t>(i) * n + k]) * m[static_cast<size_t>(j) * n + k];
      const double expected = i == j ? 1.0 : 0.0;
      if (!(std::abs(dot - expected) < 1e-3))
        throw_invalid(fn, "an orthogonal matrix (rows orthonormal to 1e-3)",
                      detail::concat("row ", i, " . row ", j, " = ", dot));
    }
  }
}

}  // namespace

void fast_hadamard_transform(float* x, int n) {
  for (int half = 1; half < n; half <<= 1) {
    for (int block = 0; block < n; block += 2 * half) {
      for (int i = block; i < block + half; ++i) {
        const float a = x[i];
        const float b = x[i + half];
        x[i] = a + b;
        x[i + half] = a - b;
      }
    }
  }
}

Rotation::Rotation(RotationKind kind, int dim, std::vector<float> signs, std::vector<float> matrix)
    : kind_(kind), dim_(dim), signs_(std::move(signs)), matrix_(std::move(matrix)) {}

Rotation Rotation::hadamard(int dim, uint64_t seed) {
  codec::check_dim("Rotation.hadamard", dim);
  if (!codec::is_power_of_two(dim))
    throw_invalid("Rotation.hadamard", "a power-of-two dim (use Rotation.dense otherwise)", dim);
  codec::SplitMix64 rng(seed ^ codec::kRotationStream);
  std::vector<float> signs(dim);
  for (float& s : signs) s = rng.sign();
  return Rotation(RotationKind::kHadamard, dim, std::move(signs), {});
}

Rotation Rotation::hadamard_from_signs(std::vector<float> signs) {
  const int64_t dim = static_cast<int64_t>(signs.size());
  codec::check_dim("Rotation.hadamard_from_signs", dim);
  if (!codec::is_power_of_two(dim))
    throw_invalid("Rotation.hadamard_from_signs", "a power-of-two number of signs", dim);
  for (float s : signs)
    if (s != 1.0f && s != -1.0f)
      throw_invalid("Rotation.hadamard_from_signs", "signs of +1 or -1", s);
  return Rotation(RotationKind::kHadamard, static_cast<int>(dim), std::move(signs), {});
}

Rotation Rotation::dense(int dim, uint64_t seed) {
  codec::check_dim("Rotation.dense", dim);
  codec::SplitMix64 rng(seed ^ codec::kRotationStream);
  std::vector<double> gaussian(static_cast<size_t>(dim) * dim);
  rng.gaussians(gaussian.data(), static_cast<int64_t>(gaussian.size()));
  const std::vector<double> q = haar_from_gaussian(std::move(gaussian), dim);
  return Rotation(RotationKind::kDense, dim, {}, std::vector<float>(q.begin(), q.end()));
}

Rotation Rotation::dense_from_matrix(int dim, std::vector<float> matrix) {
  codec::check_dim("Rotation.dense_from_matrix", dim);
  if (static_cast<int64_t>(matrix.size()) != int64_t{dim} * dim)
    throw_invalid("Rotation.dense_from_matrix", detail::concat(int64_t{dim} * dim, " entries"),
                  matrix.size());
  for (float v : matrix)
    if (!std::isfinite(v)) throw_invalid("Rotation.dense_from_matrix", "finite entries", v);
  check_orthogonal("Rotation.dense_from_matrix", matrix, dim);
  return Rotation(RotationKind::kDense, dim, {}, std::move(matrix));
}

Rotation Rotation::default_for(int dim, uint64_t seed) {
  return codec::is_power_of_two(dim) ? hadamard(dim, seed) : dense(dim, seed);
}

void Rotation::forward(const float* x, float* y) const {
  if (kind_ == RotationKind::kHadamard) {
    const float scale = 1.0f / std::sqrt(static_cast<float>(dim_));
    for (int i = 0; i < dim_; ++i) y[i] = x[i] * signs_[i];
    fast_hadamard_transform(y, dim_);
    for (int i = 0; i < dim_; ++i) y[i] *= scale;
    return;
  }
  std::vector<float> tmp(x, x + dim_);
  for (int i = 0; i < dim_; ++i) {
    const float* row = matrix_.data() + static_cast<size_t>(i) * dim_;
    float acc = 0.0f;
    for (int j = 0; j < dim_; ++j) acc += row[j] * tmp[j];
    y[i] = acc;
  }
}

void Rotation::inverse(const float* y, float* x) const {
  if (kind_ == RotationKind::kHadamard) {
    const float scale = 1.0f / std::sqrt(static_cast<float>(dim_));
    if (x != y)
      for (int i = 0; i < dim_; ++i) x[i] = y[i];
    fast_hadamard_transform(x, dim_);
    for (int i = 0; i < dim_; ++i) x[i] *= scale * signs_[i];
    return;
  }
  std::vector<float> tmp(y, y + dim_);
  for (int j = 0; j < dim_; ++j) x[j] = 0.0f;
  for (int i = 0; i < dim_; ++i) {
    const float* row = matrix_.data() + static_cast<size_t>(i) * dim_;
    const float yi = tmp[i];
    for (int j = 0; j < dim_; ++j) x[j] += row[j] * yi;
  }
}

std::vector<float> Rotation::to_matrix() const {
  if (kind_ == RotationKind::kDense) return matrix_;
  std::vector<float> m(static_cast<size_t>(dim_) * dim_);
  std::vector<float> e(dim_), col(dim_);
  for (int j = 0; j < dim_; ++j) {
    for (int i = 0; i < dim_; ++i) e[i] = i == j ? 1.0f : 0.0f;
    forward(e.data(), col.data());
    for (int i = 0; i < dim_; ++i) m[static_cast<size_t>(i) * dim_ + j] = col[i];
  }
  return m;
}

}  // namespace tqattn

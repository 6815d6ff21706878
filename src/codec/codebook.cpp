#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <utility>

#include "codec/coordinate_law.h"
#include "codec/validate.h"
#include "tqattn/codec.h"
#include "tqattn/error.h"

namespace tqattn {
namespace {

double distortion_of(const codec::CoordinateLaw& law, const std::vector<double>& centroids) {
  const int k = static_cast<int>(centroids.size());
  double total = 0.0;
  for (int i = 0; i < k; ++i) {
    const double lo = i == 0 ? -1.0 : 0.5 * (centroids[i - 1] + centroids[i]);
    const double hi = i == k - 1 ? 1.0 : 0.5 * (centroids[i] + centroids[i + 1]);
    double m0, m1, m2;
    law.cell_moments(lo, hi, &m0, &m1, &m2);
    const double c = centroids[i];
    total += m2 - 2.0 * c * m1 + c * c * m0;
  }
  return law.dim() * total;
}

void symmetrise(std::vector<double>& c) {
  const size_t k = c.size();
  for (size_t i = 0; i < k / 2; ++i) {
    const double half = 0.5 * (c[k - 1 - i] - c[i]);
    c[i] = -half;
    c[k - 1 - i] = half;
  }
}

bool strictly_ascending(const std::vector<double>& c) {
  for (size_t i = 1; i < c.size(); ++i)
    if (!(c[i] > c[i - 1])) return false;
  return true;
}

// Solves the Lloyd-Max conditions c_i = E[x | x in cell i] (cells bounded by midpoints) with exact
// cell integrals: a few Lloyd iterations from the high-resolution optimum, then Newton's method on
// F(c) = c - mu(c), whose Jacobian is tridiagonal, with step halving. The density is log-concave,
// so the fixed point is unique (Fleischer 1964) and this is the true optimum.
std::vector<double> solve_lloyd_max(const codec::CoordinateLaw& law, int bits) {
  const int k = 1 << bits;
  // Start from the high-resolution optimum: centroid density proportional to f^(1/3), which for
  // this family is the law of shape (d + 6) / 3.
  const codec::CoordinateLaw companding((law.dim() + 6.0) / 3.0);
  std::vector<double> c(k);
  for (int i = 0; i < k; ++i) c[i] = companding.quantile((i + 0.5) / k);
  symmetrise(c);

  std::vector<double> mu(k), d_lo(k), d_hi(k);
  auto evaluate = [&](const std::vector<double>& x, bool derivatives) {
    double residual = 0.0;
    for (int i = 0; i < k; ++i) {
      const double lo = i == 0 ? -1.0 : 0.5 * (x[i - 1] + x[i]);
      const double hi = i == k - 1 ? 1.0 : 0.5 * (x[i] + x[i + 1]);
      double m0, m1, m2;
      law.cell_moments(lo, hi, &m0, &m1, &m2);
      mu[i] = m0 > 0 ? m1 / m0 : 0.5 * (lo + hi);
      residual = std::max(residual, std::abs(x[i] - mu[i]));
      if (!derivatives) continue;
      // d mu / d lo and d mu / d hi: moving a boundary adds or removes mass f(b) at b.
      d_lo[i] = (i == 0 || m0 <= 0) ? 0.0 : law.density(lo) * (mu[i] - lo) / m0;
      d_hi[i] = (i == k - 1 || m0 <= 0) ? 0.0 : law.density(hi) * (hi - mu[i]) / m0;
    }
    return residual;
  };

  const double tolerance = 1e-14 / std::sqrt(law.dim());
  for (int it = 0; it < 8; ++it) {
    evaluate(c, false);
    c = mu;
    symmetrise(c);
  }
  std::vector<double> a(k), b(k), cc(k), rhs(k), step(k), trial(k);
  for (int it = 0; it < 100; ++it) {
    const double residual = evaluate(c, true);
    if (residual < tolerance) break;
    // J = I - dmu/dc, tridiagonal: row i has 0.5 d_lo (c_{i-1}), 1 - 0.5 (d_lo + d_hi), 0.5 d_hi.
    for (int i = 0; i < k; ++i) {
      a[i] = -0.5 * d_lo[i];
      b[i] = 1.0 - 0.5 * (d_lo[i] + d_hi[i]);
      cc[i] = -0.5 * d_hi[i];
      rhs[i] = -(c[i] - mu[i]);
    }
    for (int i = 1; i < k; ++i) {  // Thomas algorithm
      const double w = a[i] / b[i - 1];
      b[i] -= w * cc[i - 1];
      rhs[i] -= w * rhs[i - 1];
    }
    step[k - 1] = rhs[k - 1] / b[k - 1];
    for (int i = k - 2; i >= 0; --i) step[i] = (rhs[i] - cc[i] * step[i + 1]) / b[i];
    double scale = 1.0;
    for (int halving = 0; halving < 30; ++halving, scale *= 0.5) {
      for (int i = 0; i < k; ++i) trial[i] = c[i] + scale * step[i];
      symmetrise(trial);
      if (strictly_ascending(trial) && trial.front() > -1.0 && trial.back() < 1.0 &&
          evaluate(trial, false) < residual)
        break;
    }
    if (!strictly_ascending(trial)) {  // Newton failed: one plain Lloyd step instead
      evaluate(c, false);
      trial = mu;
      symmetrise(trial);
    }
    c.swap(trial);
  }
  return c;
}

}  // namespace

Codebook::Codebook(int dim, int bits, std::vector<float> centroids)
    : dim_(dim), bits_(bits), centroids_(std::move(centroids)) {
  boundaries_.resize(centroids_.size() - 1);
  for (size_t i = 0; i + 1 < centroids_.size(); ++i)
    boundaries_[i] = 0.5f * (centroids_[i] + centroids_[i + 1]);
  const codec::CoordinateLaw law(dim);
  distortion_ = distortion_of(law, std::vector<double>(centroids_.begin(), centroids_.end()));
}

std::shared_ptr<const Codebook> Codebook::lloyd_max(int dim, int bits) {
  codec::check_dim("Codebook.lloyd_max", dim);
  codec::check_bits("Codebook.lloyd_max", bits, kMinBits);
  static std::mutex mutex;
  static std::map<std::pair<int, int>, std::shared_ptr<const Codebook>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[{dim, bits}];
  if (!slot) {
    const codec::CoordinateLaw law(dim);
    const std::vector<double> solved = solve_lloyd_max(law, bits);
    slot = std::make_shared<const Codebook>(dim, bits,
                                            std::vector<float>(solved.begin(), solved.end()));
  }
  return slot;
}

std::shared_ptr<const Codebook> Codebook::from_centroids(int dim, int bits,
                                                         std::vector<float> centroids) {
  codec::check_dim("Codebook.from_centroids", dim);
  codec::check_bits("Codebook.from_centroids", bits, kMinBits);
  if (static_cast<int64_t>(centroids.size()) != (int64_t{1} << bits))
    throw_invalid("Codebook.from_centroids", detail::concat(1 << bits, " centroids for ", bits,
                                                            " bits"),
                  centroids.size());
  for (size_t i = 0; i < centroids.size(); ++i) {
    if (!std::isfinite(centroids[i]))
      throw_invalid("Codebook.from_centroids", "finite centroids", centroids[i]);
    if (i > 0 && !(centroids[i] > centroids[i - 1]))
      throw_invalid("Codebook.from_centroids", "strictly ascending centroids",
                    detail::concat(centroids[i - 1], " then ", centroids[i], " at ", i));
  }
  return std::make_shared<const Codebook>(dim, bits, std::move(centroids));
}

int Codebook::nearest(float y) const {
  // Number of boundaries strictly below y: ties at a boundary go to the lower centroid.
  return static_cast<int>(std::lower_bound(boundaries_.begin(), boundaries_.end(), y) -
                          boundaries_.begin());
}

}  // namespace tqattn

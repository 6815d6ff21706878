#include "codec/coordinate_law.h"

#include <algorithm>
#include <cmath>

namespace tqattn::codec {
namespace {

constexpr int kGridCells = 4096;
constexpr double kHalfPi = 1.57079632679489661923;
// 8-point Gauss-Legendre nodes and weights on [-1, 1].
constexpr double kNodes[8] = {-0.9602898564975363, -0.7966664774136267, -0.5255324099163290,
                              -0.1834346424956498, 0.1834346424956498,  0.5255324099163290,
                              0.7966664774136267,  0.9602898564975363};
constexpr double kWeights[8] = {0.1012285362903763, 0.2223810344533745, 0.3137066458778873,
                                0.3626837833783620, 0.3626837833783620, 0.3137066458778873,
                                0.2223810344533745, 0.1012285362903763};

}  // namespace

CoordinateLaw::CoordinateLaw(double dim) : dim_(dim) {
  // f(x) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) (1-x^2)^((d-3)/2); in theta the Jacobian cos
  // makes it C cos^(d-2).
  log_c_ = std::lgamma(dim / 2.0) - 0.5 * std::log(M_PI) - std::lgamma((dim - 1) / 2.0);
  // Coordinates beyond 14 standard deviations (1/sqrt(d)) carry mass under 1e-40.
  const double x_max = std::min(1.0, 14.0 / std::sqrt(dim));
  theta_max_ = x_max >= 1.0 ? kHalfPi : std::asin(x_max);
  step_ = 2.0 * theta_max_ / kGridCells;
  for (auto& c : cum_) c.assign(kGridCells + 1, 0.0);
  for (int cell = 0; cell < kGridCells; ++cell) {
    const double lo = -theta_max_ + cell * step_;
    double sums[3] = {0, 0, 0};
    for (int q = 0; q < 8; ++q) {
      const double theta = lo + 0.5 * step_ * (kNodes[q] + 1.0);
      const double g = density_theta(theta) * kWeights[q] * 0.5 * step_;
      const double x = std::sin(theta);
      sums[0] += g;
      sums[1] += g * x;
      sums[2] += g * x * x;
    }
    for (int k = 0; k < 3; ++k) cum_[k][cell + 1] = cum_[k][cell] + sums[k];
  }
  // Normalise the tabulated mass to exactly 1 (the truncated tails are below 1e-40).
  const double total = cum_[0][kGridCells];
  for (auto& c : cum_)
    for (double& v : c) v /= total;
  scale_ = 1.0 / total;
}

double CoordinateLaw::density_theta(double theta) const {
  const double c = std::cos(theta);
  if (c <= 0.0) return dim_ <= 2.0 ? std::exp(log_c_) : 0.0;
  return std::exp(log_c_ + (dim_ - 2) * std::log(c));
}

void CoordinateLaw::cumulative(double x, double* m0, double* m1, double* m2) const {
  const double theta = std::asin(std::clamp(x, -1.0, 1.0));
  if (theta <= -theta_max_) {
    *m0 = *m1 = *m2 = 0.0;
    return;
  }
  if (theta >= theta_max_) {
    *m0 = cum_[0][kGridCells];
    *m1 = cum_[1][kGridCells];
    *m2 = cum_[2][kGridCells];
    return;
  }
  const double pos = (theta + theta_max_) / step_;
  const int cell = std::min(static_cast<int>(pos), kGridCells - 1);
  const double t = pos - cell;
  // Cubic Hermite on [theta_i, theta_i+1] with derivatives d/dtheta M_k = g(theta) sin^k(theta).
  const double th0 = -theta_max_ + cell * step_;
  const double th1 = th0 + step_;
  const double g0 = density_theta(th0), g1 = density_theta(th1);
  const double s0 = std::sin(th0), s1 = std::sin(th1);
  const double h00 = (1 + 2 * t) * (1 - t) * (1 - t), h10 = t * (1 - t) * (1 - t);
  const double h01 = t * t * (3 - 2 * t), h11 = t * t * (t - 1);
  double d0[3] = {g0, g0 * s0, g0 * s0 * s0};
  double d1[3] = {g1, g1 * s1, g1 * s1 * s1};
  double* out[3] = {m0, m1, m2};
  for (int k = 0; k < 3; ++k) {
    *out[k] = h00 * cum_[k][cell] + h01 * cum_[k][cell + 1] +
              step_ * scale_ * (h10 * d0[k] + h11 * d1[k]);
  }
}

void CoordinateLaw::cell_moments(double a, double b, double* m0, double* m1, double* m2) const {
  double a0, a1, a2, b0, b1, b2;
  cumulative(a, &a0, &a1, &a2);
  cumulative(b, &b0, &b1, &b2);
  *m0 = b0 - a0;
  *m1 = b1 - a1;
  *m2 = b2 - a2;
}

double CoordinateLaw::density(double x) const {
  const double one_minus = 1.0 - x * x;
  if (one_minus <= 0.0) return 0.0;
  return scale_ * std::exp(log_c_ + 0.5 * (dim_ - 3.0) * std::log(one_minus));
}

double CoordinateLaw::quantile(double p) const {
  double lo = -1.0, hi = 1.0;
  for (int it = 0; it < 100; ++it) {
    const double mid = 0.5 * (lo + hi);
    double m0, m1, m2;
    cumulative(mid, &m0, &m1, &m2);
    (m0 < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

}  // namespace tqattn::codec

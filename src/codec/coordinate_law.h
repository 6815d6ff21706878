// Integrals of the coordinate law of a uniform random unit vector in R^dim, for the Lloyd-Max
// solver and for distortion of any codebook.
#pragma once

#include <vector>

namespace tqattn::codec {

// With x = sin(theta) the density becomes g(theta) = C cos^(dim-2)(theta) on (-pi/2, pi/2): smooth
// and bounded for every dim >= 2 (x itself has an integrable singularity at +-1 when dim = 2). The
// cumulative moments M_k(x) = integral_{-1}^{x} t^k f(t) dt, k = 0, 1, 2, are tabulated on a
// uniform theta grid by 8-point Gauss-Legendre per cell and interpolated between grid points by
// cubic Hermite with the exact derivatives, so a cell integral costs O(1) with error ~1e-13.
class CoordinateLaw {
 public:
  // shape is the dimension d; non-integer shapes give the family (1 - x^2)^((shape - 3) / 2),
  // used for the companding initialisation of the solver.
  explicit CoordinateLaw(double shape);
  // Integral over [a, b] (clamped to [-1, 1]) of t^k f(t): mass, first and second moments.
  void cell_moments(double a, double b, double* m0, double* m1, double* m2) const;
  // The density f(x) itself, for |x| < 1.
  double density(double x) const;
  // x with M_0(x) = p.
  double quantile(double p) const;
  double dim() const { return dim_; }

 private:
  void cumulative(double x, double* m0, double* m1, double* m2) const;
  double density_theta(double theta) const;  // g(theta)
  double dim_;
  double log_c_;
  double theta_max_;  // beyond it the mass is below 1e-30
  double step_;
  double scale_ = 1.0;  // 1 / tabulated mass, applied to the density's derivatives
  std::vector<double> cum_[3];
};

}  // namespace tqattn::codec

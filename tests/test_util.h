// Helpers shared by the tests: fresh random data, error norms.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace tqattn::testing {

inline std::vector<float> random_normal(int64_t n, uint64_t seed, float stddev = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// Rows of unit vectors.
inline std::vector<float> random_unit_vectors(int64_t n, int dim, uint64_t seed) {
  std::vector<float> v = random_normal(n * dim, seed);
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int j = 0; j < dim; ++j) s += double(v[i * dim + j]) * v[i * dim + j];
    const float inv = static_cast<float>(1.0 / std::sqrt(s));
    for (int j = 0; j < dim; ++j) v[i * dim + j] *= inv;
  }
  return v;
}

template <typename A, typename B>
double relative_l2(const A& got, const B& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = double(got[i]) - double(want[i]);
    num += d * d;
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

}  // namespace tqattn::testing

// The documented generator behind every seeded rotation and projection (docs/format.md):
// SplitMix64 (Steele, Lea, Flood 2014), uniform doubles from the top 53 bits, Gaussians by
// Box-Muller taking two uniforms per pair.
#pragma once

#include <cmath>
#include <cstdint>

namespace tqattn::codec {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // In (0, 1]: never 0, so log() is finite.
  double uniform() { return (static_cast<double>(next() >> 11) + 1.0) * 0x1.0p-53; }
  // +1 when the top bit is 0, else -1.
  float sign() { return (next() >> 63) ? -1.0f : 1.0f; }
  // Fills n standard normals (pairs from Box-Muller: r cos t, r sin t).
  template <typename T>
  void gaussians(T* out, int64_t n) {
    for (int64_t i = 0; i < n; i += 2) {
      const double u1 = uniform();
      const double u2 = uniform();
      const double r = std::sqrt(-2.0 * std::log(u1));
      const double t = 6.283185307179586476925 * u2;
      out[i] = static_cast<T>(r * std::cos(t));
      if (i + 1 < n) out[i + 1] = static_cast<T>(r * std::sin(t));
    }
  }

 private:
  uint64_t state_;
};

// Stream seeds derived from the user's seed, one per purpose, so that a Prod codec's QJL matrix
// differs from its rotation.
constexpr uint64_t kRotationStream = 0x0000000000000000ull;
constexpr uint64_t kQjlStream = 0x51ed270b27a4c3f5ull;

}  // namespace tqattn::codec

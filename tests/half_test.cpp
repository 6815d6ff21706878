#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "tqattn/half.h"

namespace tqattn {
namespace {

TEST(Half, EveryFp16PatternRoundTrips) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = half_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(half_to_float(float_to_half(f))));
      continue;
    }
    ASSERT_EQ(float_to_half(f), h) << std::hex << h;
  }
}

TEST(Half, RoundsToNearestIncludingSubnormals) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> exponent(-26.0f, 15.9f);
  for (int i = 0; i < 200000; ++i) {
    const float x = std::exp2(exponent(rng)) * ((rng() & 1) ? -1.0f : 1.0f);
    const float y = half_to_float(float_to_half(x));
    // The nearest fp16: no neighbour of the result is closer to x.
    const uint16_t h = float_to_half(x);
    for (int step : {-1, 1}) {
      const uint16_t n = static_cast<uint16_t>(h + step);
      const float neighbour = half_to_float(n);
      if (std::isnan(neighbour) || std::isinf(neighbour) || std::signbit(neighbour) != std::signbit(y))
        continue;
      ASSERT_LE(std::abs(y - x), std::abs(neighbour - x)) << x;
    }
  }
  EXPECT_EQ(float_to_half(1e-5f), 0x00a8);
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);
  EXPECT_EQ(float_to_half(-0.0f), 0x8000);
}

TEST(Half, Bfloat16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_float(float_to_bf16(3.140625f)), 3.140625f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
  EXPECT_EQ(float_to_bf16(1.0f + 0x1.0p-8f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + 0x1.8p-8f), 0x3f81);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
}

}  // namespace
}  // namespace tqattn

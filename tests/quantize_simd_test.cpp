// The vectorised batch quantizer and dequantizer (src/cpu/quantize_hwy.cpp) against their scalar
// twins Codec::quantize / Codec::dequantize. The vector kernel runs each row in its own SIMD lane
// with the scalar float operations in the same order, so the planes must be bit-identical, not
// merely close.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#ifdef TQATTN_HAVE_HIGHWAY
#include <hwy/targets.h>
#endif

#include "cpu/quantize.h"
#include "test_util.h"
#include "tqattn/codec.h"
#include "tqattn/half.h"

namespace tqattn {
namespace {

struct Planes {
  std::vector<uint32_t> indices;
  std::vector<uint16_t> norms;
  std::vector<uint16_t> residual_norms;
  std::vector<uint32_t> signs;

  Planes(const Codec& codec, int64_t n)
      : indices(n * codec.index_words() + 1, 0xdeadbeefu),
        norms(n + 1, 0xbeefu),
        residual_norms(n + 1, 0xbeefu),
        signs(n * sign_words(codec.dim()) + 1, 0xdeadbeefu) {}
  PackedPlanes view() {
    return {indices.data(), norms.data(), residual_norms.data(), signs.data()};
  }
};

// Fresh rows with varied norms (including a zero row and a tiny one) so that every code path of
// the codec is hit.
std::vector<float> test_rows(int64_t n, int dim, uint64_t seed) {
  std::vector<float> x = testing::random_normal(n * dim, seed);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::uniform_real_distribution<float> scale(0.01f, 30.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float s = scale(rng);
    for (int j = 0; j < dim; ++j) x[i * dim + j] *= s;
  }
  if (n > 3) {
    for (int j = 0; j < dim; ++j) x[3 * dim + j] = 0.0f;     // zero vector
    for (int j = 0; j < dim; ++j) x[1 * dim + j] *= 1e-20f;  // tiny but nonzero
  }
  return x;
}

void expect_identical(const CodecConfig& config, int64_t n, uint64_t seed) {
  auto codec = std::make_shared<const Codec>(config);
  const std::vector<float> x = test_rows(n, config.dim, seed);
  Planes scalar(*codec, n), simd(*codec, n);
  codec->quantize(x.data(), n, scalar.view());
  cpu::PreparedCodec prepared(codec);
  ASSERT_TRUE(prepared.quantize(x.data(), n, simd.view()));
  const std::string where = ::testing::PrintToString(config.dim) + " dims, " +
                            ::testing::PrintToString(config.bits) + " bits, " +
                            (config.mode == QuantMode::kProd ? "prod" : "mse") +
                            (config.dense_rotation ? ", dense" : "") +
                            (config.norm_correction ? ", norm correction" : "");
  EXPECT_EQ(simd.indices, scalar.indices) << where;
  EXPECT_EQ(simd.norms, scalar.norms) << where;
  if (config.mode == QuantMode::kProd) {
    EXPECT_EQ(simd.residual_norms, scalar.residual_norms) << where;
    EXPECT_EQ(simd.signs, scalar.signs) << where;
  }
  // Dequantization: the vector kernel against Codec::dequantize, bit for bit.
  std::vector<float> want(n * config.dim), got(n * config.dim + 1, -7.0f);
  codec->dequantize(scalar.view(), n, want.data());
  prepared.dequantize(scalar.view(), n, got.data());
  EXPECT_EQ(got.back(), -7.0f) << where;  // nothing written past row n - 1
  got.pop_back();
  EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * sizeof(float))) << where;
  // The guard words past the last slot are untouched.
  EXPECT_EQ(simd.indices.back(), 0xdeadbeefu);
  EXPECT_EQ(simd.norms.back(), 0xbeefu);
}

// Runs body once per SIMD target compiled in and supported by this CPU (AVX-512, AVX2, SSE4, ...,
// the emulated scalar one), so every dispatch path is checked, not only the best one here.
template <typename Body>
void for_each_target(Body body) {
#ifdef TQATTN_HAVE_HIGHWAY
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    ASSERT_EQ(std::string(cpu::quantize_target_name()), hwy::TargetName(target));
    body();
  }
  hwy::SetSupportedTargetsForTest(0);
#else
  body();
#endif
}

TEST(QuantizeSimd, EveryTargetMatchesScalar) {
  uint64_t seed = 500;
  for_each_target([&] {
    for (int dim : {17, 96, 128}) {
      for (int bits : {1, 4, 6, 8}) {
        CodecConfig config;
        config.dim = dim;
        config.bits = bits;
        config.seed = seed;
        expect_identical(config, 35, seed++);
        config.mode = QuantMode::kProd;
        config.bits = bits == 1 ? 2 : bits;
        expect_identical(config, 35, seed++);
      }
    }
    CodecConfig config;
    config.dim = 64;
    config.bits = 3;
    config.norm_correction = true;
    config.dense_rotation = true;
    expect_identical(config, 33, seed++);
  });
}

TEST(QuantizeSimd, HalfConversionIsExactForEveryBitPattern) {
  std::vector<uint16_t> all(1 << 16);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  for_each_target([&] {
    for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
      // Odd count and offset: the vector body and the scalar tail both run.
      std::vector<float> got(all.size() - 3);
      cpu::convert_to_float(all.data() + 1, dtype, static_cast<int64_t>(got.size()), got.data());
      for (size_t i = 0; i < got.size(); ++i) {
        const uint16_t bits = all[i + 1];
        const float want = dtype == DType::kFloat16 ? half_to_float(bits) : bf16_to_float(bits);
        if (std::isnan(want)) {
          ASSERT_TRUE(std::isnan(got[i])) << dtype_name(dtype) << " bits " << bits;
        } else {
          uint32_t a, b;
          std::memcpy(&a, &got[i], 4);
          std::memcpy(&b, &want, 4);
          ASSERT_EQ(a, b) << dtype_name(dtype) << " bits " << bits;
        }
      }
    }
  });
}

TEST(QuantizeSimd, ReportsTarget) {
  const std::string target = cpu::quantize_target_name();
  EXPECT_FALSE(target.empty());
  std::printf("quantizer target: %s\n", target.c_str());
}

TEST(QuantizeSimd, MseMatchesScalarAllBitsAndDims) {
  uint64_t seed = 100;
  for (int dim : {64, 80, 96, 128, 256}) {
    for (int bits = 1; bits <= 8; ++bits) {
      CodecConfig config;
      config.dim = dim;
      config.bits = bits;
      config.seed = seed;
      // 37 rows: two full 16-lane groups and a ragged tail.
      expect_identical(config, 37, seed++);
    }
  }
}

TEST(QuantizeSimd, MseDenseRotationAndNormCorrection) {
  uint64_t seed = 200;
  for (int dim : {64, 128}) {
    for (int bits : {1, 3, 4, 8}) {
      CodecConfig config;
      config.dim = dim;
      config.bits = bits;
      config.seed = seed;
      config.dense_rotation = true;
      config.norm_correction = true;
      expect_identical(config, 21, seed++);
      config.dense_rotation = false;
      expect_identical(config, 21, seed++);
    }
  }
}

TEST(QuantizeSimd, ProdMatchesScalar) {
  uint64_t seed = 300;
  for (int dim : {64, 80, 96, 128, 256}) {
    for (int bits = 2; bits <= 8; bits += (dim == 128 ? 1 : 3)) {
      CodecConfig config;
      config.dim = dim;
      config.bits = bits;
      config.mode = QuantMode::kProd;
      config.seed = seed;
      expect_identical(config, 19, seed++);
    }
  }
}

TEST(QuantizeSimd, OddDimsAndSingleRows) {
  uint64_t seed = 400;
  for (int dim : {2, 3, 5, 17, 33}) {
    for (int64_t n : {1, 2, 15, 16, 17}) {
      CodecConfig config;
      config.dim = dim;
      config.bits = 3;
      config.seed = seed;
      expect_identical(config, n, seed++);
    }
  }
}

TEST(QuantizeSimd, FlagsNonFiniteRows) {
  CodecConfig config;
  config.dim = 64;
  config.bits = 4;
  auto codec = std::make_shared<const Codec>(config);
  cpu::PreparedCodec prepared(codec);
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity(), 1e30f}) {
    std::vector<float> x = testing::random_normal(20 * 64, 7);
    x[17 * 64 + 5] = bad;
    Planes planes(*codec, 20);
    EXPECT_FALSE(prepared.quantize(x.data(), 20, planes.view())) << bad;
    EXPECT_FALSE(cpu::quantize_rows_scalar(*codec, x.data(), 20, planes.view())) << bad;
  }
  std::vector<float> x = testing::random_normal(20 * 64, 8);
  Planes planes(*codec, 20);
  EXPECT_TRUE(prepared.quantize(x.data(), 20, planes.view()));
}

TEST(QuantizeSimd, CallerSuppliedCentroidsAndSigns) {
  // A caller's (non-Lloyd-Max) table and sign vector take the same path as generated ones.
  CodecConfig config;
  config.dim = 32;
  config.bits = 2;
  config.centroids = {-0.3f, -0.05f, 0.1f, 0.35f};
  std::mt19937 rng(5);
  for (int j = 0; j < 32; ++j) config.signs.push_back(rng() & 1 ? 1.0f : -1.0f);
  expect_identical(config, 45, 9);
}

}  // namespace
}  // namespace tqattn

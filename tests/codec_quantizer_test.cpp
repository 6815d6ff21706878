#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "test_util.h"
#include "tqattn/tqattn.h"

namespace tqattn {
namespace {

struct Planes {
  std::vector<uint32_t> indices, signs;
  std::vector<uint16_t> norms, residual_norms;
  PackedPlanes view() {
    return {indices.data(), norms.data(), residual_norms.data(), signs.data()};
  }
};

Planes make_planes(const Codec& codec, int64_t n) {
  Planes p;
  p.indices.resize(n * codec.index_words());
  p.norms.resize(n);
  p.residual_norms.resize(n);
  p.signs.resize(n * sign_words(codec.dim()));
  return p;
}

std::vector<float> round_trip(const Codec& codec, const std::vector<float>& x) {
  const int64_t n = static_cast<int64_t>(x.size()) / codec.dim();
  Planes p = make_planes(codec, n);
  codec.quantize(x.data(), n, p.view());
  std::vector<float> back(x.size());
  codec.dequantize(p.view(), n, back.data());
  return back;
}

double mean_squared_error_per_vector(const std::vector<float>& a, const std::vector<float>& b,
                                     int dim) {
  double total = 0;
  for (size_t i = 0; i < a.size(); ++i) total += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return total / (a.size() / dim);
}

TEST(CodecMse, MeasuredDistortionMatchesCodebook) {
  const int64_t n = 20000;
  struct Case {
    int dim;
    bool dense;
  };
  for (Case c : {Case{64, false}, Case{128, false}, Case{256, false}, Case{96, true},
                 Case{64, true}, Case{128, true}}) {
    const auto x = testing::random_unit_vectors(n, c.dim, 100 + c.dim);
    for (int bits : {1, 2, 3, 4}) {
      if (c.dense && c.dim == 128 && bits != 3) continue;  // keep the dense sweep short
      CodecConfig config;
      config.dim = c.dim;
      config.bits = bits;
      config.seed = 17;
      config.dense_rotation = c.dense;
      const Codec codec(config);
      const double measured = mean_squared_error_per_vector(round_trip(codec, x), x, c.dim);
      EXPECT_NEAR(measured, codec.codebook().distortion(), 0.03 * codec.codebook().distortion())
          << "dim " << c.dim << " bits " << bits << (c.dense ? " dense" : " hadamard");
    }
  }
}

TEST(CodecProd, InnerProductsAreUnbiased) {
  for (int bits : {2, 3}) {
    const int dim = 64;
    const int pairs = 3000;
    double sum = 0, sum_sq = 0;
    for (int i = 0; i < pairs; ++i) {
      CodecConfig config;
      config.dim = dim;
      config.bits = bits;
      config.mode = QuantMode::kProd;
      config.seed = 1000 + i;  // a fresh QJL matrix (and rotation) per pair
      const Codec codec(config);
      const auto x = testing::random_unit_vectors(1, dim, 5000 + i);
      const auto q = testing::random_normal(dim, 9000 + i);
      const auto xhat = round_trip(codec, x);
      double exact = 0, estimate = 0;
      for (int j = 0; j < dim; ++j) {
        exact += double(q[j]) * x[j];
        estimate += double(q[j]) * xhat[j];
      }
      const double err = estimate - exact;
      sum += err;
      sum_sq += err * err;
    }
    const double mean = sum / pairs;
    const double stderr_ = std::sqrt((sum_sq / pairs - mean * mean) / pairs);
    EXPECT_LT(std::abs(mean), 3 * stderr_) << "bits " << bits << " mean " << mean;
    // And the error has the size the paper gives: D_prod ~ 0.56/d at 2 bits (times |q|^2 ~ d).
    EXPECT_GT(stderr_, 0.0);
  }
}

TEST(CodecMse, InnerProductsOfMseAreBiasedButProdIsNot) {
  // A check that the unbiasedness test can fail: 1-bit MSE shrinks inner products by 2/pi.
  const int dim = 64;
  double sum = 0;
  for (int i = 0; i < 500; ++i) {
    CodecConfig config;
    config.dim = dim;
    config.bits = 1;
    config.seed = i;
    const Codec codec(config);
    const auto x = testing::random_unit_vectors(1, dim, 77 + i);
    const auto xhat = round_trip(codec, x);
    double exact = 0, estimate = 0;
    for (int j = 0; j < dim; ++j) {
      exact += double(x[j]) * x[j];
      estimate += double(x[j]) * xhat[j];
    }
    sum += estimate - exact;
  }
  EXPECT_LT(sum / 500, -0.1);
}

TEST(Codec, ZeroVectorAndNormCorrection) {
  CodecConfig config;
  config.dim = 128;
  config.bits = 3;
  config.norm_correction = true;
  const Codec codec(config);
  std::vector<float> x = testing::random_normal(2 * 128, 3, 5.0f);
  for (int j = 0; j < 128; ++j) x[128 + j] = 0.0f;
  const auto back = round_trip(codec, x);
  double norm_x = 0, norm_back = 0;
  for (int j = 0; j < 128; ++j) {
    norm_x += double(x[j]) * x[j];
    norm_back += double(back[j]) * back[j];
    EXPECT_EQ(back[128 + j], 0.0f);
  }
  EXPECT_NEAR(std::sqrt(norm_back), std::sqrt(norm_x), 2e-3 * std::sqrt(norm_x));
}

TEST(Codec, SuppliedCentroidsAndRotationAreUsed) {
  CodecConfig config;
  config.dim = 64;
  config.bits = 2;
  config.centroids = {-0.2f, -0.05f, 0.05f, 0.2f};
  config.signs = Rotation::hadamard(64, 77).signs();
  const Codec codec(config);
  EXPECT_EQ(codec.codebook().centroids(), config.centroids);
  EXPECT_EQ(codec.rotation().signs(), config.signs);
  const auto x = testing::random_unit_vectors(1, 64, 1);
  const auto back = round_trip(codec, x);
  std::vector<float> y(64);
  codec.rotation().forward(back.data(), y.data());
  for (float v : y) {
    bool is_centroid = false;
    for (float c : config.centroids) is_centroid |= std::abs(std::abs(v) - std::abs(c)) < 1e-3f;
    EXPECT_TRUE(is_centroid) << v;
  }
}

TEST(TensorQuantizer, SplitPicksOutlierChannels) {
  const int dim = 128;
  const int64_t n = 256;
  auto x = testing::random_normal(n * dim, 21);
  const std::vector<int> outliers = {3, 50, 77, 90, 100, 101, 120, 127};
  for (int64_t i = 0; i < n; ++i)
    for (int c : outliers) x[i * dim + c] *= 20.0f;
  CodecConfig base;
  base.seed = 5;
  const TensorQuantizer q =
      TensorQuantizer::calibrate_split(dim, 2.0 + 8.0 / 128.0, base, x.data(), n);
  ASSERT_TRUE(q.is_split());
  EXPECT_EQ(q.parts()[1].channels, outliers);
  EXPECT_EQ(q.parts()[1].codec->bits(), 3);
  EXPECT_EQ(q.parts()[0].codec->bits(), 2);
  EXPECT_EQ(q.parts()[0].channels.size(), 120u);
  EXPECT_DOUBLE_EQ(q.bits_per_coordinate(), 2.0 + 8.0 / 128.0);
  EXPECT_EQ(q.bytes_per_vector(), bytes_per_vector(120, 2, QuantMode::kMse) +
                                      bytes_per_vector(8, 3, QuantMode::kMse));
  const TensorQuantizer whole = TensorQuantizer::calibrate_split(dim, 4.0, base, x.data(), n);
  EXPECT_FALSE(whole.is_split());
}

TEST(Codec, RejectsBadArguments) {
  auto make = [](int dim, int bits, QuantMode mode) {
    CodecConfig c;
    c.dim = dim;
    c.bits = bits;
    c.mode = mode;
    return Codec(c);
  };
  EXPECT_THROW(make(128, 0, QuantMode::kMse), InvalidArgument);
  EXPECT_THROW(make(128, 9, QuantMode::kMse), InvalidArgument);
  EXPECT_THROW(make(128, 1, QuantMode::kProd), InvalidArgument);
  EXPECT_THROW(make(1, 4, QuantMode::kMse), InvalidArgument);
  EXPECT_THROW(make(-5, 4, QuantMode::kMse), InvalidArgument);
  CodecConfig wrong_signs;
  wrong_signs.dim = 64;
  wrong_signs.signs.assign(32, 1.0f);
  EXPECT_THROW(Codec{wrong_signs}, InvalidArgument);
  CodecConfig prod_corrected;
  prod_corrected.dim = 64;
  prod_corrected.mode = QuantMode::kProd;
  prod_corrected.norm_correction = true;
  EXPECT_THROW(Codec{prod_corrected}, InvalidArgument);
  try {
    make(128, 9, QuantMode::kMse);
  } catch (const InvalidArgument& e) {
    EXPECT_STREQ(e.what(), "[tqattn.Codec] expected bits in [1, 8], got 9");
  }
}

}  // namespace
}  // namespace tqattn

#include <gtest/gtest.h>

#include <cmath>

#include "tqattn/tqattn.h"

namespace tqattn {
namespace {

TEST(Codebook, DistortionAtDim128MatchesPaper) {
  const double expected[] = {0.361, 0.116, 0.0340, 0.00931};
  for (int bits = 1; bits <= 4; ++bits) {
    const auto cb = Codebook::lloyd_max(128, bits);
    EXPECT_NEAR(cb->distortion(), expected[bits - 1], 0.01 * expected[bits - 1]) << bits;
  }
}

TEST(Codebook, ApproachesGaussianLimitAsDimGrows) {
  // Lloyd-Max for N(0, 1): 0.3634, 0.1175, 0.03455, 0.009497.
  const double gaussian[] = {0.3634, 0.1175, 0.03455, 0.009497};
  for (int bits = 1; bits <= 4; ++bits) {
    double previous_gap = 1e9;
    for (int dim : {16, 64, 256, 4096}) {
      const double gap = std::abs(Codebook::lloyd_max(dim, bits)->distortion() - gaussian[bits - 1]);
      EXPECT_LT(gap, previous_gap) << "dim " << dim << " bits " << bits;
      previous_gap = gap;
    }
    EXPECT_LT(previous_gap, 0.003 * gaussian[bits - 1]) << bits;
  }
  // Centroids scale as 1/sqrt(d): the top 2-bit centroid tends to 1.5104 / sqrt(d).
  EXPECT_NEAR(Codebook::lloyd_max(4096, 2)->centroids().back() * 64.0, 1.5104, 2e-3);
}

TEST(Codebook, SymmetricAscendingAndCached) {
  for (int dim : {2, 3, 80, 128}) {
    for (int bits = 1; bits <= 8; ++bits) {
      const auto cb = Codebook::lloyd_max(dim, bits);
      const auto& c = cb->centroids();
      ASSERT_EQ(static_cast<int>(c.size()), 1 << bits);
      for (size_t i = 0; i < c.size(); ++i) {
        EXPECT_EQ(c[i], -c[c.size() - 1 - i]) << dim << "/" << bits << "/" << i;
        if (i) EXPECT_GT(c[i], c[i - 1]);
      }
      EXPECT_EQ(cb.get(), Codebook::lloyd_max(dim, bits).get());
    }
  }
}

TEST(Codebook, IsAStationaryPointThatBeatsPerturbations) {
  // Optimality: moving any centroid increases the exact distortion.
  const auto cb = Codebook::lloyd_max(96, 3);
  for (size_t i = 0; i < cb->centroids().size(); ++i) {
    for (float delta : {-1e-3f, 1e-3f}) {
      auto c = cb->centroids();
      c[i] += delta / std::sqrt(96.0f);
      if (i > 0 && c[i] <= c[i - 1]) continue;
      if (i + 1 < c.size() && c[i] >= c[i + 1]) continue;
      EXPECT_GT(Codebook::from_centroids(96, 3, c)->distortion(), cb->distortion());
    }
  }
}

TEST(Codebook, ExactLawAtDim3IsUniform) {
  // For d = 3 a coordinate is uniform on [-1, 1]: the optimum is the uniform quantizer.
  const auto cb = Codebook::lloyd_max(3, 2);
  EXPECT_NEAR(cb->centroids()[3], 0.75, 1e-6);
  EXPECT_NEAR(cb->distortion(), 3.0 * (2.0 / 4) * (2.0 / 4) / 12.0, 1e-6);
}

TEST(Codebook, NearestTiesGoToLowerIndex) {
  const auto cb = Codebook::lloyd_max(64, 2);
  EXPECT_EQ(cb->nearest(0.0f), 1);
  EXPECT_EQ(cb->nearest(cb->boundaries()[2]), 2);
  EXPECT_EQ(cb->nearest(10.0f), 3);
  EXPECT_EQ(cb->nearest(-10.0f), 0);
}

TEST(Codebook, RejectsBadArguments) {
  EXPECT_THROW(Codebook::lloyd_max(128, 0), InvalidArgument);
  EXPECT_THROW(Codebook::lloyd_max(128, 9), InvalidArgument);
  EXPECT_THROW(Codebook::lloyd_max(1, 4), InvalidArgument);
  EXPECT_THROW(Codebook::from_centroids(64, 1, {0.1f, -0.1f}), InvalidArgument);
  EXPECT_THROW(Codebook::from_centroids(64, 2, {0.1f, 0.2f}), InvalidArgument);
  EXPECT_THROW(Codebook::from_centroids(64, 1, {-0.1f, NAN}), InvalidArgument);
  try {
    Codebook::lloyd_max(128, 9);
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("[tqattn.Codebook.lloyd_max] expected bits in [1, 8], got 9"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace tqattn

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "test_util.h"
#include "tqattn/tqattn.h"

namespace tqattn {
namespace {

void expect_orthogonal(const std::vector<float>& m, int n) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double dot = 0;
      for (int k = 0; k < n; ++k) dot += double(m[i * n + k]) * m[j * n + k];
      ASSERT_NEAR(dot, i == j ? 1.0 : 0.0, 1e-6) << i << "," << j;
    }
}

TEST(Rotation, HadamardAndDenseAreOrthogonal) {
  for (int dim : {2, 64, 128, 256}) expect_orthogonal(Rotation::hadamard(dim, 3).to_matrix(), dim);
  for (int dim : {3, 80, 96, 128}) expect_orthogonal(Rotation::dense(dim, 5).to_matrix(), dim);
}

TEST(Rotation, InverseIsExact) {
  for (const Rotation& r : {Rotation::hadamard(128, 1), Rotation::dense(96, 2)}) {
    const auto x = testing::random_normal(r.dim(), 11);
    std::vector<float> y(r.dim()), back(r.dim());
    r.forward(x.data(), y.data());
    r.inverse(y.data(), back.data());
    EXPECT_LT(testing::relative_l2(back, x), 1e-6);
    // In place too.
    std::vector<float> z = x;
    r.forward(z.data(), z.data());
    EXPECT_LT(testing::relative_l2(z, y), 1e-7);
  }
}

TEST(Rotation, FastHadamardEqualsDenseProduct) {
  const int dim = 64;
  const Rotation r = Rotation::hadamard(dim, 9);
  // Sylvester H_ij = (-1)^popcount(i & j); Pi = H diag(s) / sqrt(d).
  const auto x = testing::random_normal(dim, 4);
  std::vector<float> fast(dim);
  r.forward(x.data(), fast.data());
  for (int i = 0; i < dim; ++i) {
    double acc = 0;
    for (int j = 0; j < dim; ++j)
      acc += ((__builtin_popcount(i & j) & 1) ? -1.0 : 1.0) * r.signs()[j] * x[j];
    EXPECT_NEAR(fast[i], acc / std::sqrt(dim), 1e-5);
  }
}

TEST(Rotation, DeterministicFromSeedAndSuppliedPieces) {
  EXPECT_EQ(Rotation::hadamard(128, 42).signs(), Rotation::hadamard(128, 42).signs());
  EXPECT_NE(Rotation::hadamard(128, 42).signs(), Rotation::hadamard(128, 43).signs());
  EXPECT_EQ(Rotation::dense(80, 1).matrix(), Rotation::dense(80, 1).matrix());
  const Rotation given = Rotation::dense_from_matrix(80, Rotation::dense(80, 1).matrix());
  EXPECT_EQ(given.matrix(), Rotation::dense(80, 1).matrix());
  const Rotation from_signs = Rotation::hadamard_from_signs(Rotation::hadamard(64, 8).signs());
  EXPECT_EQ(from_signs.to_matrix(), Rotation::hadamard(64, 8).to_matrix());
  EXPECT_EQ(Rotation::default_for(96, 0).kind(), RotationKind::kDense);
  EXPECT_EQ(Rotation::default_for(128, 0).kind(), RotationKind::kHadamard);
}

TEST(Rotation, RejectsBadArguments) {
  EXPECT_THROW(Rotation::hadamard(96, 0), InvalidArgument);
  EXPECT_THROW(Rotation::hadamard(1, 0), InvalidArgument);
  EXPECT_THROW(Rotation::hadamard_from_signs({1.0f, 0.5f}), InvalidArgument);
  EXPECT_THROW(Rotation::dense_from_matrix(2, {1, 0, 0}), InvalidArgument);
  EXPECT_THROW(Rotation::dense_from_matrix(2, {1, 1, 0, 1}), InvalidArgument);
  EXPECT_THROW(Rotation::dense_from_matrix(2, {1, 0, 0, NAN}), InvalidArgument);
}

}  // namespace
}  // namespace tqattn

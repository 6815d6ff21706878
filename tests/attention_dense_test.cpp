// dense_attention (OpenBLAS baseline) against the double-precision reference on unquantized data.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "attention_test_util.h"
#include "reference/reference_attention.h"
#include "tqattn/tqattn.h"

namespace tqattn::testing {
namespace {

struct DenseCase {
  int64_t batch, kv_heads, group, q_len, seq, dim;
  int options;  // bit 0 causal, 1 window, 2 sinks, 3 softcap, 4 additive mask, 5 causal offset
  DType dtype;
};

class DenseVsReference : public ::testing::TestWithParam<int> {};

const std::vector<DenseCase>& dense_cases() {
  static const std::vector<DenseCase> list = {
      {1, 1, 1, 1, 1, 64, 0, DType::kFloat32},
      {1, 2, 4, 1, 7, 96, 1, DType::kFloat32},
      {2, 1, 7, 3, 129, 128, 1 | 4, DType::kFloat32},
      {1, 1, 8, 128, 129, 64, 1 | 2, DType::kFloat32},
      {1, 2, 4, 1, 4097, 128, 0, DType::kFloat32},
      {1, 1, 4, 3, 4097, 256, 8 | 16, DType::kFloat32},
      {2, 2, 1, 128, 300, 64, 1 | 2 | 4 | 8 | 16, DType::kFloat32},
      {1, 1, 4, 128, 7, 64, 1 | 32, DType::kFloat32},
      {1, 2, 4, 3, 129, 128, 1, DType::kFloat16},
      {1, 1, 7, 1, 129, 64, 4, DType::kBFloat16},
  };
  return list;
}

TEST_P(DenseVsReference, MatchesDoubleReference) {
  const DenseCase& c = dense_cases()[GetParam()];
  const int64_t Hq = c.kv_heads * c.group;
  const std::vector<float> k = random_normal(c.batch * c.kv_heads * c.seq * c.dim, 40 + GetParam());
  const std::vector<float> v = random_normal(k.size(), 60 + GetParam());
  Tensor q(random_normal(c.batch * Hq * c.q_len * c.dim, 80 + GetParam()),
           {c.batch, Hq, c.q_len, c.dim}, c.dtype);
  const TensorView kv = cpu_view(k.data(), {c.batch, c.kv_heads, c.seq, c.dim});
  const TensorView vv = cpu_view(v.data(), {c.batch, c.kv_heads, c.seq, c.dim});
  AttentionOptions o;
  o.num_threads = 2;
  std::vector<float> sinks, mask;
  std::mt19937_64 rng(GetParam());
  std::uniform_real_distribution<float> unif(0.0f, 1.0f);
  if (c.options & 1) o.causal = true;
  if (c.options & 2) o.window = 9;
  if (c.options & 4) {
    for (int64_t h = 0; h < Hq; ++h) sinks.push_back(unif(rng) * 2.0f);
    o.sinks = cpu_view(sinks.data(), {Hq});
  }
  if (c.options & 8) {
    o.softcap = 2.0f;
    o.scale = 0.5f;
  }
  if (c.options & 16) {
    mask.resize(static_cast<size_t>(c.q_len * c.seq));
    for (float& m : mask)
      m = unif(rng) < 0.1f ? -std::numeric_limits<float>::infinity() : unif(rng) - 0.5f;
    o.mask = cpu_view(mask.data(), {c.q_len, c.seq});
  }
  if (c.options & 32) o.causal_offset = 0;
  Tensor out(q.view.numel(), q.view.shape, c.dtype, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lse(static_cast<size_t>(c.batch * Hq * c.q_len));
  const TensorView lv = cpu_view(lse.data(), {c.batch, Hq, c.q_len});
  dense_attention(q.view, kv, vv, out.view, o, &lv);
  const reference::AttentionResult want = reference::dense_attention(q.view, kv, vv, o);
  const double bound =
      c.dtype == DType::kFloat32 ? 1e-5 : (c.dtype == DType::kFloat16 ? 1e-3 : 6e-3);
  EXPECT_LE(relative_l2(out.floats(), want.out), bound);
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(want.lse[i])) {
      EXPECT_EQ(lse[i], -std::numeric_limits<float>::infinity());
    } else {
      EXPECT_NEAR(lse[i], want.lse[i], 2e-5 * std::max(1.0, std::abs(want.lse[i])));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AttentionDense, DenseVsReference,
                         ::testing::Range(0, static_cast<int>(dense_cases().size())));

}  // namespace
}  // namespace tqattn::testing

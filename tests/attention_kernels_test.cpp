// The fused CPU kernels against their scalar twin, run-to-run and thread-count determinism, and
// fully masked rows.
#include "cpu/attention_kernels.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "attention/attention_problem.h"
#include "attention_test_util.h"
#include "cpu/attention_cpu.h"
#include "reference/reference_attention.h"
#include "tqattn/tqattn.h"

#if defined(TQATTN_HAVE_HIGHWAY)
#include "hwy/targets.h"
#endif

namespace tqattn::testing {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct KernelCase {
  double key_bits;
  QuantMode key_mode;
  double value_bits;
  int dim;
  int kv_heads;
  int group;
  int q_len;
  std::vector<int64_t> lengths;
  int64_t capacity;  // 0: max length (the plane ends right after the last token)
  int options;       // bit 0 causal, 1 window, 2 sinks, 3 softcap, 4 additive mask, 5 bool mask
};

struct RunResult {
  std::vector<float> out, lse;
};

class KernelFixture {
 public:
  explicit KernelFixture(const KernelCase& c, uint64_t seed) : c_(c) {
    const int64_t B = static_cast<int64_t>(c.lengths.size());
    S_ = 0;
    for (int64_t len : c.lengths) S_ = std::max(S_, len);
    const int64_t cap = c.capacity > 0 ? c.capacity : S_;
    kv_ = std::make_unique<KVStates>(
        B, c.kv_heads, cap, c.dim, c.lengths, QuantSpec{c.key_bits, c.key_mode, false, seed},
        QuantSpec{c.value_bits, QuantMode::kMse, false, seed + 3}, seed);
    Hq_ = int64_t{c.kv_heads} * c.group;
    q_ = random_normal(B * Hq_ * c.q_len * c.dim, seed + 11);
    std::mt19937_64 rng(seed + 12);
    std::uniform_real_distribution<float> unif(0.0f, 1.0f);
    if (c.options & 1) options_.causal = true;
    if (c.options & 2) options_.window = 23;
    if (c.options & 4) {
      sinks_.resize(Hq_);
      for (float& s : sinks_) s = unif(rng) * 3.0f - 1.0f;
      options_.sinks = cpu_view(sinks_.data(), {Hq_});
    }
    if (c.options & 8) {
      options_.softcap = 2.5f;
      options_.scale = 0.45f;
    }
    if (c.options & 16) {
      mask_.resize(static_cast<size_t>(B * c.q_len * S_));
      for (float& m : mask_) m = unif(rng) < 0.1f ? -kInf : unif(rng) * 2.0f - 1.5f;
      options_.mask = cpu_view(mask_.data(), {B, 1, c.q_len, S_});
    }
    if (c.options & 32) {
      bool_mask_.resize(static_cast<size_t>(Hq_ * S_));
      for (uint8_t& m : bool_mask_) m = unif(rng) < 0.8f;
      options_.mask =
          TensorView{bool_mask_.data(), DType::kBool, {Hq_, 1, S_}, DeviceType::kCPU, 0};
    }
  }

  RunResult run(cpu::KernelImpl impl, int threads) {
    const int64_t B = static_cast<int64_t>(c_.lengths.size());
    const TensorView qv = cpu_view(q_.data(), {B, Hq_, c_.q_len, c_.dim});
    RunResult r;
    r.out.assign(q_.size(), std::numeric_limits<float>::quiet_NaN());
    r.lse.assign(static_cast<size_t>(B * Hq_ * c_.q_len), std::numeric_limits<float>::quiet_NaN());
    const TensorView ov = cpu_view(r.out.data(), {B, Hq_, c_.q_len, c_.dim});
    const TensorView lv = cpu_view(r.lse.data(), {B, Hq_, c_.q_len});
    AttentionOptions o = options_;
    o.num_threads = threads;
    const attention::Problem p = attention::resolve_quantized("scaled_dot_product_attention", qv,
                                                              kv_->k, kv_->v, &ov, o, &lv, true);
    cpu::fused_attention(p, qv, kv_->k, kv_->v, ov, &lv, impl);
    return r;
  }

 private:
  KernelCase c_;
  int64_t S_ = 0, Hq_ = 0;
  std::unique_ptr<KVStates> kv_;
  std::vector<float> q_, sinks_, mask_;
  std::vector<uint8_t> bool_mask_;
  AttentionOptions options_;
};

constexpr QuantMode M = QuantMode::kMse;
constexpr QuantMode P = QuantMode::kProd;

// Each row count of the decode kernel (1, 2, 3->4, 4, 7->8, 8) and the row-block kernel, every
// key and value width, splits with odd part dims, and every option, with the plane ending right
// after the last token (the over-read guard).
const std::vector<KernelCase>& kernel_cases() {
  static const std::vector<KernelCase> list = {
      {1, M, 1, 64, 1, 1, 1, {300}, 0, 0},
      {2, M, 2, 64, 1, 2, 1, {300}, 0, 1},
      {3, M, 3, 128, 2, 1, 3, {300, 77}, 0, 1 | 4},
      {4, M, 4, 128, 1, 4, 1, {1000}, 0, 8},
      {5, M, 5, 96, 1, 7, 1, {300}, 0, 16},
      {6, M, 6, 64, 1, 8, 1, {300}, 0, 2 | 1},
      {7, M, 7, 256, 1, 1, 2, {129}, 0, 32},
      {8, M, 8, 64, 1, 4, 1, {300}, 0, 4},
      {2, P, 3, 128, 1, 4, 1, {300}, 0, 0},
      {5, P, 4, 64, 1, 8, 1, {129}, 0, 1},
      {3.3, M, 2.6, 96, 1, 4, 1, {300}, 0, 0},
      {2.5, P, 3.5, 128, 1, 2, 1, {129}, 0, 4},
      {4, M, 4, 128, 1, 4, 40, {300}, 0, 1},
      {3, M, 4, 64, 2, 8, 33, {200, 129}, 0, 1 | 2 | 4 | 8 | 16},
      {2, P, 5, 96, 1, 4, 20, {129}, 0, 32},
      {3.3, M, 2.6, 96, 1, 7, 12, {129}, 140, 1},
      {8, M, 1, 64, 1, 4, 128, {129}, 0, 1},
      {1, M, 8, 256, 1, 2, 9, {129}, 0, 0},
  };
  return list;
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  return relative_l2(a, b);
}

class SimdVsScalar : public ::testing::TestWithParam<int> {};

TEST_P(SimdVsScalar, MatchToRounding) {
  if (!cpu::attn::simd_available()) GTEST_SKIP() << "no SIMD target with >= 8 float lanes";
  KernelFixture f(kernel_cases()[GetParam()], 500 + GetParam());
  const RunResult simd = f.run(cpu::KernelImpl::kSimd, 2);
  const RunResult scalar = f.run(cpu::KernelImpl::kScalar, 2);
  for (float x : simd.out) ASSERT_FALSE(std::isnan(x));
  // Same tiles and softmax update; only the order of fp32 additions and exp differ.
  EXPECT_LE(rel_diff(simd.out, scalar.out), 2e-6);
  for (size_t i = 0; i < simd.lse.size(); ++i) {
    if (std::isinf(scalar.lse[i])) {
      EXPECT_EQ(simd.lse[i], scalar.lse[i]);
    } else {
      EXPECT_NEAR(simd.lse[i], scalar.lse[i], 2e-6 * std::max(1.0f, std::abs(scalar.lse[i])));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AttentionKernels, SimdVsScalar,
                         ::testing::Range(0, static_cast<int>(kernel_cases().size())));

// The 8-lane (AVX2) kernels, forced even where AVX-512 is the best target.
TEST(AttentionKernels, Avx2TargetMatchesScalar) {
#if defined(TQATTN_HAVE_HIGHWAY) && HWY_ARCH_X86
  if ((hwy::SupportedTargets() & HWY_AVX2) == 0) GTEST_SKIP() << "no AVX2 on this CPU";
  struct Restore {
    ~Restore() { hwy::SetSupportedTargetsForTest(0); }
  } restore;
  hwy::SetSupportedTargetsForTest(HWY_AVX2 | HWY_SCALAR);
  ASSERT_STREQ(cpu::attn::simd_target_name(), "AVX2");
  for (size_t i = 0; i < kernel_cases().size(); ++i) {
    SCOPED_TRACE(i);
    KernelFixture f(kernel_cases()[i], 700 + i);
    const RunResult simd = f.run(cpu::KernelImpl::kSimd, 2);
    const RunResult scalar = f.run(cpu::KernelImpl::kScalar, 2);
    EXPECT_LE(rel_diff(simd.out, scalar.out), 2e-6);
  }
#else
  GTEST_SKIP() << "built without Highway or not x86";
#endif
}

class Determinism : public ::testing::TestWithParam<int> {};

// The KV split depends on the shapes only, so any thread count gives the same bits.
TEST_P(Determinism, RepeatedRunsAndThreadCountsAreBitwiseEqual) {
  const std::vector<int> which = {0, 3, 9, 13, 15};
  KernelFixture f(kernel_cases()[which[GetParam()]], 900 + GetParam());
  for (cpu::KernelImpl impl : {cpu::KernelImpl::kAuto, cpu::KernelImpl::kScalar}) {
    const RunResult base = f.run(impl, 1);
    for (int threads : {1, 2, 3}) {
      const RunResult r = f.run(impl, threads);
      EXPECT_EQ(0, std::memcmp(r.out.data(), base.out.data(), base.out.size() * sizeof(float)))
          << "threads " << threads;
      EXPECT_EQ(0, std::memcmp(r.lse.data(), base.lse.data(), base.lse.size() * sizeof(float)))
          << "threads " << threads;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AttentionKernels, Determinism, ::testing::Range(0, 5));

// Long decode over many KV chunks (the split-KV merge path) against the reference.
TEST(AttentionKernels, SplitKvMergeMatchesReference) {
  KVStates kv(1, 2, 9000, 64, {9000}, QuantSpec{3, M, false, 5}, QuantSpec{4, M, false, 6}, 77);
  const std::vector<float> q = random_normal(8 * 64, 78);
  const TensorView qv = cpu_view(q.data(), {1, 8, 1, 64});
  AttentionOptions o;
  o.num_threads = 2;
  const attention::Problem p =
      attention::resolve_quantized("x", qv, kv.k, kv.v, nullptr, o, nullptr, true);
  EXPECT_GT(9000 / cpu::fused_chunk_tokens(p), 4);  // several chunks merged per row
  std::vector<float> out(q.size());
  scaled_dot_product_attention(qv, kv.k, kv.v, cpu_view(out.data(), {1, 8, 1, 64}), o);
  EXPECT_LE(relative_l2(out, reference::attention(qv, kv.k, kv.v, o).out), 1e-5);
}

TEST(AttentionKernels, FullyMaskedRowsGiveZerosAndMinusInfLse) {
  for (int q_len : {1, 20}) {  // decode kernel and row-block kernel
    SCOPED_TRACE(q_len);
    KVStates kv(2, 1, 50, 64, {50, 0}, QuantSpec{4, M, false, 1}, QuantSpec{4, M, false, 2}, 3);
    const int64_t Hq = 4;
    const std::vector<float> q = random_normal(2 * Hq * q_len * 64, 4);
    const TensorView qv = cpu_view(q.data(), {2, Hq, q_len, 64});
    // Row (b=0, h=1, l=0) sees no key; sequence 1 is empty.
    std::vector<uint8_t> mask(static_cast<size_t>(2 * Hq * q_len * 50), 1);
    for (int64_t s = 0; s < 50; ++s) mask[(0 * Hq + 1) * q_len * 50 + s] = 0;
    AttentionOptions o;
    o.mask = TensorView{mask.data(), DType::kBool, {2, Hq, q_len, 50}, DeviceType::kCPU, 0};
    for (bool with_sinks : {false, true}) {
      SCOPED_TRACE(with_sinks);
      std::vector<float> sinks = {0.5f, 1.5f, -0.5f, 2.0f};
      if (with_sinks) o.sinks = cpu_view(sinks.data(), {Hq});
      std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
      std::vector<float> lse(static_cast<size_t>(2 * Hq * q_len), 0.0f);
      const TensorView lv = cpu_view(lse.data(), {2, Hq, q_len});
      scaled_dot_product_attention(qv, kv.k, kv.v, cpu_view(out.data(), {2, Hq, q_len, 64}), o,
                                   &lv);
      for (float x : out) ASSERT_FALSE(std::isnan(x));
      auto row_is_zero = [&](int64_t row) {
        for (int j = 0; j < 64; ++j)
          if (out[row * 64 + j] != 0.0f) return false;
        return true;
      };
      const int64_t masked_row = (0 * Hq + 1) * q_len;
      EXPECT_TRUE(row_is_zero(masked_row));
      EXPECT_EQ(lse[masked_row], with_sinks ? sinks[1] : -kInf);
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t row = (1 * Hq + h) * q_len;
        EXPECT_TRUE(row_is_zero(row));
        EXPECT_EQ(lse[row], with_sinks ? sinks[h] : -kInf);
      }
      EXPECT_FALSE(row_is_zero(0));  // an ordinary row
      const reference::AttentionResult want = reference::attention(qv, kv.k, kv.v, o);
      EXPECT_LE(relative_l2(out, want.out), 1e-5);
    }
  }
}

}  // namespace
}  // namespace tqattn::testing

// The fused CPU attention against the double-precision dequantize-then-attend reference, over a
// sparse crossing of bits, modes, head dims, GQA groups, query/KV lengths, masks and dtypes.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "attention_test_util.h"
#include "reference/reference_attention.h"
#include "tqattn/tqattn.h"

namespace tqattn::testing {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

enum class MaskKind {
  kNone,
  kCausal,
  kCausalOffset,
  kBool,
  kAdditive,
  kAdditiveBroadcast,
  kWindow,
  kWindowCausal,
  kSinks,
  kSoftcap,
  kAll,
};

const char* mask_name(MaskKind m) {
  switch (m) {
    case MaskKind::kNone:
      return "none";
    case MaskKind::kCausal:
      return "causal";
    case MaskKind::kCausalOffset:
      return "causal_offset";
    case MaskKind::kBool:
      return "bool";
    case MaskKind::kAdditive:
      return "additive";
    case MaskKind::kAdditiveBroadcast:
      return "additive_broadcast";
    case MaskKind::kWindow:
      return "window";
    case MaskKind::kWindowCausal:
      return "window_causal";
    case MaskKind::kSinks:
      return "sinks";
    case MaskKind::kSoftcap:
      return "softcap";
    case MaskKind::kAll:
      return "all";
  }
  return "?";
}

struct Case {
  double key_bits;
  QuantMode key_mode;
  double value_bits;
  int dim;
  int kv_heads;
  int group;
  int q_len;
  std::vector<int64_t> lengths;
  MaskKind mask;
  DType dtype;
  bool dense_rotation = false;
};

std::string case_name(const Case& c, int index) {
  std::ostringstream os;
  os << index << "_k" << c.key_bits << (c.key_mode == QuantMode::kProd ? "prod" : "mse") << "_v"
     << c.value_bits << "_D" << c.dim << "_H" << c.kv_heads << "x" << c.group << "_L" << c.q_len
     << "_S";
  for (int64_t len : c.lengths) os << len << "-";
  os << mask_name(c.mask) << "_" << dtype_name(c.dtype) << (c.dense_rotation ? "_dense" : "");
  std::string s = os.str();
  for (char& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}

constexpr QuantMode M = QuantMode::kMse;
constexpr QuantMode P = QuantMode::kProd;
constexpr DType F32 = DType::kFloat32;
constexpr DType F16 = DType::kFloat16;
constexpr DType BF16 = DType::kBFloat16;
using MK = MaskKind;

// Every axis value appears at least once; the axes are crossed sparsely.
const std::vector<Case>& cases() {
  static const std::vector<Case> list = {
      {1, M, 1, 64, 1, 1, 1, {1}, MK::kNone, F32},
      {2, M, 2, 64, 1, 4, 1, {1}, MK::kCausal, F32},
      {2, M, 2, 64, 2, 4, 1, {7}, MK::kNone, F32},
      {3, M, 4, 128, 2, 4, 1, {129}, MK::kNone, F32},
      {4, M, 4, 128, 1, 8, 1, {4097}, MK::kNone, F32},
      {8, M, 8, 96, 1, 7, 1, {129}, MK::kNone, F32},
      {3, M, 3, 256, 1, 4, 3, {129}, MK::kCausal, F32},
      {4, P, 4, 128, 2, 1, 3, {129}, MK::kCausal, F32},
      {2, P, 2, 64, 1, 8, 128, {129}, MK::kCausal, F32},
      {3, P, 3, 96, 1, 4, 128, {129}, MK::kNone, F32},
      {8, P, 8, 128, 1, 1, 1, {4097}, MK::kNone, F32},
      {3, M, 4, 128, 2, 4, 128, {129}, MK::kCausal, F16},
      {4, M, 4, 64, 1, 7, 3, {7}, MK::kNone, BF16},
      {2.5, M, 3.5, 128, 1, 4, 1, {4097}, MK::kNone, F32},
      {3.3, M, 2.7, 96, 1, 4, 3, {129}, MK::kCausal, F32},
      {3.5, P, 4, 64, 1, 8, 128, {129}, MK::kCausal, F32},
      {4, M, 3, 128, 1, 4, 1, {129, 7, 100}, MK::kNone, F32},
      {4, M, 4, 64, 2, 4, 3, {129, 50}, MK::kCausal, F32},
      {3, M, 4, 128, 1, 4, 128, {129, 200}, MK::kCausal, F32},
      {4, M, 4, 64, 1, 4, 3, {129}, MK::kCausalOffset, F32},
      {4, M, 4, 64, 1, 4, 128, {129}, MK::kCausalOffset, F32},
      {2, M, 2, 128, 1, 4, 128, {7}, MK::kCausalOffset, F32},
      {4, M, 4, 128, 1, 4, 1, {129}, MK::kBool, F32},
      {2, M, 4, 64, 1, 8, 128, {129}, MK::kBool, F32},
      {4, M, 4, 64, 1, 1, 128, {129}, MK::kBool, BF16},
      {3, M, 3, 96, 1, 1, 3, {129}, MK::kAdditive, F32},
      {4, P, 4, 128, 1, 4, 128, {129}, MK::kAdditive, F32},
      {4, M, 4, 64, 2, 4, 1, {129}, MK::kAdditiveBroadcast, F16},
      {3, M, 4, 64, 1, 7, 128, {129}, MK::kAdditiveBroadcast, F32},
      {4, M, 4, 128, 1, 4, 1, {4097}, MK::kWindow, F32},
      {4, M, 4, 64, 1, 4, 128, {129}, MK::kWindowCausal, F32},
      {3, M, 3, 256, 1, 1, 3, {129}, MK::kWindowCausal, BF16},
      {2, P, 3, 256, 1, 7, 3, {129}, MK::kWindowCausal, F32},
      {4, M, 4, 128, 1, 4, 1, {129}, MK::kSinks, F32},
      {4, M, 4, 64, 1, 8, 128, {129}, MK::kSinks, F32},
      {8, P, 4, 64, 1, 4, 1, {7}, MK::kSinks, BF16},
      {4, M, 4, 128, 1, 4, 1, {129}, MK::kSoftcap, F32},
      {3, P, 4, 96, 1, 4, 128, {129}, MK::kSoftcap, F32},
      {4, M, 4, 128, 2, 4, 3, {129, 77}, MK::kAll, F32},
      {4, M, 4, 64, 1, 4, 128, {4097}, MK::kAll, F32},
      {1, M, 2, 64, 1, 4, 128, {129}, MK::kNone, F32, true},
      {8, M, 8, 256, 1, 4, 128, {129}, MK::kNone, F32},
      {1, M, 8, 128, 1, 4, 3, {7}, MK::kNone, F16},
      {8, M, 1, 64, 1, 8, 1, {4097}, MK::kCausal, BF16},
      {3, M, 4, 128, 2, 7, 1, {4097}, MK::kNone, F32},
      {4, M, 4, 96, 1, 8, 3, {1}, MK::kNone, F32},
      {2, M, 3, 64, 1, 7, 1, {4097}, MK::kBool, F32},
      {3, P, 3, 64, 1, 8, 3, {4097}, MK::kCausal, F32},
      {4, M, 4, 128, 1, 8, 3, {129, 1, 7}, MK::kSinks, F32},
      {2, P, 2, 128, 1, 7, 128, {129}, MK::kAdditive, F16},
      {1, M, 1, 256, 1, 1, 1, {7}, MK::kWindow, F32},
      {4, M, 4, 128, 1, 7, 3, {129}, MK::kAll, BF16},
      {3.5, M, 4, 128, 1, 4, 3, {4097}, MK::kCausal, F32},
      {2.25, P, 3, 64, 1, 4, 3, {129}, MK::kSinks, F32},
      {4, M, 4, 64, 1, 4, 1, {129}, MK::kNone, F32, true},
      {8, M, 8, 64, 1, 1, 128, {7}, MK::kCausalOffset, F16},
  };
  return list;
}

struct Inputs {
  std::unique_ptr<KVStates> kv;
  std::unique_ptr<Tensor> queries;
  std::vector<uint8_t> bool_mask;
  std::unique_ptr<Tensor> float_mask;
  std::vector<float> sinks;
  AttentionOptions options;
};

Inputs make_inputs(const Case& c, uint64_t seed) {
  Inputs in;
  const int64_t B = static_cast<int64_t>(c.lengths.size());
  int64_t S = 0;
  for (int64_t len : c.lengths) S = std::max(S, len);
  QuantSpec ks{c.key_bits, c.key_mode, c.dense_rotation, seed};
  QuantSpec vs{c.value_bits, QuantMode::kMse, c.dense_rotation, seed + 7};
  in.kv = std::make_unique<KVStates>(B, c.kv_heads, S + 3, c.dim, c.lengths, ks, vs, seed);
  const int64_t Hq = int64_t{c.kv_heads} * c.group, L = c.q_len;
  in.queries = std::make_unique<Tensor>(random_normal(B * Hq * L * c.dim, seed + 99),
                                        std::vector<int64_t>{B, Hq, L, c.dim}, c.dtype);
  std::mt19937_64 rng(seed + 5);
  std::uniform_real_distribution<float> unif(0.0f, 1.0f);
  AttentionOptions& o = in.options;
  o.num_threads = 2;
  auto additive = [&](std::vector<int64_t> shape, DType dtype) {
    int64_t n = 1;
    for (int64_t e : shape) n *= e;
    std::vector<float> m(static_cast<size_t>(n));
    for (float& x : m) x = unif(rng) < 0.1f ? -kInf : -3.0f + 4.0f * unif(rng);
    in.float_mask = std::make_unique<Tensor>(m, std::move(shape), dtype);
    o.mask = in.float_mask->view;
  };
  auto sinks = [&] {
    in.sinks.resize(static_cast<size_t>(Hq));
    for (float& s : in.sinks) s = -1.0f + 4.0f * unif(rng);
    o.sinks = cpu_view(in.sinks.data(), {Hq});
  };
  switch (c.mask) {
    case MK::kNone:
      break;
    case MK::kCausal:
      o.causal = true;
      break;
    case MK::kCausalOffset:
      o.causal = true;
      o.causal_offset = S > L ? (S - L) / 2 : 0;
      break;
    case MK::kBool: {
      in.bool_mask.resize(static_cast<size_t>(B * Hq * L * S));
      for (uint8_t& b : in.bool_mask) b = unif(rng) < 0.75f;
      o.mask = TensorView{in.bool_mask.data(), DType::kBool, {B, Hq, L, S}, DeviceType::kCPU, 0};
      break;
    }
    case MK::kAdditive:
      additive({B, 1, L, S}, DType::kFloat32);
      break;
    case MK::kAdditiveBroadcast:
      if (c.group == 7)
        additive({1, Hq, 1, S}, DType::kBFloat16);
      else
        additive({L, S}, DType::kFloat16);
      break;
    case MK::kWindow:
      o.window = 5;
      break;
    case MK::kWindowCausal:
      o.causal = true;
      o.window = 17;
      break;
    case MK::kSinks:
      sinks();
      break;
    case MK::kSoftcap:
      o.scale = 0.5f;
      o.softcap = 2.0f;
      break;
    case MK::kAll:
      o.causal = true;
      o.window = 40;
      o.scale = 0.4f;
      o.softcap = 3.0f;
      additive({B, Hq, L, S}, DType::kFloat32);
      sinks();
      break;
  }
  return in;
}

double output_bound(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return 1e-3;  // the output's own fp16 rounding (2^-11 relative)
    case DType::kBFloat16:
      return 6e-3;  // bf16 rounding (2^-8 relative)
    default:
      return 1e-5;
  }
}

class FusedVsReference : public ::testing::TestWithParam<int> {};

TEST_P(FusedVsReference, MatchesDoubleReference) {
  const Case& c = cases()[GetParam()];
  SCOPED_TRACE(case_name(c, GetParam()));
  Inputs in = make_inputs(c, 1000 + 17 * GetParam());
  const TensorView& q = in.queries->view;
  Tensor out(q.numel(), q.shape, c.dtype, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lse(static_cast<size_t>(q.shape[0] * q.shape[1] * q.shape[2]),
                         std::numeric_limits<float>::quiet_NaN());
  TensorView lse_view = cpu_view(lse.data(), {q.shape[0], q.shape[1], q.shape[2]});
  scaled_dot_product_attention(q, in.kv->k, in.kv->v, out.view, in.options, &lse_view);
  const reference::AttentionResult want = reference::attention(q, in.kv->k, in.kv->v, in.options);
  const std::vector<float> got = out.floats();
  for (float x : got) ASSERT_FALSE(std::isnan(x));
  EXPECT_LE(relative_l2(got, want.out), output_bound(c.dtype));
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(want.lse[i])) {
      EXPECT_EQ(lse[i], -kInf) << "row " << i;
    } else {
      EXPECT_NEAR(lse[i], want.lse[i], 2e-5 * std::max(1.0, std::abs(want.lse[i]))) << "row " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Attention, FusedVsReference,
                         ::testing::Range(0, static_cast<int>(cases().size())),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return case_name(cases()[info.param], info.param);
                         });

}  // namespace
}  // namespace tqattn::testing

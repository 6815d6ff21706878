// Every invalid attention call throws InvalidArgument naming the function and what it expected.
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "attention_test_util.h"
#include "tqattn/tqattn.h"

namespace tqattn::testing {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

void expect_invalid(const std::function<void()>& call, const std::string& fn,
                    const std::string& fragment) {
  try {
    call();
    ADD_FAILURE() << "no exception; expected one mentioning '" << fragment << "'";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("[tqattn." + fn + "]"), std::string::npos) << what;
    EXPECT_NE(what.find(fragment), std::string::npos) << what;
  }
}

// B = 2, H_kv = 2, Hq = 4, L = 3, D = 64, lengths {10, 6}.
struct Fixture {
  KVStates kv{2,
              2,
              12,
              64,
              {10, 6},
              QuantSpec{3, QuantMode::kMse, false, 1},
              QuantSpec{4, QuantMode::kMse, false, 2},
              9};
  std::vector<float> q = random_normal(2 * 4 * 3 * 64, 10);
  std::vector<float> out = std::vector<float>(q.size());
  std::vector<float> lse = std::vector<float>(2 * 4 * 3);
  TensorView qv = cpu_view(q.data(), {2, 4, 3, 64});
  TensorView ov = cpu_view(out.data(), {2, 4, 3, 64});
  AttentionOptions o;

  void call() { scaled_dot_product_attention(qv, kv.k, kv.v, ov, o); }
};

const char* kFn = "scaled_dot_product_attention";

TEST(AttentionValidation, ValidCallPasses) {
  Fixture f;
  EXPECT_NO_THROW(f.call());
  EXPECT_EQ(attention_unsupported_reason(f.qv, f.kv.k, f.kv.v, f.o), "");
}

TEST(AttentionValidation, HeadDimMismatch) {
  Fixture f;
  std::vector<float> q(2 * 4 * 3 * 32);
  f.qv = cpu_view(q.data(), {2, 4, 3, 32});
  f.ov = cpu_view(f.out.data(), {2, 4, 3, 32});
  expect_invalid([&] { f.call(); }, kFn, "head dim D = 32");
  EXPECT_NE(attention_unsupported_reason(f.qv, f.kv.k, f.kv.v, f.o).find("head dim"),
            std::string::npos);
}

TEST(AttentionValidation, QueryHeadsNotMultipleOfKvHeads) {
  Fixture f;
  std::vector<float> q(2 * 3 * 3 * 64);
  f.qv = cpu_view(q.data(), {2, 3, 3, 64});
  f.ov = cpu_view(q.data(), {2, 3, 3, 64});
  expect_invalid([&] { f.call(); }, kFn, "Hq a multiple of H_kv");
}

TEST(AttentionValidation, QueryRankAndDtype) {
  Fixture f;
  f.qv = cpu_view(f.q.data(), {8, 3, 64});
  expect_invalid([&] { f.call(); }, kFn, "rank 4");
  Fixture g;
  g.qv.dtype = DType::kInt32;
  expect_invalid([&] { g.call(); }, kFn, "queries of dtype float32, float16 or bfloat16");
}

TEST(AttentionValidation, OutShapeAndDtype) {
  Fixture f;
  f.ov = cpu_view(f.out.data(), {2, 4, 3, 32});
  expect_invalid([&] { f.call(); }, kFn, "out of the queries' shape");
  Fixture g;
  g.ov.dtype = DType::kFloat16;
  expect_invalid([&] { g.call(); }, kFn, "out of the queries' dtype");
}

TEST(AttentionValidation, LseShapeAndDtype) {
  Fixture f;
  TensorView lv = cpu_view(f.lse.data(), {2, 4, 2});
  expect_invalid([&] { scaled_dot_product_attention(f.qv, f.kv.k, f.kv.v, f.ov, f.o, &lv); }, kFn,
                 "lse of shape");
  lv = cpu_view(f.lse.data(), {2, 4, 3});
  lv.dtype = DType::kFloat16;
  expect_invalid([&] { scaled_dot_product_attention(f.qv, f.kv.k, f.kv.v, f.ov, f.o, &lv); }, kFn,
                 "lse of dtype float32");
}

TEST(AttentionValidation, MaskShapeAndDtype) {
  Fixture f;
  std::vector<float> m(2 * 4 * 3 * 10);
  f.o.mask = cpu_view(m.data(), {2, 4, 3, 9});  // S is 10
  expect_invalid([&] { f.call(); }, kFn, "mask broadcastable to [B, Hq, L, S] = [2, 4, 3, 10]");
  f.o.mask = cpu_view(m.data(), {1, 2, 4, 3, 10});
  expect_invalid([&] { f.call(); }, kFn, "mask broadcastable");
  f.o.mask = cpu_view(m.data(), {3, 1, 10});
  expect_invalid([&] { f.call(); }, kFn, "mask broadcastable");
  f.o.mask = cpu_view(m.data(), {4, 1, 10});  // broadcasts: fine
  EXPECT_NO_THROW(f.call());
  f.o.mask->dtype = DType::kInt32;
  expect_invalid([&] { f.call(); }, kFn, "a mask of dtype bool, float32, float16 or bfloat16");
}

TEST(AttentionValidation, MaskWithNaNOrPlusInf) {
  Fixture f;
  std::vector<float> m(10, 0.0f);
  m[3] = -kInf;  // allowed
  f.o.mask = cpu_view(m.data(), {10});
  EXPECT_NO_THROW(f.call());
  m[4] = kNaN;
  expect_invalid([&] { f.call(); }, kFn, "additive mask without NaN or +inf");
  m[4] = kInf;
  expect_invalid([&] { f.call(); }, kFn, "additive mask without NaN or +inf");
}

TEST(AttentionValidation, CausalWithMoreQueriesThanKeys) {
  Fixture f;  // sequence 1 has 6 tokens
  std::vector<float> q(2 * 4 * 7 * 64, 0.5f), out(q.size());
  f.qv = cpu_view(q.data(), {2, 4, 7, 64});
  f.ov = cpu_view(out.data(), {2, 4, 7, 64});
  f.o.causal = true;
  expect_invalid([&] { f.call(); }, kFn, "L <= the sequence length");
  f.o.causal = false;
  f.o.window = 4;
  expect_invalid([&] { f.call(); }, kFn, "L <= the sequence length");
  f.o.causal = true;
  f.o.causal_offset = 0;  // chunked prefill with an explicit offset: fine
  EXPECT_NO_THROW(f.call());
}

TEST(AttentionValidation, NegativeWindow) {
  Fixture f;
  f.o.window = -1;
  expect_invalid([&] { f.call(); }, kFn, "window >= 0");
}

TEST(AttentionValidation, SoftcapScaleThreads) {
  Fixture f;
  f.o.softcap = -1.0f;
  expect_invalid([&] { f.call(); }, kFn, "softcap >= 0");
  f.o.softcap = kInf;
  expect_invalid([&] { f.call(); }, kFn, "softcap >= 0");
  Fixture g;
  g.o.scale = kNaN;
  expect_invalid([&] { g.call(); }, kFn, "a finite scale");
  Fixture h;
  h.o.num_threads = -2;
  expect_invalid([&] { h.call(); }, kFn, "num_threads >= 0");
}

TEST(AttentionValidation, Sinks) {
  Fixture f;
  std::vector<float> s(3, 0.0f);
  f.o.sinks = cpu_view(s.data(), {3});
  expect_invalid([&] { f.call(); }, kFn, "sinks of shape [Hq] = [4]");
  std::vector<float> s4 = {0, 1, kNaN, 2};
  f.o.sinks = cpu_view(s4.data(), {4});
  expect_invalid([&] { f.call(); }, kFn, "sinks without NaN");
  std::vector<uint16_t> h(4);
  f.o.sinks = TensorView{h.data(), DType::kFloat16, {4}, DeviceType::kCPU, 0};
  expect_invalid([&] { f.call(); }, kFn, "sinks of dtype float32");
}

TEST(AttentionValidation, EmptyStates) {
  KVStates kv(1, 1, 4, 64, {0}, QuantSpec{4, QuantMode::kMse, false, 1},
              QuantSpec{4, QuantMode::kMse, false, 2}, 3);
  std::vector<float> q(64, 1.0f), out(64);
  expect_invalid(
      [&] {
        scaled_dot_product_attention(cpu_view(q.data(), {1, 1, 1, 64}), kv.k, kv.v,
                                     cpu_view(out.data(), {1, 1, 1, 64}));
      },
      kFn, "non-empty states");
}

TEST(AttentionValidation, EmptyQueries) {
  Fixture f;
  f.qv = cpu_view(f.q.data(), {2, 4, 0, 64});
  f.ov = cpu_view(f.out.data(), {2, 4, 0, 64});
  expect_invalid([&] { f.call(); }, kFn, "every extent >= 1");
}

TEST(AttentionValidation, NaNQuery) {
  Fixture f;
  f.q[100] = kNaN;
  expect_invalid([&] { f.call(); }, kFn, "queries without NaN or inf");
  f.q[100] = kInf;
  expect_invalid([&] { f.call(); }, kFn, "queries without NaN or inf");
}

TEST(AttentionValidation, StatesDisagree) {
  Fixture f;
  QuantizedStates v = f.kv.v;
  v.lengths = {10, 5};
  expect_invalid([&] { scaled_dot_product_attention(f.qv, f.kv.k, v, f.ov, f.o); }, kFn,
                 "values with the keys' per-sequence lengths");
  QuantizedStates k = f.kv.k;
  k.batch = 3;
  k.lengths = {10, 6, 6};
  expect_invalid([&] { scaled_dot_product_attention(f.qv, k, f.kv.v, f.ov, f.o); }, kFn,
                 "keys of the queries' batch 2");
  QuantizedStates k2 = f.kv.k;
  k2.lengths = {13, 6};  // past capacity 12
  expect_invalid([&] { scaled_dot_product_attention(f.qv, k2, f.kv.v, f.ov, f.o); }, kFn,
                 "keys lengths in [0, capacity = 12]");
  QuantizedStates k3 = f.kv.k;
  k3.device = DeviceType::kCUDA;
  expect_invalid([&] { scaled_dot_product_attention(f.qv, k3, f.kv.v, f.ov, f.o); }, kFn,
                 "on the queries' device");
  QuantizedStates k4 = f.kv.k;
  k4.parts.clear();
  expect_invalid([&] { scaled_dot_product_attention(f.qv, k4, f.kv.v, f.ov, f.o); }, kFn,
                 "one set of planes per quantizer part");
}

TEST(AttentionValidation, ProdValues) {
  Fixture f;
  KVStates prod(2, 2, 12, 64, {10, 6}, QuantSpec{3, QuantMode::kProd, false, 1},
                QuantSpec{3, QuantMode::kProd, false, 2}, 9);
  // Values quantized with Prod: the keys' states stand in as values.
  expect_invalid([&] { scaled_dot_product_attention(f.qv, f.kv.k, prod.k, f.ov, f.o); }, kFn,
                 "values quantized with mode mse");
  EXPECT_NO_THROW(scaled_dot_product_attention(f.qv, prod.k, f.kv.v, f.ov, f.o));
}

TEST(AttentionValidation, DenseAttention) {
  std::vector<float> q(1 * 4 * 2 * 32, 0.1f), k(1 * 2 * 5 * 32, 0.2f), out(q.size());
  const TensorView qv = cpu_view(q.data(), {1, 4, 2, 32});
  const TensorView kv = cpu_view(k.data(), {1, 2, 5, 32});
  const TensorView ov = cpu_view(out.data(), {1, 4, 2, 32});
  EXPECT_NO_THROW(dense_attention(qv, kv, kv, ov));
  expect_invalid(
      [&] {
        dense_attention(qv, cpu_view(k.data(), {1, 2, 10, 16}), kv, ov);
      },
      "dense_attention", "values of the keys' shape");
  expect_invalid(
      [&] {
        const TensorView k16 = cpu_view(k.data(), {1, 2, 10, 16});
        dense_attention(qv, k16, k16, ov);
      },
      "dense_attention", "keys of head dim D = 32");
  expect_invalid(
      [&] {
        const TensorView k3 = cpu_view(k.data(), {1, 3, 5, 32});
        std::vector<float> k3d(1 * 3 * 5 * 32);
        const TensorView k3v = cpu_view(k3d.data(), {1, 3, 5, 32});
        dense_attention(qv, k3v, k3v, ov);
      },
      "dense_attention", "H_kv >= 1 dividing Hq = 4");
  TensorView k16 = kv;
  k16.dtype = DType::kFloat16;
  expect_invalid([&] { dense_attention(qv, k16, k16, ov); }, "dense_attention",
                 "keys of dtype float32");
  AttentionOptions o;
  o.causal = true;
  std::vector<float> q6(1 * 4 * 6 * 32, 0.1f), out6(q6.size());
  expect_invalid(
      [&] {
        dense_attention(cpu_view(q6.data(), {1, 4, 6, 32}), kv, kv,
                        cpu_view(out6.data(), {1, 4, 6, 32}), o);
      },
      "dense_attention", "L <= the sequence length");
}

}  // namespace
}  // namespace tqattn::testing

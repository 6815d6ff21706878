// The CUDA attention kernels (decode L <= 8, prefill L > 8) against the CPU backend on the same
// packed states: fresh random data, outputs poisoned before each run, repeated runs bit-identical.
// Skipped without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#if defined(TQATTN_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

#include "cuda_test_util.h"
#include "test_util.h"
#include "tqattn/tqattn.h"

namespace tqattn {
namespace {

using testing::decode;
using testing::DeviceBuffer;
using testing::encode;

enum MaskKind { kNoMask, kBoolMask, kHalfBiasMask, kFloatFullMask, kBoolDeadRow };

struct AttnCase {
  int D = 128;
  int kbits = 3;
  int vbits = 4;
  bool prod = false;
  bool dense = false;
  int hkv = 2;
  int group = 4;
  int L = 1;
  std::vector<int64_t> lens = {129};
  int64_t cap_extra = 0;
  int64_t cap_round = 1;  // capacity rounded up to a multiple of this (KVCache: 256)
  DType qdtype = DType::kFloat32;
  bool causal = false;
  int64_t causal_offset = -1;
  int64_t window = 0;
  float softcap = 0.0f;
  MaskKind mask = kNoMask;
  bool sinks = false;
  float q_std = 2.0f;  // the queries' standard deviation
  uint64_t seed = 1;
  const char* kernel = nullptr;  // the kernel family that must serve the case, when set
  const char* merge = nullptr;   // how its splits must merge (cuda::last_split_merge), when set
  const char* stream_variant = nullptr;  // cuda::last_stream_decode_variant, when set
  // QuantizedStates::settled_tokens of the GPU states (their planes are copied in synchronously,
  // so any bound is true).
  int64_t settled = 0;
};

std::string describe(const AttnCase& c) {
  std::string lens;
  for (int64_t l : c.lens) lens += std::to_string(l) + " ";
  return detail::concat("D=", c.D, " k", c.kbits, c.prod ? "prod" : "mse", " v", c.vbits,
                        c.dense ? " dense" : "", " hkv=", c.hkv, " G=", c.group, " L=", c.L,
                        " lens=", lens, "cap+", c.cap_extra, "/", c.cap_round,
                        " q=", dtype_name(c.qdtype), c.causal ? " causal" : "",
                        " off=", c.causal_offset, " win=", c.window, " cap=", c.softcap,
                        " mask=", static_cast<int>(c.mask), c.sinks ? " sinks" : "");
}

std::shared_ptr<const TensorQuantizer> quantizer(int dim, int bits, QuantMode mode, bool dense,
                                                 uint64_t seed) {
  CodecConfig cfg;
  cfg.dim = dim;
  cfg.bits = bits;
  cfg.mode = mode;
  cfg.seed = seed;
  cfg.dense_rotation = dense;
  return std::make_shared<const TensorQuantizer>(
      TensorQuantizer::uniform(std::make_shared<const Codec>(cfg)));
}

struct Outcome {
  double rel_l2 = 0.0;
  double lse_err = 0.0;
  bool repeat_identical = true;
  bool finite = true;
  std::vector<unsigned char> out;  // the GPU output's bytes
};

// Runs one case on both backends. `graph` also replays the GPU call from a captured CUDA graph.
Outcome run_case(const AttnCase& c, bool graph = false) {
  const int64_t B = static_cast<int64_t>(c.lens.size());
  const int64_t Hq = int64_t{c.hkv} * c.group;
  int64_t S = 0;
  for (int64_t l : c.lens) S = std::max(S, l);
  const int64_t cap =
      (std::max<int64_t>(S, 1) + c.cap_extra + c.cap_round - 1) / c.cap_round * c.cap_round;
  const int D = c.D;

  const auto kq =
      quantizer(D, c.kbits, c.prod ? QuantMode::kProd : QuantMode::kMse, c.dense, c.seed);
  const auto vq = quantizer(D, c.vbits, QuantMode::kMse, c.dense, c.seed + 1);
  const std::vector<float> kx = testing::random_normal(B * c.hkv * cap * D, c.seed * 31 + 1);
  const std::vector<float> vx = testing::random_normal(B * c.hkv * cap * D, c.seed * 31 + 2);
  QuantizedTensor kc = quantize_tensor(kq, cpu_view(kx.data(), {B, c.hkv, cap, D}));
  QuantizedTensor vc = quantize_tensor(vq, cpu_view(vx.data(), {B, c.hkv, cap, D}));
  QuantizedTensor kg(kq, B, c.hkv, cap, DeviceType::kCUDA, 0);
  QuantizedTensor vg(vq, B, c.hkv, cap, DeviceType::kCUDA, 0);
  testing::copy_planes(kc, kg, B, c.hkv);
  testing::copy_planes(vc, vg, B, c.hkv);

  const std::vector<float> q = testing::random_normal(B * Hq * c.L * D, c.seed * 31 + 3, c.q_std);
  const std::vector<unsigned char> q_raw = encode(q, c.qdtype);
  const size_t out_bytes = q_raw.size();

  AttentionOptions opt;
  opt.causal = c.causal;
  opt.causal_offset = c.causal_offset;
  opt.window = c.window;
  opt.softcap = c.softcap;
  // Masks and sinks: host data, uploaded for the GPU call.
  std::vector<unsigned char> mask_raw;
  std::vector<int64_t> mask_shape;
  DType mask_dtype = DType::kBool;
  if (c.mask != kNoMask) {
    std::mt19937_64 rng(c.seed * 31 + 4);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    if (c.mask == kBoolMask || c.mask == kBoolDeadRow) {
      mask_shape = {B, 1, c.L, S};
      mask_raw.resize(B * c.L * S);
      for (auto& m : mask_raw) m = u(rng) < 0.8f;
      if (c.mask == kBoolDeadRow)
        for (int64_t s = 0; s < S; ++s) mask_raw[(0 * c.L + c.L - 1) * S + s] = 0;  // b 0, last row
    } else if (c.mask == kHalfBiasMask) {
      mask_dtype = DType::kFloat16;
      mask_shape = {1, Hq, 1, S};
      std::vector<float> m = testing::random_normal(Hq * S, c.seed * 31 + 5);
      for (size_t i = 0; i < m.size(); i += 7) m[i] = -std::numeric_limits<float>::infinity();
      mask_raw = encode(m, DType::kFloat16);
    } else {
      mask_dtype = DType::kFloat32;
      mask_shape = {B, Hq, c.L, S};
      std::vector<float> m = testing::random_normal(B * Hq * c.L * S, c.seed * 31 + 6);
      mask_raw = encode(m, DType::kFloat32);
    }
  }
  const std::vector<float> sinks = testing::random_normal(Hq, c.seed * 31 + 7);

  // CPU reference on the same (dtype-rounded) query values, kept in fp32: the GPU output's own
  // rounding to fp16/bf16 then counts once, as part of its error.
  std::vector<float> want(q.size());
  std::vector<float> want_lse(B * Hq * c.L);
  {
    AttentionOptions o = opt;
    if (c.mask != kNoMask)
      o.mask = TensorView{mask_raw.data(), mask_dtype, mask_shape, DeviceType::kCPU, 0};
    if (c.sinks) o.sinks = cpu_view(sinks.data(), {Hq});
    TensorView lse = cpu_view(want_lse.data(), {B, Hq, c.L});
    const std::vector<float> q_rounded = decode(q_raw.data(), c.qdtype, q.size());
    scaled_dot_product_attention(cpu_view(q_rounded.data(), {B, Hq, c.L, D}), kc.view(c.lens),
                                 vc.view(c.lens), cpu_view(want.data(), {B, Hq, c.L, D}), o, &lse);
  }

  // GPU.
  DeviceBuffer dq(q_raw.size()), dout(out_bytes), dlse(want_lse.size() * 4);
  DeviceBuffer dmask(std::max<size_t>(mask_raw.size(), 1)), dsinks(sinks.size() * 4);
  dq.upload(q_raw.data());
  if (!mask_raw.empty()) dmask.upload(mask_raw.data());
  dsinks.upload(sinks.data());
  AttentionOptions o = opt;
  if (c.mask != kNoMask)
    o.mask = TensorView{dmask.get(), mask_dtype, mask_shape, DeviceType::kCUDA, 0};
  if (c.sinks) o.sinks = testing::device_view(dsinks, DType::kFloat32, {Hq});
  const TensorView qv = testing::device_view(dq, c.qdtype, {B, Hq, c.L, D});
  const TensorView ov = testing::device_view(dout, c.qdtype, {B, Hq, c.L, D});
  const TensorView lv = testing::device_view(dlse, DType::kFloat32, {B, Hq, c.L});
  QuantizedStates ks = kg.view(c.lens), vs = vg.view(c.lens);
  ks.settled_tokens = vs.settled_tokens = c.settled;
  EXPECT_EQ(attention_unsupported_reason(qv, ks, vs, o), "");

  Outcome res;
  std::vector<unsigned char> first;
  std::vector<float> first_lse;
  for (int rep = 0; rep < 2; ++rep) {
    dout.poison();
    dlse.poison();
    scaled_dot_product_attention(qv, ks, vs, ov, o, &lv);
    if (c.kernel) EXPECT_STREQ(cuda::last_attention_kernel(), c.kernel);
    if (c.merge) EXPECT_STREQ(cuda::last_split_merge(), c.merge);
    if (c.stream_variant) EXPECT_STREQ(cuda::last_stream_decode_variant(), c.stream_variant);
    std::vector<unsigned char> got(out_bytes);
    dout.download(got.data());
    std::vector<float> got_lse = dlse.to_host<float>();
    if (rep == 0) {
      first = got;
      first_lse = got_lse;
    } else {
      res.repeat_identical =
          got == first && std::memcmp(got_lse.data(), first_lse.data(), got_lse.size() * 4) == 0;
    }
  }
#if defined(TQATTN_HAVE_CUDA)
  if (graph) {
    cudaStream_t stream;
    EXPECT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    o.stream = stream;
    scaled_dot_product_attention(qv, ks, vs, ov, o, &lv);  // warm-up on this stream
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    cudaGraph_t g;
    EXPECT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    scaled_dot_product_attention(qv, ks, vs, ov, o, &lv);
    EXPECT_EQ(cudaStreamEndCapture(stream, &g), cudaSuccess);
    cudaGraphExec_t exec;
    EXPECT_EQ(cudaGraphInstantiate(&exec, g, 0), cudaSuccess);
    for (int rep = 0; rep < 2; ++rep) {
      dout.poison();
      EXPECT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      std::vector<unsigned char> got(out_bytes);
      dout.download(got.data());
      res.repeat_identical &= got == first;
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(g);
    cudaStreamDestroy(stream);
  }
#endif
  const std::vector<float> got = decode(first.data(), c.qdtype, q.size());
  res.out = first;
  for (float v : got) res.finite &= std::isfinite(v);
  res.rel_l2 = testing::relative_l2(got, want);
  for (size_t i = 0; i < want_lse.size(); ++i) {
    const float a = first_lse[i], b = want_lse[i];
    if (std::isinf(b) && a == b) continue;
    const double err = std::abs(double(a) - b) / std::max(1.0, std::abs(double(b)));
    res.lse_err = std::max(res.lse_err, std::isfinite(err) ? err : 1e30);
  }
  return res;
}

void expect_close(const AttnCase& c, bool graph = false) {
  SCOPED_TRACE(describe(c));
  const Outcome r = run_case(c, graph);
  EXPECT_TRUE(r.finite) << "non-finite (or unwritten, NaN-poisoned) output";
  // Against the fp32 reference a bf16 output carries its own rounding (8 significant bits:
  // ~1.6e-3 relative L2 by itself), so bf16 gets that on top of the 2e-3 for our arithmetic.
  EXPECT_LE(r.rel_l2, c.qdtype == DType::kBFloat16 ? 3e-3 : 2e-3);
  // lse of a row with few keys is a single score: its error scales with the score's size.
  EXPECT_LE(r.lse_err, 5e-3);
  EXPECT_TRUE(r.repeat_identical) << "repeated runs differ";
  std::printf("[cuda attention] %-110s rel_l2 %.2e lse %.2e\n", describe(c).c_str(), r.rel_l2,
              r.lse_err);
}

// The CPU test matrix, walked so that every value of every axis meets several of the others
// without the full cross product (the CPU reference is the slow side).
std::vector<AttnCase> matrix_cases() {
  struct Width {
    int k, v;
    bool prod;
  };
  const int dims[] = {64, 96, 128, 256};
  // MSE (2,2), (3,3), (3,4), (4,4) run the width-specialised loops; the others the generic ones.
  const Width widths[] = {{1, 1, false}, {2, 2, true},  {2, 2, false}, {3, 3, false}, {3, 4, false},
                          {4, 4, true},  {4, 4, false}, {8, 8, false}, {5, 3, false}, {7, 6, true}};
  const int groups[] = {1, 4, 7, 8};
  const int lengths[] = {1, 3, 128};
  const int64_t seqs[] = {1, 7, 129, 4097};
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  std::vector<AttnCase> cases;
  int i = 0;
  for (int d : dims)
    for (const Width& w : widths)
      for (int L : lengths) {
        AttnCase c;
        c.D = d;
        c.kbits = w.k;
        c.vbits = w.v;
        c.prod = w.prod;
        c.group = groups[i % 4];
        c.hkv = c.group >= 7 ? 1 : 2;
        c.L = L;
        int64_t S = seqs[(i / 4 + i) % 4];
        if (L == 128 && S == 4097 && d * c.group > 512) S = 129;
        c.lens = {S, std::max<int64_t>(1, (S + 1) / 2)};
        c.cap_extra = i % 2 ? 3 : 0;  // odd capacities take the unaligned load path
        c.qdtype = dtypes[i % 3];
        c.seed = 1000 + i;
        cases.push_back(c);
        ++i;
      }
  return cases;
}

TEST(CudaAttention, MatchesCpuAcrossTheMatrix) {
  TQATTN_SKIP_WITHOUT_GPU();
  for (const AttnCase& c : matrix_cases()) expect_close(c);
}

TEST(CudaAttention, MasksWindowsSinksSoftcap) {
  TQATTN_SKIP_WITHOUT_GPU();
  std::vector<AttnCase> cases;
  auto add = [&](auto f) {
    AttnCase c;
    c.lens = {129, 100};
    c.seed = 2000 + cases.size();
    f(c);
    cases.push_back(c);
  };
  add([](AttnCase& c) {
    c.causal = true;
    c.L = 3;
  });
  add([](AttnCase& c) {
    c.causal = true;
    c.L = 128;
    c.lens = {300, 130};
  });
  add([](AttnCase& c) {
    c.causal = true;
    c.L = 128;
    c.lens = {4097, 2000};
    c.qdtype = DType::kFloat16;
  });
  add([](AttnCase& c) {
    c.causal = true;
    c.causal_offset = 5;
    c.L = 3;
  });
  add([](AttnCase& c) {
    c.causal = true;
    c.causal_offset = 40;
    c.L = 64;
  });
  add([](AttnCase& c) {
    c.window = 16;
    c.L = 1;
  });
  add([](AttnCase& c) {
    c.window = 40;
    c.causal = true;
    c.L = 128;
    c.lens = {1000, 700};
  });
  add([](AttnCase& c) {
    c.mask = kBoolMask;
    c.L = 3;
  });
  add([](AttnCase& c) {
    c.mask = kHalfBiasMask;
    c.L = 128;
    c.qdtype = DType::kBFloat16;
  });
  add([](AttnCase& c) {
    c.mask = kFloatFullMask;
    c.L = 1;
    c.sinks = true;
  });
  add([](AttnCase& c) {
    c.softcap = 5.0f;
    c.L = 3;
  });
  add([](AttnCase& c) {
    c.softcap = 3.0f;
    c.L = 64;
    c.causal = true;
  });
  add([](AttnCase& c) {
    c.sinks = true;
    c.causal = true;
    c.L = 128;
    c.lens = {128, 400};
  });
  add([](AttnCase& c) {
    c.mask = kBoolDeadRow;
    c.L = 3;
  });
  add([](AttnCase& c) {
    c.mask = kBoolDeadRow;
    c.L = 9;
    c.sinks = true;
  });
  add([](AttnCase& c) {
    c.prod = true;
    c.kbits = 4;
    c.mask = kBoolMask;
    c.softcap = 4.0f;
    c.L = 2;
  });
  add([](AttnCase& c) {
    c.prod = true;
    c.kbits = 3;
    c.causal = true;
    c.L = 128;
    c.window = 50;
    c.lens = {333, 130};
  });
  add([](AttnCase& c) {
    c.lens = {0, 50};
    c.L = 1;
  });
  add([](AttnCase& c) {
    c.lens = {0, 50};
    c.L = 16;
    c.sinks = true;
  });
  add([](AttnCase& c) {
    c.lens = {1, 4097, 300};
    c.L = 1;
    c.group = 8;
    c.hkv = 1;
  });
  add([](AttnCase& c) {
    c.causal = true;
    c.L = 8;
    c.lens = {300, 200};
  });
  add([](AttnCase& c) {
    c.causal = true;
    c.L = 9;
    c.lens = {300, 200};
  });
  add([](AttnCase& c) {
    c.dense = true;
    c.L = 1;
  });
  add([](AttnCase& c) {
    c.dense = true;
    c.L = 128;
    c.causal = true;
    c.qdtype = DType::kFloat16;
    c.lens = {129, 256};
  });
  add([](AttnCase& c) {
    c.D = 64;
    c.causal = true;
    c.L = 200;
    c.lens = {777};
  });
  add([](AttnCase& c) {
    c.D = 96;
    c.causal = true;
    c.L = 100;
    c.lens = {333};
    c.kbits = 2;
  });
  add([](AttnCase& c) {
    c.D = 256;
    c.causal = true;
    c.L = 70;
    c.lens = {517};
    c.vbits = 2;
  });
  add([](AttnCase& c) {
    c.group = 32;
    c.hkv = 1;
    c.L = 4;
    c.lens = {1500};
  });
  for (const AttnCase& c : cases) expect_close(c);
}

// Queries near the bottom of fp32's range: the kernels scale each rotated row by a power of two
// for fp16, whose inverse must stay finite (a row below 2^-114 once got an infinite one).
TEST(CudaAttention, TinyQueriesStayFinite) {
  TQATTN_SKIP_WITHOUT_GPU();
  for (int i = 0; i < 4; ++i) {
    AttnCase c;
    c.D = i == 1 ? 256 : (i == 3 ? 64 : 128);
    c.L = i < 2 ? 1 : 130;
    c.causal = c.L > 1;
    c.lens = {300, 130};
    c.cap_round = 256;
    c.qdtype = i % 2 ? DType::kBFloat16 : DType::kFloat32;
    c.q_std = 3e-37f;
    c.seed = 2900 + i;
    expect_close(c);
  }
}

TEST(CudaAttention, FixedSplitsAndGraphCapture) {
  TQATTN_SKIP_WITHOUT_GPU();
  AttnCase c;
  c.lens = {4097, 1234};
  c.L = 1;
  c.seed = 3000;
  cuda::set_decode_splits(5);
  expect_close(c, /*graph=*/true);
  c.L = 4;
  c.causal = true;
  expect_close(c, /*graph=*/true);
  cuda::set_decode_splits(0);
  c.L = 1;
  c.causal = false;
  expect_close(c, /*graph=*/true);
  EXPECT_THROW(cuda::set_decode_splits(-1), InvalidArgument);
}

// Decode over batches of very mixed lengths: long units split many ways (merged through the
// workspace), short and empty sequences beside them, windows, sinks and Prod keys at D = 256,
// causal rows over several positions, and a batch large enough to run two blocks per SM.
TEST(CudaAttention, MixedBatchDecode) {
  TQATTN_SKIP_WITHOUT_GPU();
  std::vector<AttnCase> cases(5);
  cases[0].lens = {1, 0, 9000, 3000, 17, 5000, 129};
  cases[1].lens = {1, 0, 9000, 3000, 17, 5000, 129};
  cases[1].L = 4;
  cases[1].group = 7;
  cases[1].hkv = 1;
  cases[1].D = 64;
  cases[1].qdtype = DType::kFloat16;
  cases[2].lens = {4000, 100, 2500};
  cases[2].window = 300;
  cases[2].sinks = true;
  cases[2].D = 256;
  cases[2].prod = true;
  cases[2].cap_extra = 3;
  cases[3].lens = {2000, 33, 7000};
  cases[3].L = 2;
  cases[3].causal = true;
  cases[4].lens.clear();
  for (int i = 0; i < 16; ++i) cases[4].lens.push_back(1000 + (i * 7919) % 15000);
  cases[4].hkv = 4;
  cases[4].D = 64;
  cases[4].qdtype = DType::kBFloat16;
  for (size_t i = 0; i < cases.size(); ++i) {
    cases[i].seed = 3500 + i;
    expect_close(cases[i], /*graph=*/i == 0);
  }
}

// Turns the stream decode kernel on for a scope (whatever the environment chose).
struct StreamDecodeOn {
  StreamDecodeOn() : was(cuda::stream_decode_enabled()) { cuda::set_stream_decode(true); }
  ~StreamDecodeOn() { cuda::set_stream_decode(was); }
  bool was;
};

// The stream decode kernel (MSE 2/2, 3/3, 3/4, 4/4 at D 64, 96, 128, 256 over aligned planes, as
// every KVCache allocates them): the decode matrix on 256-token capacities.
std::vector<AttnCase> stream_matrix_cases() {
  struct Width {
    int k, v;
  };
  const int dims[] = {64, 96, 128, 256};
  const Width widths[] = {{2, 2}, {3, 3}, {3, 4}, {4, 4}};
  const int groups[] = {1, 4, 7, 8};
  const int lengths[] = {1, 2, 5, 8};
  const int64_t seqs[] = {1, 7, 129, 4097, 20000};
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  std::vector<AttnCase> cases;
  int i = 0;
  for (int d : dims)
    for (const Width& w : widths)
      for (int L : lengths) {
        AttnCase c;
        c.D = d;
        c.kbits = w.k;
        c.vbits = w.v;
        c.group = groups[i % 4];
        c.hkv = c.group >= 7 ? 1 : 2;
        c.L = L;
        const int64_t S = seqs[(i / 4 + i) % 5];
        c.lens = {S, std::max<int64_t>(1, (S + 1) / 2)};
        c.cap_round = 256;
        c.qdtype = dtypes[i % 3];
        c.seed = 5000 + i;
        c.kernel = "stream decode";
        cases.push_back(c);
        ++i;
      }
  return cases;
}

TEST(CudaStreamDecode, MatchesCpuAcrossTheMatrix) {
  TQATTN_SKIP_WITHOUT_GPU();
  const StreamDecodeOn stream_on;
  // The matrix must exercise both instantiations of the stream kernel: short splits take the
  // one-round kernel, splits past one round (512 tokens, 256 at D = 256) the ring.
  int one_round = 0, ring = 0;
  for (const AttnCase& c : stream_matrix_cases()) {
    expect_close(c);
    const std::string variant = cuda::last_stream_decode_variant();
    one_round += variant == "one round";
    ring += variant == "ring";
  }
  EXPECT_GT(one_round, 0);
  EXPECT_GT(ring, 0);
}

TEST(CudaStreamDecode, MasksWindowsSinksSoftcapSplits) {
  TQATTN_SKIP_WITHOUT_GPU();
  const StreamDecodeOn stream_on;
  std::vector<AttnCase> cases;
  auto add = [&](auto f) {
    AttnCase c;
    c.lens = {1300, 999};
    c.cap_round = 256;
    c.seed = 6000 + cases.size();
    c.kernel = "stream decode";
    f(c);
    cases.push_back(c);
  };
  add([](AttnCase& c) {
    c.causal = true;
    c.L = 4;
  });
  add([](AttnCase& c) {
    c.causal = true;
    c.L = 8;
    c.group = 1;
    c.qdtype = DType::kFloat16;
  });
  add([](AttnCase& c) {
    c.causal = true;
    c.causal_offset = 70;
    c.L = 3;
  });
  add([](AttnCase& c) { c.window = 16; });
  add([](AttnCase& c) {
    c.window = 300;
    c.sinks = true;
    c.lens = {5000, 2999};
  });
  add([](AttnCase& c) {
    c.window = 40;
    c.causal = true;
    c.L = 6;
    c.D = 64;
  });
  add([](AttnCase& c) {
    c.mask = kBoolMask;
    c.L = 3;
  });
  add([](AttnCase& c) {
    c.mask = kHalfBiasMask;
    c.qdtype = DType::kBFloat16;
    c.D = 96;
  });
  add([](AttnCase& c) {
    c.mask = kFloatFullMask;
    c.sinks = true;
  });
  add([](AttnCase& c) {
    c.mask = kBoolDeadRow;
    c.L = 2;
  });
  add([](AttnCase& c) { c.softcap = 5.0f; });
  add([](AttnCase& c) {
    c.softcap = 3.0f;
    c.L = 5;
    c.causal = true;
    c.kbits = 4;
    c.vbits = 4;
  });
  add([](AttnCase& c) {
    c.sinks = true;
    c.kbits = 2;
    c.vbits = 2;
  });
  add([](AttnCase& c) { c.lens = {0, 50}; });
  add([](AttnCase& c) {
    c.lens = {1, 4097, 300};
    c.group = 8;
    c.hkv = 1;
  });
  add([](AttnCase& c) { c.dense = true; });  // D = 128 with a dense rotation
  add([](AttnCase& c) {
    c.dense = true;
    c.D = 64;
    c.L = 2;
  });
  add([](AttnCase& c) {
    c.group = 32;
    c.hkv = 1;
    c.L = 1;
    c.lens = {1500};
  });
  add([](AttnCase& c) { c.lens = {33000}; });  // many splits: the workspace merge
  add([](AttnCase& c) {
    c.lens = {3000, 2900};  // a few splits: the cluster merge
    c.qdtype = DType::kFloat16;
  });
  add([](AttnCase& c) {
    c.lens.clear();  // B = 16, mixed lengths up to ~16K
    for (int i = 0; i < 16; ++i) c.lens.push_back(1000 + (i * 7919) % 15000);
    c.hkv = 4;
    c.kbits = 3;
    c.vbits = 3;
  });
  add([](AttnCase& c) {
    c.lens = {1, 0, 9000, 3000, 17, 5000, 129};
    c.L = 4;
    c.group = 7;
    c.hkv = 1;
    c.D = 64;
    c.qdtype = DType::kFloat16;
  });
  for (const AttnCase& c : cases) expect_close(c);
  // A Prod key cache, or an odd capacity, goes to the generic kernel.
  AttnCase prod;
  prod.prod = true;
  prod.kbits = 4;
  prod.vbits = 4;
  prod.cap_round = 256;
  prod.kernel = "decode";
  expect_close(prod);
  AttnCase odd;
  odd.cap_extra = 3;
  odd.kernel = "decode";
  expect_close(odd);
}

// On by default: an aligned 3/4 cache decodes through the stream kernel unless
// set_stream_decode(false) (or TQATTN_CUDA_STREAM_DECODE=0) sends it to the generic one.
TEST(CudaStreamDecode, OnByDefaultAndSwitchesOff) {
  TQATTN_SKIP_WITHOUT_GPU();
  if (!cuda::stream_decode_enabled()) GTEST_SKIP() << "TQATTN_CUDA_STREAM_DECODE=0 is set";
  AttnCase c;
  c.lens = {3000, 1000};
  c.cap_round = 256;
  c.seed = 7500;
  c.kernel = "stream decode";
  expect_close(c);
  cuda::set_stream_decode(false);
  c.kernel = "decode";
  expect_close(c);
  cuda::set_stream_decode(true);
}

TEST(CudaStreamDecode, FixedSplitsAndGraphCapture) {
  TQATTN_SKIP_WITHOUT_GPU();
  const StreamDecodeOn stream_on;
  AttnCase c;
  c.lens = {4097, 1234};
  c.cap_round = 256;
  c.seed = 7000;
  c.kernel = "stream decode";
  cuda::set_decode_splits(5);
  c.stream_variant = "ring";  // 5 splits of 832 tokens
  expect_close(c, /*graph=*/true);
  c.L = 4;
  c.causal = true;
  expect_close(c, /*graph=*/true);
  cuda::set_decode_splits(8);
  c.lens = {4000, 1234};
  c.stream_variant = "one round";  // 8 splits of 512 tokens
  expect_close(c, /*graph=*/true);
  c.stream_variant = nullptr;
  cuda::set_decode_splits(0);
  c.L = 1;
  c.causal = false;
  c.lens = {40000};
  expect_close(c, /*graph=*/true);
  // A graph replay (created stream) against eager calls (default stream): the split length must
  // not depend on the stream (it once did; docs/perf.md history 31). 8 and auto splits of these
  // lengths round differently at 16 and 32 tokens.
  c.lens = {1, 0, 9000, 3000, 17, 5000, 129};
  c.cap_round = 1;  // 9000: a multiple of 8, so aligned planes
  expect_close(c, /*graph=*/true);
  cuda::set_decode_splits(8);
  c.lens = {9000};
  expect_close(c, /*graph=*/true);
  cuda::set_decode_splits(0);
}

// Decode splits merged through the workspace (merge_partials: a warp per row for the split
// weights once a unit has more than 8 splits), up to 33 of them, at every head dim, with 1 to 8
// query rows per block and both decode kernels. Which block merges (the last to arrive) changes
// from run to run; the result must not (expect_close compares two runs bit for bit).
TEST(CudaStreamDecode, WorkspaceMergeOfManySplits) {
  TQATTN_SKIP_WITHOUT_GPU();
  struct Shape {
    int D, group, splits;
    bool stream;
  };
  const Shape shapes[] = {{128, 4, 16, true}, {128, 4, 24, true}, {128, 8, 16, true},
                          {128, 1, 13, true}, {64, 7, 16, true},  {256, 4, 8, true},
                          {256, 4, 12, true}, {96, 4, 20, true},  {128, 4, 16, false},
                          {128, 4, 33, false}};
  const bool was = cuda::stream_decode_enabled();
  uint64_t seed = 7300;
  for (const Shape& sh : shapes) {
    cuda::set_stream_decode(sh.stream);
    AttnCase c;
    c.D = sh.D;
    c.group = sh.group;
    c.lens = {20000, 9001};
    c.cap_round = 256;
    c.seed = seed++;
    c.merge = "workspace";
    if (sh.stream) c.kernel = "stream decode";
    cuda::set_decode_splits(sh.splits);
    expect_close(c);
  }
  cuda::set_decode_splits(0);
  cuda::set_stream_decode(was);
}

// Copies of settled tokens go out before the dependency wait (QuantizedStates::settled_tokens,
// set_early_copies). That changes when bytes land, not what is computed: every mode and bound gives
// the bits of copying after the wait. A bound inside the sequences sends the splits below it early
// and the rest after the wait; a graph replay gives the same bits as the eager calls.
TEST(CudaStreamDecode, EarlyCopiesOfSettledTokensChangeNoBits) {
  TQATTN_SKIP_WITHOUT_GPU();
  const StreamDecodeOn stream_on;
  const int mode_was = cuda::early_copies();
  std::vector<AttnCase> cases;
  const std::vector<AttnCase> matrix = stream_matrix_cases();
  for (size_t i = 0; i < matrix.size(); i += 5) cases.push_back(matrix[i]);
  AttnCase ring;
  ring.lens = {40000, 9001};
  ring.cap_round = 256;
  ring.seed = 7700;
  ring.kernel = "stream decode";
  cases.push_back(ring);
  ring.L = 4;
  ring.causal = true;
  ring.window = 20000;
  ring.D = 256;
  ring.seed = 7701;
  cases.push_back(ring);
  int rings = 0;
  for (AttnCase c : cases) {
    const int64_t S = *std::max_element(c.lens.begin(), c.lens.end());
    cuda::set_early_copies(0);
    c.settled = S;
    const Outcome base = run_case(c);
    SCOPED_TRACE(describe(c));
    EXPECT_TRUE(base.finite);
    EXPECT_LE(base.rel_l2, c.qdtype == DType::kBFloat16 ? 3e-3 : 2e-3);
    rings += std::string(cuda::last_stream_decode_variant()) == "ring";
    for (const int64_t settled : {int64_t{0}, S / 2, S, int64_t{1} << 40}) {
      for (const int mode : {1, 2}) {
        SCOPED_TRACE(::testing::Message() << "settled " << settled << " mode " << mode);
        cuda::set_early_copies(mode);
        c.settled = settled;
        const Outcome r = run_case(c, /*graph=*/settled == S && mode == 2);
        EXPECT_TRUE(r.repeat_identical);
        EXPECT_TRUE(r.out == base.out) << "early copies changed the output";
      }
    }
  }
  EXPECT_GT(rings, 0);
  cuda::set_early_copies(mode_was);
}

// One split per sequence: each block streams many rounds (512 tokens, 256 at D = 256), so every
// round slot is refilled several times (D = 64 fits more slots than 128), with a short last
// round and a window that starts mid-round.
TEST(CudaStreamDecode, LongSplitsCycleTheRoundRing) {
  TQATTN_SKIP_WITHOUT_GPU();
  const StreamDecodeOn stream_on;
  cuda::set_decode_splits(1);
  int seed = 7600;
  for (int d : {64, 96, 128, 256}) {
    AttnCase c;
    c.D = d;
    c.lens = {7001, 2500};
    c.cap_round = 256;
    c.seed = seed++;
    c.kernel = "stream decode";
    c.stream_variant = "ring";
    expect_close(c);
    c.window = 3000;
    c.causal = true;
    c.L = 3;
    c.seed = seed++;
    expect_close(c);
  }
  cuda::set_decode_splits(0);
}

// The prefill kernel family a case over MSE keys at head dim d must take on this device: wgmma at
// D = 64, 128 and 256 on compute capability 9.0 (unless switched off; widths whose tables and
// stages fit, which every width pair these tests use does), mma.sync elsewhere.
const char* mse_prefill_kernel(int d = 128) {
  int major = 0, minor = 0;
#if defined(TQATTN_HAVE_CUDA)
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
#endif
  return (d == 64 || d == 128 || d == 256) && major == 9 && minor == 0 &&
                 cuda::wgmma_prefill_enabled()
             ? "wgmma prefill"
             : "prefill";
}

// The wgmma prefill kernel (MSE keys, D = 64, 128 and 256): the prefill matrix over the compiled
// widths and the generic ones (at D = 256 4/4 bits with 16 table copies, the rest with 32), aligned
// 256-token capacities (copies of whole tiles) and odd ones (the plain stage loads), causal and
// not, GQA 1/4/7/8, partial last tiles.
TEST(CudaWgmmaPrefill, MatchesCpuAcrossTheMatrix) {
  TQATTN_SKIP_WITHOUT_GPU();
  struct Width {
    int k, v;
  };
  const Width widths[] = {{2, 2}, {3, 3}, {3, 4}, {4, 4}, {1, 8}, {5, 2}, {8, 3}};
  const int groups[] = {1, 4, 7, 8};
  const int lengths[] = {9, 16, 64, 130};
  const int64_t seqs[] = {1, 7, 129, 4097, 9000};
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  int i = 0;
  for (int d : {128, 64, 256})
    for (const Width& w : widths)
      for (int L : lengths) {
        AttnCase c;
        c.D = d;
        c.kbits = w.k;
        c.vbits = w.v;
        c.group = groups[i % 4];
        c.hkv = c.group >= 7 ? 1 : 2;
        c.L = L;
        const int64_t S = std::max<int64_t>(seqs[(i / 4 + i) % 5], L);
        c.lens = {S, std::max<int64_t>(L, (S + 1) / 2)};
        c.causal = i % 2 == 0;
        if (i % 3 == 0) {
          c.cap_extra = 3;
        } else {
          c.cap_round = 256;
        }
        c.qdtype = dtypes[i % 3];
        c.seed = 8000 + i;
        c.kernel = mse_prefill_kernel(d);
        expect_close(c);
        ++i;
      }
}

TEST(CudaWgmmaPrefill, MasksWindowsSinksSoftcapSplits) {
  TQATTN_SKIP_WITHOUT_GPU();
  std::vector<AttnCase> cases;
  auto add = [&](auto f) {
    AttnCase c;
    c.L = 40;
    c.lens = {1300, 999};
    c.cap_round = 256;
    c.seed = 8500 + cases.size();
    c.kernel = mse_prefill_kernel();
    f(c);
    cases.push_back(c);
  };
  add([](AttnCase& c) { c.mask = kBoolMask; });
  add([](AttnCase& c) {
    c.mask = kHalfBiasMask;
    c.qdtype = DType::kBFloat16;
    c.causal = true;
  });
  add([](AttnCase& c) {
    c.mask = kFloatFullMask;
    c.sinks = true;
  });
  add([](AttnCase& c) {
    c.mask = kBoolDeadRow;
    c.L = 9;
  });
  add([](AttnCase& c) {
    c.window = 100;
    c.causal = true;
    c.L = 200;
  });
  add([](AttnCase& c) {
    c.window = 700;
    c.sinks = true;
    c.lens = {5000, 2999};
  });
  add([](AttnCase& c) {
    c.softcap = 4.0f;
    c.causal = true;
    c.kbits = 4;
  });
  add([](AttnCase& c) {
    c.causal = true;
    c.causal_offset = 300;
    c.L = 100;
    c.qdtype = DType::kFloat16;
  });
  // Split KV ranges and their merge: long sequences, few units.
  add([](AttnCase& c) {
    c.L = 16;
    c.hkv = 1;
    c.group = 1;
    c.lens = {40000};
  });
  add([](AttnCase& c) {
    c.causal = true;
    c.L = 64;
    c.lens = {20000, 64, 100};
    c.kbits = 2;
    c.vbits = 2;
  });
  add([](AttnCase& c) {
    c.dense = true;  // dense rotations at D = 128 (a non-Hadamard codec)
    c.L = 33;
  });
  // Every case again at D = 64 and 256.
  const size_t at128 = cases.size();
  for (int d : {64, 256})
    for (size_t i = 0; i < at128; ++i) {
      AttnCase c = cases[i];
      c.D = d;
      c.seed += d == 64 ? 100 : 200;
      c.kernel = mse_prefill_kernel(d);
      cases.push_back(c);
    }
  for (const AttnCase& c : cases) expect_close(c);
}

// The wgmma kernel's split merges: units whose 2 to 8 splits form one thread-block cluster and
// merge through distributed shared memory, and the same cases merged through the workspace
// (switched off). Uneven lengths leave some clusters' blocks without tokens, GQA 7 leaves rows
// past the last, and sinks, lse, dead rows, windows and a dense rotation go through the merge's
// finish. Whether a cluster size fits depends on the device's GPCs (an H200 holds 66 clusters of
// 2, 39 of 3, 30 of 4, 22 of 5 and 15 of 8 such blocks): the 2-split case must.
TEST(CudaWgmmaPrefill, ClusterAndWorkspaceMerges) {
  TQATTN_SKIP_WITHOUT_GPU();
  if (std::strcmp(mse_prefill_kernel(), "wgmma prefill") != 0)
    GTEST_SKIP() << "no wgmma prefill on this device";
  std::vector<AttnCase> cases;
  auto add = [&](auto f) {
    AttnCase c;
    c.hkv = 8;
    c.group = 1;
    c.L = 9;
    c.cap_round = 256;
    c.seed = 8700 + cases.size();
    c.kernel = "wgmma prefill";
    f(c);
    cases.push_back(c);
  };
  // 6 sequences x 8 KV heads: 48 units of 2 splits each.
  add([](AttnCase& c) {
    c.lens = {600, 900, 513, 1000, 700, 800};
    c.mask = kBoolDeadRow;
  });
  // 9 sequences x 4 KV heads: 36 units of 3 splits; the shorter sequences' units have fewer, so
  // their clusters hold blocks without tokens.
  add([](AttnCase& c) {
    c.hkv = 4;
    c.lens = {1500, 700, 1200, 1500, 400, 1499, 1000, 1500, 1300};
    c.causal = true;
  });
  // 24 units of 5 splits.
  add([](AttnCase& c) {
    c.lens = {1500, 700, 1200};
    c.causal = true;
  });
  // 16 units of 8 splits.
  add([](AttnCase& c) {
    c.lens = {3000, 2500};
    c.sinks = true;
    c.qdtype = DType::kBFloat16;
  });
  // GQA 7 (140 rows: a second row block of 12), 24 units.
  add([](AttnCase& c) {
    c.hkv = 4;
    c.group = 7;
    c.L = 20;
    c.lens = {2000, 1999, 1800};
    c.causal = true;
    c.qdtype = DType::kFloat16;
  });
  add([](AttnCase& c) {
    c.dense = true;
    c.lens = {1500, 1400, 1300};
  });
  // D = 64: 48 units of 2 splits, then 16 units of 8.
  add([](AttnCase& c) {
    c.D = 64;
    c.lens = {600, 900, 513, 1000, 700, 800};
    c.causal = true;
  });
  add([](AttnCase& c) {
    c.D = 64;
    c.lens = {3000, 2500};
    c.qdtype = DType::kFloat16;
  });
  // D = 256 (32-token tiles, the epilogue's scratch over the tables): 2 and then 8 splits, 4/4
  // bits (16 table copies) in the second.
  add([](AttnCase& c) {
    c.D = 256;
    c.lens = {600, 900, 513, 1000, 700, 800};
    c.causal = true;
    c.sinks = true;
  });
  add([](AttnCase& c) {
    c.D = 256;
    c.kbits = 4;
    c.lens = {3000, 2500};
    c.qdtype = DType::kBFloat16;
  });
  add([](AttnCase& c) {
    c.window = 300;
    c.causal = true;
    c.lens = {1600, 1601, 1602};
  });
  // A window's 7 tokens of slack on 1024 = 2 x 512 would make a third split per unit (144
  // blocks for 132 slots): the host keeps split grids resident at once.
  add([](AttnCase& c) {
    c.window = 200;
    c.causal = true;
    c.lens = {1024, 1024, 1024, 1024, 1024, 1024};
  });
  const bool was = cuda::cluster_merge_enabled();
  int clustered = 0;
  for (AttnCase& c : cases) {
    cuda::set_cluster_merge(true);
    c.merge = nullptr;
    expect_close(c);
    const std::string merge = cuda::last_split_merge();
    std::printf("[cuda attention] merge: %s\n", merge.c_str());
    EXPECT_NE(merge, "none");
    if (&c == &cases[0]) EXPECT_EQ(merge, "cluster");
    clustered += merge == "cluster";
    cuda::set_cluster_merge(false);
    c.merge = "workspace";
    expect_close(c);
  }
  cuda::set_cluster_merge(was);
  EXPECT_GE(clustered, 1);
}

// Off by switch: the same D = 64, 128 and 256 MSE prefill through the mma.sync kernel.
TEST(CudaWgmmaPrefill, SwitchesOff) {
  TQATTN_SKIP_WITHOUT_GPU();
  const bool was = cuda::wgmma_prefill_enabled();
  cuda::set_wgmma_prefill(false);
  for (int d : {128, 64, 256}) {
    AttnCase c;
    c.D = d;
    c.L = 50;
    c.causal = true;
    c.lens = {3000, 1000};
    c.seed = 8900 + d;
    c.kernel = "prefill";
    expect_close(c);
  }
  cuda::set_wgmma_prefill(was);
}

// Small cases that together reach every kernel path (decode and prefill, one split and several,
// aligned and unaligned planes, masks, Prod keys, dense rotation): scripts/gpu_check.sh runs this
// under compute-sanitizer memcheck and racecheck.
TEST(CudaSanitizerSubset, AttentionPaths) {
  TQATTN_SKIP_WITHOUT_GPU();
  std::vector<AttnCase> cases(18);
  // Stream decode at D = 64, 3/3 bits: 48-bit key runs and 24-bit value runs, which straddle
  // words (a row's last run must not read the next warp's stage, still in flight).
  cases[17].lens = {3000, 37};
  cases[17].D = 64;
  cases[17].vbits = 3;
  cases[17].cap_round = 256;
  cases[17].kernel = "stream decode";
  cases[16].lens = {20000};  // stream decode at D = 96 (dense rotations staged), workspace merge
  cases[16].D = 96;
  cases[16].L = 2;
  cases[16].cap_round = 256;
  cases[16].kernel = "stream decode";
  cases[15].lens = {3000, 37};  // stream decode at D = 96, cluster merge, one-split sequence
  cases[15].D = 96;
  cases[15].cap_round = 256;
  cases[15].kernel = "stream decode";
  cases[14].lens = {2000, 700};  // wgmma prefill at D = 256, 4/4 bits, splits, a partial tile
  cases[14].D = 256;
  cases[14].kbits = 4;
  cases[14].L = 45;
  cases[14].causal = true;
  cases[14].cap_round = 256;
  cases[14].kernel = mse_prefill_kernel(256);
  cases[13].lens = {2000, 700};  // wgmma prefill at D = 64, splits, causal, a partial tile
  cases[13].D = 64;
  cases[13].L = 37;
  cases[13].causal = true;
  cases[13].cap_round = 256;
  cases[13].kernel = mse_prefill_kernel(64);
  cases[12].lens = {2500, 300};  // stream decode at D = 256 (8 warps), 4/4, GQA 7
  cases[12].D = 256;
  cases[12].kbits = 4;
  cases[12].group = 7;
  cases[12].hkv = 1;
  cases[12].L = 1;
  cases[12].cap_round = 256;
  cases[12].kernel = "stream decode";
  cases[12].settled = int64_t{1} << 40;              // every first copy before the dependency wait
  cases[11].lens = {600, 900, 513, 1000, 700, 800};  // wgmma prefill, 2-split cluster merge
  cases[11].hkv = 8;
  cases[11].group = 1;
  cases[11].L = 9;
  cases[11].cap_round = 256;
  cases[11].kernel = mse_prefill_kernel();
  cases[9].lens = {5000, 700};  // wgmma prefill (on sm_90a), splits and their merge, causal
  cases[9].L = 70;
  cases[9].causal = true;
  cases[9].cap_round = 256;
  cases[9].kernel = mse_prefill_kernel();
  cases[10].lens = {300};  // wgmma prefill, odd capacity (plain stage loads), partial tile
  cases[10].L = 24;
  cases[10].cap_extra = 5;
  cases[10].mask = kHalfBiasMask;
  cases[10].kernel = mse_prefill_kernel();
  cases[7].lens = {3000, 37};  // stream decode, cluster merge, partial last stage
  cases[7].cap_round = 256;
  cases[7].kernel = "stream decode";
  cases[7].settled = int64_t{1} << 40;
  cases[8].lens = {20000};  // stream decode, workspace merge, window edge, splits below 10000 early
  cases[8].settled = 10000;
  cases[8].window = 5000;
  cases[8].L = 2;
  cases[8].cap_round = 256;
  cases[8].kernel = "stream decode";
  cases[0].lens = {600, 37};
  cases[0].L = 1;
  cases[6].lens = {3000, 1, 0, 1500};  // mixed lengths with an empty sequence
  cases[6].L = 1;
  cases[1].lens = {700};
  cases[1].L = 40;
  cases[1].causal = true;
  cases[1].cap_extra = 3;
  cases[2].lens = {300, 129};
  cases[2].L = 3;
  cases[2].prod = true;
  cases[2].mask = kBoolMask;
  cases[2].sinks = true;
  cases[3].lens = {200};
  cases[3].L = 20;
  cases[3].D = 96;
  cases[3].prod = true;
  cases[3].kbits = 5;
  cases[3].softcap = 4.0f;
  cases[4].lens = {150};
  cases[4].L = 2;
  cases[4].D = 256;
  cases[4].dense = true;
  cases[4].cap_extra = 1;
  cases[5].lens = {90, 0};
  cases[5].L = 12;
  cases[5].D = 64;
  cases[5].kbits = 8;
  cases[5].vbits = 1;
  const bool stream_was = cuda::stream_decode_enabled();
  const int early_was = cuda::early_copies();
  cuda::set_early_copies(2);  // the early copies of both stream kernels (cases 7, 8, 12)
  for (size_t i = 0; i < cases.size(); ++i) {
    cases[i].seed = 4000 + i;
    cuda::set_stream_decode(cases[i].kernel != nullptr);
    expect_close(cases[i]);
  }
  cuda::set_stream_decode(stream_was);
  cuda::set_early_copies(early_was);
}

TEST(CudaAttention, UnsupportedInputsSayWhyAndThrow) {
  TQATTN_SKIP_WITHOUT_GPU();
  const int D = 80;
  const auto q8 = quantizer(D, 3, QuantMode::kMse, false, 1);
  QuantizedTensor k(q8, 1, 1, 16, DeviceType::kCUDA, 0), v(q8, 1, 1, 16, DeviceType::kCUDA, 0);
  DeviceBuffer dq(D * 4), dout(D * 4);
  const TensorView qv = testing::device_view(dq, DType::kFloat32, {1, 1, 1, D});
  const TensorView ov = testing::device_view(dout, DType::kFloat32, {1, 1, 1, D});
  const std::string why = attention_unsupported_reason(qv, k.view({16}), v.view({16}), {});
  EXPECT_NE(why.find("head_dim"), std::string::npos) << why;
  try {
    scaled_dot_product_attention(qv, k.view({16}), v.view({16}), ov);
    FAIL() << "head_dim 80 ran on the GPU";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("scaled_dot_product_attention"), std::string::npos);
  }
  // Split-channel keys.
  CodecConfig base;
  base.bits = 3;
  const std::vector<float> sample = testing::random_normal(64 * 128, 3);
  auto split = std::make_shared<const TensorQuantizer>(
      TensorQuantizer::calibrate_split(128, 3.5, base, sample.data(), 64));
  const auto v4 = quantizer(128, 4, QuantMode::kMse, false, 2);
  QuantizedTensor ks(split, 1, 1, 16, DeviceType::kCUDA, 0), vs(v4, 1, 1, 16, DeviceType::kCUDA, 0);
  DeviceBuffer dq2(128 * 4);
  const TensorView qv2 = testing::device_view(dq2, DType::kFloat32, {1, 1, 1, 128});
  EXPECT_NE(attention_unsupported_reason(qv2, ks.view({16}), vs.view({16}), {}).find("split"),
            std::string::npos);
}

}  // namespace
}  // namespace tqattn

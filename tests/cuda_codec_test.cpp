// The CUDA quantize-on-write and dequantize kernels against the CPU codec (skipped without a GPU).
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"
#include "tqattn/tqattn.h"

namespace tqattn {
namespace {

using testing::decode;
using testing::DeviceBuffer;
using testing::encode;
using testing::plane_bytes;

struct QuantCase {
  int dim;
  double bits;  // fractional: a split quantizer
  QuantMode mode;
  bool dense;
  bool norm_correction;
  DType dtype;
};

std::shared_ptr<const TensorQuantizer> make_quantizer(const QuantCase& c, uint64_t seed,
                                                      const std::vector<float>& sample,
                                                      int64_t rows) {
  CodecConfig cfg;
  cfg.dim = c.dim;
  cfg.bits = static_cast<int>(c.bits);
  cfg.mode = c.mode;
  cfg.seed = seed;
  cfg.dense_rotation = c.dense;
  cfg.norm_correction = c.norm_correction;
  if (c.bits != std::floor(c.bits))
    return std::make_shared<const TensorQuantizer>(
        TensorQuantizer::calibrate_split(c.dim, c.bits, cfg, sample.data(), rows));
  return std::make_shared<const TensorQuantizer>(
      TensorQuantizer::uniform(std::make_shared<const Codec>(cfg)));
}

// Counts of differing packed elements across a quantize_write on the device and Codec::quantize
// on the CPU, over every written slot, plus a check that unwritten slots stay zero.
TEST(CudaQuantize, MatchesCpuCodecBits) {
  TQATTN_SKIP_WITHOUT_GPU();
  const std::vector<QuantCase> cases = {
      {64, 1, QuantMode::kMse, false, false, DType::kFloat32},
      {64, 4, QuantMode::kProd, false, false, DType::kFloat16},
      {96, 3, QuantMode::kMse, false, true, DType::kFloat32},
      {96, 5, QuantMode::kProd, false, false, DType::kBFloat16},
      {128, 2, QuantMode::kMse, false, false, DType::kBFloat16},
      {128, 3, QuantMode::kMse, false, false, DType::kFloat32},
      {128, 4, QuantMode::kMse, false, true, DType::kFloat16},
      {128, 4, QuantMode::kProd, false, false, DType::kFloat32},
      {128, 8, QuantMode::kMse, false, false, DType::kFloat32},
      {128, 6, QuantMode::kMse, true, false, DType::kFloat32},
      {128, 3.25, QuantMode::kMse, false, false, DType::kFloat32},  // split: 32 + 96 channels
      {256, 7, QuantMode::kProd, false, false, DType::kFloat16},
      {256, 2, QuantMode::kMse, false, false, DType::kFloat32},
      {80, 3, QuantMode::kMse, false, false, DType::kFloat32},
  };
  const int64_t B = 2, H = 3, n = 37, cap = 45;
  const std::vector<int64_t> start = {5, 0};
  int64_t total = 0, differing = 0;
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const QuantCase& c = cases[ci];
    SCOPED_TRACE(::testing::Message() << "case " << ci << " dim " << c.dim << " bits " << c.bits);
    std::vector<float> x = testing::random_normal(B * H * n * c.dim, 100 + ci, 3.0f);
    x[0] = 0.0f;  // one zero vector
    for (int j = 1; j < c.dim; ++j) x[j] = 0.0f;
    const auto quantizer = make_quantizer(c, 7 + ci, x, B * H * n);
    const std::vector<unsigned char> raw = encode(x, c.dtype);
    const std::vector<float> xr = decode(raw.data(), c.dtype, x.size());  // what both sides see

    DeviceBuffer dx(raw.size());
    dx.upload(raw.data());
    QuantizedTensor gpu(quantizer, B, H, cap, DeviceType::kCUDA, 0);
    gpu.write(TensorView{dx.get(), c.dtype, {B, H, n, c.dim}, DeviceType::kCUDA, 0}, start);
    const QuantizedStates gs = gpu.view({cap, cap});

    const auto& parts = quantizer->parts();
    for (size_t p = 0; p < parts.size(); ++p) {
      const Codec& codec = *parts[p].codec;
      const int d = codec.dim();
      const testing::PlaneBytes nb = plane_bytes(codec, B * H * cap);
      std::vector<uint32_t> idx(nb.indices / 4, 0), sg(nb.qjl_signs / 4, 0);
      std::vector<uint16_t> nrm(nb.norms / 2, 0), rn(nb.residual_norms / 2, 0);
      PackedPlanes cpu{idx.data(), nrm.data(), rn.empty() ? nullptr : rn.data(),
                       sg.empty() ? nullptr : sg.data()};
      std::vector<float> row(d);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t i = 0; i < n; ++i) {
            const float* src = xr.data() + ((b * H + h) * n + i) * c.dim;
            for (int j = 0; j < d; ++j) row[j] = src[parts[p].channels[j]];
            const int64_t slot = (b * H + h) * cap + start[b] + i;
            PackedPlanes at{cpu.indices + slot * codec.index_words(), cpu.norms + slot,
                            cpu.residual_norms ? cpu.residual_norms + slot : nullptr,
                            cpu.qjl_signs ? cpu.qjl_signs + slot * sign_words(d) : nullptr};
            codec.quantize(row.data(), 1, at);
          }
      std::vector<uint32_t> gidx(idx.size()), gsg(sg.size());
      std::vector<uint16_t> gnrm(nrm.size()), grn(rn.size());
      cuda::copy_bytes(gidx.data(), gs.parts[p].indices, nb.indices, 0);
      cuda::copy_bytes(gnrm.data(), gs.parts[p].norms, nb.norms, 0);
      if (!rn.empty()) {
        cuda::copy_bytes(grn.data(), gs.parts[p].residual_norms, nb.residual_norms, 0);
        cuda::copy_bytes(gsg.data(), gs.parts[p].qjl_signs, nb.qjl_signs, 0);
      }
      const int64_t words = codec.index_words();
      for (int64_t v = 0; v < B * H * cap; ++v) {
        for (int j = 0; j < d; ++j) {
          ++total;
          differing += unpack_index(gidx.data() + v * words, j, codec.index_bits()) !=
                       unpack_index(idx.data() + v * words, j, codec.index_bits());
        }
        EXPECT_EQ(gnrm[v], nrm[v]) << "norm of slot " << v;
        if (!rn.empty()) EXPECT_EQ(grn[v], rn[v]) << "residual norm of slot " << v;
      }
      int64_t sign_diff = 0;
      for (size_t k = 0; k < sg.size(); ++k) sign_diff += __builtin_popcount(gsg[k] ^ sg[k]);
      EXPECT_LE(sign_diff * 10000, static_cast<int64_t>(sg.size()) * 32) << "QJL sign bits differ";
      // Words of unwritten slots (before start[b]) stay zero.
      EXPECT_EQ(gidx[0], 0u);
    }
  }
  std::printf("[cuda quantize] %lld of %lld packed indices differ from Codec::quantize (%.2e)\n",
              static_cast<long long>(differing), static_cast<long long>(total),
              double(differing) / double(total));
  EXPECT_LE(differing, total / 10000);
}

TEST(CudaQuantize, DequantizeMatchesCpu) {
  TQATTN_SKIP_WITHOUT_GPU();
  const std::vector<QuantCase> cases = {
      {64, 3, QuantMode::kMse, false, false, DType::kFloat32},
      {96, 4, QuantMode::kProd, false, false, DType::kFloat32},
      {128, 3.5, QuantMode::kMse, false, false, DType::kFloat32},
      {256, 2, QuantMode::kProd, true, false, DType::kFloat32},
  };
  const int64_t B = 2, H = 2, cap = 33;
  const std::vector<int64_t> lengths = {33, 20};
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const QuantCase& c = cases[ci];
    SCOPED_TRACE(::testing::Message() << "case " << ci);
    const std::vector<float> x = testing::random_normal(B * H * cap * c.dim, 300 + ci, 2.0f);
    const auto quantizer = make_quantizer(c, 11 + ci, x, B * H * cap);
    QuantizedTensor cpu = quantize_tensor(quantizer, cpu_view(x.data(), {B, H, cap, c.dim}));
    QuantizedTensor gpu(quantizer, B, H, cap, DeviceType::kCUDA, 0);
    testing::copy_planes(cpu, gpu, B, H);
    const int64_t max_len = 33;
    std::vector<float> want(B * H * max_len * c.dim);
    dequantize_states(cpu.view(lengths), cpu_view(want.data(), {B, H, max_len, c.dim}));
    DeviceBuffer out(want.size() * 4);
    out.poison();
    dequantize_states(gpu.view(lengths),
                      testing::device_view(out, DType::kFloat32, {B, H, max_len, c.dim}));
    const std::vector<float> got = out.to_host<float>();
    EXPECT_LE(testing::relative_l2(got, want), 1e-6);
  }
}

TEST(CudaSanitizerSubset, QuantizeAndDequantize) {
  TQATTN_SKIP_WITHOUT_GPU();
  for (const QuantCase& c : {QuantCase{96, 4, QuantMode::kProd, false, false, DType::kFloat16},
                             QuantCase{128, 3.5, QuantMode::kMse, false, true, DType::kFloat32}}) {
    const int64_t B = 2, H = 2, n = 5, cap = 9;
    const std::vector<float> x = testing::random_normal(B * H * n * c.dim, 17);
    const auto quantizer = make_quantizer(c, 3, x, B * H * n);
    const std::vector<unsigned char> raw = encode(x, c.dtype);
    DeviceBuffer dx(raw.size());
    dx.upload(raw.data());
    QuantizedTensor gpu(quantizer, B, H, cap, DeviceType::kCUDA, 0);
    gpu.write(TensorView{dx.get(), c.dtype, {B, H, n, c.dim}, DeviceType::kCUDA, 0}, {1, 4});
    DeviceBuffer out(B * H * cap * c.dim * 4);
    dequantize_states(gpu.view({6, 9}),
                      testing::device_view(out, DType::kFloat32, {B, H, cap, c.dim}));
    for (float v : out.to_host<float>()) ASSERT_TRUE(std::isfinite(v));
  }
}

TEST(CudaQuantize, NonFiniteInputThrows) {
  TQATTN_SKIP_WITHOUT_GPU();
  CodecConfig cfg;
  cfg.dim = 64;
  cfg.bits = 3;
  auto quantizer = std::make_shared<const TensorQuantizer>(
      TensorQuantizer::uniform(std::make_shared<const Codec>(cfg)));
  std::vector<float> x = testing::random_normal(2 * 64, 5);
  x[70] = std::nanf("");
  DeviceBuffer dx(x.size() * 4);
  dx.upload(x.data());
  QuantizedTensor gpu(quantizer, 1, 1, 8, DeviceType::kCUDA, 0);
  EXPECT_THROW(gpu.write(testing::device_view(dx, DType::kFloat32, {1, 1, 2, 64}), {0}),
               InvalidArgument);
}

TEST(CudaMemory, AllocCopyAndErrors) {
  TQATTN_SKIP_WITHOUT_GPU();
  std::vector<float> a = testing::random_normal(1000, 9), b(1000, 0.0f);
  void* p = cuda::device_alloc(4000, 0);
  cuda::copy_bytes(p, a.data(), 4000, 0);
  cuda::copy_bytes(b.data(), p, 4000, 0);
  EXPECT_EQ(a, b);
  cuda::device_memset_zero(p, 4000, 0);
  cuda::copy_bytes(b.data(), p, 4000, 0);
  EXPECT_EQ(b, std::vector<float>(1000, 0.0f));
  cuda::device_free(p, 0);
  EXPECT_THROW(cuda::device_alloc(16, cuda::device_count()), InvalidArgument);
  try {
    cuda::device_alloc(size_t{1} << 60, 0);
    FAIL() << "a 1 EiB allocation succeeded";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("device_alloc"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace tqattn

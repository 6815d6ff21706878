// A KVCache on the GPU appending in a caller's stream's order: attention on that stream sees the
// new tokens with no host wait in between, growth keeps what was written, and the finite check
// either throws or leaves a NaN norm that attention cannot hide. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#if defined(TQATTN_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

#include "cuda_test_util.h"
#include "test_util.h"
#include "tqattn/tqattn.h"

namespace tqattn {
namespace {

#if defined(TQATTN_HAVE_CUDA)

constexpr int64_t kBatch = 2, kHeads = 2, kGroup = 4, kDim = 128;

KVCacheConfig cache_config(DeviceType device, bool check_finite) {
  KVCacheConfig c;
  c.batch = kBatch;
  c.kv_heads = kHeads;
  c.head_dim = kDim;
  c.key_bits = 3;
  c.value_bits = 4;
  c.step = 64;  // small, so that the appends below grow the cache twice
  c.device = device;
  c.check_finite = check_finite;
  return c;
}

// A non-blocking stream (no implicit order with the legacy default stream) and pinned staging,
// so that uploads, appends and attention are ordered by the stream alone.
struct StreamFixture {
  cudaStream_t stream = nullptr;
  StreamFixture() {
    EXPECT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  }
  ~StreamFixture() { cudaStreamDestroy(stream); }
};

struct Pinned {
  void* ptr = nullptr;
  explicit Pinned(size_t bytes) { EXPECT_EQ(cudaMallocHost(&ptr, bytes), cudaSuccess); }
  ~Pinned() { cudaFreeHost(ptr); }
};

// Uploads x asynchronously on `stream` through pinned memory that stays alive until the caller
// synchronises (`staging` keeps it).
TensorView upload_async(const std::vector<float>& x, std::vector<int64_t> shape,
                        cudaStream_t stream, std::vector<std::unique_ptr<Pinned>>& staging,
                        std::vector<std::unique_ptr<testing::DeviceBuffer>>& buffers) {
  const size_t bytes = x.size() * sizeof(float);
  staging.push_back(std::make_unique<Pinned>(bytes));
  std::memcpy(staging.back()->ptr, x.data(), bytes);
  buffers.push_back(std::make_unique<testing::DeviceBuffer>(bytes));
  EXPECT_EQ(cudaMemcpyAsync(buffers.back()->get(), staging.back()->ptr, bytes,
                            cudaMemcpyHostToDevice, stream),
            cudaSuccess);
  return TensorView{buffers.back()->get(), DType::kFloat32, std::move(shape), DeviceType::kCUDA, 0};
}

TEST(CudaKVCache, AppendsInTheCallersStreamOrder) {
  TQATTN_SKIP_WITHOUT_GPU();
  StreamFixture sf;
  KVCache cpu(cache_config(DeviceType::kCPU, true));
  KVCache gpu(cache_config(DeviceType::kCUDA, false));
  std::vector<std::unique_ptr<Pinned>> staging;
  std::vector<std::unique_ptr<testing::DeviceBuffer>> buffers;
  uint64_t seed = 4100;
  // 100 tokens for both, 37 for sequence 1 only, then one decode step for both: capacity grows
  // 128 -> 256 on the second append, between asynchronous writes on the stream.
  auto append_both = [&](int64_t n) {
    const std::vector<float> k = testing::random_normal(kBatch * kHeads * n * kDim, ++seed);
    const std::vector<float> v = testing::random_normal(kBatch * kHeads * n * kDim, ++seed);
    cpu.append(cpu_view(k.data(), {kBatch, kHeads, n, kDim}),
               cpu_view(v.data(), {kBatch, kHeads, n, kDim}));
    gpu.append(upload_async(k, {kBatch, kHeads, n, kDim}, sf.stream, staging, buffers),
               upload_async(v, {kBatch, kHeads, n, kDim}, sf.stream, staging, buffers), sf.stream);
  };
  append_both(100);
  {
    const int64_t n = 37;
    const std::vector<float> k = testing::random_normal(kHeads * n * kDim, ++seed);
    const std::vector<float> v = testing::random_normal(kHeads * n * kDim, ++seed);
    cpu.append_sequence(1, cpu_view(k.data(), {kHeads, n, kDim}),
                        cpu_view(v.data(), {kHeads, n, kDim}));
    gpu.append_sequence(1, upload_async(k, {kHeads, n, kDim}, sf.stream, staging, buffers),
                        upload_async(v, {kHeads, n, kDim}, sf.stream, staging, buffers), sf.stream);
  }
  append_both(1);
  ASSERT_EQ(gpu.lengths(), cpu.lengths());
  EXPECT_EQ(gpu.capacity(), 256);

  for (const int64_t L : {int64_t{1}, int64_t{9}}) {
    SCOPED_TRACE(::testing::Message() << "L " << L);
    const int64_t Hq = kHeads * kGroup;
    const std::vector<float> q = testing::random_normal(kBatch * Hq * L * kDim, ++seed, 2.0f);
    std::vector<float> want(q.size());
    AttentionOptions opt;
    opt.causal = L > 1;
    scaled_dot_product_attention(cpu_view(q.data(), {kBatch, Hq, L, kDim}), cpu.keys(),
                                 cpu.values(), cpu_view(want.data(), {kBatch, Hq, L, kDim}), opt);
    testing::DeviceBuffer out(q.size() * sizeof(float));
    out.poison();
    opt.stream = sf.stream;
    scaled_dot_product_attention(
        upload_async(q, {kBatch, Hq, L, kDim}, sf.stream, staging, buffers), gpu.keys(),
        gpu.values(), testing::device_view(out, DType::kFloat32, {kBatch, Hq, L, kDim}), opt);
    ASSERT_EQ(cudaStreamSynchronize(sf.stream), cudaSuccess);
    const std::vector<float> got = out.to_host<float>();
    for (float x : got) ASSERT_TRUE(std::isfinite(x)) << "non-finite or unwritten output";
    EXPECT_LE(testing::relative_l2(got, want), 2e-3);
  }
}

// What attention may copy before its dependency wait (QuantizedStates::settled_tokens): tokens
// below the lowest start of the cache's most recent write, all of them once a write waited for
// its kernels (check_finite) or the cache grew (which waits for the device).
TEST(CudaKVCache, SettledTokensFollowTheMostRecentWrite) {
  TQATTN_SKIP_WITHOUT_GPU();
  StreamFixture sf;
  KVCache async(cache_config(DeviceType::kCUDA, false));
  KVCache checked(cache_config(DeviceType::kCUDA, true));
  KVCache cpu(cache_config(DeviceType::kCPU, true));
  std::vector<std::unique_ptr<Pinned>> staging;
  std::vector<std::unique_ptr<testing::DeviceBuffer>> buffers;
  uint64_t seed = 4300;
  auto append = [&](int64_t seq, int64_t n) {
    const int64_t b = seq < 0 ? kBatch : 1;
    std::vector<int64_t> shape = {kHeads, n, kDim};
    if (seq < 0) shape.insert(shape.begin(), kBatch);
    const std::vector<float> k = testing::random_normal(b * kHeads * n * kDim, ++seed);
    const std::vector<float> v = testing::random_normal(b * kHeads * n * kDim, ++seed);
    for (KVCache* c : {&async, &checked}) {
      const TensorView kv = upload_async(k, shape, sf.stream, staging, buffers);
      const TensorView vv = upload_async(v, shape, sf.stream, staging, buffers);
      if (seq < 0) {
        c->append(kv, vv, sf.stream);
      } else {
        c->append_sequence(seq, kv, vv, sf.stream);
      }
    }
    if (seq < 0) {
      cpu.append(cpu_view(k.data(), shape), cpu_view(v.data(), shape));
    } else {
      cpu.append_sequence(seq, cpu_view(k.data(), shape), cpu_view(v.data(), shape));
    }
  };
  auto expect_settled = [&](int64_t want_async) {
    EXPECT_EQ(async.keys().settled_tokens, want_async);
    EXPECT_EQ(async.values().settled_tokens, want_async);
    EXPECT_EQ(checked.keys().settled_tokens, checked.capacity());
    EXPECT_EQ(checked.values().settled_tokens, checked.capacity());
    EXPECT_EQ(cpu.keys().settled_tokens, cpu.capacity());
  };
  append(-1, 10);  // lengths 10, 10
  expect_settled(0);
  append(-1, 5);  // 15, 15
  expect_settled(10);
  append(1, 3);  // 15, 18: only sequence 1 was written, from 15
  expect_settled(15);
  append(-1, 60);  // 75, 78: grows past 64 (a device wait), then writes from 15 and 18
  EXPECT_GT(async.capacity(), 64);
  expect_settled(15);
  append(0, 1);  // 76, 78
  expect_settled(75);
  ASSERT_EQ(cudaStreamSynchronize(sf.stream), cudaSuccess);
}

TEST(CudaKVCache, NonFiniteRowsThrowOrPoison) {
  TQATTN_SKIP_WITHOUT_GPU();
  StreamFixture sf;
  std::vector<std::unique_ptr<Pinned>> staging;
  std::vector<std::unique_ptr<testing::DeviceBuffer>> buffers;
  const int64_t n = 20;
  std::vector<float> k = testing::random_normal(kBatch * kHeads * n * kDim, 4200);
  const std::vector<float> v = testing::random_normal(kBatch * kHeads * n * kDim, 4201);
  k[((1 * kHeads + 0) * n + 7) * kDim + 5] = std::nanf("");  // sequence 1, head 0, token 7

  KVCache checked(cache_config(DeviceType::kCUDA, true));
  EXPECT_THROW(
      checked.append(upload_async(k, {kBatch, kHeads, n, kDim}, sf.stream, staging, buffers),
                     upload_async(v, {kBatch, kHeads, n, kDim}, sf.stream, staging, buffers),
                     sf.stream),
      InvalidArgument);
  EXPECT_EQ(checked.lengths(), (std::vector<int64_t>{0, 0}));

  KVCache unchecked(cache_config(DeviceType::kCUDA, false));
  unchecked.append(upload_async(k, {kBatch, kHeads, n, kDim}, sf.stream, staging, buffers),
                   upload_async(v, {kBatch, kHeads, n, kDim}, sf.stream, staging, buffers),
                   sf.stream);
  EXPECT_EQ(unchecked.lengths(), (std::vector<int64_t>{n, n}));
  const int64_t Hq = kHeads * kGroup;
  const std::vector<float> q = testing::random_normal(kBatch * Hq * kDim, 4202, 2.0f);
  testing::DeviceBuffer out(q.size() * sizeof(float));
  out.poison();
  AttentionOptions opt;
  opt.stream = sf.stream;
  scaled_dot_product_attention(
      upload_async(q, {kBatch, Hq, 1, kDim}, sf.stream, staging, buffers), unchecked.keys(),
      unchecked.values(), testing::device_view(out, DType::kFloat32, {kBatch, Hq, 1, kDim}), opt);
  ASSERT_EQ(cudaStreamSynchronize(sf.stream), cudaSuccess);
  const std::vector<float> got = out.to_host<float>();
  // Query heads 0-3 of sequence 1 read KV head 0, which holds the NaN row; every other row is
  // finite.
  for (int64_t b = 0; b < kBatch; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const bool poisoned = b == 1 && h / kGroup == 0;
      for (int64_t d = 0; d < kDim; ++d) {
        const float x = got[(b * Hq + h) * kDim + d];
        ASSERT_EQ(std::isnan(x), poisoned) << "sequence " << b << " head " << h << " dim " << d;
      }
    }
}

#endif  // TQATTN_HAVE_CUDA

}  // namespace
}  // namespace tqattn

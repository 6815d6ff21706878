// Quantize+append throughput of the KV cache (D=128, 4-bit MSE, Hadamard, fp32 input), against
// the scalar codec and against this machine's memory bandwidth, all measured in the same run.
//   ./bench_quantize                       (all)
//   ./bench_quantize --benchmark_filter=Append
// Counters: vectors/s, input GB/s (bytes of the input dtype read), and GB/s for the bandwidth
// probes (memcpy counts bytes read + written).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "cpu/quantize.h"
#include "cpu/thread_pool.h"
#include "tqattn/cache.h"
#include "tqattn/codec.h"
#include "tqattn/half.h"

namespace {

using namespace tqattn;

constexpr int64_t kDim = 128;
constexpr int kBits = 4;
constexpr int64_t kHeads = 8;
constexpr int64_t kTokensPerAppend = 512;  // a prefill chunk: 8 heads x 512 = 4096 vectors
constexpr int64_t kCapacity = 16 * kTokensPerAppend;

std::vector<float> random_input(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = dist(rng);
  return x;
}

void set_rate_counters(benchmark::State& state, int64_t vectors, int64_t bytes_per_element = 4,
                       const char* bytes_name = "input_GB/s") {
  const double total = static_cast<double>(vectors) * state.iterations();
  state.counters["vectors/s"] = benchmark::Counter(total, benchmark::Counter::kIsRate);
  state.counters[bytes_name] = benchmark::Counter(
      total * kDim * static_cast<double>(bytes_per_element) / 1e9, benchmark::Counter::kIsRate);
}

// KVCache::append of keys and values (2 x 8 heads x 512 tokens per call); args: threads, input
// dtype (0 fp32, 1 fp16, 2 bf16).
void BM_CacheAppend(benchmark::State& state) {
  KVCacheConfig config;
  config.batch = 1;
  config.kv_heads = kHeads;
  config.head_dim = kDim;
  config.key_bits = kBits;
  config.value_bits = kBits;
  config.max_capacity = kCapacity;
  config.num_threads = static_cast<int>(state.range(0));
  const DType dtype = state.range(1) == 0   ? DType::kFloat32
                      : state.range(1) == 1 ? DType::kFloat16
                                            : DType::kBFloat16;
  KVCache cache(config);
  const int64_t count = kHeads * kTokensPerAppend * kDim;
  const auto k = random_input(count, 1);
  const auto v = random_input(count, 2);
  std::vector<uint16_t> k16(count), v16(count);
  // Throughput data only: values that would be fp16 subnormals are flushed to zero, so the input
  // does not depend on how float_to_half rounds that range.
  auto to16 = [&](float x) {
    if (dtype == DType::kBFloat16) return float_to_bf16(x);
    return float_to_half(std::fabs(x) < 1e-4f ? 0.0f : x);
  };
  for (int64_t i = 0; i < count; ++i) {
    k16[i] = to16(k[i]);
    v16[i] = to16(v[i]);
  }
  const bool f32 = dtype == DType::kFloat32;
  const std::vector<int64_t> shape = {1, kHeads, kTokensPerAppend, kDim};
  const TensorView kv{f32 ? const_cast<float*>(k.data()) : static_cast<void*>(k16.data()), dtype,
                      shape};
  const TensorView vv{f32 ? const_cast<float*>(v.data()) : static_cast<void*>(v16.data()), dtype,
                      shape};
  for (auto _ : state) {
    if (cache.lengths()[0] + kTokensPerAppend > kCapacity) cache.reset();
    cache.append(kv, vv);
  }
  set_rate_counters(state, 2 * kHeads * kTokensPerAppend, dtype_size(dtype));
  state.SetLabel(dtype_name(dtype));
}
BENCHMARK(BM_CacheAppend)
    ->ArgsProduct({{1, 2}, {0, 1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

// Decode-style appends: one token per call (16 vectors: the per-call overhead).
void BM_CacheAppendDecode(benchmark::State& state) {
  KVCacheConfig config;
  config.kv_heads = kHeads;
  config.head_dim = kDim;
  config.key_bits = kBits;
  config.value_bits = kBits;
  config.max_capacity = kCapacity;
  config.num_threads = 1;
  KVCache cache(config);
  const auto k = random_input(kHeads * kDim, 3);
  const TensorView kv = cpu_view(k.data(), {1, kHeads, 1, kDim});
  for (auto _ : state) {
    if (cache.lengths()[0] == kCapacity) cache.reset();
    cache.append(kv, kv);
  }
  set_rate_counters(state, 2 * kHeads);
}
BENCHMARK(BM_CacheAppendDecode)->Unit(benchmark::kMicrosecond);

// The batched vector kernel alone (no cache bookkeeping), one thread.
void BM_QuantizeRowsSimd(benchmark::State& state) {
  CodecConfig cc;
  cc.dim = kDim;
  cc.bits = static_cast<int>(state.range(0));
  auto codec = std::make_shared<const Codec>(cc);
  cpu::PreparedCodec prepared(codec);
  const int64_t n = 4096;
  const auto x = random_input(n * kDim, 4);
  std::vector<uint32_t> idx(n * codec->index_words());
  std::vector<uint16_t> norms(n);
  const PackedPlanes out{idx.data(), norms.data(), nullptr, nullptr};
  for (auto _ : state) {
    benchmark::DoNotOptimize(prepared.quantize(x.data(), n, out));
    benchmark::ClobberMemory();
  }
  set_rate_counters(state, n);
  state.SetLabel(cpu::quantize_target_name());
}
BENCHMARK(BM_QuantizeRowsSimd)->Arg(2)->Arg(3)->Arg(4)->Arg(8)->Unit(benchmark::kMicrosecond);

// The scalar twin (Codec::quantize), one thread: the baseline for the vector kernel.
void BM_QuantizeRowsScalar(benchmark::State& state) {
  CodecConfig cc;
  cc.dim = kDim;
  cc.bits = kBits;
  auto codec = std::make_shared<const Codec>(cc);
  const int64_t n = 1024;
  const auto x = random_input(n * kDim, 5);
  std::vector<uint32_t> idx(n * codec->index_words());
  std::vector<uint16_t> norms(n);
  const PackedPlanes out{idx.data(), norms.data(), nullptr, nullptr};
  for (auto _ : state) {
    codec->quantize(x.data(), n, out);
    benchmark::ClobberMemory();
  }
  set_rate_counters(state, n);
}
BENCHMARK(BM_QuantizeRowsScalar)->Unit(benchmark::kMicrosecond);

// dequantize_states of 8 heads x 4096 tokens (4-bit MSE, D=128) to fp32, threads = arg: the
// first half of the dequantize-then-attend baseline.
void BM_DequantizeStates(benchmark::State& state) {
  CodecConfig cc;
  cc.dim = kDim;
  cc.bits = kBits;
  auto q = std::make_shared<const TensorQuantizer>(
      TensorQuantizer::uniform(std::make_shared<const Codec>(cc)));
  const int64_t tokens = 4096;
  const auto x = random_input(kHeads * tokens * kDim, 7);
  QuantizedTensor t = quantize_tensor(q, cpu_view(x.data(), {1, kHeads, tokens, kDim}));
  const QuantizedStates states = t.view({tokens});
  std::vector<float> out(x.size());
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) {
    dequantize_states(states, cpu_view(out.data(), {1, kHeads, tokens, kDim}), threads);
    benchmark::ClobberMemory();
  }
  set_rate_counters(state, kHeads * tokens, 4, "output_GB/s");
}
BENCHMARK(BM_DequantizeStates)->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMicrosecond);

// Memory bandwidth probes over 512 MiB (far beyond cache): a streaming read (sum) and memcpy,
// split over `arg` threads the same way the cache splits its work.
constexpr size_t kProbeFloats = size_t{128} << 20;

std::vector<float>& probe_buffer(int which) {
  static std::vector<float> buffers[2] = {random_input(kProbeFloats, 6),
                                          std::vector<float>(kProbeFloats)};
  return buffers[which];
}

void BM_MemoryRead(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const std::vector<float>& src = probe_buffer(0);
  const int64_t tasks = 64;
  const size_t per_task = kProbeFloats / tasks;
  std::vector<uint64_t> partial(tasks);
  for (auto _ : state) {
    cpu::parallel_for(tasks, threads, [&](int64_t t) {
      // Integer sums vectorise (they are associative), so the loop is load-bound, not add-bound.
      const auto* p = reinterpret_cast<const uint64_t*>(src.data() + t * per_task);
      uint64_t s = 0;
      for (size_t i = 0; i < per_task / 2; ++i) s += p[i];
      partial[t] = s;
    });
    benchmark::DoNotOptimize(partial.data());
  }
  state.counters["GB/s"] = benchmark::Counter(
      static_cast<double>(kProbeFloats * sizeof(float)) * state.iterations() / 1e9,
      benchmark::Counter::kIsRate);
}
BENCHMARK(BM_MemoryRead)->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_MemoryCopy(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const std::vector<float>& src = probe_buffer(0);
  std::vector<float>& dst = probe_buffer(1);
  const int64_t tasks = 64;
  const size_t per_task = kProbeFloats / tasks;
  for (auto _ : state) {
    cpu::parallel_for(tasks, threads, [&](int64_t t) {
      std::memcpy(dst.data() + t * per_task, src.data() + t * per_task, per_task * sizeof(float));
    });
    benchmark::ClobberMemory();
  }
  // Bytes read + bytes written.
  state.counters["GB/s"] = benchmark::Counter(
      2.0 * static_cast<double>(kProbeFloats * sizeof(float)) * state.iterations() / 1e9,
      benchmark::Counter::kIsRate);
}
BENCHMARK(BM_MemoryCopy)->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();

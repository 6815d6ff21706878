// Fused attention over the packed cache against dense fp32 attention (OpenBLAS sgemm) and
// dequantize-then-dense, all measured in one run, plus a memory-bandwidth probe. Prints a table of
// medians and ratios at the end.
//
// Shape (issue 3): B = 1, Hq = 32, H_kv = 8, D = 128; keys/values 3/4 and 4/4 bits (MSE keys);
// decode (L = 1) at S = 32K, prefill (L = 128, causal) at S = 8K and 32K. Threads: --threads=N
// (default 2). --quick runs decode only at S = 8K (a smoke run).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cpu/attention_kernels.h"
#include "cpu/thread_pool.h"
#include "tqattn/tqattn.h"

namespace {

using namespace tqattn;

int g_threads = 2;
constexpr int64_t kHq = 32, kHkv = 8, kD = 128;

struct Setup {
  int64_t seq;
  std::vector<float> keys, values;  // [1, H_kv, S, D]
  std::vector<float> deq_k, deq_v;  // dequantize-then-dense buffers
  std::map<std::string, std::unique_ptr<QuantizedTensor>> quantized;  // "k3", "v4", ...
};

std::vector<float> gaussian(int64_t n, uint64_t seed, int outlier_every) {
  std::vector<float> v(static_cast<size_t>(n));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    v[i] = dist(rng);
    if (outlier_every > 0 && (i % kD) % outlier_every == 0) v[i] *= 5.0f;
  }
  return v;
}

std::shared_ptr<const TensorQuantizer> quantizer(int bits, uint64_t seed) {
  CodecConfig c;
  c.dim = kD;
  c.bits = bits;
  c.seed = seed;
  return std::make_shared<const TensorQuantizer>(
      TensorQuantizer::uniform(std::make_shared<const Codec>(c)));
}

Setup& setup(int64_t seq) {
  static std::map<int64_t, std::unique_ptr<Setup>> cache;
  auto& slot = cache[seq];
  if (!slot) {
    slot = std::make_unique<Setup>();
    Setup& s = *slot;
    s.seq = seq;
    const int64_t n = kHkv * seq * kD;
    s.keys = gaussian(n, 1, 16);
    s.values = gaussian(n, 2, 0);
    s.deq_k.resize(n);
    s.deq_v.resize(n);
    const TensorView kv = cpu_view(s.keys.data(), {1, kHkv, seq, kD});
    const TensorView vv = cpu_view(s.values.data(), {1, kHkv, seq, kD});
    for (int bits : {3, 4}) {
      s.quantized["k" + std::to_string(bits)] =
          std::make_unique<QuantizedTensor>(quantize_tensor(quantizer(bits, 10), kv, g_threads));
      s.quantized["v" + std::to_string(bits)] =
          std::make_unique<QuantizedTensor>(quantize_tensor(quantizer(bits, 11), vv, g_threads));
    }
  }
  return *slot;
}

struct Query {
  std::vector<float> q, out;
  explicit Query(int64_t L) : q(gaussian(kHq * L * kD, 3, 0)), out(q.size()) {}
};

AttentionOptions options(int64_t L) {
  AttentionOptions o;
  o.num_threads = g_threads;
  o.causal = L > 1;
  return o;
}

void BM_Fused(benchmark::State& state, int key_bits, int value_bits, int64_t seq, int64_t L) {
  Setup& s = setup(seq);
  Query q(L);
  const QuantizedStates k = s.quantized["k" + std::to_string(key_bits)]->view({seq});
  const QuantizedStates v = s.quantized["v" + std::to_string(value_bits)]->view({seq});
  const TensorView qv = cpu_view(q.q.data(), {1, kHq, L, kD});
  const TensorView ov = cpu_view(q.out.data(), {1, kHq, L, kD});
  const AttentionOptions o = options(L);
  for (auto _ : state) {
    scaled_dot_product_attention(qv, k, v, ov, o);
    benchmark::DoNotOptimize(q.out.data());
  }
  state.counters["packed_GBps"] =
      benchmark::Counter(static_cast<double>(k.nbytes() + v.nbytes()) * state.iterations(),
                         benchmark::Counter::kIsRate);
}

void BM_Dense(benchmark::State& state, int64_t seq, int64_t L) {
  Setup& s = setup(seq);
  Query q(L);
  const TensorView qv = cpu_view(q.q.data(), {1, kHq, L, kD});
  const TensorView ov = cpu_view(q.out.data(), {1, kHq, L, kD});
  const AttentionOptions o = options(L);
  for (auto _ : state) {
    dense_attention(qv, cpu_view(s.keys.data(), {1, kHkv, seq, kD}),
                    cpu_view(s.values.data(), {1, kHkv, seq, kD}), ov, o);
    benchmark::DoNotOptimize(q.out.data());
  }
  state.counters["fp32_GBps"] = benchmark::Counter(2.0 * 4 * kHkv * seq * kD * state.iterations(),
                                                   benchmark::Counter::kIsRate);
}

void BM_DequantDense(benchmark::State& state, int key_bits, int value_bits, int64_t seq,
                     int64_t L) {
  Setup& s = setup(seq);
  Query q(L);
  const QuantizedStates k = s.quantized["k" + std::to_string(key_bits)]->view({seq});
  const QuantizedStates v = s.quantized["v" + std::to_string(value_bits)]->view({seq});
  const TensorView qv = cpu_view(q.q.data(), {1, kHq, L, kD});
  const TensorView ov = cpu_view(q.out.data(), {1, kHq, L, kD});
  const TensorView dk = cpu_view(s.deq_k.data(), {1, kHkv, seq, kD});
  const TensorView dv = cpu_view(s.deq_v.data(), {1, kHkv, seq, kD});
  const AttentionOptions o = options(L);
  for (auto _ : state) {
    dequantize_states(k, dk, g_threads);
    dequantize_states(v, dv, g_threads);
    dense_attention(qv, dk, dv, ov, o);
    benchmark::DoNotOptimize(q.out.data());
  }
}

// Memory bandwidth: threads read (sum) or copy a buffer far larger than the caches.
void BM_MemRead(benchmark::State& state) {
  const int64_t n = int64_t{1} << 27;  // 1 GiB of uint64
  static std::vector<uint64_t> buf(static_cast<size_t>(n), 1);
  std::vector<uint64_t> sums(64);
  const int64_t tasks = 64;
  for (auto _ : state) {
    cpu::parallel_for(tasks, g_threads, [&](int64_t t) {
      const uint64_t* p = buf.data() + t * (n / tasks);
      uint64_t a = 0, b = 0, c = 0, d = 0;
      for (int64_t i = 0; i < n / tasks; i += 4) {
        a += p[i];
        b += p[i + 1];
        c += p[i + 2];
        d += p[i + 3];
      }
      sums[t] = a + b + c + d;
    });
    benchmark::DoNotOptimize(sums.data());
  }
  state.counters["GBps"] =
      benchmark::Counter(8.0 * n * state.iterations(), benchmark::Counter::kIsRate);
}

void BM_MemCopy(benchmark::State& state) {
  const int64_t n = int64_t{1} << 26;  // 512 MiB each way
  static std::vector<uint64_t> src(static_cast<size_t>(n), 1), dst(static_cast<size_t>(n), 0);
  const int64_t tasks = 64;
  for (auto _ : state) {
    cpu::parallel_for(tasks, g_threads, [&](int64_t t) {
      std::memcpy(dst.data() + t * (n / tasks), src.data() + t * (n / tasks), 8 * (n / tasks));
    });
    benchmark::DoNotOptimize(dst.data());
  }
  // Bytes read plus bytes written.
  state.counters["GBps"] =
      benchmark::Counter(16.0 * n * state.iterations(), benchmark::Counter::kIsRate);
}

// Collects the median real time (and counters) of every benchmark for the summary table.
class Collector : public benchmark::ConsoleReporter {
 public:
  struct Result {
    double ms = 0;
    std::map<std::string, double> counters;
  };
  std::map<std::string, Result> results;

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.aggregate_name != "median") continue;
      Result r;
      r.ms = run.GetAdjustedRealTime();  // in the benchmark's unit (ms)
      for (const auto& [name, counter] : run.counters) r.counters[name] = counter.value;
      results[run.run_name.function_name] = r;
    }
  }
};

std::string label(const char* kind, int kb, int vb, int64_t seq, int64_t L) {
  return std::string(kind) + "/k" + std::to_string(kb) + "v" + std::to_string(vb) + "/S" +
         std::to_string(seq / 1024) + "K/L" + std::to_string(L);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      g_threads = std::max(1, std::atoi(argv[i] + 10));
    } else if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      args.push_back(argv[i]);
    }
  }
  int n_args = static_cast<int>(args.size());
  benchmark::Initialize(&n_args, args.data());

  struct Shape {
    int64_t seq, L;
  };
  std::vector<Shape> shapes = {{32768, 1}, {8192, 128}, {32768, 128}};
  if (quick) shapes = {{8192, 1}};
  const int widths[][2] = {{3, 4}, {4, 4}};
  std::vector<std::string> order;
  auto reg = [&](const std::string& name, auto&& fn, int reps) {
    benchmark::RegisterBenchmark(name.c_str(), fn)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->MinTime(0.2)
        ->Repetitions(reps)
        ->ReportAggregatesOnly(true);
    order.push_back(name);
  };
  reg("mem/read", BM_MemRead, 5);
  reg("mem/copy", BM_MemCopy, 5);
  for (const Shape& sh : shapes) {
    const int reps = sh.L > 1 ? 3 : 7;
    const std::string dense = label("dense", 0, 0, sh.seq, sh.L);
    reg(
        dense, [sh](benchmark::State& st) { BM_Dense(st, sh.seq, sh.L); }, reps);
    for (const auto& w : widths) {
      const int kb = w[0], vb = w[1];
      reg(
          label("fused", kb, vb, sh.seq, sh.L),
          [=](benchmark::State& st) { BM_Fused(st, kb, vb, sh.seq, sh.L); }, reps);
      reg(
          label("dequant+dense", kb, vb, sh.seq, sh.L),
          [=](benchmark::State& st) { BM_DequantDense(st, kb, vb, sh.seq, sh.L); }, reps);
    }
  }

  Collector collector;
  benchmark::RunSpecifiedBenchmarks(&collector);
  benchmark::Shutdown();

  auto& r = collector.results;
  std::printf("\n# tqattn fused attention, B=1 Hq=%lld H_kv=%lld D=%lld, %d threads, kernels: %s\n",
              static_cast<long long>(kHq), static_cast<long long>(kHkv), static_cast<long long>(kD),
              g_threads, cpu::attn::simd_target_name());
  std::printf("memory bandwidth (median): read %.1f GB/s, copy (read+write) %.1f GB/s\n",
              r["mem/read"].counters["GBps"] / 1e9, r["mem/copy"].counters["GBps"] / 1e9);
  std::printf("%-10s %-7s %-7s %10s %10s %14s %12s %14s %12s\n", "shape", "S", "K/V", "fused ms",
              "dense ms", "deq+dense ms", "dense/fused", "deq+dense/fused", "packed GB/s");
  for (const Shape& sh : shapes) {
    const Collector::Result& dense = r[label("dense", 0, 0, sh.seq, sh.L)];
    for (const auto& w : widths) {
      if (!r.count(label("fused", w[0], w[1], sh.seq, sh.L))) continue;  // filtered out
      Collector::Result& fused = r[label("fused", w[0], w[1], sh.seq, sh.L)];
      const Collector::Result& deq = r[label("dequant+dense", w[0], w[1], sh.seq, sh.L)];
      std::printf("%-10s %-7s %-7s %10.3f %10.3f %14.3f %11.2fx %13.2fx %12.2f\n",
                  sh.L == 1 ? "decode" : "prefill", (std::to_string(sh.seq / 1024) + "K").c_str(),
                  (std::to_string(w[0]) + "/" + std::to_string(w[1])).c_str(), fused.ms, dense.ms,
                  deq.ms, dense.ms / fused.ms, deq.ms / fused.ms,
                  fused.counters["packed_GBps"] / 1e9);
    }
  }
  return 0;
}

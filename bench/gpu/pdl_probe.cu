// The floor of a split-KV decode's copy pattern on this card, and what programmatic dependent
// launch (PDL) buys back to back: a probe kernel that streams the packed bytes of a decode call
// (B=1, Hkv=8, 3-bit keys / 4-bit values, D = 128: 116 bytes per token and head) with the stream
// decode kernel's grid (8 heads x 16 splits, one block of 16 warps per SM, rounds of 512 tokens
// through two shared-memory slots on bulk copies), then merges the splits the way it does (a
// partial per block, an acquire-release arrival, the last block of a head reads the 16
// partials). It computes nothing but a word per thread per round: what it takes is the floor
// under any kernel of this shape.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I src -o pdl_probe \
//     bench/gpu/pdl_probe.cu && ./pdl_probe
//
// Prints per-call medians of CUDA graphs of back-to-back calls (inputs rotating over copies that
// exceed the L2), and for two consecutive calls how far the second's blocks start before the
// first's last block ends.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/common.cuh"

namespace {

using namespace tqattn::cuda::dev;

constexpr int kHeads = 8, kSplits = 16, kThreads = 512, kTokenBytes = 116, kRoundTokens = 512;
constexpr int kRoundBytes = kRoundTokens * kTokenBytes;  // 59,392: a multiple of 64
constexpr int kSlotsOffset = 1024;
constexpr int kTableBytes = 64 * 1024;  // the decode kernel's code tables: one block per SM

struct ProbeArgs {
  const unsigned char* data;
  int64_t block_bytes;  // bytes of one split
  int nslots;
  int early;                   // rounds issued before the dependency wait
  int trigger;                 // 0: none; 1: after the wait; 2: at entry
  int table_passes;            // shared-memory writes of the table region before the wait
  int tail_ns;                 // extra spin of a head's last block (its merge and finish)
  int compute_ns;              // spin per round (the stream loop's own work)
  float* partials;             // [grid][kThreads]
  int* counters;               // [kHeads]
  float* out;                  // [kHeads][kThreads]
  unsigned long long* stamps;  // [grid][2]: entry, exit (nullptr: none)
};

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void spin_ns(int ns) {
  if (ns <= 0) return;
  const unsigned long long end = global_ns() + ns;
  while (global_ns() < end) {
  }
}

__global__ void __launch_bounds__(kThreads, 1) stream_probe(const __grid_constant__ ProbeArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const unsigned long long t_entry = global_ns();
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem);
  int* last_flag = reinterpret_cast<int*>(smem + 512);
  unsigned char* slots = smem + kSlotsOffset;
  const int tid = threadIdx.x, head = blockIdx.x / kSplits;
  if (a.trigger == 2) grid_dependents_launch();
  const unsigned char* src = a.data + blockIdx.x * a.block_bytes;
  const int nrounds = static_cast<int>((a.block_bytes + kRoundBytes - 1) / kRoundBytes);
  auto issue = [&](int r) {
    const int slot = r % a.nslots;
    const int bytes = static_cast<int>(min(static_cast<int64_t>(kRoundBytes),
                                           a.block_bytes - static_cast<int64_t>(r) * kRoundBytes));
    const int quarter = (bytes / 4) & ~15, last = bytes - 3 * quarter;
    mbarrier_arrive_expect_tx(bars + slot, bytes);
    unsigned char* dst = slots + slot * kRoundBytes;
    const unsigned char* s = src + static_cast<int64_t>(r) * kRoundBytes;
    for (int i = 0; i < 3; ++i)
      bulk_copy_to_shared(dst + i * quarter, s + i * quarter, quarter, bars + slot);
    bulk_copy_to_shared(dst + 3 * quarter, s + 3 * quarter, last, bars + slot);
  };
  const int first = min(a.nslots, nrounds);
  if (tid == 0) {
    for (int s = 0; s < a.nslots; ++s) mbarrier_init(bars + s, 1);
    mbarrier_init_fence();
    for (int r = 0; r < min(a.early, first); ++r) issue(r);
  }
  // The tables' stores (the decode kernel builds 64 KB of code tables before its wait).
  float* table = reinterpret_cast<float*>(slots + a.nslots * kRoundBytes);
  for (int pass = 0; pass < a.table_passes; ++pass)
    for (int i = tid; i < kTableBytes / 4; i += kThreads) table[i] = static_cast<float>(i + pass);
  __syncthreads();
  grid_dependency_wait();
  if (a.trigger == 1) grid_dependents_launch();
  if (tid == 0)
    for (int r = min(a.early, first); r < first; ++r) issue(r);
  float acc = a.table_passes > 0 ? table[tid] : 0.0f;
  for (int r = 0; r < nrounds; ++r) {
    const int slot = r % a.nslots;
    mbarrier_wait(bars + slot, static_cast<uint32_t>((r / a.nslots) & 1));
    acc += reinterpret_cast<const float*>(slots + slot * kRoundBytes)[tid];
    spin_ns(a.compute_ns);
    __syncthreads();
    if (tid == 0 && r + a.nslots < nrounds) issue(r + a.nslots);
  }
  // The split merge: a partial, one arrival, the head's last block reads the 16 partials.
  a.partials[blockIdx.x * kThreads + tid] = acc;
  __syncthreads();
  if (tid == 0) *last_flag = atomic_add_acq_rel(a.counters + head, 1) == kSplits - 1;
  __syncthreads();
  if (*last_flag) {
    float sum = 0.0f;
    for (int s = 0; s < kSplits; ++s) sum += a.partials[(head * kSplits + s) * kThreads + tid];
    spin_ns(a.tail_ns);
    a.out[head * kThreads + tid] = sum;
    if (tid == 0) a.counters[head] = 0;
  }
  if (a.stamps != nullptr && tid == 0) {
    a.stamps[2 * blockIdx.x] = t_entry;
    a.stamps[2 * blockIdx.x + 1] = global_ns();
  }
}

#define CHECK(x)                                                                             \
  do {                                                                                       \
    cudaError_t e = (x);                                                                     \
    if (e != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

struct Config {
  const char* name;
  int tokens;
  bool pdl;
  int early, trigger, table_passes, tail_ns, compute_ns;
};

void launch(const Config& c, ProbeArgs a, cudaStream_t s) {
  const int grid = kHeads * kSplits;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kSlotsOffset + 2 * kRoundBytes + kTableBytes;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = c.pdl ? 1 : 0;
  CHECK(cudaLaunchKernelEx(&cfg, stream_probe, a));
}

}  // namespace

int main() {
  CHECK(cudaFuncSetAttribute(stream_probe, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSlotsOffset + 2 * kRoundBytes + kTableBytes));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs, L2 %d MiB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  const int grid = kHeads * kSplits;
  constexpr int kCopies = 4;
  const int64_t max_bytes = int64_t{131072} * kTokenBytes * kHeads;
  std::vector<unsigned char*> bufs(kCopies);
  for (auto& b : bufs) {
    CHECK(cudaMalloc(&b, max_bytes));
    CHECK(cudaMemset(b, 0x3c, max_bytes));
  }
  float *partials, *out;
  int* counters;
  unsigned long long* stamps;
  CHECK(cudaMalloc(&partials, grid * kThreads * 4));
  CHECK(cudaMalloc(&out, kHeads * kThreads * 4));
  CHECK(cudaMalloc(&counters, kHeads * 4));
  CHECK(cudaMemset(counters, 0, kHeads * 4));
  CHECK(cudaMalloc(&stamps, 2 * 2 * grid * 8));
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));

  const Config configs[] = {
      {"empty, no PDL", 0, false, 0, 0, 0, 0, 0},
      {"empty, PDL trigger after wait", 0, true, 0, 1, 0, 0, 0},
      {"tables only, PDL", 0, true, 0, 1, 1, 0, 0},
      {"2K stream+merge, PDL", 2048, true, 0, 1, 1, 0, 0},
      {"32K stream+merge, no PDL", 32768, false, 0, 0, 1, 0, 0},
      {"32K stream+merge, PDL", 32768, true, 0, 1, 1, 0, 0},
      {"32K stream+merge, PDL, early 1", 32768, true, 1, 1, 1, 0, 0},
      {"32K stream+merge, PDL, early 2", 32768, true, 2, 1, 1, 0, 0},
      {"32K stream+merge, PDL trigger at entry, early 2", 32768, true, 2, 2, 1, 0, 0},
      {"32K + tail 4us, PDL", 32768, true, 0, 1, 1, 4000, 0},
      {"32K + tail 4us, PDL, early 2", 32768, true, 2, 1, 1, 4000, 0},
      {"32K + tail 4us, PDL, early 2, entry trigger", 32768, true, 2, 2, 1, 4000, 0},
      {"32K + 1.5us/round compute, PDL", 32768, true, 0, 1, 1, 0, 1500},
      {"32K + 1.5us/round + tail 4us, PDL, early 2", 32768, true, 2, 1, 1, 4000, 1500},
      {"64K stream+merge, PDL", 65536, true, 0, 1, 1, 0, 0},
      {"128K stream+merge, no PDL", 131072, false, 0, 0, 1, 0, 0},
      {"128K stream+merge, PDL", 131072, true, 0, 1, 1, 0, 0},
      {"128K stream+merge, PDL, early 2", 131072, true, 2, 1, 1, 0, 0},
  };
  std::printf("%-52s %10s %10s %10s\n", "config (per call, graph of 40, median of 7)", "us", "TB/s",
              "overlap us");
  for (const Config& c : configs) {
    const int64_t block_bytes = int64_t{c.tokens / kSplits} * kTokenBytes;
    auto args = [&](int i, unsigned long long* st) {
      ProbeArgs a{bufs[i % kCopies], block_bytes,  2,        c.early,  c.trigger, c.table_passes,
                  c.tail_ns,         c.compute_ns, partials, counters, out,       st};
      return a;
    };
    for (int i = 0; i < 8; ++i) launch(c, args(i, nullptr), s);
    CHECK(cudaStreamSynchronize(s));
    constexpr int kIters = 40;
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < kIters; ++i) launch(c, args(i, nullptr), s);
    CHECK(cudaStreamEndCapture(s, &g));
    CHECK(cudaGraphInstantiate(&ge, g, 0));
    std::vector<float> times;
    for (int rep = 0; rep < 7; ++rep) {
      CHECK(cudaEventRecord(e0, s));
      CHECK(cudaGraphLaunch(ge, s));
      CHECK(cudaEventRecord(e1, s));
      CHECK(cudaEventSynchronize(e1));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, e0, e1));
      times.push_back(ms * 1e3f / kIters);
    }
    std::sort(times.begin(), times.end());
    // Two consecutive calls in a graph, stamped: the second's earliest block entry against the
    // first's latest block exit (positive: the second started that much before the first ended).
    cudaGraph_t g2;
    cudaGraphExec_t ge2;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    launch(c, args(0, stamps), s);
    launch(c, args(1, stamps + 2 * grid), s);
    CHECK(cudaStreamEndCapture(s, &g2));
    CHECK(cudaGraphInstantiate(&ge2, g2, 0));
    CHECK(cudaGraphLaunch(ge2, s));
    CHECK(cudaStreamSynchronize(s));
    std::vector<unsigned long long> h(4 * grid);
    CHECK(cudaMemcpy(h.data(), stamps, h.size() * 8, cudaMemcpyDeviceToHost));
    unsigned long long first_end = 0, second_start = ~0ull;
    for (int b = 0; b < grid; ++b) {
      first_end = std::max(first_end, h[2 * b + 1]);
      second_start = std::min(second_start, h[2 * grid + 2 * b]);
    }
    const double overlap =
        (static_cast<double>(first_end) - static_cast<double>(second_start)) / 1e3;
    const double us = times[3];
    const double tbs = us > 0 ? block_bytes * grid / (us * 1e-6) / 1e12 : 0.0;
    std::printf("%-52s %10.2f %10.2f %10.2f\n", c.name, us, tbs, overlap);
    CHECK(cudaGraphExecDestroy(ge));
    CHECK(cudaGraphDestroy(g));
    CHECK(cudaGraphExecDestroy(ge2));
    CHECK(cudaGraphDestroy(g2));
  }
  return 0;
}

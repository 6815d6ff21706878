// Device-side helpers shared by the kernels: the warp-level matrix instructions (mma.sync,
// movmatrix, ldmatrix), cp.async, dtype conversions and small warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/cuda_check.h"

namespace tqattn::cuda {
namespace dev {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, int dtype) {
  if (dtype == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store_from_float(void* p, int64_t i, int dtype, float v) {
  if (dtype == kF16) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else if (dtype == kBF16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// Additive mask value: a bool mask gives 0 (attend) or -inf.
__device__ __forceinline__ float mask_value(const void* p, int64_t i, int dtype) {
  if (dtype == kBool) return static_cast<const uint8_t*>(p)[i] ? 0.0f : -INFINITY;
  return load_as_float(p, i, dtype);
}

__device__ __forceinline__ float half_bits_to_float(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t half_bits(float v) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v)));
}

// D += A * B for one m16n8k16 tile: fp16 operands, fp32 accumulators.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Transposes an 8x8 fp16 fragment held one row-pair per thread (row lane/4, cols 2(lane%4)+{0,1}).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A shared-memory mbarrier (sm_90) that one thread arms with the bytes of its bulk copies; the
// copy engine completes the phase when they have landed.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
}

// Makes initialised mbarriers visible to the copy engine (the async proxy).
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

// Blocks until the phase of `bar` with this parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to this block's
// shared memory on the copy engine; completion is counted on `bar`.
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, uint32_t bytes,
                                                    uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// Programmatic dependent launch (sm_90): a kernel launched with launch_dependent() may start
// while the previous kernel in the stream finishes; grid_dependency_wait() then blocks until that
// kernel has completed and its writes are visible. Without the launch attribute both are no-ops.
__device__ __forceinline__ void grid_dependency_wait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

// Asks L2 for `bytes` from `src` in 128-byte lines (nothing for a null `src`); a hint, so it may
// run before grid_dependency_wait() for data no kernel in the stream writes.
__device__ __forceinline__ void prefetch_l2(const void* src, int bytes, int tid, int nthreads) {
  if (src == nullptr) return;
  const char* c = static_cast<const char*>(src);
  for (int off = tid * 128; off < bytes; off += nthreads * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(c + off));
}

// Lets the next kernel in the stream (if launched with the attribute) start its prologue.
__device__ __forceinline__ void grid_dependents_launch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// Thread-block cluster barrier halves (every thread of the block calls them). arrive_release
// publishes this block's shared-memory writes to the cluster; arrive_relaxed only says "done with
// the others' shared memory"; wait (acquire) blocks until every block of the cluster arrived.
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
}

// Calls f(std::integral_constant<int, B>{}) for a runtime code width B in 1..8 (checked on the
// host), so that the kernels that serve every width get each one unrolled at compile time.
template <class F>
__device__ __forceinline__ void with_code_width(int bits, F&& f) {
  switch (bits) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 5:
      return f(std::integral_constant<int, 5>{});
    case 6:
      return f(std::integral_constant<int, 6>{});
    case 7:
      return f(std::integral_constant<int, 7>{});
    default:
      return f(std::integral_constant<int, 8>{});
  }
}

// A GPU-scope acquire load: later loads see what the writer published before its release.
__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A GPU-scope acquire-release fetch-add: publishes what this thread (and, after a block barrier,
// its block) wrote before it, and makes what earlier arrivals published visible after it.
__device__ __forceinline__ int atomic_add_acq_rel(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n"
               : "=r"(old)
               : "l"(p), "r"(v)
               : "memory");
  return old;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// The power of two that brings a row whose largest magnitude is `amax` to [2^13, 2^14): fp16 then
// keeps full relative precision and cannot overflow however large or small the row is. Read off
// amax's exponent field (no log2f / exp2f); rows below 2^-100 (denormals included) get 2^-113, so
// that the inverse below stays finite.
__device__ __forceinline__ float fp16_row_scale(float amax) {
  if (!(amax > 0.0f) || !isfinite(amax)) return 1.0f;
  const int e = max(static_cast<int>((__float_as_uint(amax) >> 23) & 0xffu) - 127, -100);
  return __uint_as_float(static_cast<uint32_t>(e - 13 + 127) << 23);
}

// 1 / scale for a power of two scale from fp16_row_scale, exactly: negate the exponent.
__device__ __forceinline__ float fp16_row_unscale(float scale) {
  return __uint_as_float((254u << 23) - __float_as_uint(scale));
}

}  // namespace dev

// Launches `kernel` with programmatic stream serialization allowed, so that its prologue up to
// dev::grid_dependency_wait() overlaps the previous kernel in the stream (also inside a captured
// graph); a `cluster` of more than one block groups blocks into thread-block clusters of that
// shape. Launch errors throw a RuntimeError naming `fn`.
template <typename... Args>
void launch_dependent(const char* fn, void (*kernel)(Args...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, dim3 cluster, const Args&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[2];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  if (cluster.x * cluster.y * cluster.z > 1) {
    attribute[1].id = cudaLaunchAttributeClusterDimension;
    attribute[1].val.clusterDim.x = cluster.x;
    attribute[1].val.clusterDim.y = cluster.y;
    attribute[1].val.clusterDim.z = cluster.z;
    config.numAttrs = 2;
  }
  TQATTN_CUDA(fn, cudaLaunchKernelEx(&config, kernel, args...));
}
}  // namespace tqattn::cuda

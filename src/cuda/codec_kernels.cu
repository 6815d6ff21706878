// Quantize-on-append and dequantize on the device. One warp per (vector, quantizer part).
//
// The quantize kernel reproduces Codec::quantize's float arithmetic operation for operation: the
// same sequential sums (one lane walks them in the CPU's order), the same Hadamard butterflies,
// products and sums written with __fmul_rn/__fadd_rn so that nvcc cannot fuse them into FMAs the
// CPU does not use. The packed bits therefore equal the CPU codec's (tests count the agreement).
// Packing never shares a word between threads: lane w assembles whole word w from the indices in
// shared memory, and QJL sign words come from one warp ballot each.
#include <algorithm>
#include <string>
#include <vector>

#include "cache/cache_internal.h"
#include "cuda/common.cuh"
#include "cuda/cuda_backend.h"
#include "cuda/device_store.h"
#include "tqattn/error.h"

namespace tqattn::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPartDim = 256;
constexpr int kMaxLaunchBatch = 256;
constexpr uint16_t kHalfNaNBits = 0x7e00;

struct PartArgs {
  int dim = 0;
  int index_bits = 0;
  int prod = 0;
  int hadamard = 0;
  int norm_correction = 0;
  int words = 0;
  int swords = 0;
  int n_bound = 0;
  float inv_sqrt_dim = 0.0f;
  float qjl_scale = 0.0f;
  const float* centroids = nullptr;
  const float* boundaries = nullptr;
  const float* signs = nullptr;
  const float* matrix = nullptr;
  const float* matrix_t = nullptr;
  const float* qjl = nullptr;
  const float* qjl_t = nullptr;
  const int* channels = nullptr;
  uint32_t* indices = nullptr;
  uint16_t* norms = nullptr;
  uint16_t* rnorms = nullptr;
  uint32_t* qsigns = nullptr;
};

struct CodecArgs {
  const void* x = nullptr;  // quantize: input; dequantize: null
  void* out = nullptr;      // dequantize: output
  int dtype = kF32;
  int full_dim = 0;
  int64_t heads = 0;
  int64_t n = 0;  // quantize: tokens per sequence in x; dequantize: max length
  int64_t capacity = 0;
  int64_t first_b = 0;  // sequences [first_b, first_b + batches) in this launch
  int64_t batches = 0;
  int64_t x_first_b = 0;  // quantize: index in x of sequence first_b
  int nparts = 1;
  int* nonfinite = nullptr;
  PartArgs parts[2];
  int64_t per_b[kMaxLaunchBatch];  // quantize: start token; dequantize: length
};

struct WarpScratch {
  float u[kMaxPartDim];
  float y[kMaxPartDim];
  float t[kMaxPartDim];
  uint8_t idx[kMaxPartDim];
};

__device__ __forceinline__ void fwht(float* v, int n, int lane) {
  for (int half = 1; half < n; half <<= 1) {
    for (int k = lane; k < n / 2; k += 32) {
      const int i = (k / half) * 2 * half + (k % half);
      const float a = v[i];
      const float b = v[i + half];
      v[i] = __fadd_rn(a, b);
      v[i + half] = __fsub_rn(a, b);
    }
    __syncwarp();
  }
}

// y <- Pi y (Rotation::forward); t is scratch.
__device__ void rotate_forward(const PartArgs& p, float* y, float* t, int lane) {
  const int n = p.dim;
  if (p.hadamard) {
    for (int j = lane; j < n; j += 32) y[j] = __fmul_rn(y[j], p.signs[j]);
    __syncwarp();
    fwht(y, n, lane);
    for (int j = lane; j < n; j += 32) y[j] = __fmul_rn(y[j], p.inv_sqrt_dim);
    __syncwarp();
    return;
  }
  for (int i = lane; i < n; i += 32) {
    float acc = 0.0f;
    for (int j = 0; j < n; ++j) acc = __fadd_rn(acc, __fmul_rn(p.matrix_t[j * n + i], y[j]));
    t[i] = acc;
  }
  __syncwarp();
  for (int j = lane; j < n; j += 32) y[j] = t[j];
  __syncwarp();
}

// x <- Pi^T x (Rotation::inverse); t is scratch.
__device__ void rotate_inverse(const PartArgs& p, float* x, float* t, int lane) {
  const int n = p.dim;
  if (p.hadamard) {
    fwht(x, n, lane);
    for (int j = lane; j < n; j += 32)
      x[j] = __fmul_rn(x[j], __fmul_rn(p.inv_sqrt_dim, p.signs[j]));
    __syncwarp();
    return;
  }
  for (int j = lane; j < n; j += 32) {
    float acc = 0.0f;
    for (int i = 0; i < n; ++i) acc = __fadd_rn(acc, __fmul_rn(p.matrix[i * n + j], x[i]));
    t[j] = acc;
  }
  __syncwarp();
  for (int j = lane; j < n; j += 32) x[j] = t[j];
  __syncwarp();
}

// Codebook::nearest: the number of boundaries strictly below y.
__device__ __forceinline__ int nearest(const float* bounds, int nb, float y) {
  int lo = 0, hi = nb;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (bounds[mid] < y) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// A run of sequential float sums, walked by lane 0 in index order (as the CPU loops do).
__device__ __forceinline__ float serial_sumsq(const float* v, int n, int lane) {
  float s = 0.0f;
  if (lane == 0)
    for (int j = 0; j < n; ++j) s = __fadd_rn(s, __fmul_rn(v[j], v[j]));
  return __shfl_sync(dev::kFull, s, 0);
}

__global__ void __launch_bounds__(kWarps * 32)
    quantize_kernel(const __grid_constant__ CodecArgs a) {
  // A dependent launch (attention after an append) may start its prologue and its copies of
  // settled tokens now; it waits for this kernel before it reads anything this kernel writes.
  dev::grid_dependents_launch();
  __shared__ WarpScratch scratch[kWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  WarpScratch& s = scratch[warp];
  const int64_t vectors = a.batches * a.heads * a.n;
  const int64_t items = vectors * a.nparts;
  for (int64_t item = int64_t{blockIdx.x} * kWarps + warp; item < items;
       item += int64_t{gridDim.x} * kWarps) {
    const PartArgs& p = a.parts[item % a.nparts];
    const int64_t v = item / a.nparts;
    const int64_t i = v % a.n, bh = v / a.n;
    const int64_t h = bh % a.heads, bl = bh / a.heads;
    const int64_t b = a.first_b + bl;
    const int64_t src = (((a.x_first_b + bl) * a.heads + h) * a.n + i) * a.full_dim;
    const int64_t slot = (b * a.heads + h) * a.capacity + a.per_b[bl] + i;
    const int n = p.dim;

    for (int j = lane; j < n; j += 32)
      s.u[j] = dev::load_as_float(a.x, src + (p.channels ? p.channels[j] : j), a.dtype);
    __syncwarp();
    const float sumsq = serial_sumsq(s.u, n, lane);
    if (!isfinite(sumsq)) {
      // A NaN norm poisons every score over this token: never a silent answer, even unchecked.
      if (lane == 0) {
        atomicOr(a.nonfinite, 1);
        p.norms[slot] = kHalfNaNBits;
        if (p.prod) p.rnorms[slot] = kHalfNaNBits;
      }
      __syncwarp();
      continue;
    }
    const float norm = __fsqrt_rn(sumsq);
    const float inv = norm > 0.0f ? __fdiv_rn(1.0f, norm) : 0.0f;
    for (int j = lane; j < n; j += 32) s.y[j] = __fmul_rn(s.u[j], inv);
    __syncwarp();
    rotate_forward(p, s.y, s.t, lane);
    for (int j = lane; j < n; j += 32)
      s.idx[j] = static_cast<uint8_t>(nearest(p.boundaries, p.n_bound, s.y[j]));
    __syncwarp();

    float stored = norm;
    if (p.norm_correction) {
      float code = 0.0f;
      if (lane == 0) {
        for (int j = 0; j < n; ++j) {
          const float c = p.centroids[s.idx[j]];
          code = __fadd_rn(code, __fmul_rn(c, c));
        }
      }
      code = __shfl_sync(dev::kFull, code, 0);
      if (code > 0.0f) stored = __fdiv_rn(norm, __fsqrt_rn(code));
    }
    const int bits = p.index_bits;
    for (int w = lane; w < p.words; w += 32) {
      const int first = (32 * w) / bits;
      const int last = min(n - 1, (32 * w + 31) / bits);
      uint32_t word = 0;
      for (int e = first; e <= last; ++e) {
        const int bit = e * bits - 32 * w;
        const uint32_t val = s.idx[e];
        word |= bit >= 0 ? (val << bit) : (val >> (-bit));
      }
      p.indices[slot * p.words + w] = word;
    }
    if (lane == 0) p.norms[slot] = __half_as_ushort(__float2half_rn(stored));

    if (p.prod) {
      for (int j = lane; j < n; j += 32)
        s.t[j] = inv > 0.0f ? __fsub_rn(s.y[j], p.centroids[s.idx[j]]) : 0.0f;
      __syncwarp();
      const float gamma_sq = serial_sumsq(s.t, n, lane);
      rotate_inverse(p, s.t, s.y, lane);
      for (int w = 0; w < p.swords; ++w) {
        const int row = w * 32 + lane;
        float acc = -1.0f;
        if (row < n) {
          acc = 0.0f;
          for (int j = 0; j < n; ++j) acc = __fadd_rn(acc, __fmul_rn(p.qjl_t[j * n + row], s.t[j]));
        }
        const unsigned word = __ballot_sync(dev::kFull, row < n && acc >= 0.0f);
        if (lane == 0) p.qsigns[slot * p.swords + w] = word;
      }
      if (lane == 0) p.rnorms[slot] = __half_as_ushort(__float2half_rn(__fsqrt_rn(gamma_sq)));
    }
    __syncwarp();
  }
  // Launched beside the previous write (quantize_write's beside_previous), this grid ends only
  // after that one has: whoever waits for this write also waits for that one. Otherwise a no-op.
  dev::grid_dependency_wait();
}

__device__ __forceinline__ uint32_t unpack(const uint32_t* words, int j, int bits) {
  const int bit = j * bits;
  const int word = bit >> 5, offset = bit & 31;
  uint64_t window = words[word] >> offset;
  if (offset + bits > 32) window |= static_cast<uint64_t>(words[word + 1]) << (32 - offset);
  return static_cast<uint32_t>(window) & ((1u << bits) - 1u);
}

// Codec::dequantize per vector, written into the output's channels of each part.
__global__ void __launch_bounds__(kWarps * 32)
    dequantize_kernel(const __grid_constant__ CodecArgs a) {
  __shared__ WarpScratch scratch[kWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  WarpScratch& s = scratch[warp];
  const int64_t items = a.batches * a.heads * a.n * a.nparts;
  for (int64_t item = int64_t{blockIdx.x} * kWarps + warp; item < items;
       item += int64_t{gridDim.x} * kWarps) {
    const PartArgs& p = a.parts[item % a.nparts];
    const int64_t v = item / a.nparts;
    const int64_t t = v % a.n, bh = v / a.n;
    const int64_t h = bh % a.heads, bl = bh / a.heads;
    const int64_t b = a.first_b + bl;
    const int64_t dst = ((b * a.heads + h) * a.n + t) * a.full_dim;
    const int n = p.dim;
    if (t >= a.per_b[bl]) {
      for (int j = lane; j < n; j += 32)
        dev::store_from_float(a.out, dst + (p.channels ? p.channels[j] : j), a.dtype, 0.0f);
      continue;
    }
    const int64_t slot = (b * a.heads + h) * a.capacity + t;
    const uint32_t* words = p.indices + slot * p.words;
    for (int j = lane; j < n; j += 32) s.y[j] = p.centroids[unpack(words, j, p.index_bits)];
    __syncwarp();
    rotate_inverse(p, s.y, s.t, lane);
    const float norm = dev::half_bits_to_float(p.norms[slot]);
    if (p.prod) {
      const uint32_t* sg = p.qsigns + slot * p.swords;
      const float gamma = dev::half_bits_to_float(p.rnorms[slot]) * p.qjl_scale;
      for (int j = lane; j < n; j += 32) {
        float acc = 0.0f;
        for (int i = 0; i < n; ++i) {
          const float sign = ((sg[i >> 5] >> (i & 31)) & 1u) ? gamma : -gamma;
          acc = __fadd_rn(acc, __fmul_rn(sign, p.qjl[i * n + j]));
        }
        s.y[j] = __fadd_rn(s.y[j], acc);
      }
      __syncwarp();
    }
    for (int j = lane; j < n; j += 32)
      dev::store_from_float(a.out, dst + (p.channels ? p.channels[j] : j), a.dtype,
                            __fmul_rn(s.y[j], norm));
    __syncwarp();
  }
}

int dtype_code(const char* fn, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return kF32;
    case DType::kFloat16:
      return kF16;
    case DType::kBFloat16:
      return kBF16;
    default:
      break;
  }
  throw_invalid(fn, "dtype float32, float16 or bfloat16", dtype_name(dtype));
}

void fill_parts(CodecArgs& a, const TensorQuantizer& quantizer,
                const std::vector<PackedPlanes>& planes, int device, void* stream, const char* fn) {
  const auto& parts = quantizer.parts();
  if (parts.size() > 2 || parts.size() != planes.size())
    throw_invalid(fn, "one or two quantizer parts with one plane set each",
                  detail::concat(parts.size(), " parts, ", planes.size(), " plane sets"));
  a.nparts = static_cast<int>(parts.size());
  for (size_t k = 0; k < parts.size(); ++k) {
    const int dim = parts[k].codec->dim();
    if (dim > kMaxPartDim)
      throw_runtime(fn, "the CUDA quantize kernels handle vectors (or split groups) of up to ",
                    kMaxPartDim, " channels; got ", dim);
    const CodecTables& t = codec_tables(parts[k], quantizer.is_split(), device, stream, fn);
    PartArgs& p = a.parts[k];
    p.dim = t.dim;
    p.index_bits = t.index_bits;
    p.prod = t.prod;
    p.hadamard = t.hadamard;
    p.norm_correction = t.norm_correction;
    p.words = static_cast<int>(packed_words(t.dim, t.index_bits));
    p.swords = static_cast<int>(sign_words(t.dim));
    p.n_bound = (1 << t.index_bits) - 1;
    p.inv_sqrt_dim = t.inv_sqrt_dim;
    p.qjl_scale = t.qjl_scale;
    p.centroids = t.centroids;
    p.boundaries = t.boundaries;
    p.signs = t.signs;
    p.matrix = t.matrix;
    p.matrix_t = t.matrix_t;
    p.qjl = t.qjl;
    p.qjl_t = t.qjl_t;
    p.channels = t.channels;
    p.indices = planes[k].indices;
    p.norms = planes[k].norms;
    p.rnorms = planes[k].residual_norms;
    p.qsigns = planes[k].qjl_signs;
  }
}

int grid_for(int64_t items, int device) {
  const int64_t per_block = kWarps;
  const int64_t cap = int64_t{device_info(device).sm_count} * 16;
  return static_cast<int>(std::max<int64_t>(1, std::min((items + per_block - 1) / per_block, cap)));
}

}  // namespace

bool quantize_write(const TensorQuantizer& quantizer, const TensorView& x,
                    const std::vector<PackedPlanes>& planes, int64_t batch, int64_t heads,
                    int64_t capacity, const std::vector<int64_t>& start, int64_t sequence,
                    void* stream, bool check_finite, bool beside_previous) {
  const char* fn = cache_detail::api_name("QuantizedTensor.write");
  if (x.device != DeviceType::kCUDA)
    throw_invalid(fn, "x on a CUDA device for a CUDA cache", device_name(x.device));
  const int64_t n = x.shape[x.rank() - 2];
  if (n == 0) return false;
  DeviceGuard guard(x.device_id, fn);
  CodecArgs a;
  a.x = x.data;
  a.dtype = dtype_code(fn, x.dtype);
  a.full_dim = quantizer.dim();
  a.heads = heads;
  a.n = n;
  a.capacity = capacity;
  fill_parts(a, quantizer, planes, x.device_id, stream, fn);
  // Validation of device data needs its result on the host: one 4-byte read-back, which waits for
  // the stream. Skipped under graph capture, where the host cannot wait, and when not asked for.
  const bool validate = check_finite && !stream_capturing(stream, fn);
  const FiniteFlag flag = finite_flag(x.device_id, stream, fn);
  a.nonfinite = flag.device;
  const cudaStream_t s = as_stream(stream);
  if (validate) TQATTN_CUDA(fn, cudaMemsetAsync(flag.device, 0, sizeof(int), s));
  const int64_t b_begin = sequence >= 0 ? sequence : 0;
  const int64_t b_end = sequence >= 0 ? sequence + 1 : batch;
  for (int64_t b0 = b_begin; b0 < b_end; b0 += kMaxLaunchBatch) {
    a.first_b = b0;
    a.batches = std::min<int64_t>(kMaxLaunchBatch, b_end - b0);
    a.x_first_b = sequence >= 0 ? 0 : b0;
    for (int64_t k = 0; k < a.batches; ++k)
      a.per_b[k] = start.size() == 1 && sequence >= 0 ? start[0] : start[b0 + k];
    const int grid = grid_for(a.batches * heads * n * a.nparts, x.device_id);
    if (beside_previous && !validate && b0 == b_begin) {
      launch_dependent(fn, quantize_kernel, dim3(grid), dim3(kWarps * 32), 0, s, dim3(1, 1, 1), a);
    } else {
      quantize_kernel<<<grid, kWarps * 32, 0, s>>>(a);
      check_launch(fn, "quantize_kernel");
    }
  }
  if (validate) {
    TQATTN_CUDA(fn,
                cudaMemcpyAsync(flag.host, flag.device, sizeof(int), cudaMemcpyDeviceToHost, s));
    TQATTN_CUDA(fn, cudaStreamSynchronize(s));
    if (*flag.host != 0)
      throw_invalid(fn, "finite x (no NaN or Inf, and a squared norm within float range)",
                    "a non-finite row on the device");
  }
  return validate;
}

void dequantize_states(const QuantizedStates& states, const TensorView& out, void* stream) {
  const char* fn = "dequantize_states";
  if (out.device != DeviceType::kCUDA || states.device != DeviceType::kCUDA)
    throw_invalid(fn, "states and out on a CUDA device", device_name(out.device));
  const int64_t max_len = states.max_length();
  if (max_len == 0 || states.batch == 0) return;
  DeviceGuard guard(states.device_id, fn);
  CodecArgs a;
  a.out = out.data;
  a.dtype = dtype_code(fn, out.dtype);
  a.full_dim = states.quantizer->dim();
  a.heads = states.heads;
  a.n = max_len;
  a.capacity = states.capacity;
  fill_parts(a, *states.quantizer, states.parts, states.device_id, stream, fn);
  const cudaStream_t s = as_stream(stream);
  for (int64_t b0 = 0; b0 < states.batch; b0 += kMaxLaunchBatch) {
    a.first_b = b0;
    a.batches = std::min<int64_t>(kMaxLaunchBatch, states.batch - b0);
    for (int64_t k = 0; k < a.batches; ++k) a.per_b[k] = states.lengths[b0 + k];
    const int grid = grid_for(a.batches * a.heads * max_len * a.nparts, states.device_id);
    dequantize_kernel<<<grid, kWarps * 32, 0, s>>>(a);
    check_launch(fn, "dequantize_kernel");
  }
}

}  // namespace tqattn::cuda

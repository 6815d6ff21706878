// Device pieces shared by the decode and prefill kernels: reading a thread's span of packed codes,
// turning code pairs into fp16 pairs through shared-memory tables, per-row masking, and the
// epilogue (merge of split partials, sinks, normalisation, un-rotation, store).
//
// The span layout: thread column c (lane % 4) of a warp always owns the contiguous quarter
// [c * D/4, (c+1) * D/4) of every token's dimensions. Both mma operands are permuted the same
// way, so a thread reads one contiguous run of packed bits per token, and each consecutive pair
// of codes (2b adjacent bits) becomes one half2 register through one table load.
#pragma once

#include <type_traits>

#include "cuda/attention_params.h"
#include "cuda/common.cuh"

namespace tqattn::cuda::attn {

using namespace tqattn::cuda::dev;

// Calls f(KB, VB) with the (key, value) index widths as integral constants when the attention
// loops are compiled for them (MSE keys: the common TurboQuant settings 2/2, 3/3, 3/4, 4/4), else
// with (0, 0): the loops that switch on the width per span.
template <class F>
void with_specialized_widths(int kbits, int vbits, F&& f) {
  using Two = std::integral_constant<int, 2>;
  using Three = std::integral_constant<int, 3>;
  using Four = std::integral_constant<int, 4>;
  if (kbits == 2 && vbits == 2) return f(Two{}, Two{});
  if (kbits == 3 && vbits == 3) return f(Three{}, Three{});
  if (kbits == 3 && vbits == 4) return f(Three{}, Four{});
  if (kbits == 4 && vbits == 4) return f(Four{}, Four{});
  f(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
}

// A run of kBits packed bits: run `index` of a row is bits [index * kBits, (index + 1) * kBits).
template <int kBits>
struct Run {
  static constexpr bool kWordAligned = (kBits % 32) == 0;
  static constexpr int kWords = (kBits + 31) / 32;
  // Runs start at multiples of kBits, so a run's first bit within its word is a multiple of the
  // largest power of two dividing kBits: 32 minus that is the latest a run can start.
  static constexpr int kMaxShift = kWordAligned ? 0 : 32 - (kBits & -kBits);
  // Words one run's bits can touch: one more than kWords only where some run starts late enough
  // in its word for its end to reach the next one (that word is then read only by such runs).
  static constexpr int kLoad = (kMaxShift + kBits + 31) / 32;
};
static_assert(Run<72>::kLoad == 3 && Run<48>::kLoad == 2 && Run<96>::kLoad == 3, "no extra word");
static_assert(Run<120>::kLoad == 5 && Run<24>::kLoad == 2 && Run<3>::kLoad == 2, "extra word");

// Thread column c's span of a token row: the codes of dims [c * D/4, (c+1) * D/4).
template <int D, int B>
struct Span : Run<D / 4 * B> {
  static constexpr int kDims = D / 4;
};

// Run `index` of one row (words), realigned so that bit 0 is the run's first bit. Reads only the
// words that hold the run's bits: a row's last run reads nothing past the row, which matters where
// the next row may still be in flight (the stream decode's ring, each warp's stage on its own
// barrier).
template <int kBits>
__device__ __forceinline__ void load_run(const uint32_t* row, int index,
                                         uint32_t (&w)[Run<kBits>::kWords]) {
  using R = Run<kBits>;
  if constexpr (R::kWordAligned) {
    const uint32_t* p = row + index * R::kWords;
    if constexpr (R::kWords % 4 == 0) {
#pragma unroll
      for (int i = 0; i < R::kWords; i += 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(p + i);
        w[i] = v.x;
        w[i + 1] = v.y;
        w[i + 2] = v.z;
        w[i + 3] = v.w;
      }
    } else if constexpr (R::kWords % 2 == 0) {
#pragma unroll
      for (int i = 0; i < R::kWords; i += 2) {
        const uint2 v = *reinterpret_cast<const uint2*>(p + i);
        w[i] = v.x;
        w[i + 1] = v.y;
      }
    } else {
#pragma unroll
      for (int i = 0; i < R::kWords; ++i) w[i] = p[i];
    }
  } else {
    const int bit = index * kBits;
    const uint32_t* p = row + (bit >> 5);
    const int shift = bit & 31;
    uint32_t raw[R::kWords + 1];
#pragma unroll
    for (int i = 0; i < R::kWords; ++i) raw[i] = p[i];
    raw[R::kWords] = 0;  // bits past the run's end
    if constexpr (R::kLoad > R::kWords) {
      if (shift + kBits > 32 * R::kWords) raw[R::kWords] = p[R::kWords];
    }
#pragma unroll
    for (int i = 0; i < R::kWords; ++i) w[i] = __funnelshift_r(raw[i], raw[i + 1], shift);
  }
}

// The packed bits of span c of one token row (see load_run).
template <int D, int B>
__device__ __forceinline__ void load_span(const uint32_t* row, int c,
                                          uint32_t (&w)[Span<D, B>::kWords]) {
  load_run<D / 4 * B>(row, c, w);
}

// Bits [bit, bit + n) of a realigned span (bit and n compile-time after unrolling).
template <int kWords>
__device__ __forceinline__ uint32_t field(const uint32_t (&w)[kWords], int bit, int n) {
  const int word = bit >> 5, off = bit & 31;
  const uint32_t mask = n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
  if (off + n <= 32 || word + 1 >= kWords) return (w[word] >> off) & mask;
  return __funnelshift_r(w[word], w[word + 1], off) & mask;
}

// Pair j of the span from a table with 2^cshift copies of each entry, `lut` already offset to
// this lane's copy (the copy count is chosen at run time to fit two blocks per SM).
template <int B, int kWords>
__device__ __forceinline__ uint32_t code_pair_shift(const uint32_t (&w)[kWords], int j,
                                                    const uint32_t* lut, int cshift) {
  if constexpr (B <= kMaxPairBits) {
    return lut[field<kWords>(w, 2 * B * j, 2 * B) << cshift];
  } else {
    const uint32_t lo = lut[field<kWords>(w, 2 * B * j, B) << cshift];
    const uint32_t hi = lut[field<kWords>(w, 2 * B * j + B, B) << cshift];
    return __byte_perm(lo, hi, 0x5410);
  }
}

// 2^x on the MUFU unit (relative error ~2^-22; 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Byte offset of this lane's copy of entry `field(bit, n)` in a table whose entry rows are
// 2^kRowShift bytes (the copies of one entry side by side): (field << kRowShift) | lane_bytes,
// built with one shift and one LOP3. The load then adds only the table's base.
template <int kRowShift, int kWords>
__device__ __forceinline__ uint32_t lut_row_offset(const uint32_t (&w)[kWords], int bit, int n,
                                                   uint32_t lane_bytes) {
  static_assert(kRowShift <= 16, "a crossing field starts at bit >= 16");
  const int word = bit >> 5, off = bit & 31;
  const uint32_t mask = ((1u << n) - 1u) << kRowShift;
  uint32_t x;
  if (off + n <= 32 || word + 1 >= kWords) {
    x = off >= kRowShift ? (w[word] >> (off - kRowShift)) : (w[word] << (kRowShift - off));
  } else {
    x = __funnelshift_r(w[word], w[word + 1], off - kRowShift);
  }
  uint32_t r;  // (x & mask) | lane_bytes as one LOP3 (the compiler otherwise splits it in two)
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "r"(mask), "r"(lane_bytes));
  return r;
}

__device__ __forceinline__ uint32_t lds_at(const unsigned char* base, uint32_t byte_offset) {
  return *reinterpret_cast<const uint32_t*>(base + byte_offset);
}

// Pair j of the span from a table with 2^kCopyShift copies of each entry at byte base `lut`,
// lane_bytes = this lane's copy * 4 (decode: 32 copies, one per lane, at a compile-time offset).
template <int B, int kCopyShift, int kWords>
__device__ __forceinline__ uint32_t code_pair_copies(const uint32_t (&w)[kWords], int j,
                                                     const unsigned char* lut,
                                                     uint32_t lane_bytes) {
  constexpr int kRow = kCopyShift + 2;
  if constexpr (B <= kMaxPairBits) {
    return lds_at(lut, lut_row_offset<kRow, kWords>(w, 2 * B * j, 2 * B, lane_bytes));
  } else {
    const uint32_t lo = lds_at(lut, lut_row_offset<kRow, kWords>(w, 2 * B * j, B, lane_bytes));
    const uint32_t hi = lds_at(lut, lut_row_offset<kRow, kWords>(w, 2 * B * j + B, B, lane_bytes));
    return __byte_perm(lo, hi, 0x5410);
  }
}

// Entry e of a code table for index width `bits` (a half2 pair, or one half for wide codes).
__device__ __forceinline__ uint32_t lut_value(const float* centroids, int bits, int e) {
  const uint32_t mask = (1u << bits) - 1u;
  return bits <= kMaxPairBits ? pack_half2(centroids[e & mask], centroids[e >> bits])
                              : half_bits(centroids[e]);
}

// Stores kCopies copies of entry e (one 128-byte row for 32 copies) with 16-byte stores, each
// thread starting at a different chunk so that the 8 threads of a store phase hit distinct banks.
template <int kCopies>
__device__ __forceinline__ void store_lut_row(uint32_t* lut, int e, uint32_t v) {
  constexpr int kChunks = kCopies / 4;
  uint4* row = reinterpret_cast<uint4*>(lut) + e * kChunks;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) row[(k + e) & (kChunks - 1)] = make_uint4(v, v, v, v);
}

// Both decode tables, one entry per thread (every width has at most 256 entries): the four
// centroid loads of a thread are in flight together, then each thread writes its rows.
template <int kCopies, int kThreads>
__device__ __forceinline__ void build_luts_by_entry(uint32_t* klut, const float* kcent, int kbits,
                                                    uint32_t* vlut, const float* vcent, int vbits,
                                                    int tid) {
  static_assert(kThreads >= 256, "one entry per thread");
  static_assert(kCopies % 4 == 0 && ((kCopies / 4) & (kCopies / 4 - 1)) == 0, "16-byte chunks");
  const bool kown = tid < lut_entries(kbits), vown = tid < lut_entries(vbits);
  const uint32_t kv = kown ? lut_value(kcent, kbits, tid) : 0u;
  const uint32_t vv = vown ? lut_value(vcent, vbits, tid) : 0u;
  if (kown) store_lut_row<kCopies>(klut, tid, kv);
  if (vown) store_lut_row<kCopies>(vlut, tid, vv);
}

// A table with 2^cshift (4 or 8) copies of each entry.
__device__ __forceinline__ void build_lut_copies(uint32_t* lut, const float* centroids, int bits,
                                                 int cshift, int tid, int nthreads) {
  const int entries = lut_entries(bits), chunk_shift = cshift - 2;
  for (int i = tid; i < (entries << chunk_shift); i += nthreads) {
    const uint32_t v = lut_value(centroids, bits, i >> chunk_shift);
    reinterpret_cast<uint4*>(lut)[i] = make_uint4(v, v, v, v);
  }
}

// The QJL sign table: a 2-bit pair of sign bits -> half2 of +-1.
template <int kCopies>
__device__ void build_sign_lut(uint32_t* lut, int tid, int nthreads) {
  for (int i = tid; i < 4 * kCopies; i += nthreads) {
    const int e = i / kCopies;
    lut[i] = pack_half2((e & 1) ? 1.0f : -1.0f, (e & 2) ? 1.0f : -1.0f);
  }
}

// What one flattened query row f of KV head kvh, sequence b may see: keys [lo, hi) (positions
// fit in 32 bits; the host checks) and the row's base offset into the mask.
struct RowInfo {
  int lo;
  int hi;
  int64_t mask_base;
};

__device__ __forceinline__ RowInfo row_info(const AttnParams& p, int f, int64_t b, int kvh,
                                            int64_t len, int64_t pos0) {
  RowInfo r;
  const bool valid = f < p.rows;
  const int ff = valid ? f : 0;
  const int l = ff / p.group, hq = kvh * p.group + ff % p.group;
  const int64_t pos = pos0 + l;
  r.lo = static_cast<int>(p.window > 0 ? max(int64_t{0}, pos - p.window + 1) : 0);
  r.hi = static_cast<int>(p.causal ? min(len, pos + 1) : len);
  if (!valid) r.hi = r.lo;  // sees nothing
  r.mask_base = b * p.mstride_b + hq * p.mstride_h + l * p.mstride_l;
  return r;
}

// Soft-cap, additive mask and visibility for one score (log2 units on return).
__device__ __forceinline__ float modify_score(const AttnParams& p, float s, int64_t t,
                                              const RowInfo& r) {
  if (t < r.lo || t >= r.hi) return -INFINITY;
  if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap) * kLog2e;
  if (p.mask) s += mask_value(p.mask, r.mask_base + t * p.mstride_s, p.mask_dtype) * kLog2e;
  return s;
}

// A group of threads working together on rows (a block or a single warp).
struct BlockGroup {
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
};
struct WarpGroup {
  __device__ int rank() const { return threadIdx.x & 31; }
  __device__ int size() const { return 32; }
  __device__ void sync() const { __syncwarp(); }
};

// Fast Walsh-Hadamard transforms of kRows rows held by a warp as v[r][k] = x_r[lane + 32 k], with
// the butterflies of the shared-memory version (x[i] = a + c, x[i + h] = a - c for i without bit
// h): distances below 32 by shuffles, the rest within the thread. No shared memory, no barriers.
// The rows' shuffle chains are independent, so several rows at once hide each other's latency
// (a row alone is a chain of five shuffle round trips).
template <int D, int kRows>
__device__ __forceinline__ void warp_hadamard_rows(float (&v)[kRows][D / 32], int lane) {
  constexpr int kPer = D / 32;
  static_assert((D & (D - 1)) == 0 && D >= 32, "power-of-two rows");
#pragma unroll
  for (int h = 1; h < 32; h <<= 1) {
    const bool upper = (lane & h) != 0;
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const float other = __shfl_xor_sync(kFull, v[r][k], h);
        v[r][k] = upper ? other - v[r][k] : v[r][k] + other;
      }
  }
#pragma unroll
  for (int h = 1; h < kPer; h <<= 1)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        if (k & h) continue;
        const float a = v[r][k], c = v[r][k + h];
        v[r][k] = a + c;
        v[r][k + h] = a - c;
      }
}

// A head dim without a power-of-two Hadamard has dense rotations (D x D fp32, read after the
// dependency wait by the query rotation and the un-rotation): asking L2 for them beforehand takes
// their DRAM latency off the call (with the unrolled products, D = 96 decode at 8K 23.6 -> 16.2 us,
// docs/perf.md history 78). Compiled only for such D: at a power-of-two D a dense rotation is
// opt-in and the Hadamard kernels need no prologue work for it.
template <int D>
__device__ __forceinline__ void prefetch_dense_rotations(const AttnParams& p, int tid,
                                                         int nthreads) {
  if constexpr ((D & (D - 1)) != 0) {
    prefetch_l2(p.kmat_t, D * D * 4, tid, nthreads);
    prefetch_l2(p.kqjl_t, D * D * 4, tid, nthreads);
    prefetch_l2(p.vmat, D * D * 4, tid, nthreads);
  }
}

// Starts copying a D x D fp32 rotation into shared memory (cp.async, one commit group per
// thread): the caller waits with cp_async_wait<0>() and a block barrier before reading it.
template <int D>
__device__ __forceinline__ void stage_rotation(float* dst, const float* src, int tid,
                                               int nthreads) {
  static_assert(D * D % 4 == 0, "16-byte chunks");
  for (int i = tid; i < D * D / 4; i += nthreads) cp_async16(dst + 4 * i, src + 4 * i);
  cp_async_commit();
}

// Row f (< p.rows) of (sequence b, KV head kvh) with running max m (log2 units) and sum l: adds the
// sink, stores lse and returns the factor that normalises the row's accumulated output.
__device__ __forceinline__ float finish_factor(const AttnParams& p, float m, float l, int f,
                                               int64_t b, int kvh) {
  const int hq = kvh * p.group + f % p.group, lq = f / p.group;
  float sum = l, scale = 1.0f, mx = m;
  if (p.sinks) {
    const float sink = p.sinks[hq] * kLog2e;
    mx = fmaxf(m, sink);
    scale = m == -INFINITY ? 0.0f : exp2f(m - mx);
    sum = sum * scale + exp2f(sink - mx);
  }
  if (p.lse) {
    const int64_t idx = (b * p.hq + hq) * p.qlen + lq;
    p.lse[idx] = sum > 0.0f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
  }
  return sum > 0.0f ? scale / sum : 0.0f;
}

// Rows f0 .. f0 + nrows of one (sequence, KV head) from fo [nrows][D] (un-normalised output in
// the values' rotated space), fm / fl (row max in log2 units, row sum): adds sinks, normalises,
// un-rotates with the values' rotation and stores out and lse. fac is scratch [nrows]. With the
// Hadamard rotation each warp transforms kRowsAtOnce consecutive rows together (their shuffle
// chains overlap): many rows per warp (prefill) want several, a row per warp (decode) one.
// `vmat_staged`: the values' dense rotation in shared memory (stage_rotation by every thread of
// the group, not yet waited for), or null to read p.vmat.
template <int D, int kRowsAtOnce, class Group>
__device__ void finalize_rows(const AttnParams& p, float* fo, const float* fm, const float* fl,
                              float* fac, int nrows, int f0, int64_t b, int kvh, Group grp,
                              const float* vmat_staged = nullptr) {
  const int rank = grp.rank(), size = grp.size();
  // A lane's value signs (dims lane + 32k) load first: their latency then overlaps the factors and
  // the barrier instead of following the transform.
  constexpr int kPer = D / 32;
  [[maybe_unused]] float vsg[kPer];  // used by the power-of-two Hadamard path only
  if constexpr ((D & (D - 1)) == 0) {
#pragma unroll
    for (int k = 0; k < kPer; ++k) vsg[k] = p.vhad ? p.vsigns[(rank & 31) + 32 * k] : 1.0f;
  }
  for (int r = rank; r < nrows; r += size) {
    const int f = f0 + r;
    fac[r] = f < p.rows ? finish_factor(p, fm[r], fl[r], f, b, kvh) : 0.0f;
  }
  if (vmat_staged != nullptr) cp_async_wait<0>();
  grp.sync();
  if constexpr ((D & (D - 1)) == 0) {
    if (p.vhad) {
      // A warp's rows in registers, the transforms together, then coalesced stores.
      const int lane = rank & 31;
      for (int r0 = (rank >> 5) * kRowsAtOnce; r0 < nrows; r0 += (size >> 5) * kRowsAtOnce) {
        float v[kRowsAtOnce][kPer];
#pragma unroll
        for (int i = 0; i < kRowsAtOnce; ++i)
#pragma unroll
          for (int k = 0; k < kPer; ++k)
            v[i][k] = r0 + i < nrows ? fo[(r0 + i) * D + lane + 32 * k] : 0.0f;
        warp_hadamard_rows<D, kRowsAtOnce>(v, lane);
#pragma unroll
        for (int i = 0; i < kRowsAtOnce; ++i) {
          const int f = f0 + r0 + i;
          if (r0 + i >= nrows || f >= p.rows) continue;
          const int hq = kvh * p.group + f % p.group, l = f / p.group;
          const int64_t base = ((b * p.hq + hq) * p.qlen + l) * D;
          const float fr = fac[r0 + i] * p.v_inv_sqrt;
#pragma unroll
          for (int k = 0; k < kPer; ++k)
            store_from_float(p.out, base + lane + 32 * k, p.qdtype, v[i][k] * fr * vsg[k]);
        }
      }
      grp.sync();
      return;
    }
  }
  // A dense rotation (a Hadamard one needs a power-of-two D, Rotation::hadamard: handled above).
  const float* vmat = vmat_staged != nullptr ? vmat_staged : p.vmat;
  for (int k = rank; k < nrows * D; k += size) {
    const int r = k / D, i = k % D, f = f0 + r;
    if (f >= p.rows) continue;
    const float* y = fo + r * D;
    float acc = 0.0f;
#pragma unroll 16
    for (int j = 0; j < D; ++j) acc += vmat[j * D + i] * y[j];
    const int hq = kvh * p.group + f % p.group, l = f / p.group;
    const int64_t dst = ((b * p.hq + hq) * p.qlen + l) * D + i;
    store_from_float(p.out, dst, p.qdtype, acc * fac[r]);
  }
  grp.sync();
}

// Stores one split's rows: (m, l) and the normalised output in fp16 (8 dims per store).
template <int D, class Group>
__device__ void store_partial(const AttnParams& p, const float* fo, const float* fm,
                              const float* fl, int nrows, int64_t slot_row0, Group grp) {
  const int rank = grp.rank(), size = grp.size();
  for (int r = rank; r < nrows; r += size)
    reinterpret_cast<float2*>(p.part_ml)[slot_row0 + r] = make_float2(fm[r], fl[r]);
  for (int k = rank; k < nrows * (D / 8); k += size) {
    const int r = k / (D / 8), d0 = (k % (D / 8)) * 8;
    const float inv = fl[r] > 0.0f ? 1.0f / fl[r] : 0.0f;
    const float* src = fo + r * D + d0;
    uint4 v;
    v.x = pack_half2(src[0] * inv, src[1] * inv);
    v.y = pack_half2(src[2] * inv, src[3] * inv);
    v.z = pack_half2(src[4] * inv, src[5] * inv);
    v.w = pack_half2(src[6] * inv, src[7] * inv);
    reinterpret_cast<uint4*>(p.part_o + (slot_row0 + r) * D)[d0 / 8] = v;
  }
}

// Merges `nsplit` split partials of rows [row0, row0 + nrows) of a unit, in split order (the
// result does not depend on which block merges). Block-wide: the split weights l_s * 2^(m_s - max)
// go to `w` (shared, nrows * nsplit floats), then every thread accumulates 8-dim chunks with
// 16-byte loads. Row r in [0, nrows) goes to fo[r * D ..], its max to fm[r] and sum to fl[r].
template <int D>
__device__ void merge_partials(const AttnParams& p, float* w, int nrows, int rows_per_unit,
                               int row0, int unit, int units, int nsplit, float* fo, float* fm,
                               float* fl) {
  const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const int nwarps = nthreads >> 5;
  auto slot = [&](int s, int r) { return (int64_t{s} * units + unit) * rows_per_unit + row0 + r; };
  const float2* ml = reinterpret_cast<const float2*>(p.part_ml);
  // Many rows or few splits: a thread per row, its splits' loads in flight together (the first
  // eight kept for the weights: one L2 round trip); a warp per row would walk the rows in a chain
  // of round trips.
  const bool row_threads = nrows >= nthreads / 2 || nsplit <= 8;
  if (row_threads) {
    constexpr int kKept = 8;
    for (int r = tid; r < nrows; r += nthreads) {
      float2 kept[kKept];
      float mx = -INFINITY;
#pragma unroll
      for (int s = 0; s < kKept; ++s) {
        kept[s] = s < nsplit ? __ldcg(ml + slot(s, r)) : make_float2(-INFINITY, 0.0f);
        mx = fmaxf(mx, kept[s].x);
      }
      for (int s = kKept; s < nsplit; ++s) mx = fmaxf(mx, __ldcg(ml + slot(s, r)).x);
      const float ms = mx == -INFINITY ? 0.0f : mx;
      float sum = 0.0f;
#pragma unroll
      for (int s = 0; s < kKept; ++s) {
        if (s >= nsplit) break;
        const float wt = kept[s].y * exp2f(kept[s].x - ms);
        w[r * nsplit + s] = wt;
        sum += wt;
      }
      for (int s = kKept; s < nsplit; ++s) {
        const float2 v = __ldcg(ml + slot(s, r));
        const float wt = v.y * exp2f(v.x - ms);
        w[r * nsplit + s] = wt;
        sum += wt;
      }
      fm[r] = mx;
      fl[r] = sum;
    }
  }
  for (int r = warp; r < nrows && !row_threads; r += nwarps) {
    // A lane's first two splits stay in registers between the max and the weights: one L2
    // round trip instead of two for up to 64 splits.
    float2 first[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int s = lane + 32 * i;
      first[i] = s < nsplit ? __ldcg(ml + slot(s, r)) : make_float2(-INFINITY, 0.0f);
    }
    float mx = fmaxf(first[0].x, first[1].x);
    for (int s = lane + 64; s < nsplit; s += 32) mx = fmaxf(mx, __ldcg(ml + slot(s, r)).x);
    mx = warp_max(mx);
    const float ms = mx == -INFINITY ? 0.0f : mx;
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int s = lane + 32 * i;
      if (s < nsplit) {
        const float wt = first[i].y * exp2f(first[i].x - ms);
        w[r * nsplit + s] = wt;
        sum += wt;
      }
    }
    for (int s = lane + 64; s < nsplit; s += 32) {
      const float2 v = __ldcg(ml + slot(s, r));
      const float wt = v.y * exp2f(v.x - ms);
      w[r * nsplit + s] = wt;
      sum += wt;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      fm[r] = mx;
      fl[r] = sum;
    }
  }
  __syncthreads();
  // `sub` adjacent threads share an 8-dim item when threads outnumber items (decode: 2), each
  // taking every sub-th split, then add by shuffles: fewer dependent rounds of L2 loads.
  const int items = nrows * (D / 8);
  int sub = 1;
  while (sub < 8 && sub * 2 * items <= nthreads) sub *= 2;
  for (int base = 0; base < items * sub; base += nthreads) {
    const int item = (base + tid) / sub, part = (base + tid) % sub;
    const bool valid = item < items;
    const int r = valid ? item / (D / 8) : 0, c8 = item % (D / 8);
    const float* wr = w + r * nsplit;
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 16
    for (int s = valid ? part : nsplit; s < nsplit; s += sub) {
      const uint4 v = __ldcg(reinterpret_cast<const uint4*>(p.part_o + slot(s, r) * D) + c8);
      const float wt = wr[s];
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&words[k]));
        acc[2 * k] += wt * f.x;
        acc[2 * k + 1] += wt * f.y;
      }
    }
    for (int o = 1; o < sub; o <<= 1)
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] += __shfl_xor_sync(kFull, acc[k], o);
    if (valid && part == 0)
#pragma unroll
      for (int k = 0; k < 8; ++k) fo[r * D + c8 * 8 + k] = acc[k];
  }
  __syncthreads();
}

// kRows query rows already multiplied by the Hadamard signs, D / 32 values per lane (dims
// lane + 32k): transforms them together, scales by 1/sqrt(D) and stores the first nvalid rows in
// fp16 at dst + r * ld, each with its power-of-two scale at rs[r].
template <int D, int kRows>
__device__ __forceinline__ void warp_hadamard_rows_to_half(const AttnParams& p,
                                                           float (&v)[kRows][D / 32], __half* dst,
                                                           int ld, float* rs, int nvalid,
                                                           int lane) {
  constexpr int kPer = D / 32;
  warp_hadamard_rows<D, kRows>(v, lane);
  float amax[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    amax[r] = 0.0f;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      v[r][k] *= p.k_inv_sqrt;
      amax[r] = fmaxf(amax[r], fabsf(v[r][k]));
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) amax[r] = warp_max(amax[r]);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= nvalid) continue;
    const float scale = fp16_row_scale(amax[r]);
    const float inv = fp16_row_unscale(scale);
#pragma unroll
    for (int k = 0; k < kPer; ++k) dst[r * ld + lane + 32 * k] = __float2half_rn(v[r][k] * inv);
    if (lane == 0) rs[r] = scale;
  }
}

template <int D>
__device__ __forceinline__ void warp_hadamard_row_to_half(const AttnParams& p, float (&v)[D / 32],
                                                          __half* dst, float* rs, int lane) {
  warp_hadamard_rows_to_half<D, 1>(p, reinterpret_cast<float(&)[1][D / 32]>(v), dst, 0, rs, 1,
                                   lane);
}

// The un-rotated query side: rows of fp32 q (already scaled) in `x` [nrows][D] become fp16 in
// `dst` [nrows][ld] (rotated with the keys' rotation, or projected by S when `qjl`), each row
// scaled by a power of two recorded in `rs` so fp16 keeps full precision. Runs on one warp per
// call; the Hadamard rotation transforms kRowsAtOnce rows together. `kmat_staged`: the keys'
// dense rotation (transposed) in shared memory, or null to read p.kmat_t.
template <int D, int kRowsAtOnce>
__device__ void warp_rotate_rows(const AttnParams& p, float* x, int nrows, bool qjl, __half* dst,
                                 int ld, float* rs, int lane, const float* kmat_staged = nullptr) {
  constexpr int kPer = D / 32;
  if constexpr ((D & (D - 1)) == 0) {
    if (!qjl && p.khad) {
      float sg[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) sg[k] = p.ksigns[lane + 32 * k];
      for (int r0 = 0; r0 < nrows; r0 += kRowsAtOnce) {
        float v[kRowsAtOnce][kPer];
#pragma unroll
        for (int i = 0; i < kRowsAtOnce; ++i)
#pragma unroll
          for (int k = 0; k < kPer; ++k)
            v[i][k] = r0 + i < nrows ? x[(r0 + i) * D + lane + 32 * k] * sg[k] : 0.0f;
        warp_hadamard_rows_to_half<D, kRowsAtOnce>(p, v, dst + r0 * ld, ld, rs + r0, nrows - r0,
                                                   lane);
      }
      __syncwarp();
      return;
    }
  }
  if (!qjl && p.khad) {
    for (int k = lane; k < nrows * D; k += 32) x[k] *= p.ksigns[k % D];
    __syncwarp();
    for (int half = 1; half < D; half <<= 1) {
      for (int k = lane; k < nrows * (D / 2); k += 32) {
        const int r = k / (D / 2), kk = k % (D / 2);
        const int i = r * D + (kk / half) * 2 * half + (kk % half);
        const float a = x[i], c = x[i + half];
        x[i] = a + c;
        x[i + half] = a - c;
      }
      __syncwarp();
    }
    for (int r = 0; r < nrows; ++r) {
      float v[kPer];
      float amax = 0.0f;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        v[k] = x[r * D + lane + 32 * k] * p.k_inv_sqrt;
        amax = fmaxf(amax, fabsf(v[k]));
      }
      const float scale = fp16_row_scale(warp_max(amax));
      const float inv = fp16_row_unscale(scale);
#pragma unroll
      for (int k = 0; k < kPer; ++k) dst[r * ld + lane + 32 * k] = __float2half_rn(v[k] * inv);
      if (lane == 0) rs[r] = scale;
    }
    __syncwarp();
    return;
  }
  const float* m = qjl ? p.kqjl_t : kmat_staged != nullptr ? kmat_staged : p.kmat_t;
  for (int r = 0; r < nrows; ++r) {
    // The lane's kPer outputs in one pass over j, unrolled so that many matrix loads are in
    // flight at once (each output sums over j in the same order as one at a time would).
    float v[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) v[k] = 0.0f;
#pragma unroll 8
    for (int j = 0; j < D; ++j) {
      const float xj = x[r * D + j];
#pragma unroll
      for (int k = 0; k < kPer; ++k) v[k] += m[j * D + lane + 32 * k] * xj;
    }
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < kPer; ++k) amax = fmaxf(amax, fabsf(v[k]));
    const float scale = fp16_row_scale(warp_max(amax));
    const float inv = fp16_row_unscale(scale);
#pragma unroll
    for (int k = 0; k < kPer; ++k) dst[r * ld + lane + 32 * k] = __float2half_rn(v[k] * inv);
    if (lane == 0) rs[r] = scale;
  }
  __syncwarp();
}

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// Query rows f0 + i (i < nrows and f0 + i < p.rows; the others are zero) of (b, kvh) as fp32
// times q_factor, dims lane + 32k in v[i][k]: the kRows rows' loads are in flight together.
template <int D, int kRows>
__device__ __forceinline__ void warp_query_rows(const AttnParams& p, int f0, int nrows, int64_t b,
                                                int kvh, int lane, float (&v)[kRows][D / 32]) {
  constexpr int kPer = D / 32;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* q = static_cast<const T*>(p.q);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int f = f0 + i;
      const bool valid = i < nrows && f < p.rows;
      const int ff = valid ? f : 0;
      const int hq = kvh * p.group + ff % p.group, l = ff / p.group;
      const T* src = q + ((b * p.hq + hq) * p.qlen + l) * D + lane;
#pragma unroll
      for (int k = 0; k < kPer; ++k) v[i][k] = valid ? to_float(src[32 * k]) * p.q_factor : 0.0f;
    }
  };
  if (p.qdtype == kF16) {
    run(__half{});
  } else if (p.qdtype == kBF16) {
    run(__nv_bfloat16{});
  } else {
    run(float{});
  }
}

// Loads query rows f0 + r (r < nrows) of (b, kvh) into x [nrows][D] as fp32 times q_factor; rows
// past p.rows are zero. Runs on one warp. Eight rows' loads are in flight together (a load then a
// shared store per element would make one global round trip per row).
template <int D>
__device__ void warp_load_queries(const AttnParams& p, float* x, int nrows, int f0, int64_t b,
                                  int kvh, int lane) {
  constexpr int kPer = D / 32, kBatch = 8;
  for (int r0 = 0; r0 < nrows; r0 += kBatch) {
    float v[kBatch][kPer];
    warp_query_rows<D, kBatch>(p, f0 + r0, nrows - r0, b, kvh, lane, v);
#pragma unroll
    for (int i = 0; i < kBatch; ++i)
      if (r0 + i < nrows)
#pragma unroll
        for (int k = 0; k < kPer; ++k) x[(r0 + i) * D + lane + 32 * k] = v[i][k];
  }
  __syncwarp();
}

// Launches an attention kernel through launch_dependent, first raising its dynamic shared-memory
// limit to 227 KiB (once per device; the device whose limit was raised last is remembered).
template <auto kKernel>
void launch_attention_kernel(dim3 grid, int threads, size_t smem, cudaStream_t stream, dim3 cluster,
                             const AttnParams& p) {
  static int configured = -1;
  int device = 0;
  TQATTN_CUDA("scaled_dot_product_attention", cudaGetDevice(&device));
  if (configured != device) {
    TQATTN_CUDA(
        "scaled_dot_product_attention",
        cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
    configured = device;
  }
  launch_dependent("scaled_dot_product_attention", kKernel, grid, dim3(threads), smem, stream,
                   cluster, p);
}

}  // namespace tqattn::cuda::attn

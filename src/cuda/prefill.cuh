// Fused prefill (L > 8): flash-attention-2 style tensor-core attention where each KV tile is
// expanded once per block from packed codes into fp16 tiles in shared memory.
//
// A block owns 128 flattened query rows (64 for D = 256) of one KV head (rows f = l * group + h,
// so a block's rows span few positions and the causal diagonal costs at most a tile or two) and
// one split of the KV range. Its warps (8 of 16 rows for D = 128, else 4 of 32 or 16 rows) each
// hold their rows: Q (rotated, scaled, fp16) sits in shared memory and is read through ldmatrix;
// scores S = Q K^T via mma.m16n8k16 with K's B fragments from ldmatrix (the expanded tiles hold
// codes times their token's norm, so S and P need no per-column factor; Prod keys add the QJL
// term from a sign tile), and O += P V with V's B fragments from ldmatrix.trans. Packed tiles
// arrive by cp.async three tiles ahead; each is
// expanded once through small code tables into one of two fp16 tile buffers while the previous
// tile is multiplied (one block barrier per tile). Splits store partials and the unit's last
// block merges them (as in decode). The epilogue un-rotates per warp. The common (key, value)
// widths of MSE keys get kernels compiled for their widths and table copies (no width switch, a
// two-instruction table address, constant-size tile copies). On Hopper, MSE keys at D = 128 take
// the wgmma kernel instead (prefill_wgmma.cuh), which shares this file's block, softmax and
// epilogue helpers.
#pragma once

#include <cooperative_groups.h>

#include "cuda/attention_common.cuh"
#include "cuda/decode.cuh"  // load_stage
#include "tqattn/error.h"

namespace tqattn::cuda::attn {

template <int D>
struct PrefillShape {
  static constexpr int kMT = prefill_rows_per_warp(D) / 16;  // m16 tiles per warp
  static constexpr int kRowsW = prefill_rows_per_warp(D);
  static constexpr int kBM = prefill_block_rows(D);
  static constexpr int kBN = prefill_tile(D);
  static constexpr int kLd =
      D + 8;  // halves per tile row: 16-byte pad keeps ldmatrix conflict-free
  static constexpr int kSpan = D / 4;
};

// Expands span c of one token's packed codes into fp16 values times `scale` (the token's norm,
// so that scores and P need no per-column factor): `store(j, v)` puts 16-byte chunk j (dims
// c * D/4 + 8 j ..) where the tile layout wants it. `pair(w, j)` looks up code pair j of the
// realigned span w.
template <int D, int B, class Pair, class Store>
__device__ __forceinline__ void expand_span_pairs(const uint32_t* row, int c, __half2 scale,
                                                  Pair pair, Store store) {
  uint32_t w[Span<D, B>::kWords];
  load_span<D, B>(row, c, w);
  auto scaled = [&](uint32_t h2) {
    const __half2 v = __hmul2(*reinterpret_cast<const __half2*>(&h2), scale);
    return *reinterpret_cast<const uint32_t*>(&v);
  };
#pragma unroll
  for (int j = 0; j < D / 32; ++j) {
    uint4 v;
    v.x = scaled(pair(w, 4 * j));
    v.y = scaled(pair(w, 4 * j + 1));
    v.z = scaled(pair(w, 4 * j + 2));
    v.w = scaled(pair(w, 4 * j + 3));
    store(j, v);
  }
}

// The padded row-major tile of the mma.sync kernel: span c of a token row at dst[c*D/4 ..).
template <int D>
__device__ __forceinline__ auto row_store(__half* dst, int c) {
  uint4* out = reinterpret_cast<uint4*>(dst + c * (D / 4));
  return [out](int j, const uint4& v) { out[j] = v; };
}

// Through a table with 2^cshift copies of each entry, `lut` already offset to this lane's copy.
template <int D, int B, class Store>
__device__ __forceinline__ void expand_span(const uint32_t* row, int c, const uint32_t* lut,
                                            int cshift, __half2 scale, Store store) {
  expand_span_pairs<D, B>(
      row, c, scale, [&](const auto& w, int j) { return code_pair_shift<B>(w, j, lut, cshift); },
      store);
}

template <int D, class Store>
__device__ __forceinline__ void expand_span_bits(int bits, const uint32_t* row, int c,
                                                 const uint32_t* lut, int cshift, __half2 scale,
                                                 Store store) {
  with_code_width(
      bits, [&](auto b) { expand_span<D, decltype(b)::value>(row, c, lut, cshift, scale, store); });
}

// expand_span with the copy count fixed at compile time: the table at byte base `lut`, this lane's
// copy at lane_bytes; a pair costs one shift, one LOP3 and the load.
template <int D, int B, int kCopyShift, class Store>
__device__ __forceinline__ void expand_span_copies(const uint32_t* row, int c,
                                                   const unsigned char* lut, uint32_t lane_bytes,
                                                   __half2 scale, Store store) {
  expand_span_pairs<D, B>(
      row, c, scale,
      [&](const auto& w, int j) { return code_pair_copies<B, kCopyShift>(w, j, lut, lane_bytes); },
      store);
}

// A compile-time width B > 0 and copy shift LS > 0 (the common pairs: no switch, so the expansion
// is one basic block the compiler can interleave with the MMAs), or both from the params.
template <int D, int B, int LS, class Store>
__device__ __forceinline__ void expand_span_for(int bits, const uint32_t* row, int c,
                                                const uint32_t* lut, const unsigned char* lut_base,
                                                int cshift, uint32_t lane_bytes, __half2 scale,
                                                Store store) {
  if constexpr (B > 0 && LS > 0) {
    expand_span_copies<D, B, LS>(row, c, lut_base, lane_bytes, scale, store);
  } else {
    expand_span_bits<D>(bits, row, c, lut, cshift, scale, store);
  }
}

// One tile of aligned planes (t0 a multiple of 8; the capacity a multiple of 8, so rounding the
// count up stays inside the allocation) with the index widths fixed: each thread issues at most
// a few 16-byte copies, all bounds compile-time but the tile's token count n (rounded up to 8).
// Sources are the tile's first 16-byte chunks of each plane; the stage offsets as in TileStage.
template <int KW, int VW, int kBN, int kThreads>
__device__ __forceinline__ void copy_tile_aligned(const uint4* ksrc, const uint4* vsrc,
                                                  const uint4* knsrc, const uint4* vnsrc,
                                                  unsigned char* stage, int st_vidx, int st_knorm,
                                                  int st_vnorm, int n, int tid) {
  constexpr int kK = kBN * KW / 4, kV = kBN * VW / 4, kN = kBN / 8;
  static_assert(kBN * KW % 4 == 0 && kBN * VW % 4 == 0, "whole 16-byte chunks per tile");
  uint4* kdst = reinterpret_cast<uint4*>(stage);
  uint4* vdst = reinterpret_cast<uint4*>(stage + st_vidx);
  uint4* kndst = reinterpret_cast<uint4*>(stage + st_knorm);
  uint4* vndst = reinterpret_cast<uint4*>(stage + st_vnorm);
#pragma unroll
  for (int i0 = 0; i0 < kK + kV + 2 * kN; i0 += kThreads) {
    const int i = i0 + tid;
    if (i < kK) {
      if (i < n * KW / 4) cp_async16(kdst + i, ksrc + i);
    } else if (i < kK + kV) {
      const int j = i - kK;
      if (j < n * VW / 4) cp_async16(vdst + j, vsrc + j);
    } else if (i < kK + kV + kN) {
      const int j = i - kK - kV;
      if (j < n / 8) cp_async16(kndst + j, knsrc + j);
    } else if (i < kK + kV + 2 * kN) {
      const int j = i - kK - kV - kN;
      if (j < n / 8) cp_async16(vndst + j, vnsrc + j);
    }
  }
}

template <int KW, int VW, int kBN, int kThreads>
__device__ __forceinline__ void load_tile_aligned(const AttnParams& p, unsigned char* stage,
                                                  int64_t khead, int64_t vhead, int64_t t0,
                                                  int64_t t1, int tid) {
  copy_tile_aligned<KW, VW, kBN, kThreads>(
      reinterpret_cast<const uint4*>(p.kidx + (khead + t0) * KW),
      reinterpret_cast<const uint4*>(p.vidx + (vhead + t0) * VW),
      reinterpret_cast<const uint4*>(p.knorm + khead + t0),
      reinterpret_cast<const uint4*>(p.vnorm + vhead + t0), stage, p.st_vidx, p.st_knorm,
      p.st_vnorm, static_cast<int>(((t1 - t0) + 7) & ~int64_t{7}), tid);
}

// A prefill block's work: split `split` of unit (sequence, KV head, row block rb), its flattened
// rows [f0, f0 + nrows) and token range [t_begin, t_end), and the range every row sees in full.
struct PrefillBlock {
  int split, rb, unit, units, kvh, f0, nrows, nsplit;
  int64_t b, len, pos0, t_begin, t_end, vis_lo, vis_hi;
};

// Row blocks of kBM rows, the longest (causal) rows first; splits of p.split_tokens tokens.
template <int kBM>
__device__ __forceinline__ PrefillBlock prefill_block(const AttnParams& p) {
  PrefillBlock k;
  k.split = blockIdx.x;
  k.rb = p.row_blocks - 1 - static_cast<int>(blockIdx.y);
  const int seq_head = blockIdx.z;
  k.units = p.row_blocks * gridDim.z;
  k.unit = seq_head * p.row_blocks + k.rb;
  k.kvh = seq_head % p.hkv;
  const int bl = seq_head / p.hkv;
  k.b = p.first_b + bl;
  k.len = p.lens[bl];
  k.f0 = k.rb * kBM;
  k.nrows = min(kBM, p.rows - k.f0);
  k.pos0 = p.causal_offset >= 0 ? p.causal_offset : k.len - p.qlen;
  const int l_lo = k.f0 / p.group, l_hi = (k.f0 + k.nrows - 1) / p.group;
  const int64_t lo = p.window > 0 ? max(int64_t{0}, k.pos0 + l_lo - p.window + 1) : 0;
  const int64_t hi = p.causal ? min(k.len, k.pos0 + l_hi + 1) : k.len;
  const int64_t lo_al = lo & ~int64_t{7};
  const int64_t range = hi > lo ? hi - lo_al : 0;
  k.nsplit = range > 0 ? static_cast<int>((range + p.split_tokens - 1) / p.split_tokens) : 1;
  k.t_begin = lo_al + int64_t{k.split} * p.split_tokens;
  k.t_end = range > 0 ? min(hi, k.t_begin + p.split_tokens) : k.t_begin;
  k.vis_lo = p.window > 0 ? k.pos0 + l_hi - p.window + 1 : 0;
  k.vis_hi = p.causal ? min(k.len, k.pos0 + l_lo + 1) : k.len;
  return k;
}

// A warp's fp32 scratch in the block's tile region: its rows [kRowsW][D], then max, sum and a
// factor per row (query staging before the loop, the epilogue after it).
template <int D, int kRowsW>
__device__ __forceinline__ float* prefill_warp_scratch(unsigned char* region, int warp) {
  return reinterpret_cast<float*>(region) + warp * (kRowsW * D + 4 * kRowsW);
}

// One tile's scores to P: row scale (and the QJL term), mask, online softmax. Updates the row
// maxima and sums, rescales o when a maximum grows, and packs P (fp16) as m16n8k16 A fragments.
// Norms are already in the tiles, so in the fast case (plain and every column visible to every
// row) a score is acc * rs and P = 2^(acc * rs - m): one FFMA and one EX2. A plain tile with some
// hidden columns (the causal diagonal, a window's edge, the range's end) takes a compact
// visibility-only select; only a mask or a soft-cap runs modify_score, whose unrolled code is
// ~40 KB and would run cold (i-cache misses) once per block on the diagonal tile.
template <int D, int kMT, int kBN, bool PROD>
__device__ __forceinline__ void prefill_softmax_tile(
    const AttnParams& p, float (&sacc)[kMT][kBN / 8][4],
    const float (&qacc)[PROD ? kMT : 1][PROD ? kBN / 8 : 1][4], bool plain, bool fast,
    const float (&rsq)[kMT][2], const float (&rsk)[kMT][2], const RowInfo (&ri)[kMT][2], int64_t t0,
    int nvalid, float (&mrow)[kMT][2], float (&lrow)[kMT][2], float (&o)[kMT][D / 8][4],
    uint32_t (&pa)[kMT][kBN / 16][4]) {
  const int c = threadIdx.x & 3;
  float scl[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) scl[mt][h] = (PROD || !fast) ? 1.0f : rsq[mt][h];
  if (fast) {
    if constexpr (PROD) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            sacc[mt][nt][e] = sacc[mt][nt][e] * rsq[mt][e >> 1] + qacc[mt][nt][e] * rsk[mt][e >> 1];
    }
  } else if (plain) {
    // Column nt * 8 + 2c + (e & 1) is visible to a row when its key position lies in
    // [ri.lo, min(ri.hi, t0 + nvalid)): relative to this thread's first column, one unsigned
    // compare per score. Positions fit in 32 bits (the host checks).
    const int base = static_cast<int>(t0) + 2 * c;
    uint32_t vis_lo[kMT][2], vis_span[kMT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lo = ri[mt][h].lo - base;
        const int hi = min(ri[mt][h].hi, static_cast<int>(t0) + nvalid) - base;
        vis_lo[mt][h] = static_cast<uint32_t>(lo);
        vis_span[mt][h] = hi > lo ? static_cast<uint32_t>(hi - lo) : 0u;
      }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1;
          float s = sacc[mt][nt][e] * rsq[mt][h];
          if constexpr (PROD) s += qacc[mt][nt][e] * rsk[mt][h];
          const uint32_t k = static_cast<uint32_t>(nt * 8 + (e & 1)) - vis_lo[mt][h];
          sacc[mt][nt][e] = k < vis_span[mt][h] ? s : -INFINITY;
        }
  } else {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1, col = nt * 8 + 2 * c + (e & 1);
          float s = sacc[mt][nt][e] * rsq[mt][h];
          if constexpr (PROD) s += qacc[mt][nt][e] * rsk[mt][h];
          sacc[mt][nt][e] = col < nvalid ? modify_score(p, s, t0 + col, ri[mt][h]) : -INFINITY;
        }
  }
  // Row maxima over this thread's columns. The running max is lazy: it moves (quad reduction,
  // rescale factors, rescale of o and l) only when some score exceeds it by more than
  // kLazyMaxSlack (log2 units), so after the first tiles it almost never does. Meanwhile P may
  // reach 2^kLazyMaxSlack, well inside fp16 for P and fp32 for the sums, at the same relative
  // precision.
  float mx[kMT][2];
  bool grows = false;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    mx[mt][0] = mx[mt][1] = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      mx[mt][0] = fmaxf(mx[mt][0], fmaxf(sacc[mt][nt][0], sacc[mt][nt][1]));
      mx[mt][1] = fmaxf(mx[mt][1], fmaxf(sacc[mt][nt][2], sacc[mt][nt][3]));
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) grows |= mx[mt][h] * scl[mt][h] > mrow[mt][h] + kLazyMaxSlack;
  }
  if (__any_sync(kFull, grows)) {
    float alpha[kMT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m = mx[mt][h];
        m = fmaxf(m, __shfl_xor_sync(kFull, m, 1));
        m = fmaxf(m, __shfl_xor_sync(kFull, m, 2));
        const float mn = fmaxf(mrow[mt][h], m * scl[mt][h]);
        alpha[mt][h] = fast_exp2(mrow[mt][h] - (mn == -INFINITY ? 0.0f : mn));
        mrow[mt][h] = mn;
      }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      lrow[mt][0] *= alpha[mt][0];
      lrow[mt][1] *= alpha[mt][1];
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        o[mt][nd][0] *= alpha[mt][0];
        o[mt][nd][1] *= alpha[mt][0];
        o[mt][nd][2] *= alpha[mt][1];
        o[mt][nd][3] *= alpha[mt][1];
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    const float ms0 = mrow[mt][0] == -INFINITY ? 0.0f : mrow[mt][0];
    const float ms1 = mrow[mt][1] == -INFINITY ? 0.0f : mrow[mt][1];
    const float k0 = scl[mt][0], k1 = scl[mt][1];
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      const float p0 = fast_exp2(fmaf(sacc[mt][nt][0], k0, -ms0));
      const float p1 = fast_exp2(fmaf(sacc[mt][nt][1], k0, -ms0));
      const float p2 = fast_exp2(fmaf(sacc[mt][nt][2], k1, -ms1));
      const float p3 = fast_exp2(fmaf(sacc[mt][nt][3], k1, -ms1));
      lrow[mt][0] += p0 + p1;
      lrow[mt][1] += p2 + p3;
      pa[mt][nt >> 1][(nt & 1) * 2] = pack_half2(p0, p1);
      pa[mt][nt >> 1][(nt & 1) * 2 + 1] = pack_half2(p2, p3);
    }
  }
}

// The split merge of a unit whose p.cluster splits are the blocks of one thread-block cluster:
// every block holds its rows' un-normalised output, max and sum in its warps' scratch (`scratch`,
// the layout of prefill_warp_scratch); block `rank` merges rows [r0, r1) of all blocks through
// distributed shared memory into `merged` (free shared memory, the Q tile: [r1 - r0][D] outputs,
// then maxima, sums and factors) and finishes them. Each warp merges kMergeRows rows at once, all
// blocks' values of a row in flight together. A block signals "done reading" before finishing its
// rows and waits for the others only before exiting, so its scratch stays alive while read.
template <int D, int kRowsW, int kBM>
__device__ void merge_prefill_cluster(const AttnParams& p, const PrefillBlock& blk,
                                      const float* scratch, float* merged) {
  namespace cg = cooperative_groups;
  constexpr int kPer = D / 32, kMergeRows = 4, kWarpFloats = kRowsW * D + 4 * kRowsW;
  cg::cluster_group cluster = cg::this_cluster();
  cluster_arrive_release();
  cluster_wait();
  const int cs = p.cluster, rank = static_cast<int>(cluster.block_rank());
  const int per = (kBM + cs - 1) / cs, r0 = min(kBM, rank * per), r1 = min(kBM, r0 + per);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, nwarps = blockDim.x >> 5;
  float* mo = merged;
  float* mm = mo + per * D;
  float* msum = mm + per;
  float* fac = msum + per;
  const float* remote[kMaxPrefillCluster];
#pragma unroll
  for (int q = 0; q < kMaxPrefillCluster; ++q)
    remote[q] = q < cs ? cluster.map_shared_rank(scratch, q) : scratch;
  auto row_base = [&](int r) { return (r / kRowsW) * kWarpFloats; };
  for (int rb = r0 + warp * kMergeRows; rb < r1; rb += nwarps * kMergeRows) {
    float mq[kMaxPrefillCluster][kMergeRows], mx[kMergeRows];
#pragma unroll
    for (int i = 0; i < kMergeRows; ++i) mx[i] = -INFINITY;
#pragma unroll
    for (int q = 0; q < kMaxPrefillCluster; ++q)
#pragma unroll
      for (int i = 0; i < kMergeRows; ++i) {
        const int r = min(rb + i, r1 - 1);
        mq[q][i] = q < cs ? remote[q][row_base(r) + kRowsW * D + r % kRowsW] : -INFINITY;
        mx[i] = fmaxf(mx[i], mq[q][i]);
      }
    float acc[kMergeRows][kPer], sum[kMergeRows];
#pragma unroll
    for (int i = 0; i < kMergeRows; ++i) {
      sum[i] = 0.0f;
#pragma unroll
      for (int k = 0; k < kPer; ++k) acc[i][k] = 0.0f;
    }
#pragma unroll
    for (int q = 0; q < kMaxPrefillCluster; ++q) {
      if (q >= cs) break;
#pragma unroll
      for (int i = 0; i < kMergeRows; ++i) {
        const int r = min(rb + i, r1 - 1);
        const float* src = remote[q] + row_base(r);
        const float wt = fast_exp2(mq[q][i] - (mx[i] == -INFINITY ? 0.0f : mx[i]));
        sum[i] += wt * src[kRowsW * D + kRowsW + r % kRowsW];
#pragma unroll
        for (int k = 0; k < kPer; ++k) acc[i][k] += wt * src[(r % kRowsW) * D + lane + 32 * k];
      }
    }
#pragma unroll
    for (int i = 0; i < kMergeRows; ++i) {
      const int r = rb + i - r0;
      if (rb + i >= r1) continue;
#pragma unroll
      for (int k = 0; k < kPer; ++k) mo[r * D + lane + 32 * k] = acc[i][k];
      if (lane == 0) {
        mm[r] = mx[i];
        msum[r] = sum[i];
      }
    }
  }
  // Relaxed is enough: every remote value read above was consumed before this point.
  cluster_arrive_relaxed();
  __syncthreads();
  finalize_rows<D, kMergeRows>(p, mo, mm, msum, fac, r1 - r0, blk.f0 + r0, blk.b, blk.kvh,
                               BlockGroup{});
  cluster_wait();
}

// Epilogue: row sums over the quad, then each warp finishes its rows through its scratch in the
// tile region (which it takes over after the last copies land): directly when the unit has one
// split; through distributed shared memory when the unit's splits form a cluster
// (merge_prefill_cluster); else every block stores its partial, waits for the unit's other splits
// and merges and finishes a share of the rows, with `merge_weights` (the Q tile, free by then)
// holding the split weights.
template <int D, int kMT, int kRowsW, int kBM>
__device__ __forceinline__ void finish_prefill_block(const AttnParams& p, const PrefillBlock& blk,
                                                     float (&o)[kMT][D / 8][4],
                                                     float (&mrow)[kMT][2], float (&lrow)[kMT][2],
                                                     unsigned char* region, float* merge_weights) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int wr0 = warp * kRowsW;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      lrow[mt][h] += __shfl_xor_sync(kFull, lrow[mt][h], 1);
      lrow[mt][h] += __shfl_xor_sync(kFull, lrow[mt][h], 2);
    }
  cp_async_wait<0>();
  __syncthreads();  // tiles and stages become scratch
  float* scratch = prefill_warp_scratch<D, kRowsW>(region, warp);
  float* fm = scratch + kRowsW * D;
  float* fl = fm + kRowsW;
  float* fac = fl + kRowsW;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    const int r0 = mt * 16 + g, r1 = r0 + 8;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      const int d = nd * 8 + 2 * c;
      scratch[r0 * D + d] = o[mt][nd][0];
      scratch[r0 * D + d + 1] = o[mt][nd][1];
      scratch[r1 * D + d] = o[mt][nd][2];
      scratch[r1 * D + d + 1] = o[mt][nd][3];
    }
    if (c == 0) {
      fm[r0] = mrow[mt][0];
      fm[r1] = mrow[mt][1];
      fl[r0] = lrow[mt][0];
      fl[r1] = lrow[mt][1];
    }
  }
  __syncwarp();
  if (p.cluster > 1) {
    merge_prefill_cluster<D, kRowsW, kBM>(p, blk, reinterpret_cast<const float*>(region),
                                          merge_weights);
    return;
  }
  if (blk.nsplit == 1) {
    finalize_rows<D, 4>(p, scratch, fm, fl, fac, kRowsW, blk.f0 + wr0, blk.b, blk.kvh, WarpGroup{});
    return;
  }
  store_partial<D>(p, scratch, fm, fl, kRowsW,
                   (int64_t{blk.split} * blk.units + blk.unit) * kBM + wr0, WarpGroup{});
  // Every split of the unit then merges and finishes a share of the unit's rows, rather than the
  // last to arrive merging them all: the host splits only grids that are resident at once (at
  // most one block per SM slot), so each block waits for the others' arrival. Counters: arrivals,
  // then blocks done reading; the last done resets both for the next call. The block barrier
  // then thread 0's cumulative GPU-scope release publish every thread's partial stores (no
  // thread-wide fences: each is a MEMBAR.SC.GPU per warp); its acquire loads cover the others'.
  __syncthreads();
  int* arrived = p.counters + 2 * blk.unit;
  if (tid == 0) {
    atomic_add_acq_rel(arrived, 1);
    while (load_acquire(arrived) < blk.nsplit) __nanosleep(32);
  }
  __syncthreads();
  const int per = (kBM + blk.nsplit - 1) / blk.nsplit;
  const int r0 = min(kBM, blk.split * per), r1 = min(kBM, r0 + per);
  float* mo = reinterpret_cast<float*>(region);  // [per][D], then maxima, sums, factors
  float* mm = mo + per * D;
  float* msum = mm + per;
  float* mfac = msum + per;
  merge_partials<D>(p, merge_weights, r1 - r0, kBM, r0, blk.unit, blk.units, blk.nsplit, mo, mm,
                    msum);
  if (tid == 0 && atomicAdd(arrived + 1, 1) == blk.nsplit - 1) {
    atomicExch(arrived, 0);
    atomicExch(arrived + 1, 0);
  }
  finalize_rows<D, 4>(p, mo, mm, msum, mfac, r1 - r0, blk.f0 + r0, blk.b, blk.kvh, BlockGroup{});
}

// KB, VB: key / value index widths, LS: log2 of the code tables' copies per entry; all > 0 for a
// specialised kernel (MSE keys), all 0 to read them from the params.
template <int D, bool PROD, int KB, int VB, int LS>
__global__ void __launch_bounds__(prefill_warps(D) * 32, 2)
    prefill_kernel(const __grid_constant__ AttnParams p) {
  static_assert((KB > 0) == (VB > 0) && (KB > 0) == (LS > 0) && !(PROD && KB > 0),
                "widths and copies all fixed (MSE keys) or all from the params");
  constexpr int kKW = KB > 0 ? static_cast<int>(::tqattn::packed_words(D, KB)) : 0;
  constexpr int kVW = VB > 0 ? static_cast<int>(::tqattn::packed_words(D, VB)) : 0;
  const int kwords = KB > 0 ? kKW : p.kwords;
  const int vwords = VB > 0 ? kVW : p.vwords;
  using Sh = PrefillShape<D>;
  constexpr int kMT = Sh::kMT, kBM = Sh::kBM, kBN = Sh::kBN, kLd = Sh::kLd, kRowsW = Sh::kRowsW;
  constexpr int kThreads = prefill_warps(D) * 32;
  constexpr int kSignShift = kPrefillLutCopies == 8 ? 3 : 2;
  static_assert(kPrefillLutCopies == 8 || kPrefillLutCopies == 4, "sign table copies");
  static_assert((kBN & (kBN - 1)) == 0, "tile tokens are a power of two");
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2;
  const PrefillBlock blk = prefill_block<kBM>(p);
  if (blk.split >= blk.nsplit) return;
  const int64_t b = blk.b, t_begin = blk.t_begin, t_end = blk.t_end;
  const int kvh = blk.kvh, f0 = blk.f0;
  const bool plain = p.mask == nullptr && p.softcap == 0.0f;

  __half* qs = reinterpret_cast<__half*>(smem + p.off_q);
  __half* sqs = reinterpret_cast<__half*>(smem + p.off_sq);
  float* rs = reinterpret_cast<float*>(smem + p.off_rs);  // [kBM] q scales, then [kBM] S q
  uint32_t* klut = reinterpret_cast<uint32_t*>(smem + p.off_klut);
  uint32_t* vlut = reinterpret_cast<uint32_t*>(smem + p.off_vlut);
  uint32_t* slut = reinterpret_cast<uint32_t*>(smem + p.off_slut);
  unsigned char* region = smem + p.off_f;  // tiles + stages during the loop, scratch otherwise
  // Tile buffer i: K at region + i * kBufBytes, then V, then the Prod signs.
  constexpr int kBufs = prefill_tile_bufs(D), kStages = kPrefillStages;
  constexpr int kBufBytes = prefill_tile_buf_bytes(D, PROD);
  unsigned char* stages = region + p.off_stage;
  float* scratch = prefill_warp_scratch<D, kRowsW>(region, warp);

  const int wr0 = warp * kRowsW;  // this warp's first block row
  // The code tables depend only on the codec: built before waiting for the previous kernel in the
  // stream (programmatic dependent launch, as in decode).
  build_lut_copies(klut, p.kcent, p.kbits, p.lut_shift, tid, kThreads);
  build_lut_copies(vlut, p.vcent, p.vbits, p.lut_shift, tid, kThreads);
  if constexpr (PROD) build_sign_lut<kPrefillLutCopies>(slut, tid, kThreads);
  prefetch_dense_rotations<D>(p, tid, kThreads);
  grid_dependency_wait();
  grid_dependents_launch();
  // Queries: each warp rotates its own rows through its scratch.
  warp_load_queries<D>(p, scratch, kRowsW, f0 + wr0, b, kvh, lane);
  if constexpr (PROD)
    warp_rotate_rows<D, 4>(p, scratch, kRowsW, true, sqs + wr0 * kLd, kLd, rs + kBM + wr0, lane);
  warp_rotate_rows<D, 4>(p, scratch, kRowsW, false, qs + wr0 * kLd, kLd, rs + wr0, lane);
  // This lane's copy of each table entry: entry << lut_shift from a lane-offset base.
  const int cshift = LS > 0 ? LS : p.lut_shift;
  const uint32_t lane_bytes = static_cast<uint32_t>(lane & ((1 << cshift) - 1)) << 2;
  const unsigned char* klut_b = smem + p.off_klut;
  const unsigned char* vlut_b = smem + p.off_vlut;
  const uint32_t* klut_l = klut + (lane & ((1 << cshift) - 1));
  const uint32_t* vlut_l = vlut + (lane & ((1 << cshift) - 1));
  const uint32_t* slut_l = slut + (lane & (kPrefillLutCopies - 1));
  __syncthreads();  // scratch is about to become tiles and stages

  const int64_t khead = (b * p.hkv + kvh) * p.kcap;
  const int64_t vhead = (b * p.hkv + kvh) * p.vcap;
  const int ntiles = static_cast<int>((t_end - t_begin + kBN - 1) / kBN);
  // Copies tile t's packed planes into stage slot `slot`.
  auto load_tile = [&](int slot, int t) {
    const int64_t t0 = t_begin + int64_t{t} * kBN, t1 = min(t_end, t0 + kBN);
    unsigned char* stage = stages + slot * p.stage_bytes;
    if constexpr (KB > 0) {
      if (p.aligned) {
        load_tile_aligned<kKW, kVW, kBN, kThreads>(p, stage, khead, vhead, t0, t1, tid);
        return;
      }
    }
    load_stage<PROD>(p, stage, khead, vhead, t0, t1, tid, kThreads);
  };
  for (int st = 0; st < kStages; ++st) {
    if (st < ntiles) load_tile(st, st);
    cp_async_commit();
  }

  RowInfo ri[kMT][2];
  float rsq[kMT][2], rsk[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int br = wr0 + mt * 16 + g + 8 * h;
      ri[mt][h] = row_info(p, f0 + br, b, kvh, blk.len, blk.pos0);
      rsq[mt][h] = rs[br];
      rsk[mt][h] = PROD ? rs[kBM + br] * p.qjl_scale : 0.0f;
    }

  float o[kMT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
      o[mt][nd][0] = o[mt][nd][1] = o[mt][nd][2] = o[mt][nd][3] = 0.0f;
  float mrow[kMT][2], lrow[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
    mrow[mt][0] = mrow[mt][1] = -INFINITY, lrow[mt][0] = lrow[mt][1] = 0.0f;

  // Expands tile t (packed in stage t % kStages) into tile buffer t % kBufs: K and V codes times
  // their token norms (zero past the valid range), the Prod signs times norm * residual norm.
  auto expand_tile = [&](int t) {
    const int64_t tt0 = t_begin + int64_t{t} * kBN;
    const int nv = static_cast<int>(min(int64_t{kBN}, t_end - tt0));
    __half* kd = reinterpret_cast<__half*>(region + (t % kBufs) * kBufBytes);
    __half* vd = kd + kBN * kLd;
    __half* sd = vd + kBN * kLd;
    const unsigned char* stage = stages + (t % kStages) * p.stage_bytes;
    const uint32_t* kidx = reinterpret_cast<const uint32_t*>(stage);
    const uint32_t* vidx = reinterpret_cast<const uint32_t*>(stage + p.st_vidx);
    const uint16_t* knorm = reinterpret_cast<const uint16_t*>(stage + p.st_knorm);
    const uint16_t* vnorm = reinterpret_cast<const uint16_t*>(stage + p.st_vnorm);
    const uint16_t* kres = reinterpret_cast<const uint16_t*>(stage + p.st_kres);
    // Tasks: (plane, token, span); K tasks first, then V (8 warps: one task per thread).
    for (int task = tid; task < 2 * kBN * 4; task += kThreads) {
      const bool is_v = task >= kBN * 4;
      const int tt = (task >> 2) & (kBN - 1), cc = task & 3;
      const bool valid = tt < nv;
      if (is_v) {
        const __half vh = valid ? __ushort_as_half(vnorm[tt]) : __float2half(0.0f);
        expand_span_for<D, VB, LS>(p.vbits, vidx + tt * vwords, cc, vlut_l, vlut_b, cshift,
                                   lane_bytes, __half2half2(vh), row_store<D>(vd + tt * kLd, cc));
      } else {
        const __half kh = valid ? __ushort_as_half(knorm[tt]) : __float2half(0.0f);
        expand_span_for<D, KB, LS>(p.kbits, kidx + tt * kwords, cc, klut_l, klut_b, cshift,
                                   lane_bytes, __half2half2(kh), row_store<D>(kd + tt * kLd, cc));
        if constexpr (PROD) {
          const uint32_t* ksign = reinterpret_cast<const uint32_t*>(stage + p.st_ksign);
          const float kg =
              valid ? half_bits_to_float(knorm[tt]) * half_bits_to_float(kres[tt]) : 0.0f;
          expand_span<D, 1>(ksign + tt * p.swords, cc, slut_l, kSignShift, __float2half2_rn(kg),
                            row_store<D>(sd + tt * kLd, cc));
        }
      }
    }
  };
  if (ntiles > 0) {
    cp_async_wait<kStages - 1>();
    __syncthreads();  // tile 0's packed bytes landed
    expand_tile(0);
  }

  // One barrier per tile: after it, tile `it` is expanded (buffer it % kBufs), tile it + 1's
  // packed bytes have landed and every warp is done with tile it - 1, so this iteration expands
  // tile it + 1 into the other buffer while multiplying tile `it`, and refills the stage that
  // tile `it` came from. (With one buffer, expansion waits for a second barrier after the MMAs.)
  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages < ntiles) load_tile(it % kStages, it + kStages);
    cp_async_commit();
    if constexpr (kBufs == 2) {
      if (it + 1 < ntiles) expand_tile(it + 1);
    }
    const int64_t t0 = t_begin + int64_t{it} * kBN;
    const int nvalid = static_cast<int>(min(int64_t{kBN}, t_end - t0));
    const __half* ks = reinterpret_cast<const __half*>(region + (it % kBufs) * kBufBytes);
    const __half* vs = ks + kBN * kLd;
    const __half* ss = vs + kBN * kLd;  // Prod signs

    // S = Q K^T (and the QJL scores).
    float sacc[kMT][kBN / 8][4];
    float qacc[PROD ? kMT : 1][PROD ? kBN / 8 : 1][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        sacc[mt][nt][0] = sacc[mt][nt][1] = sacc[mt][nt][2] = sacc[mt][nt][3] = 0.0f;
        if constexpr (PROD)
          qacc[mt][nt][0] = qacc[mt][nt][1] = qacc[mt][nt][2] = qacc[mt][nt][3] = 0.0f;
      }
#pragma unroll
    for (int pass = 0; pass < (PROD ? 2 : 1); ++pass) {
      const __half* qsrc = pass == 0 ? qs : sqs;
      const __half* ksrc = pass == 0 ? ks : ss;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
          ldmatrix_x4(qa[mt],
                      qsrc + (wr0 + mt * 16 + (lane & 15)) * kLd + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < kBN / 16; ++np) {
          uint32_t kb[4];
          ldmatrix_x4(kb, ksrc + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * kLd + kk * 16 +
                              ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            if (pass == 0) {
              mma_16816(sacc[mt][2 * np], qa[mt], kb[0], kb[1]);
              mma_16816(sacc[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
            } else if constexpr (PROD) {
              mma_16816(qacc[mt][2 * np], qa[mt], kb[0], kb[1]);
              mma_16816(qacc[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
            }
          }
        }
      }
    }

    const bool fast = plain && t0 >= blk.vis_lo && t0 + kBN <= blk.vis_hi && t0 + kBN <= t_end;
    uint32_t pa[kMT][kBN / 16][4];
    prefill_softmax_tile<D, kMT, kBN, PROD>(p, sacc, qacc, plain, fast, rsq, rsk, ri, t0, nvalid,
                                            mrow, lrow, o, pa);
    // O += P' V.
#pragma unroll
    for (int kt = 0; kt < kBN / 16; ++kt) {
#pragma unroll
      for (int nd2 = 0; nd2 < D / 16; ++nd2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, vs + (kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + nd2 * 16 +
                                  (lane >> 4) * 8);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816(o[mt][2 * nd2], pa[mt][kt], vb[0], vb[1]);
          mma_16816(o[mt][2 * nd2 + 1], pa[mt][kt], vb[2], vb[3]);
        }
      }
    }
    if constexpr (kBufs == 1) {
      if (it + 1 < ntiles) {
        __syncthreads();  // every warp is done with the buffer
        expand_tile(it + 1);
      }
    }
  }

  // The Q tile is free by the merge: it holds the split weights.
  finish_prefill_block<D, kMT, kRowsW, kBM>(p, blk, o, mrow, lrow, region,
                                            reinterpret_cast<float*>(qs));
}

template <int D, bool PROD, int KB, int VB, int LS>
void launch_prefill_kernel(const AttnParams& p, dim3 grid, size_t smem, cudaStream_t stream) {
  launch_attention_kernel<prefill_kernel<D, PROD, KB, VB, LS>>(grid, prefill_warps(D) * 32, smem,
                                                               stream, dim3(1, 1, 1), p);
}

// The same specialised (key, value) widths as decode, with the table copies the host chose (8, or
// 4 to keep two blocks per SM).
template <int D>
void launch_prefill_widths(const AttnParams& p, bool prod, dim3 grid, size_t smem,
                           cudaStream_t stream) {
  if (prod) return launch_prefill_kernel<D, true, 0, 0, 0>(p, grid, smem, stream);
  with_specialized_widths(p.kbits, p.vbits, [&](auto kb, auto vb) {
    constexpr int kKB = decltype(kb)::value, kVB = decltype(vb)::value;
    if constexpr (kKB == 0) {
      launch_prefill_kernel<D, false, 0, 0, 0>(p, grid, smem, stream);
    } else if (p.lut_shift == 2) {
      launch_prefill_kernel<D, false, kKB, kVB, 2>(p, grid, smem, stream);
    } else if (p.lut_shift == 3) {
      launch_prefill_kernel<D, false, kKB, kVB, 3>(p, grid, smem, stream);
    } else {
      throw_runtime("scaled_dot_product_attention",
                    "prefill code tables: 4 or 8 copies per entry are supported, got 2^",
                    p.lut_shift);
    }
  });
}

template <int D, bool PROD>
int prefill_kernel_occupancy(size_t smem) {
  int blocks = 0;
  TQATTN_CUDA("scaled_dot_product_attention",
              cudaFuncSetAttribute(prefill_kernel<D, PROD, 0, 0, 0>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
  TQATTN_CUDA("scaled_dot_product_attention",
              cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                  &blocks, prefill_kernel<D, PROD, 0, 0, 0>, prefill_warps(D) * 32, smem));
  return blocks;
}

}  // namespace tqattn::cuda::attn

#define TQATTN_INSTANTIATE_PREFILL(D)                                            \
  namespace tqattn::cuda {                                                       \
  template <>                                                                    \
  void launch_prefill<D>(const AttnParams& p, bool prod, dim3 grid, size_t smem, \
                         cudaStream_t stream) {                                  \
    attn::launch_prefill_widths<D>(p, prod, grid, smem, stream);                 \
  }                                                                              \
  template <>                                                                    \
  int prefill_occupancy<D>(bool prod, size_t smem) {                             \
    return prod ? attn::prefill_kernel_occupancy<D, true>(smem)                  \
                : attn::prefill_kernel_occupancy<D, false>(smem);                \
  }                                                                              \
  }

// Pieces every decode kernel shares: which slice of the work a block owns, the query row each of
// the first kDecodeRows warps prepares, the merge of the block's warps, and the merge of a unit's
// splits (thread-block cluster or workspace partials) that ends with the normalised, un-rotated
// output.
#pragma once

#include <cooperative_groups.h>

#include "cuda/attention_common.cuh"

namespace tqattn::cuda::attn {

// One decode block's work: unit = (sequence, KV head, row block) = blockIdx.x, split = blockIdx.y.
struct DecodeSlice {
  int unit, units, split, nsplit;
  int kvh, f0;
  int64_t b, len, pos0;
  int64_t t_begin, t_end;  // this split's tokens (t_begin is a multiple of 8)
  int64_t vis_lo, vis_hi;  // tokens every row of the block sees
  bool active;             // false: past the unit's splits and not in a cluster (nothing to do)
};

// The unit's query rows this block serves (at most kDecodeRows), recomputed where needed rather
// than kept in DecodeSlice: a field would stay live across the decode loops, at the register cap.
__device__ __forceinline__ int slice_rows(const AttnParams& p, int f0) {
  return min(kDecodeRows, p.rows - f0);
}

__device__ __forceinline__ DecodeSlice decode_slice(const AttnParams& p) {
  constexpr int kR = kDecodeRows;
  DecodeSlice s;
  s.unit = blockIdx.x;
  s.units = gridDim.x;
  s.split = blockIdx.y;
  const int rb = s.unit % p.row_blocks, seq_head = s.unit / p.row_blocks;
  s.kvh = seq_head % p.hkv;
  const int bl = seq_head / p.hkv;
  s.b = p.first_b + bl;
  s.len = p.lens[bl];
  s.f0 = rb * kR;
  const int nrows = slice_rows(p, s.f0);
  s.pos0 = p.causal_offset >= 0 ? p.causal_offset : s.len - p.qlen;
  const int l_lo = s.f0 / p.group, l_hi = (s.f0 + nrows - 1) / p.group;
  // Union of the rows' visible ranges (rows are ordered by position).
  const int64_t lo = p.window > 0 ? max(int64_t{0}, s.pos0 + l_lo - p.window + 1) : 0;
  const int64_t hi = p.causal ? min(s.len, s.pos0 + l_hi + 1) : s.len;
  const int64_t lo_al = lo & ~int64_t{7};
  const int64_t range = hi > lo ? hi - lo_al : 0;
  s.nsplit = range > 0 ? static_cast<int>((range + p.split_tokens - 1) / p.split_tokens) : 1;
  // A cluster's blocks all take part in its merge, those past this unit's splits with no tokens.
  s.active = s.split < s.nsplit || p.cluster > 1;
  s.t_begin = lo_al + int64_t{s.split} * p.split_tokens;
  s.t_end = range > 0 && s.split < s.nsplit ? min(hi, s.t_begin + p.split_tokens) : s.t_begin;
  s.vis_lo = p.window > 0 ? s.pos0 + l_hi - p.window + 1 : 0;
  s.vis_hi = p.causal ? min(s.len, s.pos0 + l_lo + 1) : s.len;
  return s;
}

// Query row f of (b, kvh) times q_factor, dims lane + 32 k (zero past the rows).
template <int D>
__device__ __forceinline__ void load_query_row(const AttnParams& p, int f, int64_t b, int kvh,
                                               int lane, float (&q)[D / 32]) {
  if (f < p.rows) {
    const int hq = kvh * p.group + f % p.group, l = f / p.group;
    const int64_t src = ((b * p.hq + hq) * p.qlen + l) * D;
#pragma unroll
    for (int k = 0; k < D / 32; ++k)
      q[k] = load_as_float(p.q, src + lane + 32 * k, p.qdtype) * p.q_factor;
  } else {
#pragma unroll
    for (int k = 0; k < D / 32; ++k) q[k] = 0.0f;
  }
}

// Whether rotate_query_row can rotate in registers (power-of-two D, MSE keys, a Hadamard
// rotation), and then this lane's Hadamard signs of dims lane + 32 k in qsign (ones otherwise).
// Codec data: load it with the tables, before the dependency wait, so that rotating the query
// after its own load is not a second serial round trip.
template <int D, bool PROD>
__device__ __forceinline__ bool load_query_signs(const AttnParams& p, int lane,
                                                 float (&qsign)[D / 32]) {
  const bool presign = (D & (D - 1)) == 0 && !PROD && p.khad;
#pragma unroll
  for (int k = 0; k < D / 32; ++k) qsign[k] = presign ? p.ksigns[lane + 32 * k] : 1.0f;
  return presign;
}

// Rotates one warp's query row with the keys' rotation into fp16 `qh_row` and its power-of-two
// scale into *rs_row (for Prod keys also S q into sqh_row, *srs_row). `qsign` holds the Hadamard
// signs of dims lane + 32 k when `presign` (power-of-two D, MSE keys): the rotation then runs in
// registers; otherwise through the fp32 scratch row `x` (a dense rotation from `kmat_staged` in
// shared memory when not null).
template <int D, bool PROD>
__device__ __forceinline__ void rotate_query_row(const AttnParams& p, float (&qreg)[D / 32],
                                                 const float (&qsign)[D / 32], bool presign,
                                                 float* x, __half* qh_row, float* rs_row,
                                                 __half* sqh_row, float* srs_row, int lane,
                                                 const float* kmat_staged = nullptr) {
  if constexpr ((D & (D - 1)) == 0) {
    if (presign) {
#pragma unroll
      for (int k = 0; k < D / 32; ++k) qreg[k] *= qsign[k];
      warp_hadamard_row_to_half<D>(p, qreg, qh_row, rs_row, lane);
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < D / 32; ++k) x[lane + 32 * k] = qreg[k];
  __syncwarp();
  if constexpr (PROD) warp_rotate_rows<D, 1>(p, x, 1, true, sqh_row, D, srs_row, lane);
  warp_rotate_rows<D, 1>(p, x, 1, false, qh_row, D, rs_row, lane, kmat_staged);
}

// S[16 tok x 8 rows] += K Q^T for one 16-token group (rows r0 = g, r1 = g + 8 of the group: K's A
// fragment), Q^T's B fragments resident: thread column c owns the contiguous quarter of every
// token's dims, so each A register is code pair j of one token's span, looked up by pair(w, j).
template <int D, int B, class Pair>
__device__ __forceinline__ void key_scores_pairs(const uint32_t* row0, const uint32_t* row1, int c,
                                                 const uint32_t (&qb)[D / 16][2], float (&acc)[4],
                                                 Pair pair) {
  uint32_t w0[Span<D, B>::kWords], w1[Span<D, B>::kWords];
  load_span<D, B>(row0, c, w0);
  load_span<D, B>(row1, c, w1);
  float odd[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // a second chain halves the mma dependency depth
#pragma unroll
  for (int s = 0; s < D / 16; ++s) {
    uint32_t a[4];
    a[0] = pair(w0, 2 * s);
    a[1] = pair(w1, 2 * s);
    a[2] = pair(w0, 2 * s + 1);
    a[3] = pair(w1, 2 * s + 1);
    if (s & 1) {
      mma_16816(odd, a, qb[s][0], qb[s][1]);
    } else {
      mma_16816(acc, a, qb[s][0], qb[s][1]);
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) acc[k] += odd[k];
}

// One online-softmax step for a thread's score columns (query rows 2c and 2c + 1 of a decode
// fragment): mx0 / mx1 are its largest new scores of each row. A row max can grow only where a
// score exceeds it, so one vote decides whether the reduction over the warp's lanes of equal c
// (three shuffle levels) and the rescale of the sums and outputs run at all; the results are the
// same as always running them.
template <int kKS>
__device__ __forceinline__ void raise_row_max(float mx0, float mx1, float& m0, float& m1, float& l0,
                                              float& l1, float (&o)[kKS][4]) {
  if (!__any_sync(kFull, mx0 > m0 || mx1 > m1)) return;
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(kFull, mx0, off));
    mx1 = fmaxf(mx1, __shfl_xor_sync(kFull, mx1, off));
  }
  const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
  const float a0 = fast_exp2(m0 - (mn0 == -INFINITY ? 0.0f : mn0));
  const float a1 = fast_exp2(m1 - (mn1 == -INFINITY ? 0.0f : mn1));
  l0 *= a0;
  l1 *= a1;
#pragma unroll
  for (int i = 0; i < kKS; ++i) {
    o[i][0] *= a0;
    o[i][1] *= a1;
    o[i][2] *= a0;
    o[i][3] *= a1;
  }
  m0 = mn0;
  m1 = mn1;
}

// Merges the block's kW warps, each holding its tokens' un-normalised O^T fragments o[D/16][4]
// (columns 2c, 2c + 1 of each fragment are query rows 2c, 2c + 1) with row max m0 / m1 and
// thread-partial sums l0 / l1, into rows [0, nrows) of fo [kR][D], fm, fl (the rest are not
// written: rows past the unit's query rows are never read). `scratch` holds the warps' fragments in
// fragment order [warp][i][k][lane] (decode_warp_merge_bytes); row_dim_of(f, r, d) gives the
// (row, dim) of fragment element f = (i * 4 + k) * 32 + lane. Both the stores and the reads walk
// the fragment order, so neither has bank conflicts (reading by (row, dim) put 16 lanes on a bank).
// Call with every thread of the block, after its last read of `scratch`.
template <int D, int kW, class RowDimOf>
__device__ __forceinline__ void merge_decode_warps(const float (&o)[D / 16][4], float m0, float m1,
                                                   float l0, float l1, unsigned char* scratch,
                                                   float* fo, float* fm, float* fl,
                                                   RowDimOf row_dim_of, int nrows) {
  constexpr int kR = kDecodeRows, kKS = D / 16, kFrag = kKS * 4 * 32;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  // Row sums over the warp's tokens (lanes of equal c hold the same rows).
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l0 += __shfl_xor_sync(kFull, l0, off);
    l1 += __shfl_xor_sync(kFull, l1, off);
  }
  float* wm = reinterpret_cast<float*>(scratch);
  float* wl = wm + kW * kR;
  float* wo = wl + kW * kR;
  if (g == 0) {
    wm[warp * kR + 2 * c] = m0;
    wm[warp * kR + 2 * c + 1] = m1;
    wl[warp * kR + 2 * c] = l0;
    wl[warp * kR + 2 * c + 1] = l1;
  }
#pragma unroll
  for (int i = 0; i < kKS; ++i)
#pragma unroll
    for (int k = 0; k < 4; ++k) wo[warp * kFrag + (i * 4 + k) * 32 + lane] = o[i][k];
  __syncthreads();
  // Every thread weighs its element's row itself (kW exponentials, all independent) rather than
  // waiting at a second barrier for kR threads to walk the warps in a serial chain.
  auto row_max = [&](int r) {
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kW; ++w) mx = fmaxf(mx, wm[w * kR + r]);
    return mx;
  };
  if (tid < nrows) {
    const int r = tid;
    const float mx = row_max(r), ms = mx == -INFINITY ? 0.0f : mx;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kW; ++w) sum += fast_exp2(wm[w * kR + r] - ms) * wl[w * kR + r];
    fm[r] = mx;
    fl[r] = sum;
  }
  for (int f = tid; f < kFrag; f += kW * 32) {
    int r, d;
    row_dim_of(f, r, d);
    if (r >= nrows) continue;
    const float mx = row_max(r), ms = mx == -INFINITY ? 0.0f : mx;
    float acc = 0.0f;
#pragma unroll
    for (int w = 0; w < kW; ++w) acc += fast_exp2(wm[w * kR + r] - ms) * wo[w * kFrag + f];
    fo[r * D + d] = acc;
  }
  __syncthreads();
}

// Finishes a block's rows fo [kR][D] (un-normalised, the block's max fm and sum fl): with one
// split, normalises, un-rotates and stores them; otherwise merges the unit's splits in split order
// (deterministic) through the thread-block cluster's distributed shared memory (p.cluster > 1) or
// the workspace partials (the unit's last block to arrive merges), then finishes the rows.
// Only the unit's query rows (at most kR) are merged and finished. `fx` [kR][D] and `scratch` are
// free shared memory (scratch: at least 2 kR + kR * nsplit floats). `rot`: free shared memory to
// stage the values' dense rotation in (D x D fp32, p.off_rot), or null to read it from global
// memory.
template <int D>
__device__ void finish_decode_slice(const AttnParams& p, const DecodeSlice& s, float* fo, float* fm,
                                    float* fl, float* fac, float* fx, unsigned char* scratch,
                                    int* flag, float* rot = nullptr) {
  constexpr int kR = kDecodeRows;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nrows = slice_rows(p, s.f0);
  // A block that will finish rows copies the rotation as soon as it knows: the copy overlaps the
  // merge.
  auto stage_value_rotation = [&] {
    if (rot != nullptr) stage_rotation<D>(rot, p.vmat, tid, blockDim.x);
  };
  if (p.cluster > 1 || s.nsplit <= 1) stage_value_rotation();
  // The rows this block finishes (one finalize_rows site: the tail's code stays small, see
  // docs/perf.md on instruction-cache stalls).
  float* xo = fo;
  float* xm = fm;
  float* xl = fl;
  int xr0 = 0, xrows = nrows;
  namespace cg = cooperative_groups;
  if (p.cluster > 1) {
    // The unit's splits are the blocks of one cluster: block `rank` merges rows [r0, r1) of
    // every block's fo / fm / fl, then finishes them. A block signals "done reading" before
    // finishing its rows and waits for the others' signal only before exiting, so its rows stay
    // alive until read.
    cg::cluster_group cluster = cg::this_cluster();
    cluster_arrive_release();
    cluster_wait();
    const int cs = static_cast<int>(cluster.num_blocks());
    const int rank = static_cast<int>(cluster.block_rank());
    const int per = (nrows + cs - 1) / cs, r0 = min(nrows, rank * per), r1 = min(nrows, r0 + per);
    xo = fx;
    xm = reinterpret_cast<float*>(scratch);
    xl = xm + kR;
    if (warp < r1 - r0) {
      const int r = r0 + warp;
      float mx = -INFINITY;
      for (int q = 0; q < cs; ++q) mx = fmaxf(mx, cluster.map_shared_rank(fm, q)[r]);
      const float ms = mx == -INFINITY ? 0.0f : mx;
      float acc[D / 32], sum = 0.0f;
#pragma unroll
      for (int k = 0; k < D / 32; ++k) acc[k] = 0.0f;
      for (int q = 0; q < cs; ++q) {
        const float wt = fast_exp2(cluster.map_shared_rank(fm, q)[r] - ms);
        sum += wt * cluster.map_shared_rank(fl, q)[r];
        const float* src = cluster.map_shared_rank(fo, q) + r * D;
#pragma unroll
        for (int k = 0; k < D / 32; ++k) acc[k] += wt * src[lane + 32 * k];
      }
#pragma unroll
      for (int k = 0; k < D / 32; ++k) xo[r * D + lane + 32 * k] = acc[k];
      if (lane == 0) {
        xm[r] = mx;
        xl[r] = sum;
      }
    }
    // Relaxed is enough: every remote value read above was consumed before this point.
    cluster_arrive_relaxed();
    __syncthreads();
    xo += r0 * D;
    xm += r0;
    xl += r0;
    xr0 = r0;
    xrows = r1 - r0;
  } else if (s.nsplit > 1) {
    store_partial<D>(p, fo, fm, fl, nrows, (int64_t{s.split} * s.units + s.unit) * kR,
                     BlockGroup{});
    // Every thread's partial stores precede thread 0's arrival (the block barrier, then one
    // cumulative GPU-scope release); its acquire covers the other splits' partials for the
    // block. No thread-wide fences: each would be a MEMBAR.SC.GPU per warp.
    __syncthreads();
    if (tid == 0) *flag = atomic_add_acq_rel(p.counters + s.unit, 1) == s.nsplit - 1;
    __syncthreads();
    if (!*flag) return;
    stage_value_rotation();
    merge_partials<D>(p, reinterpret_cast<float*>(scratch), nrows, kR, 0, s.unit, s.units, s.nsplit,
                      fo, fm, fl);
    if (tid == 0) p.counters[s.unit] = 0;  // ready for the next call
  }
  finalize_rows<D, 1>(p, xo, xm, xl, fac, xrows, s.f0 + xr0, s.b, s.kvh, BlockGroup{}, rot);
  if (p.cluster > 1) cluster_wait();
}

}  // namespace tqattn::cuda::attn

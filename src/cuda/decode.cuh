// Fused decode (L <= 8): split-KV flash-decoding over the packed cache with tensor cores.
//
// A block serves up to 8 query rows (the flattened (l, h) rows of one KV head, so every query
// head of a KV head shares one pass over its packed bytes) and one split of the KV range. Each of
// the 8 warps streams its own 16-token groups (w, w + 8, ...) through a private 2-3 deep cp.async
// ring, so the loop has no block barrier. Per group:
//   S[16 tok x 8 rows] = K Q^T with mma.m16n8k16: K's A fragment is built in registers from code
//     pairs through a 32-way replicated half2 table (one shift, one LOP3, one LDS per pair), Q^T's
//     B fragment stays resident;
//   key norms (and the QJL term) scale S's columns; online softmax in fp32 (log2 units);
//   P' = P * value norm, transposed in registers (movmatrix) into the B fragment of
//   O^T[D x 8 rows] += V^T P'^T, whose A fragment is V's code pairs, also transposed by movmatrix.
// Warps merge in shared memory; with one split the block finishes the rows. Up to 8 splits of a
// unit form one thread-block cluster and merge through distributed shared memory; more store
// partials and the last block of the unit (an arrival counter) merges them. Either way the merge
// runs in split order, un-rotates and stores. One launch per call (programmatic dependent launch:
// the code tables are built while the previous kernel finishes), no host synchronisation.
// The common (key, value) widths of MSE keys get a loop compiled for them (no width switch).
#pragma once

#include "cuda/attention_common.cuh"
#include "cuda/decode_shared.cuh"
#include "tqattn/format.h"

namespace tqattn::cuda::attn {

template <int D, int B>
__device__ __forceinline__ void key_scores(const uint32_t* row0, const uint32_t* row1, int c,
                                           uint32_t lane4, const unsigned char* lut,
                                           const uint32_t (&qb)[D / 16][2], float (&acc)[4]) {
  key_scores_pairs<D, B>(row0, row1, c, qb, acc, [&](const auto& w, int j) {
    return code_pair_copies<B, 5>(w, j, lut, lane4);
  });
}

template <int D, int B>
__device__ __forceinline__ void value_accumulate(const uint32_t* row0, const uint32_t* row1, int c,
                                                 uint32_t lane4, const unsigned char* lut,
                                                 uint32_t pb0, uint32_t pb1,
                                                 float (&o)[D / 16][4]) {
  uint32_t w0[Span<D, B>::kWords], w1[Span<D, B>::kWords];
  load_span<D, B>(row0, c, w0);
  load_span<D, B>(row1, c, w1);
#pragma unroll
  for (int i = 0; i < D / 16; ++i) {
    uint32_t a[4];
    a[0] = movmatrix_trans(code_pair_copies<B, 5>(w0, 2 * i, lut, lane4));
    a[1] = movmatrix_trans(code_pair_copies<B, 5>(w0, 2 * i + 1, lut, lane4));
    a[2] = movmatrix_trans(code_pair_copies<B, 5>(w1, 2 * i, lut, lane4));
    a[3] = movmatrix_trans(code_pair_copies<B, 5>(w1, 2 * i + 1, lut, lane4));
    mma_16816(o[i], a, pb0, pb1);
  }
}

template <int D>
__device__ __forceinline__ void key_scores_bits(int bits, const uint32_t* row0,
                                                const uint32_t* row1, int c, uint32_t lane4,
                                                const unsigned char* lut,
                                                const uint32_t (&qb)[D / 16][2], float (&acc)[4]) {
  with_code_width(
      bits, [&](auto b) { key_scores<D, decltype(b)::value>(row0, row1, c, lane4, lut, qb, acc); });
}

template <int D>
__device__ __forceinline__ void value_accumulate_bits(int bits, const uint32_t* row0,
                                                      const uint32_t* row1, int c, uint32_t lane4,
                                                      const unsigned char* lut, uint32_t pb0,
                                                      uint32_t pb1, float (&o)[D / 16][4]) {
  with_code_width(bits, [&](auto b) {
    value_accumulate<D, decltype(b)::value>(row0, row1, c, lane4, lut, pb0, pb1, o);
  });
}

// The kernel's key / value widths: KB, VB > 0 are compile-time (the common pairs get a loop
// with no width switch, small enough for the instruction cache), 0 reads them from the params.
template <int D, int KB>
__device__ __forceinline__ void key_scores_for(int bits, const uint32_t* row0, const uint32_t* row1,
                                               int c, uint32_t lane4, const unsigned char* lut,
                                               const uint32_t (&qb)[D / 16][2], float (&acc)[4]) {
  if constexpr (KB > 0) {
    key_scores<D, KB>(row0, row1, c, lane4, lut, qb, acc);
  } else {
    key_scores_bits<D>(bits, row0, row1, c, lane4, lut, qb, acc);
  }
}

template <int D, int VB>
__device__ __forceinline__ void value_accumulate_for(int bits, const uint32_t* row0,
                                                     const uint32_t* row1, int c, uint32_t lane4,
                                                     const unsigned char* lut, uint32_t pb0,
                                                     uint32_t pb1, float (&o)[D / 16][4]) {
  if constexpr (VB > 0) {
    value_accumulate<D, VB>(row0, row1, c, lane4, lut, pb0, pb1, o);
  } else {
    value_accumulate_bits<D>(bits, row0, row1, c, lane4, lut, pb0, pb1, o);
  }
}

// Copies tokens [t0, t1) of one head's planes into a stage (`nthreads` threads from `tid`).
// Aligned planes: 16-byte cp.async of whole 8-token groups (the capacity is a multiple of 8, so
// the rounded range stays inside the allocation); otherwise plain loads of exactly [t0, t1).
template <bool PROD>
__device__ void load_stage(const AttnParams& p, unsigned char* stage, int64_t khead, int64_t vhead,
                           int64_t t0, int64_t t1, int tid, int nthreads) {
  uint32_t* kidx = reinterpret_cast<uint32_t*>(stage);
  uint32_t* vidx = reinterpret_cast<uint32_t*>(stage + p.st_vidx);
  uint16_t* knorm = reinterpret_cast<uint16_t*>(stage + p.st_knorm);
  uint16_t* vnorm = reinterpret_cast<uint16_t*>(stage + p.st_vnorm);
  uint16_t* kres = reinterpret_cast<uint16_t*>(stage + p.st_kres);
  uint32_t* ksign = reinterpret_cast<uint32_t*>(stage + p.st_ksign);
  if (p.aligned) {
    const int n = static_cast<int>(((t1 - t0) + 7) & ~int64_t{7});
    auto copy = [&](void* dst, const void* src, int chunks) {
      for (int i = tid; i < chunks; i += nthreads)
        cp_async16(static_cast<uint4*>(dst) + i, static_cast<const uint4*>(src) + i);
    };
    copy(kidx, p.kidx + (khead + t0) * p.kwords, n * p.kwords / 4);
    copy(vidx, p.vidx + (vhead + t0) * p.vwords, n * p.vwords / 4);
    copy(knorm, p.knorm + khead + t0, n / 8);
    copy(vnorm, p.vnorm + vhead + t0, n / 8);
    if constexpr (PROD) {
      copy(kres, p.kres + khead + t0, n / 8);
      copy(ksign, p.ksign + (khead + t0) * p.swords, n * p.swords / 4);
    }
  } else {
    const int n = static_cast<int>(t1 - t0);
    for (int i = tid; i < n * p.kwords; i += nthreads)
      kidx[i] = p.kidx[(khead + t0) * p.kwords + i];
    for (int i = tid; i < n * p.vwords; i += nthreads)
      vidx[i] = p.vidx[(vhead + t0) * p.vwords + i];
    for (int i = tid; i < n; i += nthreads) {
      knorm[i] = p.knorm[khead + t0 + i];
      vnorm[i] = p.vnorm[vhead + t0 + i];
      if constexpr (PROD) kres[i] = p.kres[khead + t0 + i];
    }
    if constexpr (PROD)
      for (int i = tid; i < n * p.swords; i += nthreads)
        ksign[i] = p.ksign[(khead + t0) * p.swords + i];
  }
}

// One warp copies a full 16-token group of aligned planes (t0 a multiple of 8): the loop's
// common case, without load_stage's general rounding and unaligned path (whose inlined code,
// with the ring-slot modulo, cost ~100 issued instructions per group).
// KW / VW: words per token of the index planes when known at compile time (0: from the params).
template <bool PROD, int KW = 0, int VW = 0>
__device__ __forceinline__ void load_group_aligned(const AttnParams& p, unsigned char* stage,
                                                   int64_t khead, int64_t vhead, int64_t t0,
                                                   int lane) {
  constexpr int kG = kDecodeGroup;
  const int kwords = KW > 0 ? KW : p.kwords, vwords = VW > 0 ? VW : p.vwords;
  static_assert(kG == 16, "two 16-byte chunks of norms per plane");
  const uint4* ksrc = reinterpret_cast<const uint4*>(p.kidx + (khead + t0) * kwords);
  const uint4* vsrc = reinterpret_cast<const uint4*>(p.vidx + (vhead + t0) * vwords);
  uint4* kdst = reinterpret_cast<uint4*>(stage);
  uint4* vdst = reinterpret_cast<uint4*>(stage + p.st_vidx);
#pragma unroll
  for (int i = lane; i < kG / 4 * kwords; i += 32) cp_async16(kdst + i, ksrc + i);
#pragma unroll
  for (int i = lane; i < kG / 4 * vwords; i += 32) cp_async16(vdst + i, vsrc + i);
  if (lane < 4) {
    // Lanes 0-1: key norms, 2-3: value norms (16 tokens = two chunks each).
    const int h = lane & 1;
    const uint16_t* src = lane < 2 ? p.knorm + khead + t0 : p.vnorm + vhead + t0;
    unsigned char* dst = stage + (lane < 2 ? p.st_knorm : p.st_vnorm);
    cp_async16(reinterpret_cast<uint4*>(dst) + h, reinterpret_cast<const uint4*>(src) + h);
  }
  if constexpr (PROD) {
    if (lane < 2)
      cp_async16(reinterpret_cast<uint4*>(stage + p.st_kres) + lane,
                 reinterpret_cast<const uint4*>(p.kres + khead + t0) + lane);
    const uint4* ssrc = reinterpret_cast<const uint4*>(p.ksign + (khead + t0) * p.swords);
    uint4* sdst = reinterpret_cast<uint4*>(stage + p.st_ksign);
    for (int i = lane; i < kG / 4 * p.swords; i += 32) cp_async16(sdst + i, ssrc + i);
  }
}

// The index planes of a full 16-token group (t0 a multiple of 8) when only they are aligned.
__device__ __forceinline__ void load_group_indices(const AttnParams& p, unsigned char* stage,
                                                   int64_t khead, int64_t vhead, int64_t t0,
                                                   int lane) {
  constexpr int kG = kDecodeGroup;
  const uint4* ksrc = reinterpret_cast<const uint4*>(p.kidx + (khead + t0) * p.kwords);
  const uint4* vsrc = reinterpret_cast<const uint4*>(p.vidx + (vhead + t0) * p.vwords);
  uint4* kdst = reinterpret_cast<uint4*>(stage);
  uint4* vdst = reinterpret_cast<uint4*>(stage + p.st_vidx);
  for (int i = lane; i < kG / 4 * p.kwords; i += 32) cp_async16(kdst + i, ksrc + i);
  for (int i = lane; i < kG / 4 * p.vwords; i += 32) cp_async16(vdst + i, vsrc + i);
}

static_assert(kDecodeWarps == kDecodeRows, "warp w prepares query row w");

// Blocks per SM the register budget is set for. At D = 256 the resident accumulators (O^T and
// Q^T's fragments, 96 registers) do not fit two blocks' 128-register cap without spilling.
constexpr int decode_blocks_per_sm(int d) { return d >= 256 ? 1 : 2; }

template <int D, bool PROD, int KB, int VB>
__global__ void __launch_bounds__(kDecodeWarps * 32, decode_blocks_per_sm(D))
    decode_kernel(const __grid_constant__ AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kW = kDecodeWarps, kR = kDecodeRows, kG = kDecodeGroup, kKS = D / 16;
  constexpr int kSpan = D / 4;
  static_assert((KB > 0) == (VB > 0), "both widths fixed or both from the params");
  constexpr int kKW = KB > 0 ? static_cast<int>(::tqattn::packed_words(D, KB)) : 0;
  constexpr int kVW = VB > 0 ? static_cast<int>(::tqattn::packed_words(D, VB)) : 0;
  const int kwords = KB > 0 ? kKW : p.kwords, vwords = VB > 0 ? kVW : p.vwords;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const uint32_t lane4 = static_cast<uint32_t>(lane) << 2;
  const DecodeSlice sl = decode_slice(p);
  if (!sl.active) return;
  const int kvh = sl.kvh, f0 = sl.f0;
  const int64_t b = sl.b, len = sl.len, pos0 = sl.pos0;
  const int64_t t_begin = sl.t_begin, t_end = sl.t_end, vis_lo = sl.vis_lo, vis_hi = sl.vis_hi;
  const bool plain = p.mask == nullptr && p.softcap == 0.0f;

  const unsigned char* klut = smem + kKeyLutOffset;
  const unsigned char* vlut = smem + kValueLutOffset;
  const unsigned char* slut = smem + p.off_slut;
  __half* qh = reinterpret_cast<__half*>(smem + p.off_q);
  __half* sqh = reinterpret_cast<__half*>(smem + p.off_sq);
  float* rs = reinterpret_cast<float*>(smem + p.off_rs);  // [0, 8): rotated q, [8, 16): S q
  float* fo = reinterpret_cast<float*>(smem + p.off_f);   // [8][D] scratch / merged output
  float* fx = fo + kR * D;                                // [8][D] scratch
  float* fm = fx + kR * D;                                // [8]
  float* fl = fm + kR;                                    // [8]
  float* fac = fl + kR;                                   // [8]
  int* flag = reinterpret_cast<int*>(fac + kR);
  unsigned char* rings = smem + p.off_stage;
  unsigned char* ring = rings + warp * p.nstages * p.stage_bytes;

  const int64_t khead = (b * p.hkv + kvh) * p.kcap;
  const int64_t vhead = (b * p.hkv + kvh) * p.vcap;
  // Warp w streams groups w, w + 8, ... of the split through its own ring: no block barrier in
  // the loop, each warp runs at its own pace.
  const int total_groups = static_cast<int>((t_end - t_begin + kG - 1) / kG);
  const int my_groups = warp < total_groups ? (total_groups - warp + kW - 1) / kW : 0;
  auto group_start = [&](int j) { return t_begin + int64_t{warp + j * kW} * kG; };
  // The code tables depend only on the codec (uploaded synchronously when it is created), so they
  // are built before waiting for the previous kernel in the stream (programmatic dependent launch:
  // this prologue overlaps that kernel's tail). Everything after the wait may read what it wrote.
  build_luts_by_entry<32, kW * 32>(reinterpret_cast<uint32_t*>(smem + kKeyLutOffset), p.kcent,
                                   p.kbits, reinterpret_cast<uint32_t*>(smem + kValueLutOffset),
                                   p.vcent, p.vbits, tid);
  if constexpr (PROD)
    build_sign_lut<32>(reinterpret_cast<uint32_t*>(smem + p.off_slut), tid, kW * 32);
  prefetch_dense_rotations<D>(p, tid, kW * 32);
  float qsign[D / 32];
  const bool presign = load_query_signs<D, PROD>(p, lane, qsign);
  grid_dependency_wait();
  grid_dependents_launch();
  // The query loads go out next: their latency and the ring's first copies overlap instead of
  // forming a serial chain of global round trips.
  float qreg[D / 32];
  load_query_row<D>(p, f0 + warp, b, kvh, lane, qreg);          // warp w prepares query row w
  const bool reg_norms = !PROD && !p.aligned && p.idx_aligned;  // see fetch_norms below
  // Copies group j of this warp into a ring slot: full groups by cp.async alone.
  auto issue_group = [&](unsigned char* dst, int j) {
    const int64_t tn = group_start(j);
    if (p.aligned && tn + kG <= t_end) {
      load_group_aligned<PROD, kKW, kVW>(p, dst, khead, vhead, tn, lane);
    } else if (reg_norms && tn + kG <= t_end) {
      load_group_indices(p, dst, khead, vhead, tn, lane);
    } else {
      load_stage<PROD>(p, dst, khead, vhead, tn, min(t_end, tn + kG), lane, 32);
    }
  };
  for (int st = 0; st < p.nstages - 1; ++st) {
    if (st < my_groups) issue_group(ring + st * p.stage_bytes, st);
    cp_async_commit();
  }
  rotate_query_row<D, PROD>(p, qreg, qsign, presign, fx + warp * D, qh + warp * D, rs + warp,
                            sqh + warp * D, rs + kR + warp, lane);
  __syncthreads();

  // Resident B fragments of Q^T (and (S q)^T): row g, dims c*D/4 + 4s + [0, 4).
  uint32_t qb[kKS][2];
  uint32_t sqb[PROD ? kKS : 1][2];
#pragma unroll
  for (int s = 0; s < kKS; ++s) {
    const uint2 v = *reinterpret_cast<const uint2*>(qh + g * D + c * kSpan + 4 * s);
    qb[s][0] = v.x;
    qb[s][1] = v.y;
    if constexpr (PROD) {
      const uint2 u = *reinterpret_cast<const uint2*>(sqh + g * D + c * kSpan + 4 * s);
      sqb[s][0] = u.x;
      sqb[s][1] = u.y;
    }
  }
  // This thread's score columns are rows 2c and 2c + 1.
  const RowInfo ri0 = row_info(p, f0 + 2 * c, b, kvh, len, pos0);
  const RowInfo ri1 = row_info(p, f0 + 2 * c + 1, b, kvh, len, pos0);
  const float rs0 = rs[2 * c], rs1 = rs[2 * c + 1];
  const float qs0 = PROD ? rs[kR + 2 * c] * p.qjl_scale : 0.0f;
  const float qs1 = PROD ? rs[kR + 2 * c + 1] * p.qjl_scale : 0.0f;

  float o[kKS][4];
#pragma unroll
  for (int i = 0; i < kKS; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

  // Odd capacities misalign the norm planes (2 bytes a token) but, for most widths, not the index
  // planes: those still go by cp.async while each thread prefetches its two tokens' norms into
  // registers one group ahead (a synchronous copy would stall every group on a global load).
  // The two tokens' fp16 norms packed in one register per plane (register pressure: the loop
  // sits at the 128-register cap).
  uint32_t pkn = 0, pvn = 0;
  auto fetch_norms = [&](int j) {
    const int64_t ta = group_start(j) + g, tb = ta + 8;
    const uint32_t ka = ta < t_end ? p.knorm[khead + ta] : 0u;
    const uint32_t va = ta < t_end ? p.vnorm[vhead + ta] : 0u;
    const uint32_t kb = tb < t_end ? p.knorm[khead + tb] : 0u;
    const uint32_t vb = tb < t_end ? p.vnorm[vhead + tb] : 0u;
    pkn = ka | (kb << 16);
    pvn = va | (vb << 16);
  };
  if (reg_norms && my_groups > 0) fetch_norms(0);
  // Ring slots of the group in use and of the next copy, advanced without a modulo.
  int use_slot = 0, load_slot = p.nstages - 1;
  for (int j = 0; j < my_groups; ++j) {
    if (p.nstages == 3) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncwarp();
    const int next = j + p.nstages - 1;
    if (next < my_groups) issue_group(ring + load_slot * p.stage_bytes, next);
    cp_async_commit();
    load_slot = load_slot + 1 == p.nstages ? 0 : load_slot + 1;

    const int64_t tg = group_start(j);
    const unsigned char* stage = ring + use_slot * p.stage_bytes;
    use_slot = use_slot + 1 == p.nstages ? 0 : use_slot + 1;
    const uint32_t* kidx = reinterpret_cast<const uint32_t*>(stage);
    const uint32_t* vidx = reinterpret_cast<const uint32_t*>(stage + p.st_vidx);
    const uint16_t* knorm = reinterpret_cast<const uint16_t*>(stage + p.st_knorm);
    const uint16_t* vnorm = reinterpret_cast<const uint16_t*>(stage + p.st_vnorm);
    const int r0 = g, r1 = g + 8;  // this thread's two tokens, rows of the stage

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    key_scores_for<D, KB>(p.kbits, kidx + r0 * kwords, kidx + r1 * kwords, c, lane4, klut, qb, acc);
    float kn0, kn1, vn0, vn1;
    if (reg_norms) {
      kn0 = half_bits_to_float(static_cast<uint16_t>(pkn));
      kn1 = half_bits_to_float(static_cast<uint16_t>(pkn >> 16));
      vn0 = half_bits_to_float(static_cast<uint16_t>(pvn));
      vn1 = half_bits_to_float(static_cast<uint16_t>(pvn >> 16));
      if (j + 1 < my_groups) fetch_norms(j + 1);
    } else {
      kn0 = half_bits_to_float(knorm[r0]);
      kn1 = half_bits_to_float(knorm[r1]);
      vn0 = half_bits_to_float(vnorm[r0]);
      vn1 = half_bits_to_float(vnorm[r1]);
    }
    float s[4] = {acc[0] * rs0 * kn0, acc[1] * rs1 * kn0, acc[2] * rs0 * kn1, acc[3] * rs1 * kn1};
    if constexpr (PROD) {
      const uint32_t* ksign = reinterpret_cast<const uint32_t*>(stage + p.st_ksign);
      const uint16_t* kres = reinterpret_cast<const uint16_t*>(stage + p.st_kres);
      float acc2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      key_scores<D, 1>(ksign + r0 * p.swords, ksign + r1 * p.swords, c, lane4, slut, sqb, acc2);
      const float g0 = kn0 * half_bits_to_float(kres[r0]), g1 = kn1 * half_bits_to_float(kres[r1]);
      s[0] += acc2[0] * qs0 * g0;
      s[1] += acc2[1] * qs1 * g0;
      s[2] += acc2[2] * qs0 * g1;
      s[3] += acc2[3] * qs1 * g1;
    }
    const bool fast = plain && tg >= vis_lo && tg + kG <= vis_hi && tg + kG <= t_end;
    if (!fast) {
      const int64_t ta = tg + g, tb = ta + 8;
      s[0] = ta < t_end ? modify_score(p, s[0], ta, ri0) : -INFINITY;
      s[1] = ta < t_end ? modify_score(p, s[1], ta, ri1) : -INFINITY;
      s[2] = tb < t_end ? modify_score(p, s[2], tb, ri0) : -INFINITY;
      s[3] = tb < t_end ? modify_score(p, s[3], tb, ri1) : -INFINITY;
      if (ta >= t_end) vn0 = 0.0f;  // the stage may hold stale bytes past the split's end
      if (tb >= t_end) vn1 = 0.0f;
    }
    raise_row_max<kKS>(fmaxf(s[0], s[2]), fmaxf(s[1], s[3]), m0, m1, l0, l1, o);
    const float ms0 = m0 == -INFINITY ? 0.0f : m0, ms1 = m1 == -INFINITY ? 0.0f : m1;
    const float p0 = fast_exp2(s[0] - ms0), p1 = fast_exp2(s[1] - ms1);
    const float p2 = fast_exp2(s[2] - ms0), p3 = fast_exp2(s[3] - ms1);
    l0 += p0 + p2;
    l1 += p1 + p3;
    const uint32_t pb0 = movmatrix_trans(pack_half2(p0 * vn0, p1 * vn0));
    const uint32_t pb1 = movmatrix_trans(pack_half2(p2 * vn1, p3 * vn1));
    value_accumulate_for<D, VB>(p.vbits, vidx + r0 * vwords, vidx + r1 * vwords, c, lane4, vlut,
                                pb0, pb1, o);
  }

  cp_async_wait<0>();
  __syncthreads();
  // Merge the warps through shared memory (the rings are free now). The fragment map: row
  // 2c + (k & 1), dim (g >> 1) * kSpan + 4i + (g & 1) + 2 * (k >> 1).
  merge_decode_warps<D, kW>(
      o, m0, m1, l0, l1, rings, fo, fm, fl,
      [](int f, int& r, int& d) {
        const int ln = f & 31, k = (f >> 5) & 3, i = f >> 7, gg = ln >> 2, cc = ln & 3;
        r = 2 * cc + (k & 1);
        d = (gg >> 1) * kSpan + 4 * i + (gg & 1) + 2 * (k >> 1);
      },
      slice_rows(p, sl.f0));
  finish_decode_slice<D>(p, sl, fo, fm, fl, fac, fx, rings, flag);
}

template <int D, bool PROD, int KB, int VB>
void launch_decode_kernel(const AttnParams& p, dim3 grid, size_t smem, cudaStream_t stream) {
  launch_attention_kernel<decode_kernel<D, PROD, KB, VB>>(
      grid, kDecodeWarps * 32, smem, stream,
      dim3(1, static_cast<unsigned>(p.cluster > 1 ? p.cluster : 1), 1), p);
}

// Widths 1..8 other than the specialised pairs (MSE keys) take the width-generic loop.
template <int D>
void launch_decode_widths(const AttnParams& p, bool prod, dim3 grid, size_t smem,
                          cudaStream_t stream) {
  if (prod) return launch_decode_kernel<D, true, 0, 0>(p, grid, smem, stream);
  with_specialized_widths(p.kbits, p.vbits, [&](auto kb, auto vb) {
    launch_decode_kernel<D, false, decltype(kb)::value, decltype(vb)::value>(p, grid, smem, stream);
  });
}

template <int D, bool PROD>
int decode_kernel_occupancy(size_t smem) {
  int blocks = 0;
  TQATTN_CUDA("scaled_dot_product_attention",
              cudaFuncSetAttribute(decode_kernel<D, PROD, 0, 0>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
  TQATTN_CUDA("scaled_dot_product_attention",
              cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_kernel<D, PROD, 0, 0>,
                                                            kDecodeWarps * 32, smem));
  return blocks;
}

}  // namespace tqattn::cuda::attn

#define TQATTN_INSTANTIATE_DECODE(D)                                            \
  namespace tqattn::cuda {                                                      \
  template <>                                                                   \
  void launch_decode<D>(const AttnParams& p, bool prod, dim3 grid, size_t smem, \
                        cudaStream_t stream) {                                  \
    attn::launch_decode_widths<D>(p, prod, grid, smem, stream);                 \
  }                                                                             \
  template <>                                                                   \
  int decode_occupancy<D>(bool prod, size_t smem) {                             \
    return prod ? attn::decode_kernel_occupancy<D, true>(smem)                  \
                : attn::decode_kernel_occupancy<D, false>(smem);                \
  }                                                                             \
  }

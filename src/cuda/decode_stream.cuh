// Stream decode (L <= 8): the fused decode for MSE keys of the specialised widths (2/2, 3/3, 3/4,
// 4/4) at D 64, 96, 128 and 256 over 16-byte aligned planes (every KVCache); decode.cuh serves the
// rest.
//
// One block of 16 warps per SM (8 at D = 256, stream_warps) holds up to 8 query rows (the
// flattened (l, h) rows of one KV head: every query head of a KV head shares one pass over its
// packed bytes) and one split of the KV range. The split streams in rounds of 512 tokens (256 at
// D = 256) through a ring of round slots that the copy engine fills: one thread arms the slot's
// mbarrier and issues four bulk copies (key codes, value codes, key norms, value norms), so the
// loop spends almost no instructions on its loads.
// Warp w computes stage w (32 tokens) of each round; the last warp done with a round (a
// shared-memory arrival counter) refills its slot, so there is no block barrier in the loop and
// the copies are issued once a round rather than once per warp and stage. Round 0 is the
// exception: each warp copies its own stage onto its own barrier and starts when that lands, and
// the other slots' first rounds go out only once warp 0's stage is in, so that they do not
// compete with round 0 for DRAM (the whole chip starts at once). A stage is two 16-token tiles:
//   S[16 tok x 8 rows] = K Q^T (mma.m16n8k16); thread column c owns the contiguous quarter of
//     every token's dims, so each register of K's A fragment is one code pair of one token. Its
//     address is one PRMT: the byte of the code run that starts at the pair (after at most one
//     shift per distinct bit offset within a byte) placed above the lane's 4-byte copy offset in
//     a 32-way replicated table of 256-byte rows (indices narrower than a byte are replicated
//     over the bits above them, so any 8-bit window is a valid row); then one LDS.
//   one online-softmax step per stage: one vote for both tiles decides whether a row max can grow;
//   O^T[D x 8 rows] += V^T P'^T, P' = P * value norm (transposed into the B fragment by
//     movmatrix). A register of V^T's A fragment is one dim of two consecutive tokens, so the
//     value tables are indexed by (code of token t, code of token t + 1): two LOP3s (and at most
//     two shifts) interleave two tokens' code runs into such bytes, then each byte is one PRMT and
//     one LDS. Lane group g owns the dims [g D/8, (g + 1) D/8), register row g of MMA i holds dim
//     g D/8 + 2i, row g + 8 dim g D/8 + 2i + 1.
// The warps merge in shared memory, then the unit's splits merge (decode_shared.cuh).
#pragma once

#include "cuda/decode_shared.cuh"
#include "tqattn/error.h"
#include "tqattn/format.h"

namespace tqattn::cuda::attn {

// Table row offset (byte << 8 | lane4) of the 8-bit window of `w` that starts at bit p
// (compile-time after unrolling): one PRMT, after a shift when p is not byte-aligned (the same
// shift serves every window at that offset within a byte: the compiler shares it).
template <int kN>
__device__ __forceinline__ uint32_t window_row(const uint32_t (&w)[kN], int p, uint32_t lane4) {
  const int r = p & 7, q = p - r, word = q >> 5, byte = (q >> 3) & 3;
  uint32_t x;
  if (r == 0) {
    x = w[word];
  } else if (word + 1 < kN) {
    x = __funnelshift_r(w[word], w[word + 1], r);
  } else {
    x = w[word] >> r;
  }
  return __byte_perm(x, lane4, 0x5504u | (static_cast<uint32_t>(byte) << 4));
}

// Bit i of word `word` of the mask of even-numbered b-bit codes.
template <int B>
__host__ __device__ constexpr uint32_t even_code_mask(int word) {
  uint32_t m = 0;
  for (int i = 0; i < 32; ++i)
    if ((word * 32 + i) % (2 * B) < B) m |= 1u << i;
  return m;
}

// Interleaves the realigned code runs of two tokens a (t) and b (t + 1): field k (2B bits at
// 2Bk) of x is (a's code 2k, b's code 2k), of y (a's code 2k + 1, b's code 2k + 1).
template <int B, int kN>
__device__ __forceinline__ void interleave_tokens(const uint32_t (&a)[kN], const uint32_t (&b)[kN],
                                                  uint32_t (&x)[kN], uint32_t (&y)[kN]) {
  // Fields never cross a word when 2B divides 32: the bits a word shift moves in are masked off.
  constexpr bool kWordLocal = 32 % (2 * B) == 0;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const uint32_t m = even_code_mask<B>(i);
    uint32_t bs, as;
    if constexpr (kWordLocal) {
      bs = b[i] << B;
      as = a[i] >> B;
    } else {
      bs = i > 0 ? __funnelshift_l(b[i - 1], b[i], B) : b[i] << B;
      as = i + 1 < kN ? __funnelshift_r(a[i], a[i + 1], B) : a[i] >> B;
    }
    x[i] = (a[i] & m) | (bs & ~m);
    y[i] = (as & m) | (b[i] & ~m);
  }
}

// Both stream tables (see kStreamLutBytes): 512 half-rows, half e & 1 (keys, values) of row e >> 1,
// filled with 16-byte stores, each thread starting at a different chunk (conflict-free store
// phases); a block of 256 threads fills two half-rows a thread.
template <int KB, int VB, int kThreads>
__device__ __forceinline__ void build_stream_luts(unsigned char* lut, const float* kcent,
                                                  const float* vcent, int tid) {
  static_assert(512 % kThreads == 0, "whole half-rows per thread");
#pragma unroll
  for (int i = 0; i < 512 / kThreads; ++i) {
    const int h = tid + i * kThreads, e = h >> 1, half = h & 1;
    const int bits = half ? VB : KB;
    const float* cent = half ? vcent : kcent;
    const int m = (1 << bits) - 1;
    const uint32_t v = pack_half2(cent[e & m], cent[(e >> bits) & m]);
    uint4* row = reinterpret_cast<uint4*>(lut + e * 256 + half * kStreamValueLut);
#pragma unroll
    for (int k = 0; k < 8; ++k) row[(k + h) & 7] = make_uint4(v, v, v, v);
  }
}

// Scores of one 16-token tile (key_scores_pairs): a code pair's table row is one window_row.
template <int D, int KB>
__device__ __forceinline__ void stream_key_scores(const uint32_t* row0, const uint32_t* row1, int c,
                                                  uint32_t lane4, const unsigned char* lut,
                                                  const uint32_t (&qb)[D / 16][2],
                                                  float (&acc)[4]) {
  key_scores_pairs<D, KB>(row0, row1, c, qb, acc, [&](const auto& w, int j) {
    return lds_at(lut, window_row(w, 2 * KB * j, lane4));
  });
}

// O^T += V^T P'^T for one 16-token tile (`tile` = its first row): this thread reads tokens 2c,
// 2c + 1, 2c + 8, 2c + 9 of its lane group's dims. Rows are 64 bytes for D = 128, so the four
// columns' rows 2c would share banks: columns 2 and 3 take each pair in the other order (`swap`),
// which puts two rows on each half of the banks, and their P' pairs are swapped to match (the
// products sum over the pair, so the order within it is free).
template <int D, int VB>
__device__ __forceinline__ void stream_value_accumulate(const uint32_t* tile, int g, int c,
                                                        int swap, uint32_t lane4,
                                                        const unsigned char* lut, uint32_t pb0,
                                                        uint32_t pb1, float (&o)[D / 16][4]) {
  constexpr int kVW = static_cast<int>(::tqattn::packed_words(D, VB));
  constexpr int kBits = D / 8 * VB;
  constexpr int kN = Run<kBits>::kWords;
  const int first = 2 * c + swap, second = 2 * c + 1 - swap;
  uint32_t t0[kN], t1[kN], t8[kN], t9[kN];
  load_run<kBits>(tile + first * kVW, g, t0);
  load_run<kBits>(tile + second * kVW, g, t1);
  load_run<kBits>(tile + (first + 8) * kVW, g, t8);
  load_run<kBits>(tile + (second + 8) * kVW, g, t9);
  uint32_t x01[kN], y01[kN], x89[kN], y89[kN];
  interleave_tokens<VB>(t0, t1, x01, y01);
  interleave_tokens<VB>(t8, t9, x89, y89);
#pragma unroll
  for (int i = 0; i < D / 16; ++i) {
    const int p = 2 * VB * i;
    uint32_t a[4];
    a[0] = lds_at(lut, window_row(x01, p, lane4));
    a[1] = lds_at(lut, window_row(y01, p, lane4));
    a[2] = lds_at(lut, window_row(x89, p, lane4));
    a[3] = lds_at(lut, window_row(y89, p, lane4));
    mma_16816(o[i], a, pb0, pb1);
  }
}

// kOneRound: every split of the launch fits one round (stream_decode_one_round), so each warp
// has at most its round-0 stage and the ring's refills and first rounds compile away. At 2K, where
// a split is 256 tokens, the kernel without that code is faster (docs/perf.md, history 73-75).
template <int D, int KB, int VB, bool kOneRound>
__global__ void __launch_bounds__(stream_warps(D) * 32, 1)
    stream_decode_kernel(const __grid_constant__ AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kW = stream_warps(D), kR = kDecodeRows, kT = kStreamTokens, kKS = D / 16;
  constexpr int kKW = static_cast<int>(::tqattn::packed_words(D, KB));
  constexpr int kVW = static_cast<int>(::tqattn::packed_words(D, VB));
  constexpr TileStage kRound = stream_round(D, kKW, kVW);
  constexpr int kRoundTokens = kW * kT;
  constexpr int kVDims = D / 8;
  static_assert(stream_decode_supports(D, KB, VB), "stream decode widths");
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const uint32_t lane4 = static_cast<uint32_t>(lane) << 2;
  const DecodeSlice sl = decode_slice(p);
  if (!sl.active) return;

  __half* qh = reinterpret_cast<__half*>(smem + p.off_q);
  float* rs = reinterpret_cast<float*>(smem + p.off_rs);
  float* fo = reinterpret_cast<float*>(smem + p.off_f);  // [8][D] merged output
  float* fx = fo + kR * D;                               // [8][D] scratch
  float* fm = fx + kR * D;
  float* fl = fm + kR;
  float* fac = fl + kR;
  int* flag = reinterpret_cast<int*>(fac + kR);
  // Per round slot: its mbarrier and its arrival counter (warps done with the slot, cumulative);
  // then the unit's two plane offsets and the warps' round-0 barriers (stream_barrier_bytes).
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + p.off_bar);
  int* done = reinterpret_cast<int*>(full + p.nstages);
  int64_t* heads = reinterpret_cast<int64_t*>(full + 2 * p.nstages);
  uint64_t* first = full + 2 * p.nstages + 2;
  unsigned char* rings = smem + p.off_stage;
  // A head dim without a Hadamard rotation: its dense rotations go through shared memory.
  constexpr bool kDenseRotation = (D & (D - 1)) != 0;
  float* rot = kDenseRotation ? reinterpret_cast<float*>(smem + p.off_rot) : nullptr;

  // Positions fit in 32 bits (the host checks).
  const int t_begin = static_cast<int>(sl.t_begin), t_end = static_cast<int>(sl.t_end);
  const int nstage = (t_end - t_begin + kT - 1) / kT;
  const int nround = (nstage + kW - 1) / kW;
  const int my_stages = warp < nstage ? (nstage - warp + kW - 1) / kW : 0;  // one per round
  // The unit's plane offsets (`heads`) are read from shared memory by the thread that refills a
  // slot: in registers they would be live across the whole loop, which sits at the register cap.
  auto key_head = [&] { return (sl.b * p.hkv + sl.kvh) * p.kcap; };
  auto value_head = [&] { return (sl.b * p.hkv + sl.kvh) * p.vcap; };
  auto stage_start = [&](int j) { return t_begin + j * kRoundTokens + warp * kT; };
  // n tokens from position t0 into a slot at token i of each of its planes, on barrier `bar`.
  auto copy_tokens = [&](unsigned char* st, int i, int t0, int n, uint64_t* bar, int64_t khead,
                         int64_t vhead) {
    mbarrier_arrive_expect_tx(bar, static_cast<uint32_t>(n * ((kKW + kVW) * 4 + 4)));
    bulk_copy_to_shared(st + i * kKW * 4, p.kidx + (khead + t0) * kKW, n * kKW * 4, bar);
    bulk_copy_to_shared(st + kRound.vidx + i * kVW * 4, p.vidx + (vhead + t0) * kVW, n * kVW * 4,
                        bar);
    bulk_copy_to_shared(st + kRound.knorm + i * 2, p.knorm + khead + t0, n * 2, bar);
    bulk_copy_to_shared(st + kRound.vnorm + i * 2, p.vnorm + vhead + t0, n * 2, bar);
  };
  // Round r into slot `slot`: tokens rounded up to 8 (the capacities are multiples of 8, so the
  // copies stay inside the planes and every size is a multiple of 16). One copy site (a
  // compile-time size for full rounds would double the copy code).
  auto issue_round = [&](int r, int slot, int64_t khead, int64_t vhead) {
    const int t0 = t_begin + r * kRoundTokens;
    copy_tokens(rings + slot * kRound.bytes, 0, t0, min(kRoundTokens, (t_end - t0 + 7) & ~7),
                full + slot, khead, vhead);
  };
  // Round 0, this warp's 32 tokens (rounded up to 8 like a round's) on this warp's barrier. The
  // lane that arms the barrier initialises it, so no block barrier has to come first.
  auto issue_round0_stage = [&] {
    if (lane == 0 && warp < nstage) {
      const int n = min(kT, min(kRoundTokens, (t_end - t_begin + 7) & ~7) - warp * kT);
      mbarrier_init(first + warp, 1);
      mbarrier_init_fence();
      copy_tokens(rings, warp * kT, t_begin + warp * kT, n, first + warp, key_head(), value_head());
    }
  };
  // The copies before the loop (round 0, then the other slots' first rounds) read tokens below
  // `pre_end`. When the host says that these were written before the previous kernel in the
  // stream began (QuantizedStates::settled_tokens), they may go out before the dependency wait,
  // to land while that kernel finishes (set_early_copies): `early` 1 is round 0 (all of a
  // one-round split), 2 every slot's first round.
  const int first_rounds = kOneRound ? 1 : min(p.nstages, nround);
  const int64_t pre_end = min(
      sl.len, static_cast<int64_t>((min(t_end, t_begin + first_rounds * kRoundTokens) + 7) & ~7));
  const int early = nstage == 0 || pre_end > p.settled ? 0
                    : kOneRound                        ? min(p.early_copies, 1)
                    : p.early_copies == 2              ? 2
                                                       : 0;
  if (tid == 0) {
    for (int s = 0; s < p.nstages; ++s) {
      mbarrier_init(full + s, 1);
      done[s] = 0;
    }
    mbarrier_init_fence();
  }
  if (early >= 1) issue_round0_stage();
  if (early == 2 && tid == 0) {
#pragma unroll 1
    for (int r = 1; r < first_rounds; ++r) issue_round(r, r, key_head(), value_head());
  }

  // Codec data only before the wait (programmatic dependent launch: this overlaps the previous
  // kernel's tail): the tables, the query's Hadamard signs or the dense rotations (the keys' into
  // shared memory, the values', staged only by the blocks that finish rows, into L2).
  if constexpr (kDenseRotation) stage_rotation<D>(rot, p.kmat_t, tid, kW * 32);
  build_stream_luts<KB, VB, kW * 32>(smem, p.kcent, p.vcent, tid);
  if constexpr (kDenseRotation) prefetch_l2(p.vmat, D * D * 4, tid, kW * 32);
  float qsign[D / 32];
  const bool presign = load_query_signs<D, false>(p, lane, qsign);
  grid_dependency_wait();
  grid_dependents_launch();
  float qreg[D / 32];
  if (warp < kR) load_query_row<D>(p, sl.f0 + warp, sl.b, sl.kvh, lane, qreg);

  if (early == 0) issue_round0_stage();
  if (tid == 0) {
    heads[0] = key_head();
    heads[1] = value_head();
    // Slot 0's first phase is round 0, which landed on the warps' barriers: complete it empty, so
    // that its refills start at phase 1 like every other slot's second round.
    mbarrier_arrive_expect_tx(full, 0);
  }
  // Stages whose 32 tokens every row sees, unmasked and unsoftcapped, skip per-score masking:
  // this warp's stages j in [fast_lo, fast_hi).
  int fast_lo = 0, fast_hi = 0;
  if (p.mask == nullptr && p.softcap == 0.0f) {
    const int64_t vlo = max(sl.vis_lo, sl.t_begin), vhi = min(sl.vis_hi, sl.t_end);
    if (vhi > vlo) {
      const int s_lo = static_cast<int>((vlo - sl.t_begin + kT - 1) / kT);
      const int s_hi = static_cast<int>((vhi - sl.t_begin) / kT);
      fast_lo = max(0, (s_lo - warp + kW - 1) / kW);
      fast_hi = max(0, (s_hi - warp + kW - 1) / kW);
    }
  }
  if constexpr (kDenseRotation) {
    cp_async_wait<0>();
    __syncthreads();
  }
  if (warp < kR)
    rotate_query_row<D, false>(p, qreg, qsign, presign, fx + warp * D, qh + warp * D, rs + warp,
                               nullptr, nullptr, lane, rot);
  __syncthreads();

  // Resident B fragments of Q^T: row g, dims c*D/4 + 4s + [0, 4).
  uint32_t qb[kKS][2];
#pragma unroll
  for (int s = 0; s < kKS; ++s) {
    const uint2 v = *reinterpret_cast<const uint2*>(qh + g * D + c * (D / 4) + 4 * s);
    qb[s][0] = v.x;
    qb[s][1] = v.y;
  }
  // This thread's score columns are rows 2c and 2c + 1.
  const float rs0 = rs[2 * c], rs1 = rs[2 * c + 1];

  float o[kKS][4];
#pragma unroll
  for (int i = 0; i < kKS; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  const unsigned char* klut = smem;
  const unsigned char* vlut = smem + kStreamValueLut;
  // Columns 2 and 3 read each value token pair in the other order (stream_value_accumulate).
  const int swap = (c >> 1) & 1;
  const uint32_t pair_order = swap ? 0x1032u : 0x3210u;

  // One stage: masked covers partial stages, window / causal edges, masks and soft-capping.
  // `st` is the round's slot; this warp's stage is its w-th 32 tokens in each region.
  auto run_stage = [&](const unsigned char* st, int t0, auto masked_tag) {
    constexpr bool kMasked = decltype(masked_tag)::value;
    const uint32_t* kidx = reinterpret_cast<const uint32_t*>(st) + warp * kT * kKW;
    const uint32_t* vidx = reinterpret_cast<const uint32_t*>(st + kRound.vidx) + warp * kT * kVW;
    const uint16_t* knorm = reinterpret_cast<const uint16_t*>(st + kRound.knorm) + warp * kT;
    const uint16_t* vnorm = reinterpret_cast<const uint16_t*>(st + kRound.vnorm) + warp * kT;
    float s[2][4], vn[2][2];
    RowInfo ri0{}, ri1{};
    if constexpr (kMasked) {
      ri0 = row_info(p, sl.f0 + 2 * c, sl.b, sl.kvh, sl.len, sl.pos0);
      ri1 = row_info(p, sl.f0 + 2 * c + 1, sl.b, sl.kvh, sl.len, sl.pos0);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r0 = 16 * h + g, r1 = r0 + 8;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      stream_key_scores<D, KB>(kidx + r0 * kKW, kidx + r1 * kKW, c, lane4, klut, qb, acc);
      const float kn0 = half_bits_to_float(knorm[r0]), kn1 = half_bits_to_float(knorm[r1]);
      vn[h][0] = half_bits_to_float(vnorm[r0]);
      vn[h][1] = half_bits_to_float(vnorm[r1]);
      s[h][0] = acc[0] * rs0 * kn0;
      s[h][1] = acc[1] * rs1 * kn0;
      s[h][2] = acc[2] * rs0 * kn1;
      s[h][3] = acc[3] * rs1 * kn1;
      if constexpr (kMasked) {
        // Past the split's end the stage holds stale or unwritten bytes: select, never scale.
        const int ta = t0 + r0, tb = t0 + r1;
        s[h][0] = ta < t_end ? modify_score(p, s[h][0], ta, ri0) : -INFINITY;
        s[h][1] = ta < t_end ? modify_score(p, s[h][1], ta, ri1) : -INFINITY;
        s[h][2] = tb < t_end ? modify_score(p, s[h][2], tb, ri0) : -INFINITY;
        s[h][3] = tb < t_end ? modify_score(p, s[h][3], tb, ri1) : -INFINITY;
        if (ta >= t_end) vn[h][0] = 0.0f;
        if (tb >= t_end) vn[h][1] = 0.0f;
      }
    }
    // One softmax step for the stage's two tiles.
    raise_row_max<kKS>(fmaxf(fmaxf(s[0][0], s[0][2]), fmaxf(s[1][0], s[1][2])),
                       fmaxf(fmaxf(s[0][1], s[0][3]), fmaxf(s[1][1], s[1][3])), m0, m1, l0, l1, o);
    const float ms0 = m0 == -INFINITY ? 0.0f : m0, ms1 = m1 == -INFINITY ? 0.0f : m1;
    uint32_t pb[2][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float p0 = fast_exp2(s[h][0] - ms0), p1 = fast_exp2(s[h][1] - ms1);
      const float p2 = fast_exp2(s[h][2] - ms0), p3 = fast_exp2(s[h][3] - ms1);
      l0 += p0 + p2;
      l1 += p1 + p3;
      pb[h][0] = movmatrix_trans(pack_half2(p0 * vn[h][0], p1 * vn[h][0]));
      pb[h][1] = movmatrix_trans(pack_half2(p2 * vn[h][1], p3 * vn[h][1]));
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
      stream_value_accumulate<D, VB>(vidx + 16 * h * kVW, g, c, swap, lane4, vlut,
                                     __byte_perm(pb[h][0], 0u, pair_order),
                                     __byte_perm(pb[h][1], 0u, pair_order), o);
  };

  // Round j sits in slot j % nstages; `lap` = j / nstages (the slot's phase parity is its low bit).
  int slot = 0, lap = 0;
  const unsigned char* st = rings;
  // Otherwise the other slots' first rounds go out once warp 0's stage of round 0 is in, so that
  // they do not compete with round 0 for DRAM (outside the loop: it sits at the register cap).
  if (!kOneRound && early != 2 && warp == 0 && my_stages > 0) {
    mbarrier_wait(first, 0u);
    if (lane == 0) {
#pragma unroll 1
      for (int r = 1; r < first_rounds; ++r) issue_round(r, r, heads[0], heads[1]);
    }
  }
  for (int j = 0; j < (kOneRound ? min(my_stages, 1) : my_stages); ++j) {
    // Round 0 is on this warp's own barrier.
    if (j == 0) {
      mbarrier_wait(first + warp, 0u);
    } else {
      mbarrier_wait(full + slot, static_cast<uint32_t>(lap & 1));
    }
    const int t0 = stage_start(j);
    if (j >= fast_lo && j < fast_hi) {
      run_stage(st, t0, std::false_type{});
    } else {
      run_stage(st, t0, std::true_type{});
    }
    // A round followed by another for this slot has every warp's stage (only the split's last
    // round can be short), so its kW-th arrival refills the slot.
    const int refill = j + p.nstages;
    if (!kOneRound && refill < nround) {
      __syncwarp();  // every lane of this warp is done reading the slot
      if (lane == 0) {
        __threadfence_block();
        if (atomicAdd(done + slot, 1) == (lap + 1) * kW - 1)
          issue_round(refill, slot, heads[0], heads[1]);
      }
    }
    if (++slot == p.nstages) {
      slot = 0;
      ++lap;
      st = rings;
    } else {
      st += kRound.bytes;
    }
  }

  __syncthreads();  // every warp is done with the ring: the merge reuses it
  // The fragment map: MMA i, element k of lane (g, c) is row 2c + (k & 1), dim g D/8 + 2i + k/2.
  merge_decode_warps<D, kW>(
      o, m0, m1, l0, l1, rings, fo, fm, fl,
      [](int f, int& r, int& d) {
        const int ln = f & 31, k = (f >> 5) & 3, i = f >> 7;
        r = 2 * (ln & 3) + (k & 1);
        d = (ln >> 2) * kVDims + 2 * i + (k >> 1);
      },
      slice_rows(p, sl.f0));
  finish_decode_slice<D>(p, sl, fo, fm, fl, fac, fx, rings, flag, rot);
}

template <int D, int KB, int VB>
void launch_stream_decode_kernel(const AttnParams& p, dim3 grid, size_t smem, cudaStream_t stream) {
  const dim3 cluster(1, static_cast<unsigned>(p.cluster > 1 ? p.cluster : 1), 1);
  if (stream_decode_one_round(D, p.split_tokens)) {
    launch_attention_kernel<stream_decode_kernel<D, KB, VB, true>>(grid, stream_warps(D) * 32, smem,
                                                                   stream, cluster, p);
  } else {
    launch_attention_kernel<stream_decode_kernel<D, KB, VB, false>>(grid, stream_warps(D) * 32,
                                                                    smem, stream, cluster, p);
  }
}

// The host sizes the shared memory for one resident block per SM.
template <int D>
void launch_stream_decode_widths(const AttnParams& p, dim3 grid, size_t smem, cudaStream_t stream) {
  if (p.kbits == 2 && p.vbits == 2)
    return launch_stream_decode_kernel<D, 2, 2>(p, grid, smem, stream);
  if (p.kbits == 3 && p.vbits == 3)
    return launch_stream_decode_kernel<D, 3, 3>(p, grid, smem, stream);
  if (p.kbits == 3 && p.vbits == 4)
    return launch_stream_decode_kernel<D, 3, 4>(p, grid, smem, stream);
  if (p.kbits == 4 && p.vbits == 4)
    return launch_stream_decode_kernel<D, 4, 4>(p, grid, smem, stream);
  throw_runtime("scaled_dot_product_attention", "stream decode has no kernel for ", p.kbits,
                "-bit keys with ", p.vbits, "-bit values (supported: 2/2, 3/3, 3/4, 4/4)");
}

}  // namespace tqattn::cuda::attn

#define TQATTN_INSTANTIATE_STREAM_DECODE(D)                                                        \
  namespace tqattn::cuda {                                                                         \
  template <>                                                                                      \
  void launch_stream_decode<D>(const AttnParams& p, dim3 grid, size_t smem, cudaStream_t stream) { \
    attn::launch_stream_decode_widths<D>(p, grid, smem, stream);                                   \
  }                                                                                                \
  }

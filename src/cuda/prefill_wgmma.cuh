// Fused prefill for D = 64, 128 and 256 over MSE keys on Hopper: warpgroup MMA (wgmma) reading
// the expanded K and V tiles straight from shared memory.
//
// The mma.sync kernel (prefill.cuh) is bound by shared memory: each of its 8 warps reads the same
// expanded tiles through ldmatrix. Here a block's 8 warps form two warpgroups of 64 rows; one
// wgmma per 16 dims reads a K tile once for its whole warpgroup, so the block reads each tile
// twice instead of eight times. Q (rotated, scaled, fp16) stays in registers as A fragments for
// the whole loop at D = 128, in a swizzled shared tile at D = 64 (the kernel's comment says why)
// and at D = 256 (whose 128 accumulator registers of O leave no room for Q's 64); S = Q K^T is
// m64nNk16 over a K-major B (N = the tile's tokens); P (fp16, from S's accumulators in
// registers) times V is m64nDk16 over the same tile layout read MN-major. Tiles are 64 tokens
// (32 at D = 256: two buffers of 64-token tiles, the stages and the Q tile would not fit),
// expanded into the 128-byte swizzled layout (wgmma.cuh) from packed stages that cp.async fills
// up to four tiles ahead, two tile buffers: the next tile's K expands while this tile's S runs on
// the tensor cores, its V while P V runs. The code tables hold a copy per lane (conflict-free
// lookups; every other lane's at D = 256 with 4/4 bits). Rows, splits, masks, softmax and the
// epilogue are the mma.sync kernel's (shared helpers in prefill.cuh).
#pragma once

#include "cuda/prefill.cuh"
#include "cuda/wgmma.cuh"

namespace tqattn::cuda::attn {

template <int D, int KB, int VB, int LS>
__global__ void __launch_bounds__(kWgmmaPrefillWarps * 32, D == 64 ? 2 : 1)
    prefill_wgmma_kernel(const __grid_constant__ AttnParams p) {
#if TQATTN_WGMMA
  static_assert((KB > 0) == (VB > 0) && (KB > 0) == (LS > 0),
                "widths and copies all fixed or all from the params");
  static_assert(wgmma_prefill_supports(D), "wgmma prefill head dims");
  constexpr int kKW = KB > 0 ? static_cast<int>(::tqattn::packed_words(D, KB)) : 0;
  constexpr int kVW = VB > 0 ? static_cast<int>(::tqattn::packed_words(D, VB)) : 0;
  const int kwords = KB > 0 ? kKW : p.kwords;
  const int vwords = VB > 0 ? kVW : p.vwords;
  constexpr int kBM = kWgmmaPrefillRows, kBN = wgmma_prefill_tile(D), kRowsW = 16, kMT = 1;
  constexpr int kLd = D + 8;  // the rotated Q tile's padded rows (ldmatrix, conflict-free)
  constexpr int kThreads = kWgmmaPrefillWarps * 32, kStages = kWgmmaPrefillStages;
  constexpr int kTileBytes = wgmma_prefill_tile_bytes(D), kBufBytes = 2 * kTileBytes;
  // A thread expands one span of one token per plane and tile: a quarter of the dims, an eighth
  // at D = 256 (whose tiles have half the tokens). An eighth of a 256-dim row is a quarter of a
  // 128-dim one at the next index (load_span), so the expansion runs the D = 128 code there.
  constexpr int kSpanD = D == 256 ? 128 : D, kSpans = D / (kSpanD / 4);
  constexpr int kSpanChunks = kSpanD / 32;  // 16-byte chunks of a span
  static_assert(kBM == kWgmmaPrefillWarps * kRowsW && kBN == (D == 256 ? 32 : 64),
                "two warpgroups, 64-token tiles (32 at D = 256)");
  static_assert(2 * kBN * kSpans == 2 * kThreads, "one K and one V span per thread and tile");
  static_assert(kStages == 4, "stage slot = tile & 3");
  // Shared-memory and stage layouts: compile-time for the fixed widths (the host sets the same
  // ones from the same functions), else from the params.
  constexpr bool kFixed = KB > 0;
  constexpr WgmmaPrefillLayout kL =
      wgmma_prefill_layout(D, kFixed ? KB : 1, kFixed ? VB : 1, kKW, kVW, kFixed ? LS : 5);
  constexpr TileStage kStage = mse_tile_stage(kBN, kKW, kVW);
  const int st_vidx = kFixed ? kStage.vidx : p.st_vidx;
  const int st_knorm = kFixed ? kStage.knorm : p.st_knorm;
  const int st_vnorm = kFixed ? kStage.vnorm : p.st_vnorm;
  const int stage_bytes = kFixed ? kStage.bytes : p.stage_bytes;
  const int off_klut = kFixed ? kL.klut : p.off_klut;
  const int off_vlut = kFixed ? kL.vlut : p.off_vlut;
  const int off_rs = kFixed ? kL.rs : p.off_rs;
  const int off_region = kFixed ? kL.region : p.off_f;
  const int off_stage = kFixed ? kL.stage : p.off_stage;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2;
  const PrefillBlock blk = prefill_block<kBM>(p);
  // A cluster's blocks all take part in its merge, those past this unit's splits with no tokens.
  if (blk.split >= blk.nsplit && p.cluster <= 1) return;
  const int64_t b = blk.b, t_begin = blk.t_begin, t_end = blk.t_end;
  const int kvh = blk.kvh, f0 = blk.f0;
  const bool plain = p.mask == nullptr && p.softcap == 0.0f;

  __half* qs = reinterpret_cast<__half*>(smem);         // at offset 0 in every layout
  float* rs = reinterpret_cast<float*>(smem + off_rs);  // [kBM] q scales
  uint32_t* klut = reinterpret_cast<uint32_t*>(smem + off_klut);
  uint32_t* vlut = reinterpret_cast<uint32_t*>(smem + off_vlut);
  // The tile region starts at the first 1024-byte boundary from off_f (the swizzle's period; the
  // host reserves the slack). Buffer i: K tile at i * kBufBytes, V tile after it.
  const uint32_t smem_base = smem_addr(smem);
  unsigned char* region = smem + (((smem_base + off_region + 1023) & ~1023u) - smem_base);
  unsigned char* stages = region + off_stage;
  // Descriptors of buffer 0's K tile (K-major: 8-row groups 1024 bytes apart) and V tile
  // (MN-major: 64-dim column blocks kBN * 128 bytes apart, 8-token groups 1024 apart);
  // other buffers, column blocks and steps add their byte offset / 16 to the start address.
  const uint64_t kdesc0 = wgmma_desc(smem_addr(region), 16, 1024);
  const uint64_t vdesc0 = wgmma_desc(smem_addr(region) + kTileBytes, kBN * 128, 1024);

  const int wr0 = warp * kRowsW;  // this warp's first block row (rows 16 (warp % 4) of its group)
  const int cshift = LS > 0 ? LS : p.lut_shift;
  if constexpr (LS > 0) {
    build_luts_by_entry<1 << LS, kThreads>(klut, p.kcent, p.kbits, vlut, p.vcent, p.vbits, tid);
  } else {
    build_lut_copies(klut, p.kcent, p.kbits, cshift, tid, kThreads);
    build_lut_copies(vlut, p.vcent, p.vbits, cshift, tid, kThreads);
  }
  const uint32_t lane_bytes = static_cast<uint32_t>(lane & ((1 << cshift) - 1)) << 2;
  const unsigned char* klut_b = smem + off_klut;
  const unsigned char* vlut_b = smem + off_vlut;
  const uint32_t* klut_l = klut + (lane & ((1 << cshift) - 1));
  const uint32_t* vlut_l = vlut + (lane & ((1 << cshift) - 1));

  const int64_t khead = (b * p.hkv + kvh) * p.kcap;
  const int64_t vhead = (b * p.hkv + kvh) * p.vcap;
  const int ntiles = static_cast<int>((t_end - t_begin + kBN - 1) / kBN);
  // The planes' first 16-byte chunks of the block's range (aligned planes: t_begin is a multiple
  // of 8); tile t starts t * kBN tokens later.
  const uint4* kbase = reinterpret_cast<const uint4*>(p.kidx + (khead + t_begin) * kKW);
  const uint4* vbase = reinterpret_cast<const uint4*>(p.vidx + (vhead + t_begin) * kVW);
  const uint4* knbase = reinterpret_cast<const uint4*>(p.knorm + khead + t_begin);
  const uint4* vnbase = reinterpret_cast<const uint4*>(p.vnorm + vhead + t_begin);
  // Tile arithmetic in 32 bits relative to t_begin (a block's range is below 2^31 tokens): tiles
  // starting at rel in [fast_lo, fast_hi] need no mask, window or partial-tile handling.
  const int range = static_cast<int>(t_end - t_begin);
  const int fast_lo = static_cast<int>(max(int64_t{0}, blk.vis_lo - t_begin));
  const int fast_hi = static_cast<int>(min(blk.vis_hi, t_end) - t_begin) - kBN;
  auto load_tile = [&](int t) {
    unsigned char* stage = stages + (t & 3) * stage_bytes;
    if constexpr (kFixed) {
      if (p.aligned) {
        const int n = (min(kBN, range - t * kBN) + 7) & ~7;
        copy_tile_aligned<kKW, kVW, kBN, kThreads>(
            kbase + t * (kBN * kKW / 4), vbase + t * (kBN * kVW / 4), knbase + t * (kBN / 8),
            vnbase + t * (kBN / 8), stage, st_vidx, st_knorm, st_vnorm, n, tid);
        return;
      }
    }
    const int64_t t0 = t_begin + int64_t{t} * kBN, t1 = min(t_end, t0 + kBN);
    load_stage<false>(p, stage, khead, vhead, t0, t1, tid, kThreads);
  };
  grid_dependency_wait();
  grid_dependents_launch();
  // Queries: each warp stages its rows in fp32 in the tile buffers (compactly, clear of the
  // stages), and the first tiles' copies go out once those loads have landed, so that their
  // latency overlaps the rotation (copies issued before the query loads delay them: history 39).
  // At D = 256 a warp's rows are staged in two passes of 8 (16 would not fit the buffers).
  constexpr int kQPass = D == 256 ? kRowsW / 2 : kRowsW;
  static_assert(kWgmmaPrefillWarps * kQPass * D * 4 <= 2 * kBufBytes,
                "query staging within the tile buffers");
  float* x = reinterpret_cast<float*>(region) + warp * kQPass * D;
#pragma unroll 1
  for (int r = 0; r < kRowsW; r += kQPass) {
    warp_load_queries<D>(p, x, kQPass, f0 + wr0 + r, b, kvh, lane);
    if (r == 0) {
      for (int st = 0; st < kStages; ++st) {
        if (st < ntiles) load_tile(st);
        cp_async_commit();
      }
    }
    warp_rotate_rows<D, 4>(p, x, kQPass, false, qs + (wr0 + r) * kLd, kLd, rs + wr0 + r, lane);
  }
  // Q as A fragments for the whole loop: 16 dims per wgmma.
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(qa[kk], qs + (wr0 + (lane & 15)) * kLd + kk * 16 + (lane >> 4) * 8);
  // At D = 64 and 256, S takes Q from shared memory instead: each warpgroup's 64 rows in the
  // swizzled layout (like a K tile) at the first 1024-byte boundary of the padded tile, written
  // from the fragments once every warp has read its rows. With Q in registers at D = 64, ptxas
  // (CUDA 13.0) gave the loop-invariant Q fragments the registers of the P fragments packed later
  // in the loop, so S from the second tile on was P K^T (docs/perf.md, history 84); at D = 256 O's
  // accumulators take 128 registers.
  constexpr bool kSharedQ = D != 128;
  [[maybe_unused]] uint64_t qdesc = 0;
  if constexpr (kSharedQ) {
    constexpr int kWgQBytes = 64 * D * 2;  // one warpgroup's rows
    static_assert(kBM * kLd * 2 >= 1008 + 2 * kWgQBytes, "swizzled Q within the padded Q tile");
    unsigned char* wg_q = smem + ((1024u - (smem_base & 1023u)) & 1023u) + (warp >> 2) * kWgQBytes;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = (warp & 3) * 16 + g + 8 * (j & 1);
        const int dim = kk * 16 + 8 * (j >> 1) + 2 * (lane & 3);
        *reinterpret_cast<uint32_t*>(wg_q + swizzled_chunk_offset(64, row, dim >> 3) +
                                     (dim & 7) * 2) = qa[kk][j];
      }
    fence_proxy_async_shared();  // the loop's first barrier orders it before the first S
    qdesc = wgmma_desc(smem_addr(wg_q), 16, 1024);
  }

  RowInfo ri[kMT][2];
  float rsq[kMT][2];
  const float rsk[kMT][2] = {{0.0f, 0.0f}};
  const float no_qjl[1][1][4] = {};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int br = wr0 + g + 8 * h;
    ri[0][h] = row_info(p, f0 + br, b, kvh, blk.len, blk.pos0);
    rsq[0][h] = rs[br];
  }
  float o[kMT][D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) o[0][nd][0] = o[0][nd][1] = o[0][nd][2] = o[0][nd][3] = 0.0f;
  float mrow[kMT][2] = {{-INFINITY, -INFINITY}}, lrow[kMT][2] = {{0.0f, 0.0f}};

  // This thread's share of a tile's expansion: one span of one token per plane, so that the eight
  // 16-byte stores of a quarter-warp land in eight different bank groups of the swizzled layout:
  // four consecutive tokens by two spans at D = 128 (chunks j and 4 + j), two tokens by all four
  // spans at D = 64 (chunks j, 2 + j, 4 + j, 6 + j), eight consecutive tokens by one eighth at
  // D = 256 (a warp expands its eighth of every token).
  const int ex_token = D == 256   ? (tid & 7) | (((tid >> 3) & 3) << 3)
                       : D == 128 ? ((tid >> 3) & 15) * 4 + (tid & 3)
                                  : ((tid >> 3) << 1) | (tid & 1);
  const int ex_span = D == 256   ? tid >> 5
                      : D == 128 ? ((tid >> 7) << 1) | ((tid >> 2) & 1)
                                 : (tid >> 1) & 3;
  // Expands plane V (or K) of tile t (packed in stage t & 3) into tile buffer t & 1: codes
  // times their token's norm, zero past the valid range.
  auto expand_plane = [&](int t, bool is_v) {
    const bool valid = ex_token < range - t * kBN;
    unsigned char* tile = region + (t & 1) * kBufBytes + (is_v ? kTileBytes : 0);
    const unsigned char* stage = stages + (t & 3) * stage_bytes;
    auto store = [&](int j, const uint4& v) {
      *reinterpret_cast<uint4*>(
          tile + swizzled_chunk_offset(kBN, ex_token, ex_span * kSpanChunks + j)) = v;
    };
    if (is_v) {
      const uint16_t* vnorm = reinterpret_cast<const uint16_t*>(stage + st_vnorm);
      const __half vh = valid ? __ushort_as_half(vnorm[ex_token]) : __float2half(0.0f);
      const uint32_t* vidx = reinterpret_cast<const uint32_t*>(stage + st_vidx);
      expand_span_for<kSpanD, VB, LS>(p.vbits, vidx + ex_token * vwords, ex_span, vlut_l, vlut_b,
                                      cshift, lane_bytes, __half2half2(vh), store);
    } else {
      const uint16_t* knorm = reinterpret_cast<const uint16_t*>(stage + st_knorm);
      const __half kh = valid ? __ushort_as_half(knorm[ex_token]) : __float2half(0.0f);
      const uint32_t* kidx = reinterpret_cast<const uint32_t*>(stage);
      expand_span_for<kSpanD, KB, LS>(p.kbits, kidx + ex_token * kwords, ex_span, klut_l, klut_b,
                                      cshift, lane_bytes, __half2half2(kh), store);
    }
  };
  // S = Q K^T for tile t: dims 64 j .. 64 j + 63 sit in column block j of the K tile (and of the
  // shared Q tile); 16 dims (32 bytes) per instruction within a block's 128-byte swizzled rows.
  auto issue_scores = [&](float(&sacc)[kBN / 8][4], int t) {
    const uint64_t desc = kdesc0 + (((t & 1) * kBufBytes) >> 4);
    wgmma_fence();
    if constexpr (kSharedQ) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint64_t qk = qdesc + (((kk >> 2) * (64 * 128) + (kk & 3) * 32) >> 4);
        const uint64_t kk_desc = desc + (((kk >> 2) * (kBN * 128) + (kk & 3) * 32) >> 4);
        if constexpr (kBN == 32) {
          wgmma_m64n32k16_ss(sacc, qk, kk_desc, kk > 0);
        } else {
          wgmma_m64n64k16_ss(sacc, qk, kk_desc, kk > 0);
        }
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        wgmma_m64n64k16(sacc, qa[kk], desc + (((kk >> 2) * (kBN * 128) + (kk & 3) * 32) >> 4),
                        kk > 0);
    }
    wgmma_commit();
  };
  // O += P' V for tile t: 16 tokens (2048 bytes of rows) per instruction; at D = 256 two
  // m64n128k16, each over two of the V tile's four column blocks (N = 256 would be one).
  auto issue_values = [&](const uint32_t(&pa)[kBN / 16][4], int t) {
    const uint64_t desc = vdesc0 + (((t & 1) * kBufBytes) >> 4);
    wgmma_fence_operands(o[0]);
    wgmma_fence();
#pragma unroll
    for (int kt = 0; kt < kBN / 16; ++kt) {
      const uint64_t vk = desc + ((kt * 16 * 128) >> 4);
      if constexpr (D == 256) {
        using Half = float[16][4];
        wgmma_m64nk16_tb(*reinterpret_cast<Half*>(&o[0][0]), pa[kt], vk);
        wgmma_m64nk16_tb(*reinterpret_cast<Half*>(&o[0][16]), pa[kt], vk + ((2 * kBN * 128) >> 4));
      } else {
        wgmma_m64nk16_tb(o[0], pa[kt], vk);
      }
    }
    wgmma_commit();
  };
  if (ntiles > 0) {
    cp_async_wait<kStages - 1>();
    __syncthreads();  // tile 0's packed bytes landed
    expand_plane(0, false);
    expand_plane(0, true);
    fence_proxy_async_shared();
  }
  // One barrier per tile: after it, tile `it` is expanded (buffer it % 2) and visible to the
  // tensor cores, tile it + 1's packed bytes have landed, and every warpgroup's MMAs on tile
  // it - 1 have completed, so buffer (it + 1) % 2 is free for tile it + 1.
  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages < ntiles) load_tile(it + kStages);
    cp_async_commit();
    float sacc[kMT][kBN / 8][4];
    issue_scores(sacc[0], it);
    if (it + 1 < ntiles) expand_plane(it + 1, false);
    wgmma_wait_all();
    wgmma_fence_operands(sacc[0]);
    const int rel = it * kBN;
    const int nvalid = min(kBN, range - rel);
    const bool fast = plain && rel >= fast_lo && rel <= fast_hi;
    const int64_t t0 = t_begin + rel;
    uint32_t pa[kMT][kBN / 16][4];
    prefill_softmax_tile<D, kMT, kBN, false>(p, sacc, no_qjl, plain, fast, rsq, rsk, ri, t0, nvalid,
                                             mrow, lrow, o, pa);
    issue_values(pa[0], it);
    if (it + 1 < ntiles) expand_plane(it + 1, true);
    fence_proxy_async_shared();
    wgmma_wait_all();
    wgmma_fence_operands(o[0]);
  }
  // The epilogue's scratch: the tile region, from the tables on at D = 256 (wgmma_prefill_layout).
  unsigned char* scratch = wgmma_prefill_scratch_over_tables(D) ? smem + off_klut : region;
  finish_prefill_block<D, kMT, kRowsW, kBM>(p, blk, o, mrow, lrow, scratch,
                                            reinterpret_cast<float*>(qs));
#else
  __trap();  // sm_90a only; the host launches this kernel on compute capability 9.0 alone
#endif
}

template <int D, int KB, int VB, int LS>
void launch_prefill_wgmma_kernel(const AttnParams& p, dim3 grid, size_t smem, cudaStream_t stream) {
  // p.cluster > 1: a unit's splits (gridDim.x) form one cluster.
  launch_attention_kernel<prefill_wgmma_kernel<D, KB, VB, LS>>(
      grid, kWgmmaPrefillWarps * 32, smem, stream,
      dim3(static_cast<unsigned>(p.cluster > 1 ? p.cluster : 1), 1, 1), p);
}

template <int D>
void launch_prefill_wgmma_widths(const AttnParams& p, dim3 grid, size_t smem, cudaStream_t stream) {
  with_specialized_widths(p.kbits, p.vbits, [&](auto kb, auto vb) {
    constexpr int kKB = decltype(kb)::value, kVB = decltype(vb)::value;
    // The fixed widths' kernels build their tables with the copies the layout chose for them.
    constexpr int kLS =
        kKB == 0
            ? 0
            : wgmma_prefill_lut_shift(D, kKB, kVB, static_cast<int>(::tqattn::packed_words(D, kKB)),
                                      static_cast<int>(::tqattn::packed_words(D, kVB)));
    if (kLS > 0 && p.lut_shift != kLS)
      throw_runtime("scaled_dot_product_attention", "wgmma prefill code tables at ", kKB, "/", kVB,
                    " bits: 2^", kLS, " copies per entry expected, got 2^", p.lut_shift);
    launch_prefill_wgmma_kernel<D, kKB, kVB, kLS>(p, grid, smem, stream);
  });
}

// Clusters of `cluster` blocks the device holds at once (every width pair's kernel uses the same
// resources as the generic one's at the same shared memory).
template <int D>
int prefill_wgmma_kernel_max_clusters(size_t smem, int cluster) {
  TQATTN_CUDA("scaled_dot_product_attention",
              cudaFuncSetAttribute(prefill_wgmma_kernel<D, 0, 0, 0>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(cluster), 1, 1);
  config.blockDim = dim3(kWgmmaPrefillWarps * 32);
  config.dynamicSmemBytes = smem;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  int clusters = 0;
  TQATTN_CUDA("scaled_dot_product_attention",
              cudaOccupancyMaxActiveClusters(&clusters, prefill_wgmma_kernel<D, 0, 0, 0>, &config));
  return clusters;
}

template <int D>
int prefill_wgmma_kernel_occupancy(size_t smem) {
  int blocks = 0;
  TQATTN_CUDA("scaled_dot_product_attention",
              cudaFuncSetAttribute(prefill_wgmma_kernel<D, 0, 0, 0>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
  TQATTN_CUDA("scaled_dot_product_attention",
              cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                  &blocks, prefill_wgmma_kernel<D, 0, 0, 0>, kWgmmaPrefillWarps * 32, smem));
  return blocks;
}

}  // namespace tqattn::cuda::attn

// One head dim's wgmma prefill: every width pair's kernel in one file.
#define TQATTN_INSTANTIATE_WGMMA_PREFILL(D)                                                   \
  namespace tqattn::cuda {                                                                    \
  template <>                                                                                 \
  void launch_prefill_wgmma<D>(const AttnParams& p, dim3 grid, size_t smem, cudaStream_t s) { \
    attn::launch_prefill_wgmma_widths<D>(p, grid, smem, s);                                   \
  }                                                                                           \
  template <>                                                                                 \
  int prefill_wgmma_occupancy<D>(size_t smem) {                                               \
    return attn::prefill_wgmma_kernel_occupancy<D>(smem);                                     \
  }                                                                                           \
  template <>                                                                                 \
  int prefill_wgmma_max_clusters<D>(size_t smem, int cluster) {                               \
    return attn::prefill_wgmma_kernel_max_clusters<D>(smem, cluster);                         \
  }                                                                                           \
  }

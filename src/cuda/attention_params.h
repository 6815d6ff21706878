// The parameter block the attention kernels receive by value, and the launchers each per-head-dim
// .cu file instantiates. Host and device code share it; it holds device pointers and plain sizes.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace tqattn::cuda {

// Sequences per launch: their lengths travel in the parameter block.
constexpr int kMaxLaunchSeqs = 256;

// Decode kernel shape: 8 warps, each streaming 16-token groups through its own cp.async ring;
// 8 query rows (flattened (l, h) pairs of one KV head) per block; splits in whole 16-token groups.
constexpr int kDecodeWarps = 8;
constexpr int kDecodeGroup = 16;
// Decode merges up to this many splits of a unit inside one (portable-size) cluster, and takes
// that many splits for sequences up to kDecodeClusterMaxTokens. (Non-portable clusters of 16 were
// measured slower: 13.9 vs 10.3 µs at 2K, 38.6 vs 29.7 µs at 32K on the H100.)
constexpr int kMaxDecodeCluster = 8;
constexpr int64_t kDecodeClusterMaxTokens = 4096;
// Decode blocks of up to this many tokens run one per SM (see the split choice).
constexpr int64_t kDecodeOneBlockPerSmMaxTokens = 3072;
constexpr int kDecodeRows = 8;
// Shared memory the merge of a decode block's warps takes: per (warp, row) max and sum,
// and the warps' output rows.
constexpr int decode_warp_merge_bytes(int d, int warps) {
  return (2 * warps * kDecodeRows + warps * kDecodeRows * d) * 4;
}
// Decode code tables sit at fixed shared-memory offsets (a table of b-bit codes is at most 32 KiB)
// so that a lookup is one shift, one LOP3 and one LDS with an immediate base.
constexpr int kKeyLutOffset = 0;
constexpr int kValueLutOffset = 32768;
constexpr int kDecodeLutBytes = 65536;
// Stream decode (MSE keys of the specialised widths over 16-byte aligned planes): one block of
// stream_warps(D) warps per SM streams its split in rounds of that many stages of kStreamTokens
// tokens (stage w of a round is warp w's) through a ring of round slots that the copy engine
// fills, four bulk copies a round. D = 256 runs 8 warps: its resident accumulators (O^T and Q^T's
// fragments, 96 registers) need the 255-register budget of 256 threads; the others run 16 (128
// registers each). Its code tables are byte-indexed: 256 rows of 256 bytes, the 32 copies (one
// per lane) of a key pair at byte 0 of a row and of a value pair at byte 128, so that a lookup
// address is one PRMT (code byte above the lane offset).
constexpr int stream_warps(int d) { return d >= 256 ? 8 : 16; }
constexpr int kStreamTokens = 32;
constexpr int kStreamLutBytes = 65536;
constexpr int kStreamValueLut = 128;
// Tokens of one round: a stage per warp.
constexpr int stream_round_tokens(int d) { return stream_warps(d) * kStreamTokens; }
static_assert(stream_round_tokens(128) == 512 && stream_round_tokens(256) == 256, "round sizes");
// One packed tile stage of MSE planes (stream decode stages, generic decode groups, prefill
// tiles): key indices, value indices (each followed by 16 bytes of slack, which no read needs:
// load_run reads only a run's own words; dropping it would change every stage size), key norms,
// value norms; every region 16-byte aligned. Prod keys append residual norms and signs after
// `bytes` (the host's layout_stage). Compile-time for fixed widths.
struct TileStage {
  int vidx, knorm, vnorm, bytes;
};
constexpr int round_up16(int n) { return (n + 15) / 16 * 16; }
constexpr TileStage mse_tile_stage(int tokens, int kwords, int vwords) {
  const int vidx = round_up16(tokens * kwords * 4 + 16);
  const int knorm = vidx + round_up16(tokens * vwords * 4 + 16);
  const int vnorm = knorm + round_up16(tokens * 2);
  return {vidx, knorm, vnorm, vnorm + round_up16(tokens * 2)};
}
static_assert(mse_tile_stage(64, 12, 16).bytes == 7456, "3/4 bits at D = 128, 64 tokens");
constexpr TileStage stream_round(int d, int kwords, int vwords) {
  return mse_tile_stage(stream_round_tokens(d), kwords, vwords);
}
static_assert(kStreamTokens * 2 % 16 == 0, "a warp's norms start 16-byte aligned within a round");
static_assert(stream_round(128, 12, 16).bytes == 59424, "3/4 bits at D = 128");
static_assert(stream_round(256, 24, 32).bytes == 58400, "3/4 bits at D = 256");
// The stream decode's barrier region: per round slot an mbarrier and an arrival counter (8 bytes
// each), two plane offsets, and each warp's mbarrier for its stage of round 0.
constexpr int stream_barrier_bytes(int d, int nstages) {
  return nstages * 16 + 16 + stream_warps(d) * 8;
}
// Launches whose splits all fit one round take the stream kernel's one-round instantiation (no
// ring refills; docs/perf.md, history 75).
constexpr bool stream_decode_one_round(int d, int64_t split_tokens) {
  return split_tokens <= stream_round_tokens(d);
}
static_assert(stream_decode_one_round(128, 512) && !stream_decode_one_round(128, 544) &&
                  stream_decode_one_round(256, 256) && !stream_decode_one_round(256, 288),
              "one round: 512 tokens (256 at D = 256)");
// The mma.sync prefill kernel's shape: rows per block and tokens per tile depend on D.
// D = 128 runs 8 warps of 16 rows (<= 128 registers, two blocks: 16 warps per SM to hide the
// mma / softmax dependency chains); the others 4 warps of 32 rows (16 for D = 256).
constexpr int prefill_warps(int d) { return d == 128 ? 8 : 4; }
constexpr int prefill_rows_per_warp(int d) { return d < 128 ? 32 : 16; }
constexpr int prefill_block_rows(int d) { return prefill_warps(d) * prefill_rows_per_warp(d); }
constexpr int prefill_tile(int d) { return d <= 64 ? 64 : 32; }
// Expanded fp16 tile buffers (K, V, and for Prod keys the QJL signs): two for D <= 128, so that
// tile i + 1 is expanded while tile i is multiplied with one block barrier per tile (the space
// is free there: the epilogue's fp32 scratch is larger); one for D = 256, where a second buffer
// would cost the second resident block per SM. Packed tiles arrive three tiles ahead.
constexpr int prefill_tile_bufs(int d) { return d <= 128 ? 2 : 1; }
constexpr int kPrefillStages = 3;
// Prefill's running row max moves only when a score passes it by more than this (log2 units).
constexpr float kLazyMaxSlack = 8.0f;
constexpr int prefill_tile_buf_bytes(int d, bool prod) {
  return ((prod ? 3 : 2) * prefill_tile(d) * (d + 8) * 2 + 3 * prefill_tile(d) * 4 + 15) / 16 * 16;
}
// The wgmma prefill kernel (D = 64, 128 or 256, MSE keys, compute capability 9.0): two
// warpgroups of 64 rows per block, tiles of K and V in the 128-byte swizzled layout: 64 tokens
// (8 or 16 KiB each), 32 at D = 256 (16 KiB each), so that two tile buffers, four packed stages,
// the Q tile and the code tables fit beside each other.
constexpr bool wgmma_prefill_supports(int d) { return d == 64 || d == 128 || d == 256; }
constexpr int kWgmmaPrefillWarps = 8;
constexpr int kWgmmaPrefillRows = 128;
constexpr int wgmma_prefill_tile(int d) { return d == 256 ? 32 : 64; }
constexpr int kWgmmaPrefillStages = 4;  // packed tiles in flight
// Prefill merges up to this many splits of a unit inside one (portable-size) cluster when all the
// units' clusters fit on the device at once.
constexpr int kMaxPrefillCluster = 8;
constexpr int wgmma_prefill_tile_bytes(int d) { return wgmma_prefill_tile(d) * d * 2; }
static_assert(wgmma_prefill_tile_bytes(64) % 1024 == 0 &&
                  wgmma_prefill_tile_bytes(128) % 1024 == 0 &&
                  wgmma_prefill_tile_bytes(256) % 1024 == 0,
              "tiles keep the swizzle's 1024-byte period");
// Prefill code tables hold this many copies of each entry (lane % copies picks one): fewer bank
// conflicts for a quarter of the space of full replication. (The host halves it for K/V tables
// when that keeps two blocks per SM; the QJL sign table always has this many.)
constexpr int kPrefillLutCopies = 8;
// Pair tables (two indices -> half2) for index widths up to this, single tables above.
constexpr int kMaxPairBits = 4;
// Entries of a code table for index width `bits`: pairs for bits <= kMaxPairBits.
constexpr int lut_entries(int bits) { return bits <= kMaxPairBits ? 1 << (2 * bits) : 1 << bits; }

// The most dynamic shared memory a block may have on compute capability 9.0.
constexpr int kHopperMaxSmemPerBlock = 227 * 1024;
// The wgmma prefill kernel's shared memory: the rotated Q tile (padded rows), the row scales and
// split flag, the K and V code tables (2^lut_shift copies of each entry: a lane reads its own
// copy, conflict-free; with 8 copies a lookup took ~2.8 wavefronts, the largest share of the
// kernel's shared-memory traffic), then the tile region from the next 1024-byte boundary at or
// after `region` (the swizzle's period; `bytes` holds the slack): two buffers of K and V tiles,
// the packed stages after them. The epilogue's per-warp fp32 scratch reuses the region, at D = 256
// from the tables' start on (wgmma_prefill_scratch_over_tables: the tables are dead by then too,
// and 133 KiB of scratch would not fit in the region alone). A function of the head dim, widths and
// copies alone, so kernels with fixed widths take it at compile time (their table loads then fold
// the base into the instruction).
struct WgmmaPrefillLayout {
  int q, rs, klut, vlut, region, stage, stage_bytes, bytes;
};
constexpr bool wgmma_prefill_scratch_over_tables(int d) { return d == 256; }
constexpr WgmmaPrefillLayout wgmma_prefill_layout(int d, int kbits, int vbits, int kwords,
                                                  int vwords, int lut_shift) {
  WgmmaPrefillLayout l{};
  l.q = 0;
  l.rs = kWgmmaPrefillRows * (d + 8) * 2;
  l.klut = l.rs + (2 * kWgmmaPrefillRows + 4) * 4;
  l.vlut = l.klut + (lut_entries(kbits) * 4 << lut_shift);
  l.region = l.vlut + (lut_entries(vbits) * 4 << lut_shift);
  l.stage = 2 * 2 * wgmma_prefill_tile_bytes(d);  // from the region's start
  l.stage_bytes = mse_tile_stage(wgmma_prefill_tile(d), kwords, vwords).bytes;
  const int loop = l.region + 1024 + l.stage + kWgmmaPrefillStages * l.stage_bytes;
  const int scratch_bytes = kWgmmaPrefillWarps * (16 * d + 4 * 16) * 4;
  const int epilogue =
      (wgmma_prefill_scratch_over_tables(d) ? l.klut : l.region + 1024) + scratch_bytes;
  l.bytes = loop > epilogue ? loop : epilogue;
  return l;
}
// A lane's own copy of each table entry (32 copies) where that fits, else 16 (D = 256 at 4/4 bits).
constexpr int wgmma_prefill_lut_shift(int d, int kbits, int vbits, int kwords, int vwords) {
  return wgmma_prefill_layout(d, kbits, vbits, kwords, vwords, 5).bytes <= kHopperMaxSmemPerBlock
             ? 5
             : 4;
}
static_assert(wgmma_prefill_layout(128, 3, 4, 12, 16, 5).bytes == 173200,
              "D = 128, 3/4 bits: one block per SM");
static_assert(wgmma_prefill_lut_shift(128, 4, 4, 16, 16) == 5, "D = 128, 4/4 bits fit");
static_assert(2 * (wgmma_prefill_layout(64, 3, 4, 6, 8, 5).bytes + 1024) <= 228 * 1024,
              "D = 64, 3/4 bits: two blocks per SM by shared memory");
static_assert(wgmma_prefill_lut_shift(256, 3, 4, 24, 32) == 5 &&
                  wgmma_prefill_lut_shift(256, 4, 4, 32, 32) == 4 &&
                  wgmma_prefill_layout(256, 4, 4, 32, 32, 4).bytes <= kHopperMaxSmemPerBlock,
              "D = 256: 32 copies at 3/4 bits, 16 at 4/4");

struct AttnParams {
  // Queries [B, Hq, L, D] and outputs; qdtype is also out's dtype.
  const void* q = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  int qdtype = 0;
  int hq = 0;
  int hkv = 0;
  int group = 0;
  int qlen = 0;
  int rows = 0;  // group * qlen: flattened rows f = l * group + h per KV head
  // Keys: index plane, norms, Prod planes; index_bits-wide codes of kcent.
  const uint32_t* kidx = nullptr;
  const uint16_t* knorm = nullptr;
  const uint16_t* kres = nullptr;
  const uint32_t* ksign = nullptr;
  int64_t kcap = 0;
  int kwords = 0;
  int kbits = 0;
  int swords = 0;
  const float* kcent = nullptr;
  int khad = 0;
  const float* ksigns = nullptr;
  const float* kmat_t = nullptr;  // dense key rotation, transposed (y = M q reads it coalesced)
  const float* kqjl_t = nullptr;  // S^T
  float k_inv_sqrt = 0.0f;
  float qjl_scale = 0.0f;
  // Values.
  const uint32_t* vidx = nullptr;
  const uint16_t* vnorm = nullptr;
  int64_t vcap = 0;
  int vwords = 0;
  int vbits = 0;
  const float* vcent = nullptr;
  int vhad = 0;
  const float* vsigns = nullptr;
  const float* vmat = nullptr;  // dense value rotation M (x = M^T y reads it coalesced)
  float v_inv_sqrt = 0.0f;
  // Options.
  float q_factor = 0.0f;  // scale, times log2(e) unless soft-capping (then applied after tanh)
  float softcap = 0.0f;
  int causal = 0;
  int64_t causal_offset = -1;
  int64_t window = 0;
  const void* mask = nullptr;
  int mask_dtype = 0;
  int64_t mstride_b = 0, mstride_h = 0, mstride_l = 0, mstride_s = 0;
  const float* sinks = nullptr;
  // Stream decode: a block whose copies before its loop read only tokens below `settled`
  // (QuantizedStates::settled_tokens) issues them before the dependency wait; early_copies picks
  // which (see set_early_copies).
  int64_t settled = 0;
  int early_copies = 0;
  // Sequences of this launch: b = first_b + i for i < nseq.
  int64_t first_b = 0;
  int nseq = 0;
  int aligned = 0;  // planes allow 16-byte cp.async (capacities % 8 == 0, aligned bases)
  // Index planes alone allow 16-byte cp.async of 8-token-aligned groups (capacity * words % 4 ==
  // 0, aligned bases): decode then copies them asynchronously and prefetches the norms into
  // registers even when an odd capacity misaligns the norm planes.
  int idx_aligned = 0;
  // Split-KV: tokens per split (a multiple of the kernel's tile), row blocks per (b, KV head),
  // partial results and arrival counters in the workspace.
  int split_tokens = 0;
  int row_blocks = 0;
  float* part_ml = nullptr;    // [split][unit][row] (m, l)
  uint16_t* part_o = nullptr;  // [split][unit][row][D] fp16, normalised
  int* counters = nullptr;     // decode [unit] arrivals; prefill [unit][2] arrivals, done
  // > 1 when the splits of a unit form one thread-block cluster of this size and merge through
  // distributed shared memory (no partials, no counters): decode's gridDim.y, prefill's gridDim.x.
  int cluster = 0;
  // Dynamic shared-memory layout (byte offsets), decided on the host. Decode: a ring of `nstages`
  // group stages per warp at off_stage (stream decode: one ring of `nstages` round slots);
  // prefill: two tile stages at off_f + off_stage.
  int nstages = 0;
  int stage_bytes = 0;
  int st_vidx = 0, st_knorm = 0, st_vnorm = 0, st_kres = 0, st_ksign = 0;  // within a stage
  int off_klut = 0, off_vlut = 0, off_slut = 0, off_q = 0, off_sq = 0, off_rs = 0, off_f = 0;
  int off_stage = 0;
  int off_bar = 0;  // stream decode: the warps' ring mbarriers [warp][stage]
  // Stream decode at a head dim without a Hadamard rotation: D x D fp32 that holds the keys'
  // dense rotation (kmat_t) until the query is rotated, then the values' (vmat) for the
  // un-rotation, so that neither product waits on L2 round trips. 0: not staged.
  int off_rot = 0;
  int lut_shift = 3;  // prefill: log2 of the code tables' copies per entry
  int64_t lens[kMaxLaunchSeqs] = {};
};

// Launchers (one instantiation family per head dim, in decode_d*.cu / prefill_d*.cu).
template <int D>
void launch_decode(const AttnParams& p, bool prod, dim3 grid, size_t smem, cudaStream_t stream);
template <int D>
void launch_prefill(const AttnParams& p, bool prod, dim3 grid, size_t smem, cudaStream_t stream);
// Resident blocks per SM for the kernel at this dynamic shared-memory size.
template <int D>
int decode_occupancy(bool prod, size_t smem);
// Stream decode (D 64, 96, 128, 256; MSE widths (2,2) (3,3) (3,4) (4,4); aligned planes).
template <int D>
void launch_stream_decode(const AttnParams& p, dim3 grid, size_t smem, cudaStream_t stream);
// True when the stream decode kernel serves these widths at this head dim.
constexpr bool stream_decode_supports(int d, int kbits, int vbits) {
  return (d == 64 || d == 96 || d == 128 || d == 256) &&
         ((kbits == 2 && vbits == 2) || (kbits == 3 && vbits == 3) || (kbits == 3 && vbits == 4) ||
          (kbits == 4 && vbits == 4));
}
template <int D>
int prefill_occupancy(bool prod, size_t smem);
// The wgmma prefill kernel (prefill_wgmma_d64.cu, _d128.cu, _d256.cu), its resident blocks
// per SM and its resident clusters of `cluster` blocks.
template <int D>
void launch_prefill_wgmma(const AttnParams& p, dim3 grid, size_t smem, cudaStream_t stream);
template <int D>
int prefill_wgmma_occupancy(size_t smem);
template <int D>
int prefill_wgmma_max_clusters(size_t smem, int cluster);

}  // namespace tqattn::cuda

// Host side of the CUDA attention: checks what the kernels support, lays out shared memory,
// chooses the KV split, takes the stream's workspace and launches. No host synchronisation and no
// allocation once the workspace and codec tables exist for the shapes in use.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "attention/attention_problem.h"
#include "cuda/attention_params.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"
#include "cuda/device_store.h"
#include "tqattn/error.h"

namespace tqattn::cuda {
namespace {

constexpr const char* kFn = "scaled_dot_product_attention";
constexpr float kLog2e = 1.4426950408889634f;
// Partial results of split prefill stay under this many bytes (the split count is cut to fit).
constexpr int64_t kMaxPartialBytes = int64_t{16} << 20;

thread_local const char* t_last_kernel = "";
thread_local const char* t_last_merge = "";
thread_local const char* t_last_stream_variant = "";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
int round16(int64_t n) { return static_cast<int>(round_up(n, 16)); }

// TQATTN_CUDA_DEBUG=1 prints each launch's configuration to stderr.
bool debug_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("TQATTN_CUDA_DEBUG");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

bool supported_dim(int64_t d) { return d == 64 || d == 96 || d == 128 || d == 256; }

int dtype_code(DType d) {
  switch (d) {
    case DType::kFloat16:
      return kF16;
    case DType::kBFloat16:
      return kBF16;
    case DType::kBool:
      return kBool;
    default:
      return kF32;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Stage layout for `tokens` tokens: kidx | vidx | knorm | vnorm | kres | ksign (each 16-aligned,
// index regions followed by 16 bytes of slack, mse_tile_stage).
int layout_stage(AttnParams& p, int tokens, bool prod) {
  const TileStage mse = mse_tile_stage(tokens, p.kwords, p.vwords);
  p.st_vidx = mse.vidx;
  p.st_knorm = mse.knorm;
  p.st_vnorm = mse.vnorm;
  int off = mse.bytes;
  p.st_kres = off;
  p.st_ksign = off;
  if (prod) {
    off += round16(tokens * 2);
    p.st_ksign = off;
    off += round16(int64_t{tokens} * p.swords * 4 + 16);
  }
  return off;
}

template <class F>
int dispatch_dim(int64_t d, F&& f) {
  switch (d) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 96:
      return f(std::integral_constant<int, 96>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    case 256:
      return f(std::integral_constant<int, 256>{});
    default:
      break;
  }
  throw_runtime(kFn, "head_dim ", d, " has no CUDA kernel (supported: 64, 96, 128, 256)");
}

// Occupancy queries, memoised per current device and shape (they repeat on every call).
// Thread-safe; the query runs outside the lock.
template <typename... Shape>
class OccupancyCache {
 public:
  template <typename F>
  int get(const std::tuple<Shape...>& shape, F&& query) {
    int device = 0;
    TQATTN_CUDA(kFn, cudaGetDevice(&device));
    const auto key = std::tuple_cat(std::make_tuple(device), shape);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = cache_.find(key);
      if (it != cache_.end()) return it->second;
    }
    const int value = query();
    std::lock_guard<std::mutex> lock(mutex_);
    return cache_.emplace(key, value).first->second;
  }

 private:
  std::mutex mutex_;
  std::map<std::tuple<int, Shape...>, int> cache_;
};

// Resident blocks per SM of the kernel family.
int occupancy(bool decode, bool wgmma, int64_t d, bool prod, size_t smem) {
  static OccupancyCache<bool, bool, int64_t, bool, size_t> cache;
  return cache.get(std::make_tuple(decode, wgmma, d, prod, smem), [&] {
    const int blocks = dispatch_dim(d, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if constexpr (wgmma_prefill_supports(D)) {
        if (wgmma) return prefill_wgmma_occupancy<D>(smem);
      }
      return decode ? decode_occupancy<D>(prod, smem) : prefill_occupancy<D>(prod, smem);
    });
    return std::max(blocks, 1);
  });
}

// Clusters of `cluster` wgmma prefill blocks resident at once.
int prefill_max_clusters(int64_t d, size_t smem, int cluster) {
  static OccupancyCache<int64_t, size_t, int> cache;
  return cache.get(std::make_tuple(d, smem, cluster), [&] {
    return dispatch_dim(d, [&](auto dim) -> int {
      constexpr int D = decltype(dim)::value;
      if constexpr (wgmma_prefill_supports(D)) return prefill_wgmma_max_clusters<D>(smem, cluster);
      throw_runtime(kFn, "no wgmma prefill kernel at head_dim ", D, " (supported: 64, 128, 256)");
    });
  });
}

// Decode split length (a multiple of `tile` tokens) for sequences of lengths lens[0, nseq), each
// with `per_seq` units. Blocks do not come in one wave when the split count rounds up per
// sequence (B = 16 mixed lengths made ~300 blocks for 264 slots: a second, nearly empty wave), so
// candidates from the ideal length (all work spread over `slots`) to twice that are costed as
// waves * (tokens per split + a block's fixed cost, ~512 tokens of streaming) and the cheapest
// wins.
int64_t balanced_decode_split(const int64_t* lens, int nseq, int64_t per_seq, int64_t tiles,
                              int64_t slots, int64_t tile) {
  constexpr int64_t kBlockCostTokens = 512;  // a block's fixed cost, in streamed tokens
  const int64_t m0 = std::max<int64_t>(1, ceil_div(tiles * per_seq, slots));
  const int64_t step = std::max<int64_t>(1, m0 / 32);
  int64_t best = m0, best_cost = -1;
  for (int64_t m = m0; m <= 2 * m0; m += step) {
    int64_t blocks = 0;
    for (int i = 0; i < nseq; ++i) blocks += std::max<int64_t>(1, ceil_div(lens[i], m * tile));
    const int64_t cost = ceil_div(blocks * per_seq, slots) * (m * tile + kBlockCostTokens);
    if (best_cost < 0 || cost < best_cost) {
      best = m;
      best_cost = cost;
    }
  }
  return best * tile;
}

// The stream decode kernel's block cost beyond its tokens (prologue, warp and split merges), in
// streamed tokens: ~11 us at ~240 tokens/us per block (H200, B = 1 Hkv = 8 split sweep: one more
// wave of blocks at 128K costs that much; docs/perf.md).
constexpr int64_t kStreamBlockCostTokens = 2560;

// Stream decode split length (a multiple of `tile`). One block per SM, so a batch of unequal
// lengths is bound by its longest blocks as much as by the average load: blocks of about 1.1x the
// balanced per-SM load (fixed costs included), or with more units than SMs 0.7x the mean unit's
// cost. Those factors came from simulating the in-order dispatch of the blocks onto the SMs
// against the measured B = 16 sweep (the simulation reproduced its five split counts within 5%):
// over random batches of 4-128 sequences they stay within 7% of the simulated best on average and
// 11-31% at worst, where one split per sequence was up to 45% slower. Equal lengths (B = 1) split
// evenly over the SMs.
int64_t stream_decode_split(const int64_t* lens, int nseq, int64_t per_seq, int64_t slots,
                            int64_t tile) {
  int64_t max_len = 1, total = 0;
  bool equal = true;
  for (int i = 0; i < nseq; ++i) {
    max_len = std::max(max_len, lens[i]);
    total += lens[i] * per_seq;
    equal = equal && lens[i] == lens[0];
  }
  const int64_t units = int64_t{nseq} * per_seq;
  int64_t split;
  if (equal && units < slots) {
    split = ceil_div(max_len, slots / units);
  } else {
    const double load = static_cast<double>(total + units * kStreamBlockCostTokens);
    split = static_cast<int64_t>(units < slots ? 1.1 * load / static_cast<double>(slots)
                                               : 0.7 * load / static_cast<double>(units));
  }
  return round_up(std::clamp<int64_t>(split, 1, max_len), tile);
}

std::string reason(const TensorView& queries, const QuantizedStates& keys,
                   const QuantizedStates& values) {
  if (device_count() == 0) return "no CUDA device is present";
  if (queries.rank() != 4) return "queries must be [B, Hq, L, D]";
  const int64_t d = queries.shape[3];
  if (!supported_dim(d))
    return detail::concat("the CUDA attention kernels support head_dim 64, 96, 128 or 256; got ",
                          d);
  for (const QuantizedStates* s : {&keys, &values}) {
    if (s->quantizer && s->quantizer->is_split())
      return detail::concat(
          "split-channel (fractional per-tensor width) ", s == &keys ? "keys" : "values",
          " are not supported by the CUDA kernels; use integral widths per tensor (e.g. 3-bit keys "
          "with 4-bit values)");
  }
  return {};
}

}  // namespace

const char* last_attention_kernel() { return t_last_kernel; }

const char* last_split_merge() { return t_last_merge; }

const char* last_stream_decode_variant() { return t_last_stream_variant; }

std::string unsupported_reason(const TensorView& queries, const QuantizedStates& keys,
                               const QuantizedStates& values, const AttentionOptions&) {
  return reason(queries, keys, values);
}

void attention(const TensorView& queries, const QuantizedStates& keys,
               const QuantizedStates& values, const TensorView& out,
               const AttentionOptions& options, const TensorView* lse) {
  const std::string why = reason(queries, keys, values);
  if (!why.empty()) throw_runtime(kFn, why);
  const attention::Problem pr =
      attention::resolve_quantized(kFn, queries, keys, values, &out, options, lse, false);
  const int device = queries.device_id;
  DeviceGuard guard(device, kFn);
  void* stream = options.stream;
  const CodecTables& kt = codec_tables(keys.quantizer->parts()[0], false, device, stream, kFn);
  const CodecTables& vt = codec_tables(values.quantizer->parts()[0], false, device, stream, kFn);
  const PackedPlanes& kp = keys.parts[0];
  const PackedPlanes& vp = values.parts[0];
  const int64_t D = pr.head_dim;
  const bool prod = kt.prod;
  const bool decode = pr.q_len <= 8;

  AttnParams p;
  p.q = queries.data;
  p.out = out.data;
  p.lse = lse ? lse->as<float>() : nullptr;
  p.qdtype = dtype_code(queries.dtype);
  p.hq = static_cast<int>(pr.q_heads);
  p.hkv = static_cast<int>(pr.kv_heads);
  p.group = static_cast<int>(pr.group);
  p.qlen = static_cast<int>(pr.q_len);
  p.rows = static_cast<int>(pr.group * pr.q_len);
  p.kidx = kp.indices;
  p.knorm = kp.norms;
  p.kres = kp.residual_norms;
  p.ksign = kp.qjl_signs;
  p.kcap = keys.capacity;
  p.kwords = static_cast<int>(packed_words(D, kt.index_bits));
  p.kbits = kt.index_bits;
  p.swords = static_cast<int>(sign_words(D));
  p.kcent = kt.centroids;
  p.khad = kt.hadamard;
  p.ksigns = kt.signs;
  p.kmat_t = kt.matrix_t;
  p.kqjl_t = kt.qjl_t;
  p.k_inv_sqrt = kt.inv_sqrt_dim;
  p.qjl_scale = kt.qjl_scale;
  p.vidx = vp.indices;
  p.vnorm = vp.norms;
  p.vcap = values.capacity;
  p.vwords = static_cast<int>(packed_words(D, vt.index_bits));
  p.vbits = vt.index_bits;
  p.vcent = vt.centroids;
  p.vhad = vt.hadamard;
  p.vsigns = vt.signs;
  p.vmat = vt.matrix;
  p.v_inv_sqrt = vt.inv_sqrt_dim;
  // The kernels transform a Hadamard rotation in registers, which needs a power-of-two D (as
  // Rotation::hadamard does).
  if ((p.khad || p.vhad) && (D & (D - 1)) != 0)
    throw_runtime(kFn, "a Hadamard rotation needs a power-of-two head_dim; got ", D);
  p.softcap = pr.softcap;
  p.q_factor = pr.scale * (pr.softcap > 0.0f ? 1.0f : kLog2e);
  p.causal = pr.causal;
  p.causal_offset = options.causal_offset;
  p.window = pr.window;
  p.mask = pr.mask.data;
  p.mask_dtype = dtype_code(pr.mask.dtype);
  p.mstride_b = pr.mask.stride_b;
  p.mstride_h = pr.mask.stride_h;
  p.mstride_l = pr.mask.stride_l;
  p.mstride_s = pr.mask.stride_s;
  p.sinks = pr.sinks;
  p.settled = std::min(keys.settled_tokens, values.settled_tokens);
  p.early_copies = early_copies();
  p.aligned = keys.capacity % 8 == 0 && values.capacity % 8 == 0 && aligned16(p.kidx) &&
              aligned16(p.vidx) && aligned16(p.knorm) && aligned16(p.vnorm) &&
              (!prod || (aligned16(p.kres) && aligned16(p.ksign)));
  p.idx_aligned = aligned16(p.kidx) && aligned16(p.vidx) && (keys.capacity * p.kwords) % 4 == 0 &&
                  (values.capacity * p.vwords) % 4 == 0;

  if (pr.max_len + pr.q_len >= (int64_t{1} << 31) || options.causal_offset >= (int64_t{1} << 30))
    throw_runtime(kFn, "the CUDA kernels index positions in 32 bits; sequence length ", pr.max_len,
                  " is too long");
  const DeviceInfo& info = device_info(device);
  // The stream decode kernel (one 16-warp block per SM, copy-engine rings) serves the common MSE
  // widths over aligned planes (every KVCache); the rest take the generic decode kernel. Stream
  // splits are whole 32-token stages; generic decode splits whole 16-token groups (finer than the
  // 8 warps' 128 tokens, so that a split count can fill every slot: 33 splits of 3984 tokens give
  // 264 blocks at 128K).
  const bool stream_decode = decode && !prod && p.aligned && stream_decode_enabled() &&
                             stream_decode_supports(static_cast<int>(D), p.kbits, p.vbits);
  // Prefill over MSE keys at D = 64, 128 and 256 takes the wgmma kernel where the device has it
  // (sm_90a) and its tables and stages fit (all widths but the widest pairs, e.g. 8/8, which take
  // mma.sync).
  const int wgmma_lut_shift =
      wgmma_prefill_lut_shift(static_cast<int>(D), p.kbits, p.vbits, p.kwords, p.vwords);
  const bool wgmma_prefill = !decode && !prod && wgmma_prefill_supports(static_cast<int>(D)) &&
                             info.cc_major == 9 && info.cc_minor == 0 && wgmma_prefill_enabled() &&
                             wgmma_prefill_layout(static_cast<int>(D), p.kbits, p.vbits, p.kwords,
                                                  p.vwords, wgmma_lut_shift)
                                     .bytes <= info.max_smem_per_block;
  t_last_kernel = stream_decode   ? "stream decode"
                  : decode        ? "decode"
                  : wgmma_prefill ? "wgmma prefill"
                                  : "prefill";
  const int tokens_per_tile = stream_decode   ? kStreamTokens
                              : decode        ? kDecodeGroup
                              : wgmma_prefill ? wgmma_prefill_tile(static_cast<int>(D))
                                              : prefill_tile(static_cast<int>(D));
  const int rows_per_block = decode          ? kDecodeRows
                             : wgmma_prefill ? kWgmmaPrefillRows
                                             : prefill_block_rows(static_cast<int>(D));
  p.row_blocks = static_cast<int>(ceil_div(p.rows, rows_per_block));

  // Shared-memory layout; merge_capacity: bytes free for the split merge's weights.
  size_t smem = 0;
  int64_t merge_capacity = 0;
  if (stream_decode) {
    const TileStage round = stream_round(static_cast<int>(D), p.kwords, p.vwords);
    const int merge =
        decode_warp_merge_bytes(static_cast<int>(D), stream_warps(static_cast<int>(D)));
    auto layout = [&](int nstages) {
      int off = kStreamLutBytes;
      auto place = [&](int64_t bytes) {
        const int at = off;
        off += round16(bytes);
        return at;
      };
      p.off_q = place(int64_t{kDecodeRows} * D * 2);
      p.off_rs = place(2 * kDecodeRows * 4);
      p.off_f = place((2 * kDecodeRows * D + 3 * kDecodeRows + 4) * 4);
      p.off_bar = place(stream_barrier_bytes(static_cast<int>(D), nstages));
      p.off_rot = (D & (D - 1)) != 0 ? place(D * D * 4) : 0;
      p.nstages = nstages;  // the kernel takes the round layout from stream_round itself
      p.off_stage = place(std::max(nstages * round.bytes, merge));
      return static_cast<size_t>(off);
    };
    int chosen = 2;
    for (int n = 4; n > 2; --n)
      if (static_cast<int>(layout(n)) <= info.max_smem_per_block) {
        chosen = n;
        break;
      }
    smem = layout(chosen);
    merge_capacity = std::max(p.nstages * round.bytes, merge);
  } else if (decode) {
    // Tables at fixed offsets; the small regions go first-fit into the gaps after each table,
    // the warps' rings (reused by the epilogue's merge) after that.
    const int klut = lut_entries(p.kbits) * 128, vlut = lut_entries(p.vbits) * 128;
    p.stage_bytes = layout_stage(p, kDecodeGroup, prod);
    // The warp merge: per (warp, row) max, sum and weight, and the warps' rows.
    const int merge = decode_warp_merge_bytes(static_cast<int>(D), kDecodeWarps);
    auto layout = [&](int nstages) {
      int gaps[2][2] = {{klut, kValueLutOffset}, {kValueLutOffset + vlut, kDecodeLutBytes}};
      int tail = kDecodeLutBytes;
      auto place = [&](int64_t bytes) {
        const int n = round16(bytes);
        for (auto& gap : gaps) {
          const int at = round16(gap[0]);
          if (at + n <= gap[1]) {
            gap[0] = at + n;
            return at;
          }
        }
        const int at = tail;
        tail += n;
        return at;
      };
      p.off_klut = kKeyLutOffset;
      p.off_vlut = kValueLutOffset;
      p.off_slut = prod ? place(4 * 32 * 4) : 0;
      p.off_q = place(int64_t{kDecodeRows} * D * 2);
      p.off_sq = prod ? place(int64_t{kDecodeRows} * D * 2) : p.off_q;
      p.off_rs = place(2 * kDecodeRows * 4);
      p.off_f = place((2 * kDecodeRows * D + 3 * kDecodeRows + 4) * 4);
      p.nstages = nstages;
      p.off_stage = place(std::max(kDecodeWarps * nstages * p.stage_bytes, merge));
      return static_cast<size_t>(tail);
    };
    // Deepest ring that keeps two blocks per SM, else the deepest that fits at all.
    int chosen = 0;
    for (int n = 3; n >= 2 && !chosen; --n)
      if (2 * (static_cast<int>(layout(n)) + 1024) <= info.max_smem_per_sm) chosen = n;
    for (int n = 3; n >= 2 && !chosen; --n)
      if (static_cast<int>(layout(n)) <= info.max_smem_per_block) chosen = n;
    smem = layout(chosen ? chosen : 2);
    merge_capacity = std::max(kDecodeWarps * p.nstages * p.stage_bytes, merge);
  } else if (wgmma_prefill) {
    const WgmmaPrefillLayout l = wgmma_prefill_layout(static_cast<int>(D), p.kbits, p.vbits,
                                                      p.kwords, p.vwords, wgmma_lut_shift);
    p.lut_shift = wgmma_lut_shift;
    p.off_q = p.off_sq = l.q;
    p.off_rs = l.rs;
    p.off_klut = l.klut;
    p.off_vlut = l.vlut;
    p.off_slut = 0;
    p.off_f = l.region;
    p.off_stage = l.stage;
    p.stage_bytes = layout_stage(p, wgmma_prefill_tile(static_cast<int>(D)), false);
    p.nstages = kWgmmaPrefillStages;
    smem = static_cast<size_t>(l.bytes);
    merge_capacity = l.rs - l.q;  // the Q tile
  } else {
    const int bm = prefill_block_rows(static_cast<int>(D));
    const int bn = prefill_tile(static_cast<int>(D));
    const int ld = static_cast<int>(D) + 8;
    const int rows_w = prefill_rows_per_warp(static_cast<int>(D));
    auto layout = [&](int lut_shift) {
      const int copies = 1 << lut_shift;
      int off = 0;
      p.lut_shift = lut_shift;
      p.off_q = off;
      off += round16(int64_t{bm} * ld * 2);
      p.off_sq = off;
      off += prod ? round16(int64_t{bm} * ld * 2) : 0;
      p.off_rs = off;
      off += round16((2 * bm + 4) * 4);
      p.off_klut = off;
      off += round16(lut_entries(p.kbits) * 4 * copies);
      p.off_vlut = off;
      off += round16(lut_entries(p.vbits) * 4 * copies);
      p.off_slut = off;
      off += 4 * 4 * kPrefillLutCopies;
      p.off_f = off;
      const int tiles = prefill_tile_bufs(static_cast<int>(D)) *
                        prefill_tile_buf_bytes(static_cast<int>(D), prod);
      p.off_stage = tiles;  // relative to off_f
      p.stage_bytes = layout_stage(p, bn, prod);
      p.nstages = kPrefillStages;
      const int scratch =
          prefill_warps(static_cast<int>(D)) * (rows_w * static_cast<int>(D) + 4 * rows_w) * 4;
      return static_cast<size_t>(off + std::max(tiles + kPrefillStages * p.stage_bytes, scratch));
    };
    // Eight copies per table entry unless four is what keeps two blocks per SM.
    constexpr int kShift = kPrefillLutCopies == 8 ? 3 : 2;
    smem = layout(kShift);
    if (2 * (static_cast<int>(smem) + 1024) > info.max_smem_per_sm) {
      const size_t smaller = layout(2);
      if (2 * (static_cast<int>(smaller) + 1024) <= info.max_smem_per_sm) {
        smem = smaller;
      } else {
        smem = layout(kShift);
      }
    }
    merge_capacity = int64_t{bm} * ld * 2;  // the Q tile
  }
  if (static_cast<int>(smem) > info.max_smem_per_block)
    throw_runtime(kFn, "these widths need ", smem,
                  " bytes of shared memory per block; the device "
                  "allows ",
                  info.max_smem_per_block);
  const int per_sm = stream_decode ? 1 : occupancy(decode, wgmma_prefill, D, prod, smem);
  const int target = per_sm * info.sm_count;
  const int fixed = decode_splits();
  const cudaStream_t s = as_stream(stream);

  for (int64_t b0 = 0; b0 < pr.batch; b0 += kMaxLaunchSeqs) {
    const int nseq = static_cast<int>(std::min<int64_t>(kMaxLaunchSeqs, pr.batch - b0));
    p.first_b = b0;
    p.nseq = nseq;
    int64_t max_len = 0, tiles = 0;
    for (int i = 0; i < nseq; ++i) {
      p.lens[i] = pr.lengths[b0 + i];
      max_len = std::max(max_len, p.lens[i]);
      tiles += ceil_div(p.lens[i], tokens_per_tile);
    }
    const int64_t units = int64_t{nseq} * p.hkv * p.row_blocks;
    int64_t split_tokens;
    if (decode && fixed > 0) {
      split_tokens = round_up(ceil_div(std::max<int64_t>(max_len, 1), fixed), tokens_per_tile);
    } else if (decode) {
      // One block per SM while blocks stay short: a second resident block per SM streams faster
      // (16 warps hide more latency) but doubles the per-block fixed cost on each SM and the
      // partials to merge, which only pays off for long blocks (H100, B=1 Hkv=8: one block per
      // SM wins up to ~2.8K tokens per block; bench/gpu split sweep in docs/perf.md).
      const int64_t per_seq = int64_t{p.hkv} * p.row_blocks;
      if (stream_decode) {
        split_tokens = stream_decode_split(p.lens, nseq, per_seq, info.sm_count, tokens_per_tile);
      } else {
        split_tokens =
            balanced_decode_split(p.lens, nseq, per_seq, tiles, info.sm_count, tokens_per_tile);
        if (split_tokens > kDecodeOneBlockPerSmMaxTokens)
          split_tokens =
              balanced_decode_split(p.lens, nseq, per_seq, tiles, target, tokens_per_tile);
      }
    } else if (units >= target) {
      split_tokens = round_up(std::max<int64_t>(max_len, 1) + 8, tokens_per_tile);
    } else {
      // Whole waves only: a second, nearly empty wave would double the time.
      int64_t splits = std::max<int64_t>(1, target / units);
      const int64_t per_split = units * rows_per_block * (8 + 2 * D);
      splits = std::max<int64_t>(1, std::min(splits, kMaxPartialBytes / per_split));
      split_tokens = round_up(ceil_div(std::max<int64_t>(max_len, 1), splits), tokens_per_tile);
      split_tokens = std::max<int64_t>(split_tokens, 4 * tokens_per_tile);
    }
    // The merge keeps one weight per (row, split) in shared memory: cap the split count there.
    const int64_t max_splits =
        decode ? merge_capacity / (4 * kDecodeRows)
               : std::min<int64_t>(64, merge_capacity / (4 * int64_t{rows_per_block}));
    // With a window, lo is rounded down to a multiple of 8, which can add up to 7 tokens to a
    // range; without one every range starts at 0 and is at most the length.
    const int64_t slack = p.window > 0 ? 7 : 0, span = max_len + slack;
    if (ceil_div(span, split_tokens) > max_splits)
      split_tokens = round_up(ceil_div(span, max_splits), tokens_per_tile);
    int64_t nsplit = std::max<int64_t>(1, ceil_div(span, split_tokens));
    // Prefill splits wait for each other at their merge (finish_prefill_block), so a split grid
    // must be resident at once: at most `target` blocks (a window's slack can add a split).
    while (!decode && nsplit > 1 && units * nsplit > target) {
      split_tokens += tokens_per_tile;
      nsplit = ceil_div(span, split_tokens);
    }
    // Decode splits of a unit merge inside one thread-block cluster (distributed shared memory)
    // when there are at most kMaxDecodeCluster of them, instead of through workspace partials and
    // an arrival counter (a chain of L2 round trips). Short sequences take that path even though
    // fewer blocks then fill the chip: at these lengths the merge chain costs more than streaming.
    p.cluster = 0;
    if (decode && cluster_merge_enabled()) {
      if (nsplit > kMaxDecodeCluster && fixed == 0 && max_len <= kDecodeClusterMaxTokens) {
        split_tokens = round_up(ceil_div(span, kMaxDecodeCluster), tokens_per_tile);
        nsplit = ceil_div(span, split_tokens);
      }
      // Every sequence must fill the cluster: a cluster's blocks wait for each other at the
      // merge, so the empty blocks of a shorter sequence would hold their SM slots idle.
      bool uniform = true;
      for (int i = 0; i < nseq; ++i)
        uniform = uniform && ceil_div(p.lens[i] + slack, split_tokens) == nsplit;
      if (nsplit > 1 && nsplit <= kMaxDecodeCluster && uniform)
        p.cluster = static_cast<int>(nsplit);
    } else if (wgmma_prefill && cluster_merge_enabled() && nsplit > 1 &&
               nsplit <= kMaxPrefillCluster) {
      // Prefill splits merge in a cluster only when every unit's cluster is resident at once: a
      // cluster's blocks wait for each other at the merge, and clusters that do not fit the device
      // (whole GPCs' worth of SMs each) would run in a second wave. A unit with fewer splits than
      // the cluster has empty blocks, which join the merge with nothing to add.
      if (units <= prefill_max_clusters(D, smem, static_cast<int>(nsplit)))
        p.cluster = static_cast<int>(nsplit);
    }
    t_last_merge = nsplit == 1 ? "none" : p.cluster > 1 ? "cluster" : "workspace";
    t_last_stream_variant = !stream_decode ? ""
                            : stream_decode_one_round(static_cast<int>(D), split_tokens)
                                ? "one round"
                                : "ring";
    if (debug_enabled())
      std::fprintf(stderr,
                   "[tqattn.cuda] %s D=%lld rows=%d units=%lld splits=%lld split_tokens=%lld "
                   "smem=%zu stages=%d occupancy=%d aligned=%d cluster=%d\n",
                   t_last_kernel, static_cast<long long>(D), p.rows, static_cast<long long>(units),
                   static_cast<long long>(nsplit), static_cast<long long>(split_tokens), smem,
                   p.nstages, target / info.sm_count, p.aligned, p.cluster);
    p.split_tokens = static_cast<int>(split_tokens);
    if (nsplit > 1 && p.cluster == 0) {
      // Per unit: arrivals, and (prefill) blocks done reading the partials.
      const size_t counters = static_cast<size_t>(round_up(units * 8, 256));
      const size_t ml = static_cast<size_t>(round_up(nsplit * units * rows_per_block * 8, 256));
      const size_t po = static_cast<size_t>(nsplit * units * rows_per_block * D * 2);
      char* ws = static_cast<char*>(workspace(device, stream, counters + ml + po, counters, kFn));
      p.counters = reinterpret_cast<int*>(ws);
      p.part_ml = reinterpret_cast<float*>(ws + counters);
      p.part_o = reinterpret_cast<uint16_t*>(ws + counters + ml);
    } else {
      p.counters = nullptr;
      p.part_ml = nullptr;
      p.part_o = nullptr;
    }
    if (nsplit > 65535) throw_runtime(kFn, "too many KV splits for one launch: ", nsplit);
    dispatch_dim(D, [&](auto dim) {
      constexpr int kD = decltype(dim)::value;
      if constexpr (stream_decode_supports(kD, 3, 4)) {
        if (stream_decode) {
          launch_stream_decode<kD>(
              p, dim3(static_cast<unsigned>(units), static_cast<unsigned>(nsplit)), smem, s);
          return 0;
        }
      }
      if constexpr (wgmma_prefill_supports(kD)) {
        if (wgmma_prefill) {
          launch_prefill_wgmma<kD>(
              p,
              dim3(static_cast<unsigned>(nsplit), static_cast<unsigned>(p.row_blocks),
                   static_cast<unsigned>(int64_t{nseq} * p.hkv)),
              smem, s);
          return 0;
        }
      }
      if (decode) {
        launch_decode<kD>(
            p, prod, dim3(static_cast<unsigned>(units), static_cast<unsigned>(nsplit)), smem, s);
      } else {
        launch_prefill<kD>(p, prod,
                           dim3(static_cast<unsigned>(nsplit), static_cast<unsigned>(p.row_blocks),
                                static_cast<unsigned>(int64_t{nseq} * p.hkv)),
                           smem, s);
      }
      return 0;
    });
  }
}

}  // namespace tqattn::cuda

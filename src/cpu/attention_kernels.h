// The fused CPU attention kernels' shared description of one task: a block of query rows of one
// (sequence, KV head) against a token range of the packed cache, producing an unnormalised
// partial softmax (row max m, row sum l, rotated-space accumulator acc) that the driver merges.
//
// Every kernel variant (Highway SIMD and the plain scalar twin) walks the same tiles of kTile
// tokens, aligned to multiples of kTile, with the same online-softmax update per tile, so that
// the variants differ only by rounding.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention/attention_problem.h"

namespace tqattn::cpu::attn {

constexpr int kTile = 64;      // tokens per tile
constexpr int kRowBlock = 64;  // rows per task for the row-blocked (prefill) kernel
constexpr int kSmallRows = 8;  // up to this many rows per KV head: the decode kernel
constexpr int kDimPad = 16;    // value parts are laid out at multiples of this in acc
constexpr int kMinTable = 16;  // centroid tables hold at least this many (replicated) entries

// One dot-product term of a key score, or one value part. A key score is
//   sum_c mult_c(t) * sum_j q[offset_c + j] * table_c[index_c(t, j)]
// with mult_c(t) = norm(t) * norm2(t) * constant. MSE keys give one term per quantizer part
// (norm = ||k||); Prod keys add a term whose "indices" are the 1-bit QJL signs with table
// {-1, +1}, norm2 = gamma and constant = sqrt(pi/2)/d, against q' = S q.
// For values, acc[offset_c + j] += p * norm(t) * table_c[index_c(t, j)].
struct Component {
  const uint32_t* words = nullptr;      // token 0 of this (sequence, head)
  const uint32_t* plane_end = nullptr;  // end of the whole plane: reads must stay below
  int64_t words_per_token = 0;
  int bits = 0;
  int dim = 0;
  const float* table = nullptr;     // 2^bits entries, repeated to at least kMinTable
  const uint16_t* norm = nullptr;   // fp16 per token
  const uint16_t* norm2 = nullptr;  // fp16 per token, or null
  float constant = 1.0f;
  int offset = 0;
};

struct TaskArgs {
  const attention::Problem* problem = nullptr;
  const Component* keys = nullptr;
  int n_keys = 0;
  const Component* values = nullptr;
  int n_values = 0;
  int64_t b = 0;     // sequence
  int64_t h = 0;     // KV head
  int64_t row0 = 0;  // first row of the block; row r is query (h * G + r / L, r % L)
  int rows = 0;
  const float* queries = nullptr;  // rows x q_stride: rotated (and S-projected), scaled
  int64_t q_stride = 0;
  int64_t v_stride = 0;  // acc row length: value parts at offsets padded to kDimPad
  int64_t t0 = 0;        // token range [t0, t1), t0 a multiple of kTile
  int64_t t1 = 0;
  // Outputs: m, l [rows]; acc [rows x v_stride].
  float* m = nullptr;
  float* l = nullptr;
  float* acc = nullptr;

  int64_t row_l(int r) const { return (row0 + r) % problem->q_len; }
  int64_t row_head(int r) const { return h * problem->group + (row0 + r) / problem->q_len; }
};

// Token bounds [lo, hi) the task's rows can see at all, clipped to [t0, t1), and the first tile.
struct TileRange {
  int64_t begin = 0;
  int64_t end = 0;
};
inline TileRange task_tiles(const TaskArgs& a) {
  int64_t lo = a.t1, hi = a.t0;
  for (int r = 0; r < a.rows; ++r) {
    lo = std::min(lo, a.problem->visible_lo(a.b, a.row_l(r)));
    hi = std::max(hi, a.problem->visible_hi(a.b, a.row_l(r)));
  }
  TileRange range;
  range.begin = std::max(a.t0, lo / kTile * kTile);
  range.end = std::min(a.t1, hi);
  return range;
}

// Additive mask values of rows x [ts, ts + n) into out: out[r * row_step + t * tok_step].
inline void fill_mask_tile(const TaskArgs& a, int64_t ts, int n, float* out, int64_t row_step,
                           int64_t tok_step) {
  const attention::MaskInfo& mask = a.problem->mask;
  for (int r = 0; r < a.rows; ++r) {
    const int64_t h = a.row_head(r), l = a.row_l(r);
    for (int t = 0; t < n; ++t) out[r * row_step + t * tok_step] = mask.at(a.b, h, l, ts + t);
  }
}

// Runs one task with plain scalar loops (the twin every SIMD kernel is tested against).
void run_task_scalar(const TaskArgs& args);

// Runs one task with the best Highway target; false when Highway is not built in or the target's
// vectors hold fewer than 8 floats (then callers use the scalar twin).
bool simd_available();
void run_task_simd(const TaskArgs& args);
// Row helpers of the dense baseline, vectorised when Highway is built in. softcap_max applies
// the soft-cap (when > 0) in place and returns the row max; exp_sum replaces x by exp(x - m)
// (exp(-inf) = 0) and returns the sum.
float row_softcap_max(float* x, int64_t n, float softcap);
float row_exp_sum(float* x, int64_t n, float m);

// Name of the Highway target run_task_simd uses ("scalar" without Highway).
const char* simd_target_name();

}  // namespace tqattn::cpu::attn

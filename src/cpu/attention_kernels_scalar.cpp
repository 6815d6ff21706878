// The scalar twin of the fused attention kernels: the same tiles and online-softmax update as the
// SIMD kernels, written as plain loops.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attention_kernels.h"
#include "tqattn/format.h"
#include "tqattn/half.h"

namespace tqattn::cpu::attn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

float token_mult(const Component& c, int64_t t) {
  float m = half_to_float(c.norm[t]) * c.constant;
  if (c.norm2 != nullptr) m *= half_to_float(c.norm2[t]);
  return m;
}

}  // namespace

void run_task_scalar(const TaskArgs& a) {
  const attention::Problem& p = *a.problem;
  const int rows = a.rows;
  for (int r = 0; r < rows; ++r) {
    a.m[r] = kNegInf;
    a.l[r] = 0.0f;
    for (int64_t j = 0; j < a.v_stride; ++j) a.acc[r * a.v_stride + j] = 0.0f;
  }
  const TileRange range = task_tiles(a);
  std::vector<int64_t> lo(rows), hi(rows);
  for (int r = 0; r < rows; ++r) {
    lo[r] = p.visible_lo(a.b, a.row_l(r));
    hi[r] = p.visible_hi(a.b, a.row_l(r));
  }
  std::vector<float> s(static_cast<size_t>(rows) * kTile), mask(s.size());
  std::vector<float> idx_value;
  for (int64_t ts = range.begin; ts < range.end; ts += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, range.end - ts));
    bool any = false;
    for (int r = 0; r < rows; ++r) any |= lo[r] < ts + n && hi[r] > ts;
    if (!any) continue;
    if (p.mask.data != nullptr) fill_mask_tile(a, ts, n, mask.data(), kTile, 1);

    // Scores.
    for (int r = 0; r < rows; ++r)
      for (int t = 0; t < n; ++t) s[r * kTile + t] = 0.0f;
    for (int ci = 0; ci < a.n_keys; ++ci) {
      const Component& c = a.keys[ci];
      for (int t = 0; t < n; ++t) {
        const uint32_t* words = c.words + (ts + t) * c.words_per_token;
        const float mult = token_mult(c, ts + t);
        for (int r = 0; r < rows; ++r) {
          const float* q = a.queries + r * a.q_stride + c.offset;
          float dot = 0.0f;
          for (int j = 0; j < c.dim; ++j) dot += q[j] * c.table[unpack_index(words, j, c.bits)];
          s[r * kTile + t] += mult * dot;
        }
      }
    }

    // Soft-cap, masks, online softmax.
    std::vector<float> alpha(rows);
    for (int r = 0; r < rows; ++r) {
      float tile_max = kNegInf;
      for (int t = 0; t < n; ++t) {
        float v = s[r * kTile + t];
        if (p.softcap > 0.0f) v = p.softcap * std::tanh(v / p.softcap);
        if (p.mask.data != nullptr) v += mask[r * kTile + t];
        const int64_t tok = ts + t;
        if (tok < lo[r] || tok >= hi[r]) v = kNegInf;
        s[r * kTile + t] = v;
        tile_max = std::max(tile_max, v);
      }
      const float m_new = std::max(a.m[r], tile_max);
      const float m_use = m_new == kNegInf ? 0.0f : m_new;
      alpha[r] = std::exp(a.m[r] - m_use);
      float sum = 0.0f;
      for (int t = 0; t < n; ++t) {
        const float e = std::exp(s[r * kTile + t] - m_use);
        s[r * kTile + t] = e;
        sum += e;
      }
      a.l[r] = a.l[r] * alpha[r] + sum;
      a.m[r] = m_new;
    }

    // Values, accumulated in each part's rotated space.
    for (int r = 0; r < rows; ++r)
      for (int64_t j = 0; j < a.v_stride; ++j) a.acc[r * a.v_stride + j] *= alpha[r];
    for (int ci = 0; ci < a.n_values; ++ci) {
      const Component& c = a.values[ci];
      idx_value.resize(static_cast<size_t>(c.dim));
      for (int t = 0; t < n; ++t) {
        const uint32_t* words = c.words + (ts + t) * c.words_per_token;
        for (int j = 0; j < c.dim; ++j) idx_value[j] = c.table[unpack_index(words, j, c.bits)];
        const float norm = token_mult(c, ts + t);
        for (int r = 0; r < rows; ++r) {
          const float w = s[r * kTile + t] * norm;
          float* acc = a.acc + r * a.v_stride + c.offset;
          for (int j = 0; j < c.dim; ++j) acc[j] += w * idx_value[j];
        }
      }
    }
  }
}

}  // namespace tqattn::cpu::attn

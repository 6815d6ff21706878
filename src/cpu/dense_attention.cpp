// Dense fp32 attention, the baseline the fused path is measured against: per (sequence, KV head)
// the GQA group's query rows are stacked into one matrix, scores and P V are OpenBLAS sgemm calls
// over tiles of the KV range (memory stays bounded), with a vectorised online softmax between them.
// Work is split like the fused path (row blocks x fixed KV chunks, merged in chunk order) and run
// on the library's thread pool with OpenBLAS itself single-threaded for the call.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/attention_problem.h"
#include "cpu/attention_cpu.h"
#include "cpu/attention_kernels.h"
#include "cpu/thread_pool.h"

namespace tqattn::cpu {
namespace {

using attention::Problem;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kDenseTile = 256;      // tokens per sgemm
constexpr int64_t kDenseRowBlock = 256;  // query rows per task

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Restores OpenBLAS's thread count when the call ends (also on exceptions).
class BlasSingleThread {
 public:
  BlasSingleThread() : saved_(openblas_get_num_threads()) { openblas_set_num_threads(1); }
  ~BlasSingleThread() { openblas_set_num_threads(saved_); }
  BlasSingleThread(const BlasSingleThread&) = delete;
  BlasSingleThread& operator=(const BlasSingleThread&) = delete;

 private:
  int saved_;
};

struct DenseTask {
  int64_t b, h, row0;
  int rows;
  int64_t t0, t1;
  float* m;
  float* l;
  float* acc;  // rows x D
};

void run_dense_task(const Problem& p, const float* q, const float* keys, const float* values,
                    const DenseTask& task) {
  const int64_t D = p.head_dim, S = p.max_len, L = p.q_len;
  const int rows = task.rows;
  const float* k_base = keys + (task.b * p.kv_heads + task.h) * S * D;
  const float* v_base = values + (task.b * p.kv_heads + task.h) * S * D;
  thread_local std::vector<float> scores;
  scores.resize(static_cast<size_t>(rows * kDenseTile));
  std::vector<int64_t> lo(rows), hi(rows);
  int64_t min_lo = task.t1, max_hi = task.t0;
  for (int r = 0; r < rows; ++r) {
    const int64_t l = (task.row0 + r) % L;
    lo[r] = p.visible_lo(task.b, l);
    hi[r] = p.visible_hi(task.b, l);
    min_lo = std::min(min_lo, lo[r]);
    max_hi = std::max(max_hi, hi[r]);
    task.m[r] = kNegInf;
    task.l[r] = 0.0f;
  }
  std::fill(task.acc, task.acc + rows * D, 0.0f);
  const int64_t begin = std::max(task.t0, min_lo / kDenseTile * kDenseTile);
  const int64_t end = std::min(task.t1, max_hi);
  for (int64_t ts = begin; ts < end; ts += kDenseTile) {
    const int64_t n = std::min(kDenseTile, end - ts);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, static_cast<int>(n),
                static_cast<int>(D), 1.0f, q, static_cast<int>(D), k_base + ts * D,
                static_cast<int>(D), 0.0f, scores.data(), static_cast<int>(kDenseTile));
    for (int r = 0; r < rows; ++r) {
      float* s = scores.data() + r * kDenseTile;
      const int64_t l = (task.row0 + r) % L;
      const int64_t hq = task.h * p.group + (task.row0 + r) / L;
      if (p.softcap > 0.0f) attn::row_softcap_max(s, n, p.softcap);
      if (p.mask.data != nullptr)
        for (int64_t t = 0; t < n; ++t) s[t] += p.mask.at(task.b, hq, l, ts + t);
      const int64_t a = std::clamp(lo[r] - ts, int64_t{0}, n);
      const int64_t z = std::clamp(hi[r] - ts, a, n);
      std::fill(s, s + a, kNegInf);
      std::fill(s + z, s + n, kNegInf);
      const float tile_max = attn::row_softcap_max(s, n, 0.0f);
      const float m_new = std::max(task.m[r], tile_max);
      const float m_use = m_new == kNegInf ? 0.0f : m_new;
      const float alpha = std::exp(task.m[r] - m_use);
      task.l[r] = task.l[r] * alpha + attn::row_exp_sum(s, n, m_use);
      task.m[r] = m_new;
      if (alpha != 1.0f) cblas_sscal(static_cast<int>(D), alpha, task.acc + r * D, 1);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, static_cast<int>(D),
                static_cast<int>(n), 1.0f, scores.data(), static_cast<int>(kDenseTile),
                v_base + ts * D, static_cast<int>(D), 1.0f, task.acc, static_cast<int>(D));
  }
}

}  // namespace

void dense_attention(const Problem& p, const TensorView& queries, const TensorView& keys,
                     const TensorView& values, const TensorView& out, const TensorView* lse) {
  const int threads = resolve_threads(p.num_threads);
  const int64_t B = p.batch, H = p.kv_heads, L = p.q_len, D = p.head_dim, R = p.group * L;
  // Scaled fp32 queries; a GQA group's rows are contiguous ([h * G .. h * G + G) x L).
  std::vector<float> q(static_cast<size_t>(queries.numel()));
  parallel_for(B * p.q_heads, threads, [&](int64_t bh) {
    for (int64_t i = bh * L * D; i < (bh + 1) * L * D; ++i)
      q[i] = attention::load_float(queries.data, queries.dtype, i) * p.scale;
  });

  const int64_t block = std::min(R, kDenseRowBlock);
  const int64_t n_blocks = ceil_div(R, block);
  const int64_t units = B * H * n_blocks;
  const int64_t splits =
      std::max<int64_t>(1, std::min(ceil_div(64, units), ceil_div(p.max_len, 2 * kDenseTile)));
  const int64_t chunk = ceil_div(ceil_div(p.max_len, splits), kDenseTile) * kDenseTile;
  const int64_t n_chunks = ceil_div(p.max_len, chunk);
  const int64_t slot = block * (D + 2);
  std::vector<float> partials(static_cast<size_t>(units * n_chunks * slot));

  BlasSingleThread single_thread_blas;
  parallel_for(units * n_chunks, threads, [&](int64_t task_index) {
    const int64_t unit = task_index / n_chunks, c = task_index % n_chunks;
    const int64_t b = unit / (H * n_blocks), h = unit / n_blocks % H, blk = unit % n_blocks;
    float* base = partials.data() + task_index * slot;
    DenseTask task{b,
                   h,
                   blk * block,
                   static_cast<int>(std::min(block, R - blk * block)),
                   c * chunk,
                   std::min(p.max_len, (c + 1) * chunk),
                   base,
                   base + block,
                   base + 2 * block};
    const float* q_rows = q.data() + ((b * p.q_heads + h * p.group) * L + task.row0) * D;
    run_dense_task(p, q_rows, keys.as<const float>(), values.as<const float>(), task);
  });

  parallel_for(units, threads, [&](int64_t unit) {
    const int64_t b = unit / (H * n_blocks), h = unit / n_blocks % H, blk = unit % n_blocks;
    const int64_t row0 = blk * block;
    const int rows = static_cast<int>(std::min(block, R - row0));
    std::vector<float> weights(n_chunks);
    for (int r = 0; r < rows; ++r) {
      const int64_t hq = h * p.group + (row0 + r) / L, l = (row0 + r) % L;
      const int64_t row_index = (b * p.q_heads + hq) * L + l;
      float m = kNegInf;
      for (int64_t c = 0; c < n_chunks; ++c)
        m = std::max(m, partials[(unit * n_chunks + c) * slot + r]);
      const float sink = p.sinks != nullptr ? p.sinks[hq] : kNegInf;
      m = std::max(m, sink);
      if (m == kNegInf) {
        for (int64_t j = 0; j < D; ++j)
          attention::store_float(out.data, out.dtype, row_index * D + j, 0.0f);
        if (lse != nullptr) lse->as<float>()[row_index] = kNegInf;
        continue;
      }
      float sum = p.sinks != nullptr ? std::exp(sink - m) : 0.0f;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const float* s = partials.data() + (unit * n_chunks + c) * slot;
        weights[c] = s[r] == kNegInf ? 0.0f : std::exp(s[r] - m);
        sum += s[block + r] * weights[c];
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < D; ++j) {
        float acc = 0.0f;
        for (int64_t c = 0; c < n_chunks; ++c)
          if (weights[c] != 0.0f)
            acc += weights[c] * partials[(unit * n_chunks + c) * slot + 2 * block + r * D + j];
        attention::store_float(out.data, out.dtype, row_index * D + j, acc * inv);
      }
      if (lse != nullptr) lse->as<float>()[row_index] = m + std::log(sum);
    }
  });
}

}  // namespace tqattn::cpu

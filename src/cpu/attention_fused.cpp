// The fused CPU attention driver: rotates every query once, splits each (sequence, KV head) into
// tasks over row blocks and fixed KV chunks, runs a kernel per task and merges the partial
// softmaxes in chunk order, then un-rotates each output row once. The split depends only on the
// shapes, never on the thread count, so results do not depend on how many threads ran.
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "attention/attention_problem.h"
#include "cpu/attention_cpu.h"
#include "cpu/attention_kernels.h"
#include "cpu/thread_pool.h"
#include "tqattn/error.h"

namespace tqattn::cpu {
namespace {

using attention::Problem;
using attn::Component;
using attn::kDimPad;
using attn::kMinTable;
using attn::kRowBlock;
using attn::kSmallRows;
using attn::kTile;
using attn::TaskArgs;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Enough tasks to keep up to this many threads busy; fewer when S is short.
constexpr int64_t kTargetTasks = 64;
constexpr int64_t kMinChunk = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

int64_t rows_per_block(const Problem& p) {
  const int64_t rows = p.group * p.q_len;
  return rows <= kSmallRows ? rows : kRowBlock;
}

std::vector<float> make_table(const std::vector<float>& centroids) {
  const size_t size = std::max<size_t>(centroids.size(), kMinTable);
  std::vector<float> table(size);
  for (size_t i = 0; i < size; ++i) table[i] = centroids[i % centroids.size()];
  return table;
}

// The per-part layout of the prepared queries and of the rotated-space accumulator.
struct Layout {
  struct KeyPart {
    const QuantizerPart* part;
    int q_offset;   // rotated query
    int sq_offset;  // S q (Prod), else -1
    std::vector<float> table;
  };
  struct ValuePart {
    const QuantizerPart* part;
    int offset;
    std::vector<float> table;
  };
  std::vector<KeyPart> keys;
  std::vector<ValuePart> values;
  std::vector<float> sign_table;
  int64_t q_stride = 0;
  int64_t v_stride = 0;
};

Layout make_layout(const QuantizedStates& keys, const QuantizedStates& values) {
  Layout layout;
  int offset = 0;
  for (const QuantizerPart& part : keys.quantizer->parts()) {
    Layout::KeyPart kp{&part, offset, -1, make_table(part.codec->codebook().centroids())};
    offset += part.codec->dim();
    if (part.codec->mode() == QuantMode::kProd) {
      kp.sq_offset = offset;
      offset += part.codec->dim();
    }
    layout.keys.push_back(std::move(kp));
  }
  layout.q_stride = offset;
  offset = 0;
  for (const QuantizerPart& part : values.quantizer->parts()) {
    layout.values.push_back({&part, offset, make_table(part.codec->codebook().centroids())});
    offset += static_cast<int>(round_up(part.codec->dim(), kDimPad));
  }
  layout.v_stride = offset;
  layout.sign_table = make_table({-1.0f, 1.0f});
  return layout;
}

// Components of every (sequence, head): index [b * H + h][component].
struct Components {
  std::vector<Component> keys;
  std::vector<Component> values;
  int n_keys = 0;
  int n_values = 0;
};

Components make_components(const Layout& layout, const QuantizedStates& keys,
                           const QuantizedStates& values) {
  Components c;
  for (const auto& kp : layout.keys) c.n_keys += kp.sq_offset >= 0 ? 2 : 1;
  c.n_values = static_cast<int>(layout.values.size());
  const int64_t units = keys.batch * keys.heads;
  c.keys.reserve(units * c.n_keys);
  c.values.reserve(units * c.n_values);
  for (int64_t u = 0; u < units; ++u) {
    const int64_t base = u * keys.capacity;
    for (size_t i = 0; i < layout.keys.size(); ++i) {
      const Layout::KeyPart& kp = layout.keys[i];
      const Codec& codec = *kp.part->codec;
      const PackedPlanes& planes = keys.parts[i];
      Component k;
      k.words_per_token = codec.index_words();
      k.words = planes.indices + base * k.words_per_token;
      k.plane_end = planes.indices + units * keys.capacity * k.words_per_token;
      k.bits = codec.index_bits();
      k.dim = codec.dim();
      k.table = kp.table.data();
      k.norm = planes.norms + base;
      k.offset = kp.q_offset;
      c.keys.push_back(k);
      if (kp.sq_offset >= 0) {
        Component s;
        s.words_per_token = sign_words(codec.dim());
        s.words = planes.qjl_signs + base * s.words_per_token;
        s.plane_end = planes.qjl_signs + units * keys.capacity * s.words_per_token;
        s.bits = 1;
        s.dim = codec.dim();
        s.table = layout.sign_table.data();
        s.norm = planes.norms + base;
        s.norm2 = planes.residual_norms + base;
        s.constant = codec.qjl_scale();
        s.offset = kp.sq_offset;
        c.keys.push_back(s);
      }
    }
    const int64_t vbase = u * values.capacity;
    for (size_t i = 0; i < layout.values.size(); ++i) {
      const Layout::ValuePart& vp = layout.values[i];
      const Codec& codec = *vp.part->codec;
      const PackedPlanes& planes = values.parts[i];
      Component v;
      v.words_per_token = codec.index_words();
      v.words = planes.indices + vbase * v.words_per_token;
      v.plane_end = planes.indices + units * values.capacity * v.words_per_token;
      v.bits = codec.index_bits();
      v.dim = codec.dim();
      v.table = vp.table.data();
      v.norm = planes.norms + vbase;
      v.offset = vp.offset;
      c.values.push_back(v);
    }
  }
  return c;
}

// Scaled, gathered, rotated (and S-projected) query rows of one (sequence, KV head).
void prepare_queries(const Problem& p, const Layout& layout, const TensorView& queries, int64_t b,
                     int64_t h, float* out) {
  const int64_t D = p.head_dim, L = p.q_len, R = p.group * L;
  std::vector<float> x(D), gathered, rotated;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t hq = h * p.group + r / L, l = r % L;
    const int64_t src = ((b * p.q_heads + hq) * L + l) * D;
    for (int64_t j = 0; j < D; ++j)
      x[j] = attention::load_float(queries.data, queries.dtype, src + j) * p.scale;
    float* row = out + r * layout.q_stride;
    for (const Layout::KeyPart& kp : layout.keys) {
      const Codec& codec = *kp.part->codec;
      const int d = codec.dim();
      gathered.resize(d);
      rotated.resize(d);
      for (int j = 0; j < d; ++j) gathered[j] = x[kp.part->channels[j]];
      codec.rotation().forward(gathered.data(), rotated.data());
      for (int j = 0; j < d; ++j) row[kp.q_offset + j] = rotated[j];
      if (kp.sq_offset >= 0) {
        const float* s = codec.qjl_matrix().data();
        for (int i = 0; i < d; ++i) {
          float dot = 0.0f;
          for (int j = 0; j < d; ++j) dot += s[static_cast<size_t>(i) * d + j] * gathered[j];
          row[kp.sq_offset + i] = dot;
        }
      }
    }
  }
}

struct Partial {
  const float* m;
  const float* l;
  const float* acc;
};

// Merges a row block's chunk partials in order, adds sinks, normalises, un-rotates and writes.
void finalize(const Problem& p, const Layout& layout, int64_t b, int64_t h, int64_t row0, int rows,
              const std::vector<Partial>& parts, const TensorView& out, const TensorView* lse) {
  const int64_t D = p.head_dim, L = p.q_len;
  std::vector<float> y(layout.v_stride), weights(parts.size()), unrotated(D);
  for (int r = 0; r < rows; ++r) {
    const int64_t hq = h * p.group + (row0 + r) / L, l = (row0 + r) % L;
    const int64_t row_index = (b * p.q_heads + hq) * L + l;
    float m = kNegInf;
    for (const Partial& part : parts) m = std::max(m, part.m[r]);
    const float sink = p.sinks != nullptr ? p.sinks[hq] : kNegInf;
    m = std::max(m, sink);
    float* dst_lse = lse != nullptr ? lse->as<float>() + row_index : nullptr;
    if (m == kNegInf) {
      for (int64_t j = 0; j < D; ++j)
        attention::store_float(out.data, out.dtype, row_index * D + j, 0.0f);
      if (dst_lse) *dst_lse = kNegInf;
      continue;
    }
    float sum = p.sinks != nullptr ? std::exp(sink - m) : 0.0f;
    for (size_t c = 0; c < parts.size(); ++c) {
      weights[c] = parts[c].m[r] == kNegInf ? 0.0f : std::exp(parts[c].m[r] - m);
      sum += parts[c].l[r] * weights[c];
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < layout.v_stride; ++j) {
      float acc = 0.0f;
      for (size_t c = 0; c < parts.size(); ++c)
        if (weights[c] != 0.0f) acc += weights[c] * parts[c].acc[r * layout.v_stride + j];
      y[j] = acc * inv;
    }
    for (const Layout::ValuePart& vp : layout.values) {
      const Codec& codec = *vp.part->codec;
      codec.rotation().inverse(y.data() + vp.offset, unrotated.data());
      for (int j = 0; j < codec.dim(); ++j)
        attention::store_float(out.data, out.dtype, row_index * D + vp.part->channels[j],
                               unrotated[j]);
    }
    if (dst_lse) *dst_lse = m + std::log(sum);
  }
}

}  // namespace

int64_t fused_chunk_tokens(const Problem& p) {
  const int64_t rows = p.group * p.q_len;
  const int64_t units = p.batch * p.kv_heads * ceil_div(rows, rows_per_block(p));
  const int64_t splits =
      std::max<int64_t>(1, std::min(ceil_div(kTargetTasks, units), ceil_div(p.max_len, kMinChunk)));
  return round_up(ceil_div(p.max_len, splits), kTile);
}

void fused_attention(const Problem& p, const TensorView& queries, const QuantizedStates& keys,
                     const QuantizedStates& values, const TensorView& out, const TensorView* lse,
                     KernelImpl impl) {
  const int threads = resolve_threads(p.num_threads);
  const bool simd =
      impl == KernelImpl::kSimd || (impl == KernelImpl::kAuto && attn::simd_available());
  if (impl == KernelImpl::kSimd && !attn::simd_available())
    throw_runtime("scaled_dot_product_attention",
                  "the SIMD kernels are not available in this build or on this CPU");
  void (*run_task)(const TaskArgs&) = simd ? attn::run_task_simd : attn::run_task_scalar;

  const Layout layout = make_layout(keys, values);
  const Components comps = make_components(layout, keys, values);
  const int64_t B = p.batch, H = p.kv_heads, R = p.group * p.q_len;
  const int64_t q_stride = layout.q_stride, v_stride = layout.v_stride;

  std::vector<float> prepared(static_cast<size_t>(B * H * R * q_stride));
  parallel_for(B * H, threads, [&](int64_t u) {
    prepare_queries(p, layout, queries, u / H, u % H, prepared.data() + u * R * q_stride);
  });

  // Tasks: (sequence, head, row block, chunk). Units with several chunks store partials.
  const int64_t block = rows_per_block(p);
  const int64_t n_blocks = ceil_div(R, block);
  const int64_t chunk = fused_chunk_tokens(p);
  struct Unit {
    int64_t b, h, row0;
    int rows;
    int64_t n_chunks;
    int64_t first_task;
    int64_t partial;  // offset into the partial buffer, -1 when finalised in its task
  };
  std::vector<Unit> units;
  int64_t n_tasks = 0, partial_floats = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n_chunks = std::max<int64_t>(1, ceil_div(p.lengths[b], chunk));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t blk = 0; blk < n_blocks; ++blk) {
        Unit u{b,        h,       blk * block, static_cast<int>(std::min(block, R - blk * block)),
               n_chunks, n_tasks, -1};
        if (n_chunks > 1) {
          u.partial = partial_floats;
          partial_floats += n_chunks * u.rows * (v_stride + 2);
        }
        n_tasks += n_chunks;
        units.push_back(u);
      }
  }
  std::vector<float> partials(static_cast<size_t>(partial_floats));
  std::vector<int64_t> task_unit(n_tasks);
  for (size_t i = 0; i < units.size(); ++i)
    for (int64_t c = 0; c < units[i].n_chunks; ++c) task_unit[units[i].first_task + c] = i;

  parallel_for(n_tasks, threads, [&](int64_t task) {
    const Unit& u = units[task_unit[task]];
    const int64_t c = task - u.first_task;
    const int64_t unit_index = u.b * H + u.h;
    TaskArgs args;
    args.problem = &p;
    args.keys = comps.keys.data() + unit_index * comps.n_keys;
    args.n_keys = comps.n_keys;
    args.values = comps.values.data() + unit_index * comps.n_values;
    args.n_values = comps.n_values;
    args.b = u.b;
    args.h = u.h;
    args.row0 = u.row0;
    args.rows = u.rows;
    args.queries = prepared.data() + (unit_index * R + u.row0) * q_stride;
    args.q_stride = q_stride;
    args.v_stride = v_stride;
    args.t0 = c * chunk;
    args.t1 = std::min(p.lengths[u.b], (c + 1) * chunk);
    thread_local std::vector<float> local;
    float* slot;
    if (u.partial >= 0) {
      slot = partials.data() + u.partial + c * u.rows * (v_stride + 2);
    } else {
      local.resize(static_cast<size_t>(u.rows * (v_stride + 2)));
      slot = local.data();
    }
    args.m = slot;
    args.l = slot + u.rows;
    args.acc = slot + 2 * u.rows;
    run_task(args);
    if (u.partial < 0)
      finalize(p, layout, u.b, u.h, u.row0, u.rows, {{args.m, args.l, args.acc}}, out, lse);
  });

  std::vector<int64_t> merged;
  for (size_t i = 0; i < units.size(); ++i)
    if (units[i].partial >= 0) merged.push_back(static_cast<int64_t>(i));
  parallel_for(static_cast<int64_t>(merged.size()), threads, [&](int64_t k) {
    const Unit& u = units[merged[k]];
    std::vector<Partial> parts;
    for (int64_t c = 0; c < u.n_chunks; ++c) {
      const float* slot = partials.data() + u.partial + c * u.rows * (v_stride + 2);
      parts.push_back({slot, slot + u.rows, slot + 2 * u.rows});
    }
    finalize(p, layout, u.b, u.h, u.row0, u.rows, parts, out, lse);
  });
}

}  // namespace tqattn::cpu

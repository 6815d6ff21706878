// tqattn demo: quantize a realistic synthetic KV cache at several widths, then compare fused
// attention over the packed cache with exact fp32 attention and with dequantize-then-attend.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tools/cli.h"
#include "tqattn/tqattn.h"

namespace tqattn::tools {
namespace {

struct Shape {
  int64_t batch = 1, q_heads = 32, kv_heads = 8, dim = 128, context = 4096, chunk = 128;
  int threads = 0, repeats = 5;
};

struct Width {
  const char* label;
  double key_bits, value_bits;
  QuantMode key_mode;
};

// Keys like a real LLM layer's: per-head mean offsets, a few channels with large magnitude, and a
// few attention-sink tokens at the start that every query attends to strongly.
struct SyntheticLayer {
  std::vector<float> keys, values, decode_queries, prefill_queries;
};

SyntheticLayer make_layer(const Shape& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t d = s.dim, t = s.context;
  SyntheticLayer layer;
  layer.keys.resize(s.batch * s.kv_heads * t * d);
  layer.values.resize(layer.keys.size());
  // A unit direction shared by the sink keys and (weakly) by every query: a sink's logit sits
  // about 5 above the rest, as in real layers, without making the softmax one-hot.
  std::vector<float> sink_direction(d);
  double sink_norm = 0;
  for (float& v : sink_direction) {
    v = normal(rng);
    sink_norm += double(v) * v;
  }
  for (float& v : sink_direction) v = static_cast<float>(v / std::sqrt(sink_norm));
  const float root_d = std::sqrt(static_cast<float>(d));
  const int outlier_channels[] = {5, 37, 64, 101};
  for (int64_t bh = 0; bh < s.batch * s.kv_heads; ++bh) {
    std::vector<float> head_mean(d);
    for (float& v : head_mean) v = 0.5f * normal(rng);
    for (int64_t tok = 0; tok < t; ++tok) {
      float* k = &layer.keys[(bh * t + tok) * d];
      float* v = &layer.values[(bh * t + tok) * d];
      for (int64_t j = 0; j < d; ++j) {
        k[j] = head_mean[j] + normal(rng);
        v[j] = normal(rng);
      }
      for (int c : outlier_channels)
        if (c < d) k[c] = 12.0f * (1.0f + 0.2f * normal(rng));
      if (tok < 4) {  // attention sinks: keys along the shared direction, small values
        for (int64_t j = 0; j < d; ++j) {
          k[j] += 10.0f * sink_direction[j];
          v[j] *= 0.1f;
        }
      }
    }
  }
  auto make_queries = [&](int64_t l) {
    std::vector<float> q(s.batch * s.q_heads * l * d);
    for (int64_t i = 0; i < static_cast<int64_t>(q.size()); ++i) {
      const int64_t j = i % d;
      q[i] = normal(rng) + 0.5f * sink_direction[j] * root_d;
    }
    return q;
  };
  layer.decode_queries = make_queries(1);
  layer.prefill_queries = make_queries(s.chunk);
  return layer;
}

double median_ms(int repeats, const std::function<void()>& fn) {
  fn();  // warm-up
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void error_vs(const std::vector<float>& got, const std::vector<float>& want, double* rel_l2,
              double* cosine) {
  double num = 0, den = 0, dot = 0, g2 = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double diff = double(got[i]) - want[i];
    num += diff * diff;
    den += double(want[i]) * want[i];
    dot += double(got[i]) * want[i];
    g2 += double(got[i]) * got[i];
  }
  *rel_l2 = std::sqrt(num / den);
  *cosine = dot / std::sqrt(den * g2);
}

class Progress {
 public:
  Progress(int total, bool enabled) : total_(total), enabled_(enabled) {}
  void step(const std::string& what) {
    ++done_;
    if (!enabled_) return;
    const int width = 30, filled = width * done_ / total_;
    std::fprintf(stderr, "\r[%s%s] %d/%d %-28s", std::string(filled, '#').c_str(),
                 std::string(width - filled, '.').c_str(), done_, total_, what.c_str());
    if (done_ == total_) std::fprintf(stderr, "\r%*s\r", 80, "");
    std::fflush(stderr);
  }

 private:
  int total_, done_ = 0;
  bool enabled_;
};

void print_help() {
  std::printf(
      "tqattn demo: TurboQuant KV cache quality and fused attention speed on synthetic data\n"
      "  --context S    cached tokens (default 4096)\n"
      "  --chunk L      prefill chunk length (default 128)\n"
      "  --heads HQ     query heads (default 32), --kv-heads H (default 8), --dim D (default 128)\n"
      "  --threads N    CPU threads (default: all)\n"
      "  --repeats R    timing repeats, median reported (default 5)\n"
      "  --quick        small sizes (context 1024, 3 repeats)\n");
}

}  // namespace

int run_demo(const Args& args) {
  if (has_flag(args, "--help") || has_flag(args, "-h")) {
    print_help();
    return 0;
  }
  Shape s;
  if (has_flag(args, "--quick")) {
    s.context = 1024;
    s.repeats = 3;
  }
  s.context = static_cast<int64_t>(flag_number(args, "--context", s.context));
  s.chunk = static_cast<int64_t>(flag_number(args, "--chunk", s.chunk));
  s.q_heads = static_cast<int64_t>(flag_number(args, "--heads", s.q_heads));
  s.kv_heads = static_cast<int64_t>(flag_number(args, "--kv-heads", s.kv_heads));
  s.dim = static_cast<int64_t>(flag_number(args, "--dim", s.dim));
  s.threads = static_cast<int>(flag_number(args, "--threads", 0));
  s.repeats = std::max(1, static_cast<int>(flag_number(args, "--repeats", s.repeats)));
  if (s.context < 1 || s.chunk < 1 || s.chunk > s.context)
    throw_invalid("demo", "1 <= --chunk <= --context", detail::concat(s.chunk, " > ", s.context));

  const Width widths[] = {
      {"2", 2, 2, QuantMode::kMse},        {"3", 3, 3, QuantMode::kMse},
      {"3.5 (K3/V4)", 3, 4, QuantMode::kMse}, {"4", 4, 4, QuantMode::kMse},
      {"8", 8, 8, QuantMode::kMse},        {"K2.5 split/V3", 2.5, 3, QuantMode::kMse},
      {"3 Prod keys", 3, 3, QuantMode::kProd}, {"4 Prod keys", 4, 4, QuantMode::kProd},
  };
  const int n_widths = sizeof(widths) / sizeof(widths[0]);
  const bool show_progress = isatty(STDERR_FILENO) != 0;
  Progress progress(n_widths + 1, show_progress);

  std::printf("tqattn demo: B=%lld Hq=%lld H_kv=%lld D=%lld, context %lld, prefill chunk %lld, "
              "%d threads, median of %d\n",
              (long long)s.batch, (long long)s.q_heads, (long long)s.kv_heads, (long long)s.dim,
              (long long)s.context, (long long)s.chunk,
              s.threads > 0 ? s.threads : static_cast<int>(std::thread::hardware_concurrency()),
              s.repeats);
  std::printf("synthetic layer: keys with 4 outlier channels (|x| ~ 12) and 4 attention-sink "
              "tokens; values N(0, 1)\n\n");
  const SyntheticLayer layer = make_layer(s, 2026);
  const int64_t kv_shape_elems = s.batch * s.kv_heads * s.context * s.dim;
  const TensorView keys{const_cast<float*>(layer.keys.data()), DType::kFloat32,
                        {s.batch, s.kv_heads, s.context, s.dim}};
  const TensorView values{const_cast<float*>(layer.values.data()), DType::kFloat32,
                          {s.batch, s.kv_heads, s.context, s.dim}};
  const TensorView q1{const_cast<float*>(layer.decode_queries.data()), DType::kFloat32,
                      {s.batch, s.q_heads, 1, s.dim}};
  const TensorView ql{const_cast<float*>(layer.prefill_queries.data()), DType::kFloat32,
                      {s.batch, s.q_heads, s.chunk, s.dim}};
  std::vector<float> exact1(q1.numel()), exactl(ql.numel()), out1(q1.numel()), outl(ql.numel());
  AttentionOptions decode_opts;
  decode_opts.num_threads = s.threads;
  AttentionOptions prefill_opts = decode_opts;
  prefill_opts.causal = true;
  const TensorView exact1_view{exact1.data(), DType::kFloat32, q1.shape};
  const TensorView exactl_view{exactl.data(), DType::kFloat32, ql.shape};
  const double dense_decode_ms =
      median_ms(s.repeats, [&] { dense_attention(q1, keys, values, exact1_view, decode_opts); });
  const double dense_prefill_ms =
      median_ms(s.repeats, [&] { dense_attention(ql, keys, values, exactl_view, prefill_opts); });
  progress.step("dense fp32 baseline");
  const double fp16_bytes = 2.0 * 2.0 * kv_shape_elems;

  std::printf("%-15s %9s %6s | %9s %9s | %9s %8s | %21s | %21s\n", "width", "cache", "vs f16",
              "K err", "theory", "out relL2", "cosine", "decode ms fused/deq", "prefill ms fused/deq");
  std::vector<float> dequant_k(kv_shape_elems), dequant_v(kv_shape_elems);
  for (const Width& w : widths) {
    KVCacheConfig config;
    config.batch = s.batch;
    config.kv_heads = s.kv_heads;
    config.head_dim = s.dim;
    config.key_bits = w.key_bits;
    config.value_bits = w.value_bits;
    config.key_mode = w.key_mode;
    config.num_threads = s.threads;
    config.seed = 7;
    KVCache cache(config);
    cache.append(keys, values);
    const QuantizedStates k_states = cache.keys();
    const QuantizedStates v_states = cache.values();

    // Reconstruction error of keys relative to their norms, against the codebook's d*C.
    const TensorView dk{dequant_k.data(), DType::kFloat32, keys.shape};
    const TensorView dv{dequant_v.data(), DType::kFloat32, values.shape};
    dequantize_states(k_states, dk, s.threads);
    double err = 0, norm = 0, theory = 0;
    for (int64_t i = 0; i < kv_shape_elems; ++i) {
      err += (double(dequant_k[i]) - layer.keys[i]) * (double(dequant_k[i]) - layer.keys[i]);
      norm += double(layer.keys[i]) * layer.keys[i];
    }
    std::vector<double> channel_energy(s.dim, 0.0);
    for (int64_t i = 0; i < kv_shape_elems; ++i)
      channel_energy[i % s.dim] += double(layer.keys[i]) * layer.keys[i];
    for (const auto& part : k_states.quantizer->parts()) {
      const Codec& codec = *part.codec;
      double part_energy = 0;
      for (int c : part.channels) part_energy += channel_energy[c];
      // Prod: the QJL estimate of a unit residual has squared error pi/2 - 1/d on average.
      const double d_mse = codec.mode() == QuantMode::kProd
                               ? codec.codebook().distortion() * (M_PI / 2.0 - 1.0 / codec.dim())
                               : codec.codebook().distortion();
      theory += d_mse * part_energy / norm;
    }

    const TensorView o1{out1.data(), DType::kFloat32, q1.shape};
    const TensorView ol{outl.data(), DType::kFloat32, ql.shape};
    const double fused_decode_ms = median_ms(
        s.repeats, [&] { scaled_dot_product_attention(q1, k_states, v_states, o1, decode_opts); });
    double rel, cosine;
    error_vs(out1, exact1, &rel, &cosine);
    const double fused_prefill_ms = median_ms(
        s.repeats, [&] { scaled_dot_product_attention(ql, k_states, v_states, ol, prefill_opts); });
    std::vector<float> scratch(out1.size());
    const TensorView s1{scratch.data(), DType::kFloat32, q1.shape};
    const double dequant_decode_ms = median_ms(s.repeats, [&] {
      dequantize_states(k_states, dk, s.threads);
      dequantize_states(v_states, dv, s.threads);
      dense_attention(q1, dk, dv, s1, decode_opts);
    });
    std::vector<float> scratch_l(outl.size());
    const TensorView sl{scratch_l.data(), DType::kFloat32, ql.shape};
    const double dequant_prefill_ms = median_ms(s.repeats, [&] {
      dequantize_states(k_states, dk, s.threads);
      dequantize_states(v_states, dv, s.threads);
      dense_attention(ql, dk, dv, sl, prefill_opts);
    });
    const double bytes = static_cast<double>(cache.nbytes());
    char decode_col[64], prefill_col[64];
    std::snprintf(decode_col, sizeof decode_col, "%7.2f / %-7.2f", fused_decode_ms,
                  dequant_decode_ms);
    std::snprintf(prefill_col, sizeof prefill_col, "%7.1f / %-7.1f", fused_prefill_ms,
                  dequant_prefill_ms);
    std::printf("%-15s %7.2fMB %5.2fx | %9.5f %9.5f | %9.5f %8.5f | %21s | %21s\n", w.label,
                bytes / 1e6, fp16_bytes / bytes, err / norm, theory, rel, cosine, decode_col,
                prefill_col);
    std::fflush(stdout);
    progress.step(w.label);
  }
  std::printf("\ndense fp32 attention (OpenBLAS sgemm) on the unquantized cache: decode %.2f ms, "
              "prefill %.1f ms; fp16 cache would be %.2f MB\n",
              dense_decode_ms, dense_prefill_ms, fp16_bytes / 1e6);
  std::printf("K err: |k - k_hat|^2 / |k|^2 over all keys; theory: each channel group's d*C "
              "weighted by its share of the key energy\n(Prod keys: the MSE stage's d*C times "
              "pi/2 - 1/d, the QJL estimate's squared error on a unit residual).\n"
              "out relL2 / cosine: fused decode output against exact fp32 attention.\n");
  return 0;
}

}  // namespace tqattn::tools

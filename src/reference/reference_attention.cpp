#include "reference/reference_attention.h"

#include <cmath>
#include <limits>

#include "tqattn/format.h"
#include "tqattn/half.h"

namespace tqattn::reference {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

double read(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(data)[i];
    case DType::kFloat16:
      return half_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::kBool:
      return static_cast<const uint8_t*>(data)[i] ? 0.0 : kNegInf;
    default:
      return std::numeric_limits<double>::quiet_NaN();
  }
}

// Flat index into a tensor of `shape` broadcast (numpy rules, right-aligned) to [B, Hq, L, S].
int64_t broadcast_index(const std::vector<int64_t>& shape, const int64_t (&at)[4]) {
  int64_t index = 0, stride = 1;
  const int64_t rank = static_cast<int64_t>(shape.size());
  for (int64_t i = rank - 1; i >= 0; --i) {
    const int64_t axis = 4 - rank + i;
    if (shape[i] != 1) index += at[axis] * stride;
    stride *= shape[i];
  }
  return index;
}

}  // namespace

std::vector<double> dequantize(const QuantizedStates& s) {
  const int64_t D = s.dim(), S = s.max_length();
  std::vector<double> out(static_cast<size_t>(s.batch * s.heads * S * D), 0.0);
  const auto& parts = s.quantizer->parts();
  for (size_t pi = 0; pi < parts.size(); ++pi) {
    const Codec& codec = *parts[pi].codec;
    const std::vector<int>& channels = parts[pi].channels;
    const int d = codec.dim();
    const int bits = codec.index_bits();
    const int64_t words = packed_words(d, bits);
    const int64_t swords = sign_words(d);
    const bool prod = codec.mode() == QuantMode::kProd;
    const std::vector<float> rot_f = codec.rotation().to_matrix();
    const std::vector<double> rot(rot_f.begin(), rot_f.end());
    const std::vector<float>& centroids = codec.codebook().centroids();
    const std::vector<float>& qjl = codec.qjl_matrix();
    const double qjl_scale = std::sqrt(M_PI / 2.0) / d;
    const PackedPlanes& planes = s.parts[pi];
    std::vector<double> y(d), x(d);
    for (int64_t bh = 0; bh < s.batch * s.heads; ++bh) {
      const int64_t b = bh / s.heads;
      for (int64_t t = 0; t < s.lengths[b]; ++t) {
        const int64_t token = bh * s.capacity + t;
        const uint32_t* w = planes.indices + token * words;
        for (int j = 0; j < d; ++j) y[j] = centroids[unpack_index(w, j, bits)];
        // x = Pi^T y: Pi is row-major, y = Pi x.
        for (int i = 0; i < d; ++i) {
          double acc = 0.0;
          for (int k = 0; k < d; ++k) acc += rot[static_cast<size_t>(k) * d + i] * y[k];
          x[i] = acc;
        }
        if (prod) {
          const uint32_t* sw = planes.qjl_signs + token * swords;
          const double gamma = half_to_float(planes.residual_norms[token]);
          for (int i = 0; i < d; ++i) {
            const double sign = ((sw[i >> 5] >> (i & 31)) & 1u) ? 1.0 : -1.0;
            const double f = qjl_scale * gamma * sign;
            for (int j = 0; j < d; ++j) x[j] += f * qjl[static_cast<size_t>(i) * d + j];
          }
        }
        const double norm = half_to_float(planes.norms[token]);
        double* dst = out.data() + (bh * S + t) * D;
        for (int j = 0; j < d; ++j) dst[channels[j]] = norm * x[j];
      }
    }
  }
  return out;
}

AttentionResult attend(const TensorView& queries, const std::vector<double>& keys,
                       const std::vector<double>& values, int64_t kv_heads, int64_t seq,
                       const std::vector<int64_t>& lengths, const AttentionOptions& options) {
  const int64_t B = queries.shape[0], Hq = queries.shape[1], L = queries.shape[2],
                D = queries.shape[3];
  const int64_t group = Hq / kv_heads;
  const double scale =
      options.scale.has_value() ? double(*options.scale) : 1.0 / std::sqrt(double(D));
  AttentionResult result;
  result.out.assign(static_cast<size_t>(B * Hq * L * D), 0.0);
  result.lse.assign(static_cast<size_t>(B * Hq * L), kNegInf);
  std::vector<double> logits(static_cast<size_t>(seq));
  std::vector<char> visible(static_cast<size_t>(seq));
  std::vector<double> q(static_cast<size_t>(D));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t offset = options.causal_offset >= 0 ? options.causal_offset : lengths[b] - L;
    for (int64_t hq = 0; hq < Hq; ++hq) {
      const int64_t h = hq / group;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t row = (b * Hq + hq) * L + l;
        const int64_t pos = offset + l;
        for (int64_t c = 0; c < D; ++c) q[c] = read(queries.data, queries.dtype, row * D + c);
        double m = kNegInf;
        for (int64_t j = 0; j < seq; ++j) {
          bool vis = j < lengths[b];
          if (options.causal && j > pos) vis = false;
          if (options.window > 0 && pos - j >= options.window) vis = false;
          double logit = kNegInf;
          if (vis) {
            const double* k = keys.data() + ((b * kv_heads + h) * seq + j) * D;
            double dot = 0.0;
            for (int64_t c = 0; c < D; ++c) dot += q[c] * k[c];
            logit = scale * dot;
            if (options.softcap > 0.0f)
              logit = double(options.softcap) * std::tanh(logit / double(options.softcap));
            if (options.mask.has_value()) {
              const int64_t at[4] = {b, hq, l, j};
              const TensorView& mask = *options.mask;
              logit += read(mask.data, mask.dtype, broadcast_index(mask.shape, at));
            }
            if (logit == kNegInf) vis = false;
          }
          visible[j] = vis;
          logits[j] = logit;
          if (vis) m = std::max(m, logit);
        }
        const double sink =
            options.sinks.has_value() ? double(options.sinks->as<const float>()[hq]) : kNegInf;
        m = std::max(m, sink);
        if (m == kNegInf) continue;  // no visible key and no sink: zeros, lse = -inf
        double sum = options.sinks.has_value() ? std::exp(sink - m) : 0.0;
        double* out = result.out.data() + row * D;
        for (int64_t j = 0; j < seq; ++j) {
          if (!visible[j]) continue;
          const double p = std::exp(logits[j] - m);
          sum += p;
          const double* v = values.data() + ((b * kv_heads + h) * seq + j) * D;
          for (int64_t c = 0; c < D; ++c) out[c] += p * v[c];
        }
        for (int64_t c = 0; c < D; ++c) out[c] /= sum;
        result.lse[row] = m + std::log(sum);
      }
    }
  }
  return result;
}

AttentionResult attention(const TensorView& queries, const QuantizedStates& keys,
                          const QuantizedStates& values, const AttentionOptions& options) {
  return attend(queries, dequantize(keys), dequantize(values), keys.heads, keys.max_length(),
                keys.lengths, options);
}

AttentionResult dense_attention(const TensorView& queries, const TensorView& keys,
                                const TensorView& values, const AttentionOptions& options) {
  const std::vector<double> k(keys.as<const float>(), keys.as<const float>() + keys.numel());
  const std::vector<double> v(values.as<const float>(), values.as<const float>() + values.numel());
  const std::vector<int64_t> lengths(static_cast<size_t>(keys.shape[0]), keys.shape[2]);
  return attend(queries, k, v, keys.shape[1], keys.shape[2], lengths, options);
}

}  // namespace tqattn::reference

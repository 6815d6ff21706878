#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>

#include "codec/validate.h"
#include "tqattn/codec.h"
#include "tqattn/error.h"

namespace tqattn {

TensorQuantizer TensorQuantizer::uniform(std::shared_ptr<const Codec> codec) {
  if (!codec) throw_invalid("TensorQuantizer.uniform", "a codec", "null");
  TensorQuantizer q;
  q.dim_ = codec->dim();
  std::vector<int> channels(q.dim_);
  std::iota(channels.begin(), channels.end(), 0);
  q.parts_.push_back({std::move(channels), std::move(codec)});
  return q;
}

TensorQuantizer TensorQuantizer::split(int dim, std::vector<int> high_channels,
                                       std::shared_ptr<const Codec> high,
                                       std::shared_ptr<const Codec> low) {
  const char* fn = "TensorQuantizer.split";
  codec::check_dim(fn, dim);
  if (!high || !low) throw_invalid(fn, "two codecs", "null");
  std::sort(high_channels.begin(), high_channels.end());
  std::vector<char> is_high(dim, 0);
  for (int c : high_channels) {
    if (c < 0 || c >= dim) throw_invalid(fn, detail::concat("channels in [0, ", dim, ")"), c);
    if (is_high[c]) throw_invalid(fn, "distinct high channels", c);
    is_high[c] = 1;
  }
  std::vector<int> low_channels;
  for (int c = 0; c < dim; ++c)
    if (!is_high[c]) low_channels.push_back(c);
  if (high->dim() != static_cast<int>(high_channels.size()))
    throw_invalid(fn, detail::concat("a high codec of dim ", high_channels.size()), high->dim());
  if (low->dim() != static_cast<int>(low_channels.size()))
    throw_invalid(fn, detail::concat("a low codec of dim ", low_channels.size()), low->dim());
  TensorQuantizer q;
  q.dim_ = dim;
  q.parts_.push_back({std::move(low_channels), std::move(low)});
  q.parts_.push_back({std::move(high_channels), std::move(high)});
  return q;
}

TensorQuantizer TensorQuantizer::calibrate_split(int dim, double bits, const CodecConfig& base,
                                                 const float* sample, int64_t n_sample) {
  const char* fn = "TensorQuantizer.calibrate_split";
  codec::check_dim(fn, dim);
  if (!std::isfinite(bits) || bits < kMinBits || bits > kMaxBits)
    throw_invalid(fn, detail::concat("bits in [", kMinBits, ", ", kMaxBits, "]"), bits);
  const int low_bits = static_cast<int>(std::floor(bits));
  const int n_high = static_cast<int>(std::lround((bits - low_bits) * dim));
  CodecConfig config = base;
  config.dim = dim;
  if (n_high == 0 || n_high == dim) {
    config.bits = n_high == 0 ? low_bits : low_bits + 1;
    return uniform(std::make_shared<const Codec>(config));
  }
  if (n_sample <= 0 || sample == nullptr)
    throw_invalid(fn, "at least one sample row to rank channels", n_sample);
  if (n_high < kMinDim || dim - n_high < kMinDim)
    throw_invalid(fn, detail::concat("a split leaving >= ", kMinDim, " channels per group"),
                  detail::concat(n_high, " high of ", dim));
  std::vector<double> mean_abs(dim, 0.0);
  for (int64_t r = 0; r < n_sample; ++r)
    for (int c = 0; c < dim; ++c) mean_abs[c] += std::abs(sample[r * dim + c]);
  std::vector<int> order(dim);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return mean_abs[a] > mean_abs[b]; });
  std::vector<int> high_channels(order.begin(), order.begin() + n_high);
  // Caller-supplied rotation pieces are for the full dim; each group draws its own from the seed.
  config.signs.clear();
  config.matrix.clear();
  config.centroids.clear();
  config.qjl_matrix.clear();
  CodecConfig high = config, low = config;
  high.dim = n_high;
  high.bits = low_bits + 1;
  high.seed = base.seed + 1;
  low.dim = dim - n_high;
  low.bits = low_bits;
  return split(dim, std::move(high_channels), std::make_shared<const Codec>(high),
               std::make_shared<const Codec>(low));
}

double TensorQuantizer::bits_per_coordinate() const {
  double total = 0.0;
  for (const auto& part : parts_) total += static_cast<double>(part.codec->bits()) * part.channels.size();
  return total / dim_;
}

int64_t TensorQuantizer::bytes_per_vector() const {
  int64_t total = 0;
  for (const auto& part : parts_)
    total += tqattn::bytes_per_vector(part.codec->dim(), part.codec->bits(), part.codec->mode());
  return total;
}

}  // namespace tqattn

// QuantizedTensor, quantize_tensor, dequantize_states and KVCache: chunked appends, exact byte
// accounting, growth, per-sequence appends, split widths and every rejected input.
#include "tqattn/cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda_backend.h"
#include "test_util.h"
#include "tqattn/error.h"
#include "tqattn/half.h"

namespace tqattn {
namespace {

using testing::random_normal;

// The valid bytes of every plane of every part, sequence by sequence: what "the same state" means.
std::vector<uint8_t> valid_bytes(const QuantizedStates& s) {
  std::vector<uint8_t> out;
  auto append = [&](const void* plane, int64_t bytes_per_token) {
    if (!plane) return;
    const auto* base = static_cast<const uint8_t*>(plane);
    for (int64_t b = 0; b < s.batch; ++b) {
      for (int64_t h = 0; h < s.heads; ++h) {
        const uint8_t* p = base + ((b * s.heads + h) * s.capacity) * bytes_per_token;
        out.insert(out.end(), p, p + s.lengths[b] * bytes_per_token);
      }
    }
  };
  for (size_t i = 0; i < s.parts.size(); ++i) {
    const Codec& codec = *s.quantizer->parts()[i].codec;
    append(s.parts[i].indices, 4 * codec.index_words());
    append(s.parts[i].norms, 2);
    append(s.parts[i].residual_norms, 2);
    append(s.parts[i].qjl_signs, 4 * sign_words(codec.dim()));
  }
  return out;
}

// Slice tokens [t0, t1) of a [B, H, T, D] array.
std::vector<float> slice_tokens(const std::vector<float>& x, int64_t B, int64_t H, int64_t T,
                                int64_t D, int64_t t0, int64_t t1) {
  std::vector<float> out;
  out.reserve(B * H * (t1 - t0) * D);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    out.insert(out.end(), x.begin() + (bh * T + t0) * D, x.begin() + (bh * T + t1) * D);
  }
  return out;
}

KVCacheConfig small_config(int64_t B = 2, int64_t H = 3, int64_t D = 64) {
  KVCacheConfig c;
  c.batch = B;
  c.kv_heads = H;
  c.head_dim = D;
  c.key_bits = 3;
  c.value_bits = 4;
  c.key_mode = QuantMode::kProd;
  c.seed = 11;
  c.step = 16;
  c.num_threads = 2;
  return c;
}

// Expects fn to throw E whose message contains every fragment.
template <typename E = InvalidArgument, typename Fn>
void expect_throw_with(Fn fn, std::vector<std::string> fragments) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning " << fragments[0];
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const std::string& f : fragments) {
      EXPECT_NE(msg.find(f), std::string::npos) << "message \"" << msg << "\" lacks \"" << f << '"';
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

TEST(Cache, ChunkedAppendsMatchOneAppend) {
  const int64_t B = 2, H = 3, D = 64, T = 1500;
  const KVCacheConfig config = small_config(B, H, D);
  const std::vector<float> k = random_normal(B * H * T * D, 1);
  const std::vector<float> v = random_normal(B * H * T * D, 2, 3.0f);

  KVCache whole(config);
  whole.append(cpu_view(k.data(), {B, H, T, D}), cpu_view(v.data(), {B, H, T, D}));
  const std::vector<uint8_t> want_k = valid_bytes(whole.keys());
  const std::vector<uint8_t> want_v = valid_bytes(whole.values());
  ASSERT_EQ(whole.lengths(), std::vector<int64_t>(B, T));

  for (int64_t chunk : {1, 7, 1000}) {
    KVCache cache(config);
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
      const int64_t t1 = std::min(T, t0 + chunk);
      const auto ks = slice_tokens(k, B, H, T, D, t0, t1);
      const auto vs = slice_tokens(v, B, H, T, D, t0, t1);
      cache.append(cpu_view(ks.data(), {B, H, t1 - t0, D}),
                   cpu_view(vs.data(), {B, H, t1 - t0, D}));
    }
    EXPECT_EQ(cache.lengths(), whole.lengths()) << "chunk " << chunk;
    EXPECT_EQ(valid_bytes(cache.keys()), want_k) << "chunk " << chunk;
    EXPECT_EQ(valid_bytes(cache.values()), want_v) << "chunk " << chunk;
    EXPECT_EQ(cache.nbytes(), whole.nbytes());
  }
}

TEST(Cache, NbytesIsExact) {
  for (int64_t D : {64, 80, 96, 128}) {
    KVCacheConfig c = small_config(3, 2, D);
    KVCache cache(c);
    EXPECT_EQ(cache.nbytes(), 0);
    const int64_t T = 37;
    const auto k = random_normal(3 * 2 * T * D, 3);
    cache.append(cpu_view(k.data(), {3, 2, T, D}), cpu_view(k.data(), {3, 2, T, D}));
    cache.append_sequence(1, cpu_view(k.data(), {2, 5, D}), cpu_view(k.data(), {2, 5, D}));
    // Keys: Prod 3 bits = 2-bit indices + norm + residual norm + signs; values: MSE 4 bits.
    const int64_t key_bytes = 4 * ((D * 2 + 31) / 32) + 2 + 2 + 4 * ((D + 31) / 32);
    const int64_t value_bytes = 4 * ((D * 4 + 31) / 32) + 2;
    const int64_t tokens = 3 * T + 5;
    EXPECT_EQ(cache.nbytes(), tokens * 2 * (key_bytes + value_bytes)) << D;
    EXPECT_EQ(cache.keys().nbytes(), tokens * 2 * key_bytes);
    EXPECT_GE(cache.allocated_bytes(), cache.nbytes());
    EXPECT_EQ(cache.allocated_bytes(), cache.capacity() * 3 * 2 * (key_bytes + value_bytes));
  }
}

TEST(Cache, TrimAndReset) {
  const int64_t B = 2, H = 2, D = 64;
  KVCache cache(small_config(B, H, D));
  const auto k = random_normal(B * H * 20 * D, 4);
  const auto tail = random_normal(B * H * 6 * D, 5);
  cache.append(cpu_view(k.data(), {B, H, 20, D}), cpu_view(k.data(), {B, H, 20, D}));
  const auto before = valid_bytes(cache.keys());
  cache.append(cpu_view(tail.data(), {B, H, 6, D}), cpu_view(tail.data(), {B, H, 6, D}));
  EXPECT_EQ(cache.trim(6), 6);
  EXPECT_EQ(cache.lengths(), std::vector<int64_t>(B, 20));
  EXPECT_EQ(valid_bytes(cache.keys()), before);
  cache.append_sequence(0, cpu_view(tail.data(), {H, 3, D}), cpu_view(tail.data(), {H, 3, D}));
  EXPECT_EQ(cache.trim(22), 22);  // sequence 0 had 23, sequence 1 is clamped at 0
  EXPECT_EQ(cache.lengths(), (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(cache.trim(100), 1);
  const int64_t held = cache.allocated_bytes();
  cache.append(cpu_view(k.data(), {B, H, 20, D}), cpu_view(k.data(), {B, H, 20, D}));
  cache.reset();
  EXPECT_EQ(cache.lengths(), std::vector<int64_t>(B, 0));
  EXPECT_EQ(cache.nbytes(), 0);
  EXPECT_EQ(cache.allocated_bytes(), held);  // reset keeps the allocation
  cache.append(cpu_view(k.data(), {B, H, 20, D}), cpu_view(k.data(), {B, H, 20, D}));
  EXPECT_EQ(valid_bytes(cache.keys()), before);
}

TEST(Cache, GrowthIsGeometricAndKeepsData) {
  const int64_t B = 1, H = 2, D = 64, T = 3000;
  KVCacheConfig c = small_config(B, H, D);
  c.step = 8;
  KVCache grown(c);
  KVCacheConfig fixed_config = c;
  fixed_config.max_capacity = T;
  KVCache fixed(fixed_config);
  const auto k = random_normal(B * H * T * D, 6);
  int64_t reallocations = 0, last_capacity = 0;
  for (int64_t t = 0; t < T; t += 5) {
    const auto ks = slice_tokens(k, B, H, T, D, t, t + 5);
    grown.append(cpu_view(ks.data(), {B, H, 5, D}), cpu_view(ks.data(), {B, H, 5, D}));
    fixed.append(cpu_view(ks.data(), {B, H, 5, D}), cpu_view(ks.data(), {B, H, 5, D}));
    if (grown.capacity() != last_capacity) {
      ++reallocations;
      EXPECT_EQ(grown.capacity() % c.step, 0);
      EXPECT_GE(grown.capacity(), 2 * last_capacity);
      last_capacity = grown.capacity();
    }
    EXPECT_EQ(fixed.capacity(), T);
  }
  EXPECT_LE(reallocations, 10);  // 8 -> 16 -> ... -> 4096: doubling, not one step at a time
  EXPECT_EQ(valid_bytes(grown.keys()), valid_bytes(fixed.keys()));
  EXPECT_EQ(valid_bytes(grown.values()), valid_bytes(fixed.values()));
}

TEST(Cache, PerSequenceAppendMatchesQuantizeTensor) {
  const int64_t B = 3, H = 2, D = 96;
  KVCacheConfig c = small_config(B, H, D);
  c.key_mode = QuantMode::kMse;
  KVCache cache(c);
  const auto k1 = random_normal(H * 9 * D, 7);
  const auto k2 = random_normal(H * 4 * D, 8);
  cache.append_sequence(1, cpu_view(k1.data(), {H, 9, D}), cpu_view(k1.data(), {H, 9, D}));
  cache.append_sequence(1, cpu_view(k2.data(), {H, 4, D}), cpu_view(k2.data(), {H, 4, D}));
  cache.append_sequence(2, cpu_view(k2.data(), {H, 4, D}), cpu_view(k2.data(), {H, 4, D}));
  EXPECT_EQ(cache.lengths(), (std::vector<int64_t>{0, 13, 4}));

  // Sequence 1 == quantize_tensor of its 13 tokens.
  std::vector<float> joined;
  for (int64_t h = 0; h < H; ++h) {
    joined.insert(joined.end(), k1.begin() + h * 9 * D, k1.begin() + (h + 1) * 9 * D);
    joined.insert(joined.end(), k2.begin() + h * 4 * D, k2.begin() + (h + 1) * 4 * D);
  }
  QuantizedTensor one =
      quantize_tensor(cache.keys().quantizer, cpu_view(joined.data(), {1, H, 13, D}));
  QuantizedStates seq1 = cache.keys();
  seq1.lengths = {0, 13, 0};
  QuantizedStates want = one.view({13});
  // Compare sequence 1's slab against the single-sequence tensor.
  std::vector<uint8_t> got_bytes = valid_bytes(seq1), want_bytes = valid_bytes(want);
  EXPECT_EQ(got_bytes, want_bytes);

  // dequantize_states: per-sequence lengths, zeros past each length.
  const QuantizedStates keys = cache.keys();
  std::vector<float> out(B * H * 13 * D, std::numeric_limits<float>::quiet_NaN());
  dequantize_states(keys, cpu_view(out.data(), {B, H, 13, D}));
  std::vector<float> ref(H * 13 * D);
  dequantize_states(want, cpu_view(ref.data(), {1, H, 13, D}));
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < 13 * D; ++i) {
      ASSERT_EQ(out[((0 * H + h) * 13) * D + i], 0.0f);
      ASSERT_EQ(out[((1 * H + h) * 13) * D + i], ref[h * 13 * D + i]);
      if (i >= 4 * D) ASSERT_EQ(out[((2 * H + h) * 13) * D + i], 0.0f);
    }
  }
  // 3-bit MSE: relative error about sqrt(d * C) = sqrt(0.034) = 0.18.
  EXPECT_NEAR(testing::relative_l2(ref, joined), 0.184, 0.02);
}

TEST(Cache, ThreadCountDoesNotChangeResult) {
  const int64_t B = 2, H = 4, D = 128, T = 300;
  const auto k = random_normal(B * H * T * D, 9);
  auto codec = std::make_shared<const Codec>(CodecConfig{128, 4});
  auto q = std::make_shared<const TensorQuantizer>(TensorQuantizer::uniform(codec));
  QuantizedTensor a = quantize_tensor(q, cpu_view(k.data(), {B, H, T, D}), 1);
  QuantizedTensor b = quantize_tensor(q, cpu_view(k.data(), {B, H, T, D}), 2);
  EXPECT_EQ(valid_bytes(a.view({T, T})), valid_bytes(b.view({T, T})));
  // And the scalar codec on each row gives the same planes.
  std::vector<uint32_t> idx(B * H * T * codec->index_words());
  std::vector<uint16_t> norms(B * H * T);
  codec->quantize(k.data(), B * H * T, {idx.data(), norms.data(), nullptr, nullptr});
  const QuantizedStates s = a.view({T, T});
  EXPECT_EQ(0, std::memcmp(s.parts[0].indices, idx.data(), idx.size() * 4));
  EXPECT_EQ(0, std::memcmp(s.parts[0].norms, norms.data(), norms.size() * 2));
}

TEST(Cache, HalfAndBfloat16Input) {
  const int64_t B = 1, H = 2, T = 33, D = 128;
  // Random bit patterns (sign, exponent up to magnitude 64, any mantissa), so that subnormals and
  // zeros of both formats are in the mix, not only what rounding a float happens to give.
  const size_t count = static_cast<size_t>(B * H * T * D);
  std::mt19937 rng(10);
  std::vector<uint16_t> h16(count), b16(count);
  std::vector<float> from_h16(count), from_b16(count);
  for (size_t i = 0; i < count; ++i) {
    const uint32_t r = rng();
    h16[i] = static_cast<uint16_t>((r & 0x8000u) | ((r >> 16) % 0x15u) << 10 | (r & 0x3ffu));
    b16[i] = static_cast<uint16_t>((r & 0x8000u) | (0x60u + (r >> 16) % 0x26u) << 7 | (r & 0x7fu));
    from_h16[i] = half_to_float(h16[i]);
    from_b16[i] = bf16_to_float(b16[i]);
    ASSERT_TRUE(std::isfinite(from_h16[i]) && std::isfinite(from_b16[i]));
  }
  for (bool split : {false, true}) {
    KVCacheConfig c = small_config(B, H, D);
    c.key_bits = split ? 2.5 : 3;
    KVCache f16(c), bf16(c), f32_h(c), f32_b(c);
    f16.append({h16.data(), DType::kFloat16, {B, H, T, D}},
               {h16.data(), DType::kFloat16, {B, H, T, D}});
    bf16.append({b16.data(), DType::kBFloat16, {B, H, T, D}},
                {b16.data(), DType::kBFloat16, {B, H, T, D}});
    f32_h.append(cpu_view(from_h16.data(), {B, H, T, D}), cpu_view(from_h16.data(), {B, H, T, D}));
    f32_b.append(cpu_view(from_b16.data(), {B, H, T, D}), cpu_view(from_b16.data(), {B, H, T, D}));
    EXPECT_EQ(valid_bytes(f16.keys()), valid_bytes(f32_h.keys()));
    EXPECT_EQ(valid_bytes(f16.values()), valid_bytes(f32_h.values()));
    EXPECT_EQ(valid_bytes(bf16.keys()), valid_bytes(f32_b.keys()));
    EXPECT_EQ(valid_bytes(bf16.values()), valid_bytes(f32_b.values()));
  }
}

TEST(Cache, SplitWidthCalibratesOnFirstAppendAndRoundTrips) {
  const int64_t B = 2, H = 2, T = 200, D = 128;
  auto k = random_normal(B * H * T * D, 11);
  // Outlier channels, as real keys have: these must land in the high-bit group.
  const std::vector<int> outliers = {5, 17, 64, 100};
  for (int64_t r = 0; r < B * H * T; ++r) {
    for (int c : outliers) k[r * D + c] *= 20.0f;
  }
  const auto v = random_normal(B * H * T * D, 12);
  KVCacheConfig c = small_config(B, H, D);
  c.key_mode = QuantMode::kMse;
  c.key_bits = 2.5;
  c.value_bits = 3.25;
  KVCache cache(c);
  EXPECT_THROW(cache.keys(), RuntimeError);  // nothing calibrated yet
  EXPECT_EQ(cache.nbytes(), 0);
  cache.append(cpu_view(k.data(), {B, H, T, D}), cpu_view(v.data(), {B, H, T, D}));
  const QuantizedStates keys = cache.keys();
  ASSERT_TRUE(keys.quantizer->is_split());
  EXPECT_DOUBLE_EQ(keys.quantizer->bits_per_coordinate(), 2.5);
  EXPECT_DOUBLE_EQ(cache.values().quantizer->bits_per_coordinate(), 3.25);
  const auto& high = keys.quantizer->parts()[1];
  EXPECT_EQ(high.codec->bits(), 3);
  for (int o : outliers) {
    EXPECT_NE(std::find(high.channels.begin(), high.channels.end(), o), high.channels.end()) << o;
  }

  // Round trip: each channel group reconstructs its own channels.
  std::vector<float> out(k.size(), std::numeric_limits<float>::quiet_NaN());
  dequantize_states(keys, cpu_view(out.data(), {B, H, T, D}));
  const double err = testing::relative_l2(out, k);
  EXPECT_LT(err, 0.2);
  EXPECT_GT(err, 0.0);
  // Against each part's own codec on the gathered channels.
  for (const QuantizerPart& part : keys.quantizer->parts()) {
    const int64_t pd = part.codec->dim();
    std::vector<float> sub(pd), rec(pd);
    std::vector<uint32_t> idx(part.codec->index_words());
    uint16_t norm;
    for (int64_t r : {int64_t{0}, int64_t{7}, B * H * T - 1}) {
      for (int64_t j = 0; j < pd; ++j) sub[j] = k[r * D + part.channels[j]];
      part.codec->quantize(sub.data(), 1, {idx.data(), &norm, nullptr, nullptr});
      part.codec->dequantize({idx.data(), &norm, nullptr, nullptr}, 1, rec.data());
      for (int64_t j = 0; j < pd; ++j) ASSERT_EQ(out[r * D + part.channels[j]], rec[j]);
    }
  }
  // Later appends reuse the calibrated split.
  cache.append(cpu_view(k.data(), {B, H, 1, D}), cpu_view(v.data(), {B, H, 1, D}));
  EXPECT_EQ(cache.keys().quantizer, keys.quantizer);
  EXPECT_EQ(cache.nbytes(), (T + 1) * B * H *
                                (keys.quantizer->bytes_per_vector() +
                                 cache.values().quantizer->bytes_per_vector()));
}

TEST(Cache, FromKvBits) {
  KVCacheConfig c = KVCacheConfig::from_kv_bits(3.5, 1, 8, 128);
  EXPECT_EQ(c.key_bits, 3);
  EXPECT_EQ(c.value_bits, 4);
  c = KVCacheConfig::from_kv_bits(4, 2, 8, 64);
  EXPECT_EQ(c.key_bits, 4);
  EXPECT_EQ(c.value_bits, 4);
  EXPECT_EQ(c.batch, 2);
  EXPECT_EQ(c.head_dim, 64);
  expect_throw_with([] { KVCacheConfig::from_kv_bits(9, 1, 1, 64); },
                    {"[tqattn.KVCacheConfig.from_kv_bits]", "expected bits in [1, 8]", "got 9"});
  expect_throw_with([] { KVCacheConfig::from_kv_bits(0.5, 1, 1, 64); }, {"got 0.5"});
}

TEST(Cache, FixedCapacityOverflowThrows) {
  KVCacheConfig c = small_config(1, 1, 64);
  c.max_capacity = 10;
  KVCache cache(c);
  const auto k = random_normal(11 * 64, 13);
  cache.append(cpu_view(k.data(), {1, 1, 8, 64}), cpu_view(k.data(), {1, 1, 8, 64}));
  EXPECT_EQ(cache.capacity(), 10);
  expect_throw_with<RuntimeError>(
      [&] {
        cache.append(cpu_view(k.data(), {1, 1, 3, 64}), cpu_view(k.data(), {1, 1, 3, 64}));
      },
      {"[tqattn.KVCache.append]", "expected at most 2 new tokens", "max_capacity 10", "got 3"});
  expect_throw_with<RuntimeError>(
      [&] {
        cache.append_sequence(0, cpu_view(k.data(), {1, 3, 64}), cpu_view(k.data(), {1, 3, 64}));
      },
      {"[tqattn.KVCache.append_sequence]", "at most 2", "got 3"});
  EXPECT_EQ(cache.lengths()[0], 8);  // failed appends change nothing
  cache.append(cpu_view(k.data(), {1, 1, 2, 64}), cpu_view(k.data(), {1, 1, 2, 64}));
  EXPECT_EQ(cache.lengths()[0], 10);
  expect_throw_with<RuntimeError>(
      [&] {
        cache.append(cpu_view(k.data(), {1, 1, 1, 64}), cpu_view(k.data(), {1, 1, 1, 64}));
      },
      {"[tqattn.KVCache.append]", "got 1"});
}

// ------------------------------------------------------------------------------------------------
// Bad input: each names the function, the expectation and the value.

TEST(CacheBadInput, BitsZeroAndNine) {
  KVCacheConfig c = small_config();
  c.key_bits = 0;
  expect_throw_with([&] { KVCache cache(c); },
                    {"[tqattn.KVCache]", "expected key_bits in [2, 8] (Prod)", "got 0"});
  c.key_bits = 9;
  expect_throw_with([&] { KVCache cache(c); }, {"[tqattn.KVCache]", "key_bits", "got 9"});
  c.key_bits = 4;
  c.value_bits = 9;
  expect_throw_with([&] { KVCache cache(c); },
                    {"[tqattn.KVCache]", "expected value_bits in [1, 8]", "got 9"});
  c.value_bits = 0;
  expect_throw_with([&] { KVCache cache(c); }, {"value_bits", "got 0"});
  c.value_bits = 4;
  c.key_mode = QuantMode::kProd;
  c.key_bits = 1;  // Prod needs a bit for the signs
  expect_throw_with([&] { KVCache cache(c); }, {"(Prod)", "got 1"});
}

TEST(CacheBadInput, HeadDimOneAndMismatch) {
  KVCacheConfig c = small_config(1, 1, 64);
  c.head_dim = 1;
  expect_throw_with([&] { KVCache cache(c); },
                    {"[tqattn.KVCache]", "expected head_dim in 2..4096", "got 1"});
  c.head_dim = 64;
  KVCache cache(c);
  const auto k = random_normal(4 * 80, 14);
  expect_throw_with(
      [&] {
        cache.append(cpu_view(k.data(), {1, 1, 4, 80}), cpu_view(k.data(), {1, 1, 4, 80}));
      },
      {"[tqattn.KVCache.append]", "expected keys of shape [1, 1, n >= 0, 64]",
       "got [1, 1, 4, 80]"});
  expect_throw_with(
      [&] {
        cache.append(cpu_view(k.data(), {1, 1, 5, 64}), cpu_view(k.data(), {1, 1, 4, 80}));
      },
      {"[tqattn.KVCache.append]", "values of shape", "got [1, 1, 4, 80]"});
  expect_throw_with(
      [&] {
        cache.append(cpu_view(k.data(), {1, 1, 5, 64}), cpu_view(k.data(), {1, 1, 4, 64}));
      },
      {"[tqattn.KVCache.append]", "as many tokens as keys (5)", "got 4"});
  // Wrong heads / batch count.
  expect_throw_with(
      [&] {
        cache.append(cpu_view(k.data(), {1, 2, 2, 64}), cpu_view(k.data(), {1, 2, 2, 64}));
      },
      {"keys of shape [1, 1, n >= 0, 64]", "got [1, 2, 2, 64]"});
}

TEST(CacheBadInput, NanAndInfInInput) {
  const int64_t B = 2, H = 2, T = 40, D = 64;
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      KVCache cache(small_config(B, H, D));
      auto k = random_normal(B * H * T * D, 15);
      auto v = random_normal(B * H * T * D, 16);
      v[((1 * H + 0) * T + 33) * D + 7] = bad;  // values [1, 0, 33, 7]
      std::vector<uint16_t> k16(k.size()), v16(v.size());
      for (size_t i = 0; i < k.size(); ++i) {
        k16[i] = dtype == DType::kFloat16 ? float_to_half(k[i]) : float_to_bf16(k[i]);
        v16[i] = dtype == DType::kFloat16 ? float_to_half(v[i]) : float_to_bf16(v[i]);
      }
      const bool f32 = dtype == DType::kFloat32;
      TensorView kv{f32 ? static_cast<void*>(k.data()) : k16.data(), dtype, {B, H, T, D}};
      TensorView vv{f32 ? static_cast<void*>(v.data()) : v16.data(), dtype, {B, H, T, D}};
      const std::string value = std::isnan(bad) ? "nan" : bad > 0 ? "inf" : "-inf";
      expect_throw_with(
          [&] { cache.append(kv, vv); },
          {"[tqattn.KVCache.append]", "expected finite input", value, "at [1, 0, 33, 7]"});
      EXPECT_EQ(cache.lengths(), std::vector<int64_t>(B, 0));  // nothing appended
      EXPECT_EQ(cache.nbytes(), 0);
      // The same through append_sequence and quantize_tensor.
      TensorView seq{f32 ? static_cast<void*>(v.data() + H * T * D)
                         : static_cast<void*>(v16.data() + H * T * D),
                     dtype,
                     {H, T, D}};
      TensorView kseq = seq;
      kseq.data = f32 ? static_cast<void*>(k.data()) : k16.data();
      expect_throw_with([&] { cache.append_sequence(1, kseq, seq); },
                        {"[tqattn.KVCache.append_sequence]", "finite", "at [0, 33, 7]"});
      expect_throw_with([&] { quantize_tensor(cache.keys().quantizer, vv); },
                        {"[tqattn.quantize_tensor]", "finite", value});
    }
  }
  // Finite but overflowing the squared norm.
  KVCache cache(small_config(1, 1, D));
  auto k = random_normal(D, 17);
  k[3] = 3e30f;
  expect_throw_with(
      [&] {
        cache.append(cpu_view(k.data(), {1, 1, 1, D}), cpu_view(k.data(), {1, 1, 1, D}));
      },
      {"[tqattn.KVCache.append]", "squared norm", "[0, 0, 0, 0]"});
}

TEST(CacheBadInput, NanInFirstAppendOfSplitCache) {
  KVCacheConfig c = small_config(1, 1, 64);
  c.key_bits = 2.5;
  KVCache cache(c);
  auto k = random_normal(5 * 64, 18);
  k[2 * 64 + 9] = std::numeric_limits<float>::quiet_NaN();
  expect_throw_with(
      [&] {
        cache.append(cpu_view(k.data(), {1, 1, 5, 64}), cpu_view(k.data(), {1, 1, 5, 64}));
      },
      {"[tqattn.KVCache.append]", "finite keys", "nan at [0, 0, 2, 9]"});
  EXPECT_THROW(cache.keys(), RuntimeError);  // not calibrated on bad data
}

TEST(CacheBadInput, WrongDtype) {
  KVCache cache(small_config(1, 1, 64));
  std::vector<int32_t> k(64, 1);
  TensorView bad{k.data(), DType::kInt32, {1, 1, 1, 64}};
  expect_throw_with([&] { cache.append(bad, bad); },
                    {"[tqattn.KVCache.append]",
                     "expected keys of dtype float32, float16 or bfloat16", "got int32"});
  auto f = random_normal(64, 19);
  TensorView good = cpu_view(f.data(), {1, 1, 1, 64});
  TensorView bool_values{k.data(), DType::kBool, {1, 1, 1, 64}};
  expect_throw_with([&] { cache.append(good, bool_values); }, {"values of dtype", "got bool"});
  std::vector<float> out(64);
  cache.append(good, good);
  TensorView out16{out.data(), DType::kFloat16, {1, 1, 1, 64}};
  expect_throw_with([&] { dequantize_states(cache.keys(), out16); },
                    {"[tqattn.dequantize_states]", "out of dtype float32", "got float16"});
}

TEST(CacheBadInput, WrongRank) {
  KVCache cache(small_config(2, 2, 64));
  auto k = random_normal(2 * 2 * 3 * 64, 20);
  expect_throw_with(
      [&] {
        cache.append(cpu_view(k.data(), {2, 2, 3 * 64}), cpu_view(k.data(), {2, 2, 3 * 64}));
      },
      {"[tqattn.KVCache.append]", "(rank 4)", "got [2, 2, 192]"});
  expect_throw_with(
      [&] {
        cache.append_sequence(0, cpu_view(k.data(), {1, 2, 3, 64}),
                              cpu_view(k.data(), {1, 2, 3, 64}));
      },
      {"[tqattn.KVCache.append_sequence]", "keys of shape [2, n >= 0, 64] (rank 3)",
       "got [1, 2, 3, 64]"});
  auto codec = std::make_shared<const Codec>(CodecConfig{64, 4});
  auto q = std::make_shared<const TensorQuantizer>(TensorQuantizer::uniform(codec));
  expect_throw_with(
      [&] {
        quantize_tensor(q, cpu_view(k.data(), {12, 64}));
      },
      {"[tqattn.quantize_tensor]", "rank 4", "got [12, 64]"});
  std::vector<float> out(2 * 2 * 64);
  cache.append(cpu_view(k.data(), {2, 2, 1, 64}), cpu_view(k.data(), {2, 2, 1, 64}));
  expect_throw_with(
      [&] {
        dequantize_states(cache.keys(), cpu_view(out.data(), {4, 1, 64}));
      },
      {"[tqattn.dequantize_states]", "out of shape [2, 2, 1, 64]", "got [4, 1, 64]"});
}

TEST(CacheBadInput, NegativeSizes) {
  KVCacheConfig c = small_config();
  c.batch = -1;
  expect_throw_with([&] { KVCache cache(c); }, {"[tqattn.KVCache]", "batch >= 1", "got -1"});
  c = small_config();
  c.kv_heads = 0;
  expect_throw_with([&] { KVCache cache(c); }, {"kv_heads >= 1", "got 0"});
  c = small_config();
  c.step = -4;
  expect_throw_with([&] { KVCache cache(c); }, {"step >= 1", "got -4"});
  c = small_config();
  c.max_capacity = -7;
  expect_throw_with([&] { KVCache cache(c); }, {"max_capacity", "got -7"});
  c = small_config();
  c.head_dim = -64;
  expect_throw_with([&] { KVCache cache(c); }, {"head_dim", "got -64"});

  KVCache cache(small_config(2, 3, 64));
  expect_throw_with([&] { cache.trim(-1); }, {"[tqattn.KVCache.trim]", "n >= 0", "got -1"});
  auto k = random_normal(3 * 64, 21);
  expect_throw_with(
      [&] {
        cache.append(cpu_view(k.data(), {2, 3, -1, 64}), cpu_view(k.data(), {2, 3, -1, 64}));
      },
      {"[tqattn.KVCache.append]", "n >= 0", "got [2, 3, -1, 64]"});
  expect_throw_with(
      [&] {
        cache.append_sequence(-1, cpu_view(k.data(), {3, 1, 64}), cpu_view(k.data(), {3, 1, 64}));
      },
      {"[tqattn.KVCache.append_sequence]", "sequence index in 0..1", "got -1"});
  expect_throw_with(
      [&] {
        cache.append_sequence(2, cpu_view(k.data(), {3, 1, 64}), cpu_view(k.data(), {3, 1, 64}));
      },
      {"sequence index in 0..1", "got 2"});
  auto codec = std::make_shared<const Codec>(CodecConfig{64, 4});
  auto q = std::make_shared<const TensorQuantizer>(TensorQuantizer::uniform(codec));
  expect_throw_with([&] { QuantizedTensor t(q, 1, 1, -5); },
                    {"[tqattn.QuantizedTensor]", "capacity >= 0", "got -5"});
  expect_throw_with([&] { QuantizedTensor t(q, 0, 1, 5); }, {"batch >= 1", "got 0"});
  QuantizedTensor t(q, 1, 1, 8);
  expect_throw_with([&] { t.reserve(-3, {0}); }, {"[tqattn.QuantizedTensor.reserve]", "got -3"});
  expect_throw_with([&] { t.view({9}); }, {"[tqattn.QuantizedTensor.view]", "0..8", "got 9"});
  expect_throw_with(
      [&] {
        t.write(cpu_view(k.data(), {1, 1, 2, 64}), {7});
      },
      {"[tqattn.QuantizedTensor.write]", "start in 0..capacity - n = 6", "got 7"});
}

TEST(CacheBadInput, HugeAllocationFailsCleanly) {
  auto codec = std::make_shared<const Codec>(CodecConfig{64, 4});
  auto q = std::make_shared<const TensorQuantizer>(TensorQuantizer::uniform(codec));
  expect_throw_with(
      [&] { QuantizedTensor t(q, int64_t{1} << 31, int64_t{1} << 31, int64_t{1} << 31); },
      {"[tqattn.QuantizedTensor]", "fit in 2^62 bytes"});
#if !defined(__SANITIZE_ADDRESS__)  // ASan aborts on a huge request instead of failing it
  // 2^48 vectors of 34 bytes: passes the size check, then the allocation fails.
  expect_throw_with<RuntimeError>([&] { QuantizedTensor t(q, 1 << 16, 1 << 16, 1 << 16); },
                                  {"[tqattn.QuantizedTensor]", "out of memory"});
#endif
}

TEST(CacheBadInput, CudaCacheWithoutDevice) {
  KVCacheConfig c = small_config();
  c.device = DeviceType::kCUDA;
  if (cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  expect_throw_with<RuntimeError>([&] { KVCache cache(c); }, {"[tqattn.KVCache]", "CUDA"});
  KVCache cpu_cache(small_config(1, 1, 64));
  auto k = random_normal(64, 22);
  TensorView on_gpu = cpu_view(k.data(), {1, 1, 1, 64});
  on_gpu.device = DeviceType::kCUDA;
  expect_throw_with([&] { cpu_cache.append(on_gpu, on_gpu); },
                    {"[tqattn.KVCache.append]", "keys on cpu", "got cuda:0"});
}

}  // namespace
}  // namespace tqattn

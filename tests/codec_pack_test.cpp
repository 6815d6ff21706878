#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "tqattn/tqattn.h"

namespace tqattn {
namespace {

TEST(Pack, RoundTripEveryWidthAndDim) {
  std::mt19937 rng(7);
  for (int bits = 1; bits <= 8; ++bits) {
    for (int dim : {32, 64, 80, 96, 128, 192, 256}) {
      std::vector<uint8_t> idx(dim), back(dim);
      for (auto& v : idx) v = static_cast<uint8_t>(rng() & ((1u << bits) - 1u));
      std::vector<uint32_t> words(packed_words(dim, bits) + 1, 0xdeadbeefu);
      pack_indices(idx.data(), dim, bits, words.data());
      EXPECT_EQ(words.back(), 0xdeadbeefu) << "wrote past packed_words";
      unpack_indices(words.data(), dim, bits, back.data());
      EXPECT_EQ(idx, back) << bits << " bits, dim " << dim;
      for (int j = 0; j < dim; ++j) ASSERT_EQ(unpack_index(words.data(), j, bits), idx[j]);
      // Bits past dim * bits are zero.
      const int used = dim * bits;
      const int64_t total = packed_words(dim, bits) * 32;
      for (int64_t bit = used; bit < total; ++bit)
        EXPECT_EQ((words[bit >> 5] >> (bit & 31)) & 1u, 0u);
    }
  }
}

// The worked example of docs/format.md: 3-bit D=32, index j = (3j + 1) mod 8.
TEST(Pack, GoldenThreeBitExample) {
  std::vector<uint8_t> idx(32);
  for (int j = 0; j < 32; ++j) idx[j] = static_cast<uint8_t>((3 * j + 1) % 8);
  uint32_t words[3];
  pack_indices(idx.data(), 32, 3, words);
  EXPECT_EQ(words[0], 0xe1cc55e1u);
  EXPECT_EQ(words[1], 0x55e1cc55u);
  EXPECT_EQ(words[2], 0xcc55e1ccu);
  // Element 10 (value 7) straddles words 0 and 1: bits 30-31 of word 0, bit 0 of word 1.
  EXPECT_EQ(unpack_index(words, 10, 3), 7u);
  EXPECT_EQ(words[0] >> 30, 3u);
  EXPECT_EQ(words[1] & 1u, 1u);
}

TEST(Pack, SizesAreConstexpr) {
  static_assert(packed_words(128, 4) == 16);
  static_assert(packed_words(96, 5) == 15);
  EXPECT_EQ(packed_words(1, 1), 1);
  EXPECT_EQ(bytes_per_vector(128, 3, QuantMode::kMse), 12 * 4 + 2);
}

}  // namespace
}  // namespace tqattn

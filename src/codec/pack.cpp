#include <cstring>

#include "tqattn/format.h"

namespace tqattn {

void pack_indices(const uint8_t* indices, int64_t dim, int bits, uint32_t* words) {
  const int64_t n_words = packed_words(dim, bits);
  std::memset(words, 0, static_cast<size_t>(n_words) * sizeof(uint32_t));
  for (int64_t j = 0; j < dim; ++j) {
    const int64_t bit = j * bits;
    const int64_t word = bit >> 5;
    const int offset = static_cast<int>(bit & 31);
    const uint64_t value = static_cast<uint64_t>(indices[j]) << offset;
    words[word] |= static_cast<uint32_t>(value);
    if (offset + bits > 32) words[word + 1] |= static_cast<uint32_t>(value >> 32);
  }
}

void unpack_indices(const uint32_t* words, int64_t dim, int bits, uint8_t* indices) {
  for (int64_t j = 0; j < dim; ++j) indices[j] = static_cast<uint8_t>(unpack_index(words, j, bits));
}

}  // namespace tqattn

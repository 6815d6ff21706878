// The packed format, shared by every backend and bit-compatible with mlx-vlm's TurboQuant states.
//
// One quantized tensor (keys or values) of B sequences x H heads x T tokens of dimension D is a set
// of planes, each row-major with the token axis padded to a capacity Tcap >= T:
//   indices          uint32 [B, H, Tcap, index_words(D, index_bits)]   (index_bits = b for MSE,
//                                                                        b - 1 for Prod)
//   norms            fp16   [B, H, Tcap]          ||x|| (or ||x|| / ||c[idx]|| with norm correction)
//   residual_norms   fp16   [B, H, Tcap]          Prod only: gamma = ||u - Pi^T c[idx]||
//   qjl_signs        uint32 [B, H, Tcap, sign_words(D)]   Prod only: bit j = (S r)_j >= 0
// Indices form a dense LSB-first bit stream: element j occupies absolute bits [j*b, j*b + b) of
// the vector's words, word (j*b)/32 at offset (j*b)%32, and a value that crosses a word boundary
// keeps its low bits in the first word and its high bits in the low bits of the next word. Unused
// trailing bits of the last word are zero. docs/format.md has a worked example.
#pragma once

#include <cstdint>

namespace tqattn {

constexpr int kMinBits = 1;
constexpr int kMaxBits = 8;
constexpr int kMinProdBits = 2;
constexpr int kMinDim = 2;
constexpr int kMaxDim = 4096;

enum class QuantMode : uint8_t { kMse, kProd };

constexpr int64_t packed_words(int64_t dim, int bits) { return (dim * bits + 31) / 32; }
constexpr int64_t sign_words(int64_t dim) { return (dim + 31) / 32; }
constexpr int index_bits(QuantMode mode, int bits) { return mode == QuantMode::kProd ? bits - 1 : bits; }

// Bytes one token's vector occupies across all planes.
constexpr int64_t bytes_per_vector(int64_t dim, int bits, QuantMode mode) {
  return 4 * packed_words(dim, index_bits(mode, bits)) + 2 +
         (mode == QuantMode::kProd ? 2 + 4 * sign_words(dim) : 0);
}

static_assert(packed_words(32, 3) == 3, "docs/format.md example: 3-bit D=32 is three words");
static_assert(packed_words(128, 3) == 12, "mlx-vlm: 3-bit D=128 is 12 words");
static_assert(packed_words(128, 4) == 16);
static_assert(packed_words(80, 3) == 8);
static_assert(sign_words(96) == 3);
static_assert(bytes_per_vector(128, 4, QuantMode::kMse) == 66);
static_assert(bytes_per_vector(128, 4, QuantMode::kProd) == 4 * 12 + 2 + 2 + 16);

// Pointers into one part's planes (see above). Null planes are absent (MSE has no Prod planes).
struct PackedPlanes {
  uint32_t* indices = nullptr;
  uint16_t* norms = nullptr;
  uint16_t* residual_norms = nullptr;
  uint32_t* qjl_signs = nullptr;
};

// Reads element j (bits wide) of a packed vector. The scalar definition every kernel must match.
inline uint32_t unpack_index(const uint32_t* words, int64_t j, int bits) {
  const int64_t bit = j * bits;
  const int64_t word = bit >> 5;
  const int offset = static_cast<int>(bit & 31);
  uint64_t window = words[word] >> offset;
  if (offset + bits > 32) window |= static_cast<uint64_t>(words[word + 1]) << (32 - offset);
  return static_cast<uint32_t>(window) & ((1u << bits) - 1u);
}

// Packs dim indices (each < 2^bits) into packed_words(dim, bits) words, zeroing unused bits.
void pack_indices(const uint8_t* indices, int64_t dim, int bits, uint32_t* words);
// Inverse of pack_indices.
void unpack_indices(const uint32_t* words, int64_t dim, int bits, uint8_t* indices);

}  // namespace tqattn

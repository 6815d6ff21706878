// Highway kernels of the fused CPU attention. Two layouts, chosen by the rows per KV head:
//  - decode (<= kSmallRows rows): scores with tokens in lanes from each 16-token group's packed
//    words transposed in registers (constant shifts + a codebook permute per dimension), values
//    accumulated with dimensions in lanes, decoded straight from the packed bytes;
//  - row blocks (prefill): rows in lanes for scores, softmax and values, keys and values decoded
//    token-major into fp32 tiles, small register-blocked GEMM loops (broadcast one decoded
//    element, multiply a vector of rows).
// Both use the tile walk and online-softmax update of the scalar twin
// (attention_kernels_scalar.cpp), so they match it up to rounding.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/attention_kernels.h"
#include "tqattn/half.h"

#if defined(TQATTN_HAVE_HIGHWAY)

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/attention_kernels_hwy.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Per-target headers after foreach_target.h.
#include "hwy/aligned_allocator.h"
#include "hwy/cache_control.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace tqattn::cpu::attn {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DU = hn::RebindToUnsigned<DF>;
using DI = hn::RebindToSigned<DF>;
using DU8 = hn::Repartition<uint8_t, DU>;
using DH = hn::Rebind<hwy::float16_t, DF>;
using VF = hn::Vec<DF>;
using VU = hn::Vec<DU>;
using VI = hn::Vec<DI>;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The packed-index kernels need at least 8 float lanes and x86 byte shuffles; other targets use
// the scalar twin.
#undef TQATTN_ATTN_WIDE
#if HWY_ARCH_X86 && (HWY_TARGET == HWY_AVX2 || HWY_TARGET <= HWY_AVX3)
#define TQATTN_ATTN_WIDE 1
#else
#define TQATTN_ATTN_WIDE 0
#endif

#if TQATTN_ATTN_WIDE

#if HWY_TARGET <= HWY_AVX3
constexpr int kRegBlock = 6;  // broadcast operands per micro-kernel step with 32 registers
#else
constexpr int kRegBlock = 2;
#endif

// A growable 64-byte-aligned scratch buffer, one set per thread.
class Scratch {
 public:
  float* get(size_t n) {
    if (n > size_) {
      buf_ = hwy::AllocateAligned<float>(n);
      std::memset(buf_.get(), 0, n * sizeof(float));
      size_ = n;
    }
    return buf_.get();
  }

 private:
  hwy::AlignedFreeUniquePtr<float[]> buf_;
  size_t size_ = 0;
};

struct Workspace {
  Scratch key_tile, value_tile, scores, weights, mask, mult, qt, acct, rowvec;
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

size_t padded(int dim, size_t n) { return (static_cast<size_t>(dim) + n - 1) / n * n; }

// Per-lane byte shuffle and shift that bring element i of a group of N packed b-bit indices
// (N * b / 8 bytes, replicated into every 128-bit block) into lane i.
struct UnpackPlan {
  alignas(64) uint8_t shuffle[64];
  alignas(64) uint32_t shift[16];
};

void make_plan(int bits, size_t n, UnpackPlan* plan) {
  for (size_t i = 0; i < n; ++i) {
    const size_t bit = i * bits, byte = bit >> 3;
    plan->shift[i] = static_cast<uint32_t>(bit & 7);
    plan->shuffle[4 * i] = static_cast<uint8_t>(byte);
    // shift + bits <= 15, so two bytes always suffice; a second byte past 15 is never needed.
    plan->shuffle[4 * i + 1] = byte + 1 < 16 ? static_cast<uint8_t>(byte + 1) : 0x80;
    plan->shuffle[4 * i + 2] = 0x80;
    plan->shuffle[4 * i + 3] = 0x80;
  }
}

template <bool kPermute>
HWY_INLINE VF lookup(DF df, VF table, const float* table_ptr, VU idx) {
  const DI di;
  if constexpr (kPermute) {
    return hn::TableLookupLanes(table, hn::IndicesFromVec(df, hn::BitCast(di, idx)));
  } else {
    (void)table;
    return hn::GatherIndex(df, table_ptr, hn::BitCast(di, idx));
  }
}

// out[t * ld + j] = table[index(tok0 + t, j)] for t < n, j < padded(dim); zero past dim.
template <bool kPermute>
void decode_token_major_t(const Component& c, int64_t tok0, int n, float* out, size_t ld) {
  const DF df;
  const DU du;
  const DU8 du8;
  const size_t N = hn::Lanes(df);
  UnpackPlan plan;
  make_plan(c.bits, N, &plan);
  const auto shuffle = hn::Load(du8, plan.shuffle);
  const VU shift = hn::Load(du, plan.shift);
  const VU mask = hn::Set(du, (1u << c.bits) - 1u);
  const VF table = kPermute ? hn::LoadU(df, c.table) : hn::Zero(df);
  const int vecs = static_cast<int>((c.dim + N - 1) / N);
  const size_t bytes_per_vec = N * c.bits / 8;
  const uint8_t* end = reinterpret_cast<const uint8_t*>(c.plane_end);
  const int tail = c.dim - (vecs - 1) * static_cast<int>(N);
  alignas(16) uint8_t tmp[16];
  for (int t = 0; t < n; ++t) {
    const uint8_t* base =
        reinterpret_cast<const uint8_t*>(c.words + (tok0 + t) * c.words_per_token);
    float* row = out + t * ld;
    for (int v = 0; v < vecs; ++v) {
      const uint8_t* p = base + v * bytes_per_vec;
      hn::Vec<DU8> raw;
      if (HWY_LIKELY(p + 16 <= end)) {
        raw = hn::LoadDup128(du8, p);
      } else {
        std::memset(tmp, 0, sizeof tmp);
        std::memcpy(tmp, p, static_cast<size_t>(end - p));
        raw = hn::LoadDup128(du8, tmp);
      }
      const VU idx = hn::And(hn::BitCast(du, hn::TableLookupBytesOr0(raw, shuffle)) >> shift, mask);
      VF value = lookup<kPermute>(df, table, c.table, idx);
      if (v == vecs - 1 && tail < static_cast<int>(N))
        value = hn::IfThenElseZero(hn::FirstN(df, tail), value);
      hn::Store(value, df, row + v * N);
    }
  }
}

void decode_token_major(const Component& c, int64_t tok0, int n, float* out, size_t ld) {
  if ((size_t{1} << c.bits) <= hn::Lanes(DF()))
    decode_token_major_t<true>(c, tok0, n, out, ld);
  else
    decode_token_major_t<false>(c, tok0, n, out, ld);
}

// mult[t] = norm * norm2 * constant for t < n, 0 up to kTile.
void token_mult(const Component& c, int64_t tok0, int n, float* mult) {
  const DF df;
  const DH dh;
  const size_t N = hn::Lanes(df);
  const VF constant = hn::Set(df, c.constant);
  int t = 0;
  for (; t + static_cast<int>(N) <= n; t += static_cast<int>(N)) {
    VF v = hn::PromoteTo(df,
                         hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(c.norm + tok0 + t)));
    if (c.norm2 != nullptr)
      v = hn::Mul(
          v, hn::PromoteTo(
                 df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(c.norm2 + tok0 + t))));
    hn::Store(hn::Mul(v, constant), df, mult + t);
  }
  for (; t < n; ++t) {
    float v = half_to_float(c.norm[tok0 + t]) * c.constant;
    if (c.norm2 != nullptr) v *= half_to_float(c.norm2[tok0 + t]);
    mult[t] = v;
  }
  for (; t < kTile; ++t) mult[t] = 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Decode kernel (few rows, padded to 1, 2, 4 or 8). Scores keep tokens in lanes: each group of N
// tokens' packed words is transposed in registers (word w of N tokens in one vector), so every
// dimension costs a constant shift, a table permute and one FMA per row. Values keep dimensions
// in lanes and are decoded straight from the packed bytes (byte shuffle, variable shift,
// permute). No fp32 copy of a key or value tile is made.

#if HWY_TARGET <= HWY_AVX3
constexpr int kAccRegs = 16;
#else
constexpr int kAccRegs = 8;
#endif
constexpr size_t kLanes = HWY_LANES(float);

HWY_INLINE VF vf_from_raw(decltype(VF().raw) raw) {
  VF v;
  v.raw = raw;
  return v;
}

// table[x & (2^kBits - 1)] per lane. Tables hold at least kMinTable entries with the codebook
// repeated, so a permute that reads only the low log2(N) (or 5) index bits needs no mask.
template <int kBits>
HWY_INLINE VF lookup_bits(VF table, VF table_hi, const float* table_ptr, VU x) {
  (void)table_hi;
  (void)table_ptr;
  if constexpr ((size_t{1} << kBits) <= kLanes) {
#if HWY_TARGET <= HWY_AVX3
    return vf_from_raw(_mm512_permutexvar_ps(x.raw, table.raw));
#else
    return vf_from_raw(_mm256_permutevar8x32_ps(table.raw, x.raw));
#endif
  }
#if HWY_TARGET <= HWY_AVX3
  else if constexpr (kBits == 5) {
    return vf_from_raw(_mm512_permutex2var_ps(table.raw, x.raw, table_hi.raw));
  }
#endif
  else {
    const DI di;
    return hn::GatherIndex(DF(), table_ptr,
                           hn::BitCast(di, hn::And(x, hn::Set(DU(), (1u << kBits) - 1u))));
  }
}

template <int kBits>
HWY_INLINE VF table_hi_of(const float* table) {
  if constexpr (kBits == 5 && kLanes == 16) return hn::LoadU(DF(), table + 16);
  return hn::Zero(DF());
}

// out[w * N + lane] = word w of token min(lane, n - 1), for w < W (out has room for W rounded
// up to N words; the rows past W are scratch).
void transpose_words(const uint32_t* words, int64_t W, int n, uint32_t* out,
                     const uint32_t* prefetch_end) {
  // Warm the next group's words (one group ahead is the next call's input).
  const char* next = reinterpret_cast<const char*>(words + kLanes * W);
  const char* next_end =
      std::min(next + kLanes * W * 4, reinterpret_cast<const char*>(prefetch_end));
  for (const char* p = next; p < next_end; p += 64) hwy::Prefetch(p);
#if HWY_TARGET <= HWY_AVX3
  for (int64_t w0 = 0; w0 < W; w0 += 16) {
    const int cols = static_cast<int>(std::min<int64_t>(16, W - w0));
    const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1u);
    __m512i r[16], t[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      r[i] = _mm512_maskz_loadu_epi32(mask, words + std::min(i, n - 1) * W + w0);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      r[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
      r[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
      r[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
      r[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
    }
    // r[4k + m], 128-bit lane L: rows 4k..4k+3 of column 4L + m.
#pragma GCC unroll 4
    for (int m = 0; m < 4; ++m) {
      const __m512i x0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44);
      const __m512i x1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xEE);
      const __m512i x2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
      const __m512i x3 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xEE);
      t[m] = _mm512_shuffle_i32x4(x0, x2, 0x88);
      t[4 + m] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
      t[8 + m] = _mm512_shuffle_i32x4(x1, x3, 0x88);
      t[12 + m] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
    }
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) _mm512_store_si512(out + (w0 + c) * 16, t[c]);
  }
#else
  alignas(32) static const int32_t kFirst[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                 0,  0,  0,  0,  0,  0,  0,  0};
  for (int64_t w0 = 0; w0 < W; w0 += 8) {
    const int cols = static_cast<int>(std::min<int64_t>(8, W - w0));
    const __m256i mask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kFirst + 8 - cols));
    __m256i r[8], t[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
      r[i] = _mm256_maskload_epi32(
          reinterpret_cast<const int*>(words + std::min(i, n - 1) * W + w0), mask);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      t[2 * k] = _mm256_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm256_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
#pragma GCC unroll 2
    for (int k = 0; k < 2; ++k) {
      r[4 * k] = _mm256_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
      r[4 * k + 1] = _mm256_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
      r[4 * k + 2] = _mm256_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
      r[4 * k + 3] = _mm256_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
    }
#pragma GCC unroll 4
    for (int m = 0; m < 4; ++m) {
      t[m] = _mm256_permute2x128_si256(r[m], r[4 + m], 0x20);
      t[4 + m] = _mm256_permute2x128_si256(r[m], r[4 + m], 0x31);
    }
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c)
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + (w0 + c) * 8), t[c]);
  }
#endif
}

template <int kBits, int NR, int JJ>
HWY_INLINE void score_dim(const uint32_t* wp, const float* q, int64_t qs, VF table, VF table_hi,
                          const float* table_ptr, VF (&acc)[NR]) {
  const DU du;
  const DF df;
  constexpr int kBit = JJ * kBits, kW = kBit >> 5, kSh = kBit & 31;
  VU x = hn::ShiftRight<kSh>(hn::Load(du, wp + kW * kLanes));
  if constexpr (kSh + kBits > 32)
    x = hn::Or(x, hn::ShiftLeft<32 - kSh>(hn::Load(du, wp + (kW + 1) * kLanes)));
  const VF c = lookup_bits<kBits>(table, table_hi, table_ptr, x);
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) acc[r] = hn::MulAdd(hn::Set(df, q[JJ * NR + r]), c, acc[r]);
}

template <int kBits, int NR, size_t... JJ>
HWY_INLINE void score_period(const uint32_t* wp, const float* q, int64_t qs, VF table, VF table_hi,
                             const float* table_ptr, VF (&acc)[NR], std::index_sequence<JJ...>) {
  (score_dim<kBits, NR, static_cast<int>(JJ)>(wp, q, qs, table, table_hi, table_ptr, acc), ...);
}

// dst[r * kTile] (+)= mult * sum_j q[j * NR + r] * table[index(token lane, j)] over the
// transposed words wt (accumulators stay in registers).
template <int kBits, int NR>
void score_group(const uint32_t* wt, const Component& c, const float* q, int64_t qs, VF mult,
                 float* dst, bool first) {
  const DF df;
  const DU du;
  constexpr int kPeriod = 32 / std::gcd(32, kBits);  // dimensions per whole number of words
  constexpr int kPeriodWords = kPeriod * kBits / 32;
  const VF table = hn::LoadU(df, c.table);
  const VF table_hi = table_hi_of<kBits>(c.table);
  VF acc[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) acc[r] = hn::Zero(df);
  int j = 0;
  for (; j + kPeriod <= c.dim; j += kPeriod)
    score_period<kBits, NR>(wt + (j / kPeriod) * kPeriodWords * kLanes, q + j * NR, qs, table,
                            table_hi, c.table, acc, std::make_index_sequence<kPeriod>());
  for (; j < c.dim; ++j) {
    const int bit = j * kBits, w = bit >> 5, sh = bit & 31;
    VU x = hn::ShiftRightSame(hn::Load(du, wt + w * kLanes), sh);
    if (sh + kBits > 32)
      x = hn::Or(x, hn::ShiftLeftSame(hn::Load(du, wt + (w + 1) * kLanes), 32 - sh));
    const VF v = lookup_bits<kBits>(table, table_hi, c.table, x);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[r] = hn::MulAdd(hn::Set(df, q[j * NR + r]), v, acc[r]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    float* out = dst + r * kTile;
    hn::Store(first ? hn::Mul(acc[r], mult) : hn::MulAdd(acc[r], mult, hn::Load(df, out)), df, out);
  }
}

template <int NR>
void score_group_bits(const uint32_t* wt, const Component& c, const float* q, int64_t qs, VF mult,
                      float* dst, bool first) {
  switch (c.bits) {
    case 1:
      return score_group<1, NR>(wt, c, q, qs, mult, dst, first);
    case 2:
      return score_group<2, NR>(wt, c, q, qs, mult, dst, first);
    case 3:
      return score_group<3, NR>(wt, c, q, qs, mult, dst, first);
    case 4:
      return score_group<4, NR>(wt, c, q, qs, mult, dst, first);
    case 5:
      return score_group<5, NR>(wt, c, q, qs, mult, dst, first);
    case 6:
      return score_group<6, NR>(wt, c, q, qs, mult, dst, first);
    case 7:
      return score_group<7, NR>(wt, c, q, qs, mult, dst, first);
    case 8:
      return score_group<8, NR>(wt, c, q, qs, mult, dst, first);
    default:
      break;
  }
  HWY_ABORT("attention kernel: index bits %d outside 1..8", c.bits);
}

// acc[r * vs + j] += sum_{t < n} w[r * kTile + t] * table[index(ts + t, j)] for the NV dimension
// vectors from v0 of one value part (acc already offset to the part).
template <int kBits, int NR, int NV>
void accumulate_fused(const Component& c, int64_t ts, int n, const float* w, float* acc, int64_t vs,
                      int v0, const UnpackPlan& plan) {
  const DF df;
  const DU du;
  const DU8 du8;
  const auto shuffle = hn::Load(du8, plan.shuffle);
  const VU shift = hn::Load(du, plan.shift);
  const VF table = hn::LoadU(df, c.table);
  const VF table_hi = table_hi_of<kBits>(c.table);
  constexpr size_t kBpv = kLanes * kBits / 8;
  const int vecs = static_cast<int>((c.dim + kLanes - 1) / kLanes);
  const int tail = c.dim - (vecs - 1) * static_cast<int>(kLanes);
  // Zeroes the lanes past dim in the part's last vector (they hold the next token's bits).
  const VF keep_last =
      hn::IfThenElseZero(hn::FirstN(df, static_cast<size_t>(tail)), hn::Set(df, 1.0f));
  const bool last_in_block = v0 + NV == vecs && tail < static_cast<int>(kLanes);
  const size_t token_bytes = static_cast<size_t>(c.words_per_token) * 4;
  const uint8_t* end = reinterpret_cast<const uint8_t*>(c.plane_end);
  const uint8_t* first = reinterpret_cast<const uint8_t*>(c.words + ts * c.words_per_token);
  // Tokens whose 16-byte loads stay inside the plane; the rest read a padded copy.
  int n_fast = n;
  while (n_fast > 0 && first + (n_fast - 1) * token_bytes + (v0 + NV - 1) * kBpv + 16 > end)
    --n_fast;

  VF a[NR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) a[r][i] = hn::LoadU(df, acc + r * vs + (v0 + i) * kLanes);

  auto body = [&](const uint8_t* base, int t) HWY_ATTR {
    VF wr[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) wr[r] = hn::Set(df, w[r * kTile + t]);
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) {
      const hn::Vec<DU8> raw = hn::LoadDup128(du8, base + (v0 + i) * kBpv);
      const VU x = hn::BitCast(du, hn::TableLookupBytesOr0(raw, shuffle)) >> shift;
      VF v = lookup_bits<kBits>(table, table_hi, c.table, x);
      if (i == NV - 1 && last_in_block) v = hn::Mul(v, keep_last);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) a[r][i] = hn::MulAdd(wr[r], v, a[r][i]);
    }
  };
  for (int t = 0; t < n_fast; ++t) body(first + t * token_bytes, t);
  if (n_fast < n) {
    std::vector<uint8_t> padded(token_bytes + 64, 0);
    for (int t = n_fast; t < n; ++t) {
      std::memcpy(padded.data(), first + t * token_bytes, token_bytes);
      body(padded.data(), t);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) hn::StoreU(a[r][i], df, acc + r * vs + (v0 + i) * kLanes);
}

template <int kBits, int NR>
void accumulate_part(const Component& c, int64_t ts, int n, const float* w, float* acc, int64_t vs,
                     const UnpackPlan& plan) {
  constexpr int kNV = std::max(1, kAccRegs / NR);
  const int vecs = static_cast<int>((c.dim + kLanes - 1) / kLanes);
  int v0 = 0;
  for (; v0 + kNV <= vecs; v0 += kNV)
    accumulate_fused<kBits, NR, kNV>(c, ts, n, w, acc, vs, v0, plan);
  for (; v0 < vecs; ++v0) accumulate_fused<kBits, NR, 1>(c, ts, n, w, acc, vs, v0, plan);
}

template <int NR>
void accumulate_part_bits(const Component& c, int64_t ts, int n, const float* w, float* acc,
                          int64_t vs, const UnpackPlan& plan) {
  switch (c.bits) {
    case 1:
      return accumulate_part<1, NR>(c, ts, n, w, acc, vs, plan);
    case 2:
      return accumulate_part<2, NR>(c, ts, n, w, acc, vs, plan);
    case 3:
      return accumulate_part<3, NR>(c, ts, n, w, acc, vs, plan);
    case 4:
      return accumulate_part<4, NR>(c, ts, n, w, acc, vs, plan);
    case 5:
      return accumulate_part<5, NR>(c, ts, n, w, acc, vs, plan);
    case 6:
      return accumulate_part<6, NR>(c, ts, n, w, acc, vs, plan);
    case 7:
      return accumulate_part<7, NR>(c, ts, n, w, acc, vs, plan);
    case 8:
      return accumulate_part<8, NR>(c, ts, n, w, acc, vs, plan);
    default:
      break;
  }
  HWY_ABORT("attention kernel: index bits %d outside 1..8", c.bits);
}

template <int NR>
void run_small_rows(const TaskArgs& a) {
  const attention::Problem& p = *a.problem;
  const DF df;
  const DI di;
  const DU du;
  constexpr size_t N = kLanes;
  const int rows = a.rows;
  Workspace& ws = workspace();
  int64_t max_words = 0;
  for (int i = 0; i < a.n_keys; ++i) max_words = std::max(max_words, a.keys[i].words_per_token);
  uint32_t* wt = reinterpret_cast<uint32_t*>(ws.key_tile.get((max_words + N) * N));
  float* s = ws.scores.get(NR * kTile);
  float* w = ws.weights.get(NR * kTile);
  float* maskt = ws.mask.get(NR * kTile);
  float* mults = ws.mult.get(a.n_keys * kTile);
  float* vmult = ws.value_tile.get(kTile);
  float* q = ws.qt.get(NR * a.q_stride);
  float* acc = ws.acct.get(NR * a.v_stride);
  float m[NR], l[NR], alpha[NR];
  int32_t lo[NR], hi[NR];
  for (int r = 0; r < NR; ++r) {
    const bool live = r < rows;
    m[r] = kNegInf;
    l[r] = 0.0f;
    lo[r] = live ? static_cast<int32_t>(p.visible_lo(a.b, a.row_l(r))) : 0;
    hi[r] = live ? static_cast<int32_t>(p.visible_hi(a.b, a.row_l(r))) : 0;
    for (int64_t j = 0; j < a.q_stride; ++j)
      q[j * NR + r] = live ? a.queries[r * a.q_stride + j] : 0.0f;
    for (int64_t j = 0; j < a.v_stride; ++j) acc[r * a.v_stride + j] = 0.0f;
  }
  std::vector<UnpackPlan> plans(a.n_values);
  for (int i = 0; i < a.n_values; ++i) make_plan(a.values[i].bits, N, &plans[i]);

  const bool has_mask = p.mask.data != nullptr;
  const float softcap = p.softcap;
  const VF cap = hn::Set(df, softcap), inv_cap = hn::Set(df, softcap > 0 ? 1.0f / softcap : 0.0f);
  const VF neg_inf = hn::Set(df, kNegInf);
  const TileRange range = task_tiles(a);
  for (int64_t ts = range.begin; ts < range.end; ts += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, range.end - ts));
    bool any = false;
    for (int r = 0; r < rows; ++r) any |= lo[r] < ts + n && hi[r] > ts;
    if (!any) continue;
    if (has_mask) fill_mask_tile(a, ts, n, maskt, kTile, 1);
    for (int ci = 0; ci < a.n_keys; ++ci) token_mult(a.keys[ci], ts, n, mults + ci * kTile);
    // The tile's value bytes load while the scores are computed.
    for (int ci = 0; ci < a.n_values; ++ci) {
      const Component& c = a.values[ci];
      const char* p0 = reinterpret_cast<const char*>(c.words + ts * c.words_per_token);
      const char* p1 = reinterpret_cast<const char*>(c.words + (ts + n) * c.words_per_token);
      for (const char* p = p0; p < p1; p += 64) hwy::Prefetch(p);
    }

    const int groups = static_cast<int>((n + N - 1) / N);
    for (int g = 0; g < groups; ++g) {
      const int tg = g * static_cast<int>(N);
      for (int ci = 0; ci < a.n_keys; ++ci) {
        const Component& c = a.keys[ci];
        transpose_words(c.words + (ts + tg) * c.words_per_token, c.words_per_token,
                        std::min(static_cast<int>(N), n - tg), wt,
                        c.words + a.t1 * c.words_per_token);
        score_group_bits<NR>(wt, c, q + c.offset * NR, a.q_stride,
                             hn::Load(df, mults + ci * kTile + tg), s + tg, ci == 0);
      }
    }

    const VI n_limit = hn::Set(di, n);
    const VI iota = hn::Iota(di, 0);
    bool rescale = false;
    for (int r = 0; r < NR; ++r) {
      float* srow = s + r * kTile;
      const VI vlo = hn::Set(di, lo[r]), vhi = hn::Set(di, hi[r]);
      VF vmax = neg_inf;
      for (int g = 0; g < groups; ++g) {
        VF x = hn::Load(df, srow + g * N);
        if (softcap > 0.0f) x = hn::Mul(cap, hn::Tanh(df, hn::Mul(x, inv_cap)));
        if (has_mask && r < rows) x = hn::Add(x, hn::Load(df, maskt + r * kTile + g * N));
        const VI lane = hn::Add(iota, hn::Set(di, static_cast<int32_t>(g * N)));
        const VI tok = hn::Add(lane, hn::Set(di, static_cast<int32_t>(ts)));
        const auto vis =
            hn::And(hn::AndNot(hn::Lt(tok, vlo), hn::Lt(tok, vhi)), hn::Lt(lane, n_limit));
        x = hn::IfThenElse(hn::RebindMask(df, vis), x, neg_inf);
        hn::Store(x, df, srow + g * N);
        vmax = hn::Max(vmax, x);
      }
      const float tile_max = hn::GetLane(hn::MaxOfLanes(df, vmax));
      const float m_new = std::max(m[r], tile_max);
      const float m_use = m_new == kNegInf ? 0.0f : m_new;
      alpha[r] = std::exp(m[r] - m_use);
      rescale |= r < rows && alpha[r] != 1.0f;
      const VF vm = hn::Set(df, m_use);
      VF sum = hn::Zero(df);
      for (int g = 0; g < groups; ++g) {
        const VF e = hn::Exp(df, hn::Sub(hn::Load(df, srow + g * N), vm));
        hn::Store(e, df, srow + g * N);
        sum = hn::Add(sum, e);
      }
      l[r] = l[r] * alpha[r] + hn::GetLane(hn::SumOfLanes(df, sum));
      m[r] = m_new;
    }
    if (rescale) {
      for (int r = 0; r < NR; ++r) {
        const VF al = hn::Set(df, alpha[r]);
        for (int64_t j = 0; j < a.v_stride; j += N)
          hn::Store(hn::Mul(hn::Load(df, acc + r * a.v_stride + j), al), df,
                    acc + r * a.v_stride + j);
      }
    }

    for (int ci = 0; ci < a.n_values; ++ci) {
      const Component& c = a.values[ci];
      token_mult(c, ts, n, vmult);
      for (int r = 0; r < NR; ++r)
        for (int g = 0; g < groups; ++g)
          hn::Store(hn::Mul(hn::Load(df, s + r * kTile + g * N), hn::Load(df, vmult + g * N)), df,
                    w + r * kTile + g * N);
      accumulate_part_bits<NR>(c, ts, n, w, acc + c.offset, a.v_stride, plans[ci]);
    }
  }
  (void)du;
  for (int r = 0; r < rows; ++r) {
    a.m[r] = m[r];
    a.l[r] = l[r];
    for (int64_t j = 0; j < a.v_stride; ++j) a.acc[r * a.v_stride + j] = acc[r * a.v_stride + j];
  }
}

void run_small(const TaskArgs& a) {
  if (a.rows <= 1) return run_small_rows<1>(a);
  if (a.rows <= 2) return run_small_rows<2>(a);
  if (a.rows <= 4) return run_small_rows<4>(a);
  run_small_rows<8>(a);
}

// ---------------------------------------------------------------------------------------------
// Row-block kernel (prefill): kRowBlock rows in lanes, kRowVecs vectors of them.

// st[t * kRowBlock + row] (+)= mult[t] * sum_j qt[j * kRowBlock + row] * kt[t * ld + j], for TB
// tokens from t0 and the four row vectors from g0.
template <int TB>
void score_block(const float* qt, const float* kt, size_t ld, int dim, int t0, int g0,
                 const float* mult, float* st, bool first) {
  const DF df;
  const size_t N = hn::Lanes(df);
  VF acc[4][TB];
  for (int i = 0; i < 4; ++i)
    for (int t = 0; t < TB; ++t) acc[i][t] = hn::Zero(df);
  const float* kp = kt + t0 * ld;
  for (int j = 0; j < dim; ++j) {
    VF q[4];
    for (int i = 0; i < 4; ++i) q[i] = hn::Load(df, qt + j * kRowBlock + (g0 + i) * N);
    for (int t = 0; t < TB; ++t) {
      const VF kb = hn::Set(df, kp[t * ld + j]);
      for (int i = 0; i < 4; ++i) acc[i][t] = hn::MulAdd(q[i], kb, acc[i][t]);
    }
  }
  for (int t = 0; t < TB; ++t) {
    const VF m = hn::Set(df, mult[t0 + t]);
    for (int i = 0; i < 4; ++i) {
      float* dst = st + (t0 + t) * kRowBlock + (g0 + i) * N;
      hn::Store(first ? hn::Mul(acc[i][t], m) : hn::MulAdd(acc[i][t], m, hn::Load(df, dst)), df,
                dst);
    }
  }
}

// acct[j * kRowBlock + row] = acct * alpha[row] + sum_{t < n} pw[t * kRowBlock + row] * vt[t * ld
// + j] for JB dimensions from j0 and the four row vectors from g0.
template <int JB>
void accumulate_block(float* acct, const float* vt, size_t ld, int n, const float* pw,
                      const float* alpha, int j0, int g0) {
  const DF df;
  const size_t N = hn::Lanes(df);
  VF a[4][JB];
  for (int i = 0; i < 4; ++i) {
    const VF al = hn::Load(df, alpha + (g0 + i) * N);
    for (int jj = 0; jj < JB; ++jj)
      a[i][jj] = hn::Mul(hn::Load(df, acct + (j0 + jj) * kRowBlock + (g0 + i) * N), al);
  }
  for (int t = 0; t < n; ++t) {
    VF pv[4];
    for (int i = 0; i < 4; ++i) pv[i] = hn::Load(df, pw + t * kRowBlock + (g0 + i) * N);
    const float* vrow = vt + t * ld + j0;
    for (int jj = 0; jj < JB; ++jj) {
      const VF vb = hn::Set(df, vrow[jj]);
      for (int i = 0; i < 4; ++i) a[i][jj] = hn::MulAdd(pv[i], vb, a[i][jj]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int jj = 0; jj < JB; ++jj)
      hn::Store(a[i][jj], df, acct + (j0 + jj) * kRowBlock + (g0 + i) * N);
}

void run_block(const TaskArgs& a) {
  const attention::Problem& p = *a.problem;
  const DF df;
  const DI di;
  const size_t N = hn::Lanes(df);
  const int row_vecs = kRowBlock / static_cast<int>(N);
  const int rows = a.rows;
  Workspace& ws = workspace();
  size_t kt_size = 0, vt_size = 0;
  for (int i = 0; i < a.n_keys; ++i) kt_size = std::max(kt_size, padded(a.keys[i].dim, N) * kTile);
  for (int i = 0; i < a.n_values; ++i)
    vt_size = std::max(vt_size, padded(a.values[i].dim, N) * kTile);
  float* kt = ws.key_tile.get(kt_size);
  float* vt = ws.value_tile.get(vt_size);
  float* st = ws.scores.get(kTile * kRowBlock);
  float* pw = ws.weights.get(kTile * kRowBlock);
  float* maskt = ws.mask.get(kTile * kRowBlock);
  float* mult = ws.mult.get(kTile);
  float* qt = ws.qt.get(a.q_stride * kRowBlock);
  float* acct = ws.acct.get(a.v_stride * kRowBlock);
  float* rowvec = ws.rowvec.get(5 * kRowBlock);
  float* m = rowvec;
  float* l = rowvec + kRowBlock;
  float* alpha = rowvec + 2 * kRowBlock;
  int32_t* lo = reinterpret_cast<int32_t*>(rowvec + 3 * kRowBlock);
  int32_t* hi = reinterpret_cast<int32_t*>(rowvec + 4 * kRowBlock);

  for (int r = 0; r < kRowBlock; ++r) {
    const bool live = r < rows;
    m[r] = kNegInf;
    l[r] = 0.0f;
    lo[r] = live ? static_cast<int32_t>(p.visible_lo(a.b, a.row_l(r))) : 0;
    hi[r] = live ? static_cast<int32_t>(p.visible_hi(a.b, a.row_l(r))) : 0;
    for (int64_t j = 0; j < a.q_stride; ++j)
      qt[j * kRowBlock + r] = live ? a.queries[r * a.q_stride + j] : 0.0f;
  }
  std::memset(acct, 0, sizeof(float) * a.v_stride * kRowBlock);
  if (p.mask.data != nullptr)  // rows past `rows` stay 0 (they are invisible anyway)
    std::memset(maskt, 0, sizeof(float) * kTile * kRowBlock);

  const bool has_mask = p.mask.data != nullptr;
  const float softcap = p.softcap;
  const VF cap = hn::Set(df, softcap), inv_cap = hn::Set(df, softcap > 0 ? 1.0f / softcap : 0.0f);
  const VF neg_inf = hn::Set(df, kNegInf);
  const TileRange range = task_tiles(a);
  for (int64_t ts = range.begin; ts < range.end; ts += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, range.end - ts));
    bool any = false;
    for (int r = 0; r < rows; ++r) any |= lo[r] < ts + n && hi[r] > ts;
    if (!any) continue;
    if (has_mask) fill_mask_tile(a, ts, n, maskt, 1, kRowBlock);

    for (int ci = 0; ci < a.n_keys; ++ci) {
      const Component& c = a.keys[ci];
      const size_t ld = padded(c.dim, N);
      decode_token_major(c, ts, n, kt, ld);
      token_mult(c, ts, n, mult);
      const float* q = qt + c.offset * kRowBlock;
      for (int g0 = 0; g0 < row_vecs; g0 += 4) {
        int t = 0;
        for (; t + kRegBlock <= n; t += kRegBlock)
          score_block<kRegBlock>(q, kt, ld, c.dim, t, g0, mult, st, ci == 0);
        for (; t < n; ++t) score_block<1>(q, kt, ld, c.dim, t, g0, mult, st, ci == 0);
      }
    }

    const VF zero = hn::Zero(df);
    for (int g = 0; g < row_vecs; ++g) {
      const VI vlo = hn::Load(di, lo + g * N), vhi = hn::Load(di, hi + g * N);
      VF vmax = neg_inf;
      for (int t = 0; t < n; ++t) {
        float* sp = st + t * kRowBlock + g * N;
        VF x = hn::Load(df, sp);
        if (softcap > 0.0f) x = hn::Mul(cap, hn::Tanh(df, hn::Mul(x, inv_cap)));
        if (has_mask) x = hn::Add(x, hn::Load(df, maskt + t * kRowBlock + g * N));
        const VI tok = hn::Set(di, static_cast<int32_t>(ts + t));
        const auto vis = hn::AndNot(hn::Lt(tok, vlo), hn::Lt(tok, vhi));
        x = hn::IfThenElse(hn::RebindMask(df, vis), x, neg_inf);
        hn::Store(x, df, sp);
        vmax = hn::Max(vmax, x);
      }
      const VF m_old = hn::Load(df, m + g * N);
      const VF m_new = hn::Max(m_old, vmax);
      const VF m_use = hn::IfThenElseZero(hn::Ne(m_new, neg_inf), m_new);
      const VF al = hn::Exp(df, hn::Sub(m_old, m_use));
      VF sum = zero;
      for (int t = 0; t < n; ++t) {
        float* sp = st + t * kRowBlock + g * N;
        const VF e = hn::Exp(df, hn::Sub(hn::Load(df, sp), m_use));
        hn::Store(e, df, sp);
        sum = hn::Add(sum, e);
      }
      hn::Store(hn::MulAdd(hn::Load(df, l + g * N), al, sum), df, l + g * N);
      hn::Store(m_new, df, m + g * N);
      hn::Store(al, df, alpha + g * N);
    }

    for (int ci = 0; ci < a.n_values; ++ci) {
      const Component& c = a.values[ci];
      const size_t ld = padded(c.dim, N);
      decode_token_major(c, ts, n, vt, ld);
      token_mult(c, ts, n, mult);
      for (int t = 0; t < n; ++t) {
        const VF vn = hn::Set(df, mult[t]);
        for (int g = 0; g < row_vecs; ++g)
          hn::Store(hn::Mul(hn::Load(df, st + t * kRowBlock + g * N), vn), df,
                    pw + t * kRowBlock + g * N);
      }
      float* acc_c = acct + c.offset * kRowBlock;
      const int dims = static_cast<int>(ld);
      for (int g0 = 0; g0 < row_vecs; g0 += 4) {
        int j = 0;
        for (; j + kRegBlock <= dims; j += kRegBlock)
          accumulate_block<kRegBlock>(acc_c, vt, ld, n, pw, alpha, j, g0);
        for (; j < dims; ++j) accumulate_block<1>(acc_c, vt, ld, n, pw, alpha, j, g0);
      }
    }
  }

  for (int r = 0; r < rows; ++r) {
    a.m[r] = m[r];
    a.l[r] = l[r];
    for (int64_t j = 0; j < a.v_stride; ++j) a.acc[r * a.v_stride + j] = acct[j * kRowBlock + r];
  }
}

#endif  // TQATTN_ATTN_WIDE

float RowSoftcapMax(float* x, int64_t n, float softcap) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const VF cap = hn::Set(df, softcap), inv_cap = hn::Set(df, softcap > 0 ? 1.0f / softcap : 0.0f);
  VF vmax = hn::Set(df, kNegInf);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    VF v = hn::LoadU(df, x + i);
    if (softcap > 0.0f) {
      v = hn::Mul(cap, hn::Tanh(df, hn::Mul(v, inv_cap)));
      hn::StoreU(v, df, x + i);
    }
    vmax = hn::Max(vmax, v);
  }
  float m = hn::GetLane(hn::MaxOfLanes(df, vmax));
  for (; i < n; ++i) {
    if (softcap > 0.0f) x[i] = softcap * std::tanh(x[i] / softcap);
    m = std::max(m, x[i]);
  }
  return m;
}

float RowExpSum(float* x, int64_t n, float m) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const VF vm = hn::Set(df, m);
  VF sum = hn::Zero(df);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const VF e = hn::Exp(df, hn::Sub(hn::LoadU(df, x + i), vm));
    hn::StoreU(e, df, x + i);
    sum = hn::Add(sum, e);
  }
  float total = hn::GetLane(hn::SumOfLanes(df, sum));
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    total += x[i];
  }
  return total;
}

void RunTask(const TaskArgs& a) {
#if TQATTN_ATTN_WIDE
  if (a.rows <= kSmallRows) {
    run_small(a);
  } else {
    run_block(a);
  }
#else
  run_task_scalar(a);
#endif
}

// Lanes of the packed-index kernels, 0 where this target runs the scalar twin.
int SimdLanes() {
#if TQATTN_ATTN_WIDE
  return static_cast<int>(hn::Lanes(DF()));
#else
  return 0;
#endif
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace tqattn::cpu::attn
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace tqattn::cpu::attn {

HWY_EXPORT(RunTask);
HWY_EXPORT(SimdLanes);
HWY_EXPORT(TargetName);
HWY_EXPORT(RowSoftcapMax);
HWY_EXPORT(RowExpSum);

float row_softcap_max(float* x, int64_t n, float softcap) {
  return HWY_DYNAMIC_DISPATCH(RowSoftcapMax)(x, n, softcap);
}
float row_exp_sum(float* x, int64_t n, float m) { return HWY_DYNAMIC_DISPATCH(RowExpSum)(x, n, m); }

bool simd_available() {
  const int lanes = HWY_DYNAMIC_DISPATCH(SimdLanes)();
  return lanes >= 8 && kRowBlock % (4 * lanes) == 0;
}
void run_task_simd(const TaskArgs& args) { HWY_DYNAMIC_DISPATCH(RunTask)(args); }
const char* simd_target_name() { return HWY_DYNAMIC_DISPATCH(TargetName)(); }

}  // namespace tqattn::cpu::attn
#endif  // HWY_ONCE

#else  // !TQATTN_HAVE_HIGHWAY

namespace tqattn::cpu::attn {
bool simd_available() { return false; }
void run_task_simd(const TaskArgs& args) { run_task_scalar(args); }
const char* simd_target_name() { return "scalar"; }

float row_softcap_max(float* x, int64_t n, float softcap) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (softcap > 0.0f) x[i] = softcap * std::tanh(x[i] / softcap);
    m = std::max(m, x[i]);
  }
  return m;
}
float row_exp_sum(float* x, int64_t n, float m) {
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) total += (x[i] = std::exp(x[i] - m));
  return total;
}
}  // namespace tqattn::cpu::attn

#endif  // TQATTN_HAVE_HIGHWAY
